//! `waltail ship` and `waltail receive` against real servers: the spool is
//! byte-identical to the primary's WAL (its archive_command copies are the
//! ground truth) under load, through kills, switches and timeline changes.

use crate::util::*;

const SECRET: &str = "test-secret-0123456789abcdef";
const SEG: u64 = 1 << 20;

#[test]
fn spool_is_byte_identical_to_the_primary_under_pgbench() {
    let w = Workdir::new();
    let c = archived_cluster("stream-pgbench");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let tx = start_shipper(&w, &c, &addr, &secret, &["--interval", "5ms"]);
    pgbench(&c, &["-i", "-s", "2", "-q"]);
    pgbench(&c, &["-c", "4", "-T", "4", "-n"]);
    let flush = flush_lsn(&c);
    wait_durable(&spool, flush, 60, &[&rx, &tx]);
    // The .partial below the acked position is already exact; then finish the segment.
    assert_spool_matches(&spool, &c, SEG);
    c.psql("select pg_switch_wal()").unwrap();
    c.psql("select pg_logical_emit_message(true, 'x', 'y')")
        .unwrap();
    wait_durable(&spool, flush_lsn(&c), 60, &[&rx, &tx]);
    let n = assert_spool_matches(&spool, &c, SEG);
    assert!(n >= 10, "pgbench made {n} segments");
    rx.wait_log(&["shipper admitted"], 10);
}

#[test]
fn pg_switch_wal_on_an_idle_server_completes_the_segment_with_its_padding() {
    let w = Workdir::new();
    let c = archived_cluster("stream-switch");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let tx = start_shipper(&w, &c, &addr, &secret, &[]);
    c.psql("create table t(i int); insert into t values (1)")
        .unwrap();
    let before = flush_lsn(&c);
    wait_durable(&spool, before, 30, &[&rx, &tx]);
    let seg = c
        .psql("select pg_walfile_name(pg_current_wal_flush_lsn())")
        .unwrap();
    c.psql("select pg_switch_wal()").unwrap();
    // Flush now sits exactly on the segment boundary: the quirk case.
    let after = flush_lsn(&c);
    assert_eq!(after.0 % SEG, 0, "idle switch ends on a boundary");
    // What pg_walfile_name_offset says of a boundary changed in 17; the
    // shipper's cross-check knows both.
    let row = c
        .psql(&format!(
            "select file_name, file_offset from pg_walfile_name_offset('{after}')"
        ))
        .unwrap();
    let (name, off) = row.split_once('|').unwrap();
    let fp = waltail::pg::client::FlushPoint {
        lsn: after,
        file_name: name.to_string(),
        file_offset: off.parse().unwrap(),
    };
    let seg_size = waltail::wal::SegmentSize::new(SEG).unwrap();
    assert!(
        waltail::ship::check_name_quirk(&fp, seg_size, c.bin.major),
        "PostgreSQL {}: pg_walfile_name_offset('{after}') = {row}",
        c.bin.major
    );
    assert_eq!(off, "0");
    assert_eq!(name == seg, c.bin.major < 17, "{row} after {seg}");
    wait_durable(&spool, after, 30, &[&rx, &tx]);
    let ours = wait_file(&spool.join(&seg), 10);
    let theirs = wait_file(&c.archive.clone().unwrap().join(&seg), 30);
    assert!(ours == theirs, "switched segment {seg} differs");
    assert!(!spool.join(format!("{seg}.partial")).exists());
    assert!(
        !tx.log_text().contains("names an unexpected segment"),
        "{}",
        tx.log_text()
    );
}

/// A switch in a 64 MB segment with the smallest wal_buffers: the padding
/// goes out through the buffers a few pages at a time, and the flush
/// position walks through zero pages before the segment is complete. The
/// shipper waits there (it once stopped, taking the zeros for a recycled
/// file) and the spool ends up identical to the archive.
#[test]
fn switches_in_64mb_segments_are_shipped_while_their_padding_is_flushed() {
    const SEG64: u64 = 64 << 20;
    let w = Workdir::new();
    let c = cluster(
        "stream-switch64",
        ClusterOptions {
            wal_segsize_mb: 64,
            archive: true,
            settings: vec![("wal_buffers".into(), "32kB".into())],
            ..Default::default()
        },
    );
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let mut tx = start_shipper(&w, &c, &addr, &secret, &["--interval", "1ms"]);
    c.psql("create table t(i int)").unwrap();
    for _ in 0..4 {
        c.psql("insert into t select generate_series(1, 500)")
            .unwrap();
        c.psql("select pg_switch_wal()").unwrap();
        assert!(tx.running(), "shipper stopped:\n{}", tx.log_text());
    }
    c.psql("insert into t values (0)").unwrap();
    wait_durable(&spool, flush_lsn(&c), 60, &[&rx, &tx]);
    assert!(tx.running(), "shipper stopped:\n{}", tx.log_text());
    let n = assert_spool_matches(&spool, &c, SEG64);
    assert!(n >= 3, "{n} complete segments");
}

