//! Network faults and hostile connections: shipper → fault-injecting proxy
//! (tests/util/proxy.rs) → receiver, against a real primary under load.
//! The spool must end byte-identical to the primary's WAL, no corrupt byte
//! may ever sit under a final segment name, bad frames are rejected by their
//! checksum, stalled connections are dropped by the idle timeout, and
//! clients that cannot authenticate get nothing written and cannot lock out
//! the real shipper for longer than the handshake timeout. Each test prints
//! its `WALTAIL_SEED=...` (faults, where cuts and flips land, garbage);
//! set that variable to replay a run.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::proxy::Proxy;
use crate::util::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waltail::proto::{Frame, Hello};
use waltail::wal::{scan_segment, Lsn, ScanConfig, SegmentSize, TimelineId};

const SECRET: &str = "test-secret-0123456789abcdef";
const SEG: u64 = 1 << 20;

fn free_addr() -> String {
    format!("127.0.0.1:{}", waltail::pg::cluster::free_port().unwrap())
}

/// GET /metrics; one sample's value (0 when absent).
fn metric(addr: &str, name: &str) -> f64 {
    let (code, text) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{text}");
    sample(&text, name)
}

/// How many lines of a log contain `needle`.
fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Final (complete) segment names in the spool: 24 hex digits, no suffix.
fn final_segments(spool: &Path) -> BTreeSet<String> {
    std::fs::read_dir(spool)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect()
}

/// Checks every final segment in the spool not yet in `verified`: full size,
/// scans as valid WAL to its end, and (once the primary archived its copy)
/// equals the primary's segment byte for byte; those go into `verified`.
fn check_final_segments(spool: &Path, archive: &Path, verified: &mut BTreeSet<String>) {
    let seg_size = SegmentSize::new(SEG).unwrap();
    for name in final_segments(spool) {
        if verified.contains(&name) {
            continue;
        }
        let ours = std::fs::read(spool.join(&name)).unwrap();
        assert_eq!(ours.len() as u64, SEG, "final segment {name} is short");
        let log = u64::from_str_radix(&name[8..16], 16).unwrap();
        let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
        let start = Lsn(log * 0x1_0000_0000 + seg * SEG);
        let s = scan_segment(start, &ours, ScanConfig::new(seg_size));
        assert!(
            s.records > 0 && s.end.kind.is_clean(),
            "final segment {name} does not scan as valid WAL: {} records, {}",
            s.records,
            s.end
        );
        if let Ok(theirs) = std::fs::read(archive.join(&name)) {
            if theirs.len() as u64 == SEG {
                assert!(
                    ours == theirs,
                    "final segment {name} differs from the primary's"
                );
                verified.insert(name);
            }
        }
    }
}

/// A receiver, a proxy in front of it and a shipper through the proxy.
struct Rig {
    w: Workdir,
    c: Cluster,
    spool: std::path::PathBuf,
    secret: std::path::PathBuf,
    rx: Daemon,
    rx_addr: String,
    metrics: String,
    proxy: Proxy,
    tx: Daemon,
}

fn rig(name: &str, seed: u64, rx_flags: &[&str], record_frames: usize) -> Rig {
    let w = Workdir::new();
    let c = archived_cluster(name);
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let metrics = free_addr();
    let mut flags = vec!["--metrics-addr", &metrics];
    flags.extend_from_slice(rx_flags);
    let (rx, rx_addr) = start_receiver(&w, &spool, &secret, &flags);
    let proxy = Proxy::start(&rx_addr, seed);
    proxy.with(|f| f.record_frames = record_frames);
    let tx = start_shipper(&w, &c, &proxy.addr, &secret, &["--interval", "5ms"]);
    Rig {
        w,
        c,
        spool,
        secret,
        rx,
        rx_addr,
        metrics,
        proxy,
        tx,
    }
}

impl Rig {
    /// Faults off: the spool reaches the primary's flush position, then a
    /// switched segment, and equals the primary's WAL byte for byte.
    fn settle(&self, secs: u64) -> usize {
        self.proxy.clear();
        wait_durable(&self.spool, flush_lsn(&self.c), secs, &[&self.rx, &self.tx]);
        assert_spool_matches(&self.spool, &self.c, SEG);
        self.c.psql("select pg_switch_wal()").unwrap();
        self.c
            .psql("select pg_logical_emit_message(true, 'x', 'y')")
            .unwrap();
        wait_durable(&self.spool, flush_lsn(&self.c), secs, &[&self.rx, &self.tx]);
        assert_spool_matches(&self.spool, &self.c, SEG)
    }
}

#[test]
fn random_network_faults_leave_the_spool_identical_and_no_corrupt_final_segment() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let r = rig("netfault-chaos", seed, &["--idle-timeout", "1s"], 0);
    let archive = r.c.archive.clone().unwrap();
    // pgbench writes WAL in the background for as long as the faults run.
    let mut init = r.c.pgbench(&["-i", "-s", "1", "-q"]);
    let mut run = r.c.pgbench(&["-c", "2", "-T", "14", "-n"]);
    let load = std::thread::spawn(move || {
        assert!(init.output().unwrap().status.success(), "pgbench -i");
        let out = run.output().unwrap();
        assert!(
            out.status.success(),
            "pgbench: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    wait_durable(&r.spool, flush_lsn(&r.c), 30, &[&r.rx, &r.tx]);
    let started = Instant::now();
    let mut verified = BTreeSet::new();
    let mut checks = 0u32;
    let counts = r
        .proxy
        .chaos(&mut rng, Duration::from_secs(15), 40, (300, 2000), || {
            check_final_segments(&r.spool, &archive, &mut verified);
            if checks % 5 == 0 {
                assert_partials_hold_only_primary_bytes(&r.spool, &r.c);
            }
            checks += 1;
        });
    eprintln!(
        "faults over {:.1} s: {counts:?}; {checks} spool scans",
        started.elapsed().as_secs_f64()
    );
    load.join().unwrap();
    // Every kind came up and took effect.
    assert!(counts.drops >= 2, "{counts:?}");
    assert!(counts.stalls >= 2, "{counts:?}");
    // (Delays take effect only when traffic passes during them; how many
    // chunks were delayed is in the counts printed above.)
    assert!(counts.delays >= 2, "{counts:?}");
    assert!(counts.cuts >= 1, "{counts:?}");
    assert!(counts.flips >= 1, "{counts:?}");
    // Faults off: the shipper resumes at the durable position and the
    // spool ends identical to the primary's WAL.
    let compared = r.settle(60);
    check_final_segments(&r.spool, &archive, &mut verified);
    assert_eq!(verified.len(), compared, "every final segment checked");
    assert!(compared >= 5, "pgbench made only {compared} segments");
    // Bit flips were caught by the checksum (a flip can also land on a
    // connection another fault already closed, so at most one per
    // connection that carried flips).
    let rxlog = r.rx.log_text();
    // Every new session resumed where the spool's durable data ends.
    assert_eq!(lines_with(&rxlog, "does not continue"), 0, "{rxlog}");
    let rejected = rxlog
        .lines()
        .filter(|l| l.contains("connection closed: ") && l.contains("checksum mismatch"))
        .count();
    assert!(
        rejected >= 1 && rejected as u64 <= counts.flipped_connections,
        "{rejected} checksum rejections for {counts:?}:\n{rxlog}"
    );
    assert!(
        metric(&r.metrics, "waltail_receive_frames_rejected_total") as usize <= rejected,
        "metric counts more than the log"
    );
    // The shipper lost the receiver and came back, again and again.
    let txlog = r.tx.log_text();
    let sessions = lines_with(&txlog, "streaming to");
    assert!(
        sessions >= 3 && lines_with(&txlog, "lost the receiver") >= 2,
        "{sessions} sessions for {counts:?}:\n{txlog}"
    );
}

#[test]
fn flipped_bits_are_rejected_nothing_of_them_is_written_and_the_shipper_recovers() {
    let seed = seed();
    let r = rig("netfault-flip", seed, &[], 0);
    r.c.psql("create table f(i int, pad text)").unwrap();
    wait_durable(&r.spool, flush_lsn(&r.c), 30, &[&r.rx, &r.tx]);
    r.proxy.with(|f| f.flip_every_data = 5);
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut verified = BTreeSet::new();
    let archive = r.c.archive.clone().unwrap();
    while r.proxy.counts().flipped_connections < 4 && Instant::now() < deadline {
        r.c.psql("insert into f select g, repeat('x', 300) from generate_series(1, 800) g")
            .unwrap();
        check_final_segments(&r.spool, &archive, &mut verified);
        // What is durable is the primary's WAL, and what is written at all
        // (synced or not) is too: never a flipped byte.
        if let Some((tli, durable)) = spool_position(&r.spool) {
            assert_partial_matches(&r.spool, &r.c, tli, durable);
        }
        assert_partials_hold_only_primary_bytes(&r.spool, &r.c);
    }
    r.proxy.with(|f| f.flip_every_data = 0);
    let counts = r.proxy.counts();
    assert!(counts.flipped_connections >= 4, "{counts:?}");
    r.settle(30);
    let rxlog = r.rx.log_text();
    // Every new session resumed where the spool's durable data ends.
    assert_eq!(lines_with(&rxlog, "does not continue"), 0, "{rxlog}");
    let rejected = lines_with(&rxlog, "rejected a bad frame, nothing of it written");
    // The first flipped frame of each connection closed it (the shipper
    // may have sent more frames, flipped ones too, before it noticed).
    assert_eq!(
        rejected as u64, counts.flipped_connections,
        "rejections for {counts:?}:\n{rxlog}"
    );
    assert_eq!(
        lines_with(&rxlog, "checksum mismatch"),
        rejected,
        "every rejection is a checksum mismatch"
    );
    assert_eq!(
        metric(&r.metrics, "waltail_receive_frames_rejected_total") as usize,
        rejected
    );
    assert!(
        lines_with(&r.tx.log_text(), "lost the receiver") >= rejected,
        "{}",
        r.tx.log_text()
    );
}

/// The spool's .partial equals pg_wal's segment below the durable position.
fn assert_partial_matches(spool: &Path, c: &Cluster, tli: TimelineId, durable: Lsn) {
    let seg_size = SegmentSize::new(SEG).unwrap();
    let off = durable.segment_offset(seg_size) as usize;
    if off == 0 {
        return;
    }
    let name = waltail::wal::SegmentName::of_lsn(tli, durable, seg_size).file_name(seg_size);
    let (Ok(ours), Ok(theirs)) = (
        std::fs::read(spool.join(format!("{name}.partial"))),
        std::fs::read(c.pg_wal().join(&name)),
    ) else {
        return; // finalized in between
    };
    assert!(
        ours[..off] == theirs[..off],
        "{name}.partial differs from pg_wal below the durable {durable}"
    );
}

/// Every byte of every .partial in the spool, synced or not, is the
/// primary's byte at that place, or still the zero the file was created with.
fn assert_partials_hold_only_primary_bytes(spool: &Path, c: &Cluster) {
    let seg_size = SegmentSize::new(SEG).unwrap();
    let partials: Vec<String> = std::fs::read_dir(spool)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.len() == 32 && n.ends_with(".partial"))
        .collect();
    for p in partials {
        let Ok(ours) = std::fs::read(spool.join(&p)) else {
            continue; // finalized in between
        };
        // Read after ours: nothing in ours lies past this flush position,
        // and pg_wal's bytes below it are final.
        let flush = flush_lsn(c);
        let name = &p[..24];
        let Ok(theirs) = std::fs::read(c.pg_wal().join(name)) else {
            continue;
        };
        let log = u64::from_str_radix(&name[8..16], 16).unwrap();
        let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
        let start = log * 0x1_0000_0000 + seg * SEG;
        let valid = flush.0.saturating_sub(start).min(seg_size.bytes()) as usize;
        if let Some(i) = (0..ours.len()).find(|&i| {
            let b = ours[i];
            b != 0 && (i >= valid || b != theirs[i])
        }) {
            panic!(
                "{p} holds a byte at offset {i:#x} that is not the primary's (primary flushed to {flush})"
            );
        }
    }
}

#[test]
fn a_stalled_connection_is_dropped_by_the_idle_timeout_and_the_shipper_reconnects() {
    let seed = seed();
    let r = rig("netfault-stall", seed, &["--idle-timeout", "1s"], 0);
    r.c.psql("create table s(i int)").unwrap();
    wait_durable(&r.spool, flush_lsn(&r.c), 30, &[&r.rx, &r.tx]);
    assert_eq!(lines_with(&r.tx.log_text(), "streaming to"), 1);
    let stall = Duration::from_secs(3);
    let t0 = Instant::now();
    r.proxy.stall(stall);
    // Written during the stall: it cannot arrive before the stall ends.
    r.c.psql("insert into s select generate_series(1, 1000)")
        .unwrap();
    let target = flush_lsn(&r.c);
    // The receiver gives up on the silent connection during the stall.
    r.rx.wait_log(&["no frame for 1s: closing an idle connection"], 3);
    assert!(
        t0.elapsed() < stall,
        "idle timeout fired only after the stall"
    );
    assert!(spool_position(&r.spool).unwrap().1 < target);
    // When the stall ends the shipper learns the connection is gone,
    // reconnects and resumes at the durable position.
    wait_durable(&r.spool, target, 15, &[&r.rx, &r.tx]);
    let took = t0.elapsed();
    assert!(took >= stall, "data arrived during the stall");
    assert!(
        took < stall + Duration::from_secs(6),
        "shipper took {took:?} to come back after a {stall:?} stall"
    );
    assert_eq!(lines_with(&r.tx.log_text(), "streaming to"), 2);
    assert_eq!(r.proxy.counts().stalls, 1);
    r.settle(30);
}

#[test]
fn a_link_that_dies_silently_is_given_up_after_the_ack_timeout() {
    let seed = seed();
    // The receiver's idle timeout stays at its 30 s default: only the
    // shipper's ack timeout can notice the dead link in time.
    let mut r = rig("netfault-silent", seed, &[], 0);
    r.tx.kill9();
    r.tx = start_shipper(
        &r.w,
        &r.c,
        &r.proxy.addr,
        &r.secret,
        &["--interval", "5ms", "--ack-timeout", "1s"],
    );
    r.c.psql("create table q(i int)").unwrap();
    wait_durable(&r.spool, flush_lsn(&r.c), 30, &[&r.rx, &r.tx]);
    let stall = Duration::from_secs(4);
    let t0 = Instant::now();
    r.proxy.stall(stall);
    r.c.psql("insert into q select generate_series(1, 1000)")
        .unwrap();
    let target = flush_lsn(&r.c);
    r.tx.wait_log(&["no ack for 1s"], 4);
    assert!(
        t0.elapsed() < stall,
        "the shipper noticed the dead link only after it came back"
    );
    wait_durable(&r.spool, target, 30, &[&r.rx, &r.tx]);
    r.settle(30);
}

/// Reads from `s` until EOF, an error or `d`; whether the peer closed, and
/// what it sent.
async fn closed_within(s: &mut tokio::net::TcpStream, d: Duration) -> (bool, Vec<u8>) {
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + d;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Err(_) => return (false, got),
            Ok(Ok(0)) | Ok(Err(_)) => return (true, got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn frames_in(bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Ok(Some((f, n))) = Frame::parse(&bytes[at..], 1 << 20) {
        out.push(f);
        at += n;
    }
    out
}

#[test]
fn hostile_connections_get_nothing_written_and_cannot_lock_out_the_shipper() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mut r = rig(
        "netfault-hostile",
        seed,
        &["--max-connections", "3", "--idle-timeout", "2s"],
        3,
    );
    r.c.psql("create table h(i int); insert into h select generate_series(1, 100)")
        .unwrap();
    wait_durable(&r.spool, flush_lsn(&r.c), 30, &[&r.rx, &r.tx]);
    // The real shipper's handshake, as recorded by the proxy.
    let rec = r.proxy.with(|f| f.recorded[0].clone());
    assert_eq!(rec.len(), 3, "ClientHello, ClientProof, Hello");
    assert!(matches!(
        frames_in(&rec[0])[..],
        [Frame::ClientHello { .. }]
    ));
    assert!(matches!(
        frames_in(&rec[1])[..],
        [Frame::ClientProof { .. }]
    ));
    assert!(matches!(frames_in(&rec[2])[..], [Frame::Hello(_)]));
    let sysid = match frames_in(&rec[2])[0] {
        Frame::Hello(h) => h.sysid,
        _ => unreachable!(),
    };
    let before = (spool_position(&r.spool), final_segments(&r.spool));
    let auth0 = metric(&r.metrics, "waltail_receive_auth_failures_total");
    let addr = r.rx_addr.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let connect = || tokio::net::TcpStream::connect(addr.as_str());
        // Garbage (seeded), framed with a wrong checksum or with a length
        // over the maximum: closed at once, nothing sent back.
        for prefix in [200u32, u32::MAX] {
            let mut garbage = prefix.to_le_bytes().to_vec();
            garbage.extend((0..204).map(|_| rng.below(256) as u8));
            let mut s = connect().await.unwrap();
            s.write_all(&garbage).await.unwrap();
            let (closed, got) = closed_within(&mut s, Duration::from_secs(3)).await;
            assert!(closed, "garbage ({prefix}) left the connection open");
            assert!(frames_in(&got).is_empty(), "{:?}", frames_in(&got));
        }
        // Let the refused connections' slots free (--max-connections 3), so
        // the next client is refused for what it sends, not for a full house.
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A valid Hello without authentication.
        let mut hello = Vec::new();
        Frame::Hello(Hello {
            sysid,
            tli: TimelineId(1),
            seg_size: SEG as u32,
            pg_version: 150000,
            flush: Lsn(0x900_0000),
        })
        .encode(&mut hello);
        let mut s = connect().await.unwrap();
        s.write_all(&hello).await.unwrap();
        let (closed, got) = closed_within(&mut s, Duration::from_secs(3)).await;
        assert!(closed, "an unauthenticated Hello left the connection open");
        assert!(frames_in(&got).is_empty(), "{:?}", frames_in(&got));
        // The recorded handshake replayed: the receiver's new nonce makes the
        // recorded proof wrong.
        tokio::time::sleep(Duration::from_millis(300)).await;
        // (The refused clients' slots free as their tasks end: a connection
        // made before that is closed at once, so retry a little.)
        let mut buf = vec![0u8; 4 + 1 + 2 + 64 + 4];
        let mut tries = 0;
        let mut s = loop {
            tries += 1;
            let mut s = connect().await.unwrap();
            let got = match s.write_all(&rec[0]).await {
                Ok(()) => tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut buf))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|r| r),
                Err(e) => Err(e),
            };
            match got {
                Ok(_) => break s,
                Err(e) if tries < 20 => {
                    eprintln!("replay connection {tries}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("no ServerChallenge after {tries} connections: {e}"),
            }
        };
        assert!(matches!(
            frames_in(&buf)[..],
            [Frame::ServerChallenge { .. }]
        ));
        s.write_all(&rec[1]).await.unwrap();
        let _ = s.write_all(&rec[2]).await;
        let (closed, got) = closed_within(&mut s, Duration::from_secs(3)).await;
        assert!(closed, "a replayed handshake left the connection open");
        match &frames_in(&got)[..] {
            [Frame::Refuse { code, reason }] => {
                assert_eq!(*code, waltail::proto::RefuseCode::Auth);
                assert!(reason.contains("authentication failed"));
            }
            other => panic!("replayed handshake got {other:?}"),
        }
    });
    r.rx.wait_log(
        &[
            "expected ClientHello, got Hello",
            "the shipper's proof does not match the shared secret",
        ],
        5,
    );
    assert!(metric(&r.metrics, "waltail_receive_auth_failures_total") >= auth0 + 3.0);
    // Slots: with the shipper gone, silent clients take all three.
    r.tx.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let silent: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(&r.rx_addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // One more is closed at once: the receiver is full, not stuck.
    rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(r.rx_addr.as_str())
            .await
            .unwrap();
        let (closed, _) = closed_within(&mut s, Duration::from_secs(2)).await;
        assert!(closed, "a connection over --max-connections was kept open");
    });
    r.rx.wait_log(&["refused: 3 connections already open"], 5);
    // Nothing any refused client sent reached the spool.
    assert_eq!((spool_position(&r.spool), final_segments(&r.spool)), before);
    // A new shipper is turned away until the silent clients time out
    // (HANDSHAKE_TIMEOUT, 10 s per step), then gets through.
    r.c.psql("insert into h select generate_series(1, 1000)")
        .unwrap();
    let target = flush_lsn(&r.c);
    r.tx = start_shipper(&r.w, &r.c, &r.proxy.addr, &r.secret, &["--interval", "5ms"]);
    assert!(metric(&r.metrics, "waltail_receive_connected") == 0.0);
    wait_durable(&r.spool, target, 25, &[&r.rx, &r.tx]);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(9),
        "the shipper got in after {took:?}, before the silent clients timed out"
    );
    assert!(
        lines_with(&r.tx.log_text(), "receiver unreachable") >= 1,
        "{}",
        r.tx.log_text()
    );
    assert!(
        lines_with(&r.rx.log_text(), "timed out waiting for ClientHello") >= 3,
        "{}",
        r.rx.log_text()
    );
    // The receiver closed each silent client.
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a silent client is still connected: {other:?}"),
        }
    }
    r.settle(30);
}