#[test]
fn kills_of_ship_and_receive_mid_segment_lose_and_duplicate_nothing() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let w = Workdir::new();
    let c = archived_cluster("stream-kill");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (mut rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let port = addr.rsplit(':').next().unwrap().to_string();
    let mut tx = start_shipper(&w, &c, &addr, &secret, &["--interval", "2ms"]);
    c.psql("create table k(i int, pad text)").unwrap();
    for round in 0..6 {
        // Load in the background while a process dies.
        let conn = c.conninfo();
        let bin = c.bin.tool("psql");
        let load = std::thread::spawn(move || {
            std::process::Command::new(bin)
                .args(["-X", "-q", "-d", &conn, "-c"])
                .arg("insert into k select g, repeat('x', 200) from generate_series(1, 3000) g")
                .status()
                .unwrap()
        });
        std::thread::sleep(std::time::Duration::from_millis(rng.below(150)));
        if rng.below(2) == 0 {
            tx.kill9();
            tx = start_shipper(&w, &c, &addr, &secret, &["--interval", "2ms"]);
        } else {
            rx.kill9();
            let (r, _) = start_receiver_on(&w, &spool, &secret, &port);
            rx = r;
        }
        assert!(load.join().unwrap().success(), "round {round}");
    }
    let flush = flush_lsn(&c);
    wait_durable(&spool, flush, 60, &[&rx, &tx]);
    assert_spool_matches(&spool, &c, SEG);
    c.psql("select pg_switch_wal()").unwrap();
    wait_durable(&spool, flush_lsn(&c), 60, &[&rx, &tx]);
    assert!(assert_spool_matches(&spool, &c, SEG) >= 2);
}

#[test]
fn a_timeline_switch_ships_the_history_file_and_the_new_timeline() {
    let w = Workdir::new();
    let mut c = archived_cluster("stream-tli");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let tx = start_shipper(&w, &c, &addr, &secret, &["--interval", "5ms"]);
    c.psql("create table t(i int); insert into t select generate_series(1, 1000)")
        .unwrap();
    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);
    // Archive recovery on the same data directory ends on a new timeline.
    c.stop().unwrap();
    c.touch("recovery.signal").unwrap();
    c.append_conf("restore_command = 'false'\n").unwrap();
    c.start().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while c.psql("select pg_is_in_recovery()").unwrap() != "f" {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let tli2 = c
        .psql("select substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
        .unwrap();
    assert_eq!(tli2, "00000002");
    c.psql("insert into t select generate_series(1, 1000)")
        .unwrap();
    c.psql("select pg_switch_wal()").unwrap();
    c.psql("insert into t values (0)").unwrap();
    let flush = flush_lsn(&c);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while spool_position(&spool).map(|p| p.0 .0) != Some(2)
        || spool_position(&spool).unwrap().1 < flush
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no timeline 2 in spool: {:?}\n{}\n{}",
            spool_position(&spool),
            tx.log_text(),
            rx.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let history = std::fs::read(spool.join("00000002.history")).unwrap();
    assert_eq!(
        history,
        std::fs::read(c.pg_wal().join("00000002.history")).unwrap()
    );
    assert!(assert_spool_matches(&spool, &c, SEG) >= 1);
    // The two timelines are kept apart: the switch segment exists once per
    // timeline, and no file holds a page of a later timeline than its name.
    let mut per_tli = std::collections::BTreeMap::<String, usize>::new();
    for e in std::fs::read_dir(&spool).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let base = name.trim_end_matches(".partial");
        if base.len() != 24 || !base.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let file_tli = u32::from_str_radix(&base[..8], 16).unwrap();
        *per_tli.entry(base[8..].to_string()).or_default() += 1;
        let bytes = std::fs::read(e.path()).unwrap();
        for page in bytes.chunks(8192) {
            let magic = u16::from_le_bytes([page[0], page[1]]);
            if magic == 0 {
                continue;
            }
            let page_tli = u32::from_le_bytes(page[4..8].try_into().unwrap());
            assert!(
                page_tli <= file_tli,
                "{name} holds a page of timeline {page_tli}"
            );
        }
    }
    assert!(
        per_tli.values().any(|&n| n == 2),
        "no segment kept on both timelines: {per_tli:?}"
    );
    tx.wait_log(&["timeline switch"], 10);
    assert!(
        tx.log_text().contains("primary reachable again")
            || tx.log_text().contains("lost the primary")
    );
}

#[test]
fn a_wrong_secret_is_refused_and_nothing_is_written() {
    let w = Workdir::new();
    let c = small_cluster("stream-secret");
    let good = w.secret("good", SECRET);
    let bad = w.secret("bad", "some-other-secret-entirely");
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &good, &[]);
    let mut tx = start_shipper(&w, &c, &addr, &bad, &[]);
    // Exit 3: refused for good, which the systemd unit does not restart.
    assert_eq!(
        tx.wait_exit(30),
        Some(3),
        "shipper with a wrong secret exits 3"
    );
    assert!(
        tx.log_text().contains("authentication failed"),
        "{}",
        tx.log_text()
    );
    rx.wait_log(&["refused"], 10);
    assert!(!spool.join("spool.json").exists());
    assert!(spool_position(&spool).is_none());
    // No secret at all is refused too.
    let mut tx = Daemon::start(
        "ship",
        &[
            "ship",
            "--primary",
            &c.conninfo(),
            "--receiver",
            &addr,
            "--insecure-no-auth",
        ]
        .map(String::from),
        w.path("ship-noauth.log"),
    );
    assert_eq!(tx.wait_exit(30), Some(3));
    assert!(tx.log_text().contains("AUTHENTICATION IS OFF"));
    assert!(spool_position(&spool).is_none());
}

#[test]
fn a_second_cluster_aimed_at_the_same_spool_is_refused() {
    let w = Workdir::new();
    let a = small_cluster("stream-first");
    let b = small_cluster("stream-second");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let mut ta = start_shipper(&w, &a, &addr, &secret, &[]);
    a.psql("create table t(i int)").unwrap();
    wait_durable(&spool, flush_lsn(&a), 30, &[&rx, &ta]);
    ta.terminate();
    // The receiver is done with the first shipper once it is back to waiting.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while waltail::spool::Spool::open(&spool)
        .unwrap()
        .status()
        .map(|s| s.state)
        != Some(waltail::spool::ReceiverState::Waiting)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "receiver still streaming"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = spool_position(&spool);
    let listing = |p: &std::path::Path| {
        let mut v: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            // status.json and its temp file change as the receiver reports.
            .filter(|n| n != "status.json" && !n.to_string_lossy().starts_with('.'))
            .collect();
        v.sort();
        v
    };
    let files = listing(&spool);
    let mut tb = start_shipper(&w, &b, &addr, &secret, &[]);
    assert_eq!(tb.wait_exit(30), Some(3), "{}", tb.log_text());
    assert!(
        tb.log_text()
            .contains("belongs to the cluster with system identifier"),
        "{}",
        tb.log_text()
    );
    assert_eq!(spool_position(&spool), before);
    assert_eq!(listing(&spool), files);
}

#[test]
fn the_slot_keeps_wal_until_it_has_been_shipped() {
    let w = Workdir::new();
    let c = archived_cluster("stream-slot");
    c.psql("alter system set max_wal_size = '4MB'").unwrap();
    c.psql("alter system set min_wal_size = '2MB'").unwrap();
    c.psql("select pg_reload_conf()").unwrap();
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (mut rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let port = addr.rsplit(':').next().unwrap().to_string();
    let tx = start_shipper(&w, &c, &addr, &secret, &[]);
    c.psql("create table s(i int, pad text)").unwrap();
    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);
    let (_, stalled_at) = spool_position(&spool).unwrap();
    rx.kill9();
    // Much more WAL than max_wal_size, with checkpoints that would recycle it.
    for _ in 0..8 {
        c.psql("insert into s select g, repeat('p', 500) from generate_series(1, 2000) g")
            .unwrap();
        c.psql("checkpoint").unwrap();
    }
    let restart: waltail::wal::Lsn = c
        .psql("select restart_lsn from pg_replication_slots where slot_name = 'waltail'")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        restart <= stalled_at,
        "slot moved past what was shipped: {restart} > {stalled_at}"
    );
    let first_needed = c
        .psql(&format!("select pg_walfile_name('{stalled_at}')"))
        .unwrap();
    assert!(
        c.pg_wal().join(&first_needed).exists(),
        "{first_needed} was recycled"
    );
    let (rx, _) = start_receiver_on(&w, &spool, &secret, &port);
    c.psql("select pg_switch_wal()").unwrap();
    wait_durable(&spool, flush_lsn(&c), 60, &[&rx, &tx]);
    assert!(assert_spool_matches(&spool, &c, SEG) >= 8);
    // And once shipped, the slot lets go.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r: waltail::wal::Lsn = c
            .psql("select restart_lsn from pg_replication_slots where slot_name = 'waltail'")
            .unwrap()
            .parse()
            .unwrap();
        if r > stalled_at {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot never advanced");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A CA and a certificate for 127.0.0.1 signed by it, as PEM files.
pub fn make_tls(
    w: &Workdir,
    prefix: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL (libpq's verify-full) takes a leaf whose
    // subject equals its issuer for a self-signed certificate.
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("waltail test CA {prefix}"),
    );
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "waltail test server");
    let cert = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    let (ca_p, cert_p, key_p) = (
        w.path(&format!("{prefix}ca.pem")),
        w.path(&format!("{prefix}cert.pem")),
        w.path(&format!("{prefix}key.pem")),
    );
    std::fs::write(&ca_p, ca.pem()).unwrap();
    std::fs::write(&cert_p, cert.pem()).unwrap();
    std::fs::write(&key_p, key.serialize_pem()).unwrap();
    if let Some(r) = waltail::pg::cluster::RunAs::for_servers().unwrap() {
        for p in [&ca_p, &cert_p, &key_p] {
            r.chown(p).unwrap();
        }
    }
    (ca_p, cert_p, key_p)
}

#[test]
fn tls_streams_when_the_receiver_is_verified_and_not_otherwise() {
    let w = Workdir::new();
    let c = small_cluster("stream-tls");
    let secret = w.secret("secret", SECRET);
    let (ca, cert, key) = make_tls(&w, "good-");
    let (other_ca, _, _) = make_tls(&w, "other-");
    // A shipper that trusts another CA gets nowhere.
    let spool_bad = w.path("spool-bad");
    let (rx_bad, addr_bad) = start_receiver(
        &w,
        &spool_bad,
        &secret,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let mut tx_bad = start_shipper(
        &w,
        &c,
        &addr_bad,
        &secret,
        &["--tls-ca", other_ca.to_str().unwrap()],
    );
    // A certificate that cannot be accepted is a setting to fix: exit 2.
    assert_eq!(tx_bad.wait_exit(30), Some(2), "{}", tx_bad.log_text());
    assert!(spool_position(&spool_bad).is_none());
    assert!(
        tx_bad.log_text().to_lowercase().contains("certificate"),
        "{}",
        tx_bad.log_text()
    );
    drop((rx_bad, tx_bad));
    // With the right CA, WAL flows over TLS.
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(
        &w,
        &spool,
        &secret,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let tx = start_shipper(&w, &c, &addr, &secret, &["--tls-ca", ca.to_str().unwrap()]);
    c.psql("create table t(i int); insert into t select generate_series(1, 5000)")
        .unwrap();
    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);
}

#[test]
fn a_fenced_spool_stops_the_shipper_for_good_with_exit_3_until_it_is_reset() {
    let w = Workdir::new();
    let c = small_cluster("stream-fenced");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let mut tx = start_shipper(&w, &c, &addr, &secret, &["--interval", "2ms"]);
    c.psql("create table t(i int)").unwrap();
    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);
    // A failover fences the spool while the shipper streams.
    std::fs::write(spool.join("FENCED"), "fenced by the test\n").unwrap();
    let before = spool_position(&spool);
    c.psql("insert into t values (1)").unwrap();
    // Exit 3: refused for good, which the systemd unit does not restart.
    assert_eq!(tx.wait_exit(30), Some(3), "{}", tx.log_text());
    assert!(
        tx.log_text().contains("fenced") && tx.log_text().contains("waltail rejoin"),
        "{}",
        tx.log_text()
    );
    assert_eq!(spool_position(&spool), before, "WAL taken after the fence");
    // A new shipper is refused at once, the same way.
    let mut again = start_shipper(&w, &c, &addr, &secret, &[]);
    assert_eq!(again.wait_exit(30), Some(3), "{}", again.log_text());
    assert_eq!(spool_position(&spool), before);
    // `spool reset` is refused while the receiver runs, then archives the
    // old spool; a new primary (another cluster: the roles swapped) streams.
    let s = spool.to_str().unwrap();
    let out = waltail(&["spool", "reset", "--spool", s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop it first"));
    drop(rx);
    let out = waltail(&["spool", "reset", "--spool", s, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let archived = std::path::PathBuf::from(r["archived_to"].as_str().unwrap());
    assert!(archived.starts_with(&spool) && archived.join("FENCED").exists());
    assert!(archived.join("spool.json").exists() && !spool.join("spool.json").exists());
    let b = small_cluster("stream-fenced-next");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let tx = start_shipper(&w, &b, &addr, &secret, &[]);
    b.psql("create table t(i int)").unwrap();
    wait_durable(&spool, flush_lsn(&b), 30, &[&rx, &tx]);
    let out = waltail(&["spool", "reset", "--spool", s]);
    assert_eq!(out.status.code(), Some(1), "a live spool is never reset");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not fenced"));
}
