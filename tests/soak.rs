//! The soak: faults of every kind at random, for a long time, under load.
//!
//! `cargo test --features failpoints --test integration soak -- --nocapture`
//! runs it for 20 s (part of the suite); `WALTAIL_SOAK_SECS=1800` for the
//! half-hour run. Each round writes WAL with pgbench on the primary and
//! injects one fault, chosen by the seeded RNG (`WALTAIL_SEED` replays):
//! SIGKILL of the shipper or the receiver, a stalled shipper (SIGSTOP for up
//! to 2 s), a crash of the primary (SIGKILL of every server process, then
//! crash recovery), a network fault on the link (the shipper talks to the
//! receiver through the fault-injecting proxy of `tests/util/proxy.rs`: all
//! connections dropped, a stall of up to 1.5 s, a Data frame cut in half or
//! with a bit flipped), or none; the receiver also runs with failpoints that
//! make some fsyncs fail and lose what they should have made durable, and
//! drop every write of its position file that is not fsynced (so each kill
//! of the receiver is a power loss for its position).
//! Throughout, the durable position must never go back; at the end, once
//! the faults stop, the spool must be byte-identical to the primary's
//! archive, and every byte acknowledged at any point must still be there:
//! the acknowledged WAL lost is counted, and must be 0.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::util::*;
use nix::sys::signal::{kill, Signal};
use waltail::wal::Lsn;

const SECRET: &str = "test-secret-0123456789abcdef";
const SEG: u64 = 1 << 20;

fn pid(d: &Daemon) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(d.child.id() as i32)
}

#[test]
fn soak_random_faults_under_load_lose_no_acknowledged_wal() {
    let secs: u64 = std::env::var("WALTAIL_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed = seed();
    let mut rng = Rng::new(seed);
    let w = Workdir::new();
    let mut c = archived_cluster("soak");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    // Some fsyncs fail; and every position write that is not fsynced is
    // lost, so each SIGKILL of the receiver is a power loss for it.
    let sync_faults = if cfg!(feature = "failpoints") {
        "spool-sync=1%return;spool-position-unsynced-lost=return"
    } else {
        ""
    };
    let env = [("FAILPOINTS", sync_faults)];
    let (mut rx, addr) = start_receiver_env(&w, &spool, &secret, &[], &env);
    let port = addr.rsplit(':').next().unwrap().to_string();
    let proxy = crate::util::proxy::Proxy::start(&addr, seed);
    let ship_args = ["--interval", "2ms"];
    let mut tx = start_shipper(&w, &c, &proxy.addr, &secret, &ship_args);
    let init = c.pgbench(&["-i", "-s", "2", "-q"]).output().unwrap();
    assert!(init.status.success(), "pgbench -i failed");

    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);
    // The spool starts at the beginning of its oldest segment.
    let size = waltail::wal::SegmentSize::new(SEG).unwrap();
    let start = std::fs::read_dir(&spool)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            match waltail::wal::WalFileName::parse(&n, size) {
                Ok(waltail::wal::WalFileName::Segment(s))
                | Ok(waltail::wal::WalFileName::Partial(s)) => Some(s.start_lsn(size)),
                _ => None,
            }
        })
        .min()
        .expect("the spool holds a segment");
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let mut high = Lsn(0);
    let mut rounds = 0u64;
    let mut old_logs = String::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) && rounds < 100_000 {
        rounds += 1;
        let mut load = c
            .pgbench(&["-c", "2", "-T", "2", "-n"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100 + rng.below(900)));
        let kind = match rng.below(14) {
            0..=2 => {
                tx.kill9();
                old_logs.push_str(&tx.log_text());
                tx = start_shipper(&w, &c, &proxy.addr, &secret, &ship_args);
                "kill ship"
            }
            3..=5 => {
                rx.kill9();
                old_logs.push_str(&rx.log_text());
                rx =
                    start_receiver_at(&w, &spool, &secret, &format!("127.0.0.1:{port}"), &[], &env);
                "kill receive"
            }
            6 => {
                kill(pid(&tx), Signal::SIGSTOP).unwrap();
                std::thread::sleep(Duration::from_millis(rng.below(2000)));
                kill(pid(&tx), Signal::SIGCONT).unwrap();
                "stall ship"
            }
            7 => {
                c.kill();
                let _ = load.kill();
                c.start().unwrap();
                "crash primary"
            }
            8 => {
                proxy.drop_all();
                "net drop"
            }
            9 => {
                proxy.stall(Duration::from_millis(300 + rng.below(1200)));
                "net stall"
            }
            10 => {
                proxy.with(|f| f.cut_next_streaming += 1);
                "net cut frame"
            }
            11 => {
                proxy.with(|f| f.flip_next_streaming += 1);
                "net flip bit"
            }
            _ => "none",
        };
        *faults.entry(kind).or_default() += 1;
        let _ = load.wait();
        if let Some((_, l)) = spool_position(&spool) {
            assert!(
                l >= high,
                "durable went back from {high} to {l} (seed {seed})"
            );
            high = l;
        }
    }
    // Faults off: everything flushed must arrive, identical to the archive.
    proxy.clear();
    c.psql("select pg_switch_wal()").unwrap();
    let end = flush_lsn(&c);
    wait_durable(&spool, end, 120, &[&rx, &tx]);
    let compared = assert_spool_matches(&spool, &c, SEG);
    // Every byte acknowledged during the run is still in the spool: the
    // spool equals the archive up to its durable position, which is past
    // the highest position ever acknowledged.
    let (_, durable) = spool_position(&spool).unwrap();
    assert!(durable >= high);
    let lost = acknowledged_bytes_lost(&spool, &c, start, high);
    assert_eq!(lost, 0, "acknowledged WAL lost (seed {seed})");
    let logs = format!("{old_logs}{}{}", rx.log_text(), tx.log_text());
    let sync_failures = logs
        .lines()
        .filter(|l| l.contains("Input/output error"))
        .count();
    let rejected_reconnects = logs
        .lines()
        .filter(|l| l.contains("resuming at its durable position"))
        .count();
    eprintln!(
        "SOAK {}",
        serde_json::json!({
            "seconds": t0.elapsed().as_secs(),
            "seed": seed,
            "rounds": rounds,
            "faults": faults,
            "proxy": {
                "connections": proxy.counts().connections,
                "dropped_connections": proxy.counts().dropped_connections,
                "stalls": proxy.counts().stalls,
                "cut_frames": proxy.counts().cuts,
                "flipped_frames": proxy.counts().flips,
            },
            "fsync_failures_injected": sync_failures,
            "shipper_reconnects_after_receiver_loss": rejected_reconnects,
            "wal_acknowledged_bytes": high.bytes_since(start).unwrap_or(0),
            "final_durable_lsn": durable.to_string(),
            "segments_compared_with_archive": compared,
            "acknowledged_wal_lost_bytes": lost,
        })
    );
    assert!(rounds >= 3, "only {rounds} rounds ran");
}

/// Bytes in `[start, high)` the spool does not hold exactly as the primary
/// wrote them (the archive's copy of complete segments, pg_wal for the rest).
fn acknowledged_bytes_lost(spool: &std::path::Path, c: &Cluster, start: Lsn, high: Lsn) -> u64 {
    let size = waltail::wal::SegmentSize::new(SEG).unwrap();
    let tli = waltail::wal::TimelineId(1);
    let mut lost = 0u64;
    let mut at = start;
    while at < high {
        let seg = waltail::wal::SegmentName::of_lsn(tli, at, size);
        let name = seg.file_name(size);
        let upto = high.min(seg.end_lsn(size));
        let (a, b) = (
            at.segment_offset(size) as usize,
            (upto.0 - seg.start_lsn(size).0) as usize,
        );
        let ours = std::fs::read(spool.join(&name))
            .or_else(|_| std::fs::read(spool.join(format!("{name}.partial"))))
            .unwrap_or_default();
        let theirs = std::fs::read(c.archive.as_ref().unwrap().join(&name))
            .or_else(|_| std::fs::read(c.pg_wal().join(&name)))
            .unwrap_or_default();
        let (o, t) = (ours.get(a..b), theirs.get(a..b));
        if o.is_none() || o != t {
            lost += (a..b)
                .filter(|&i| ours.get(i).is_none() || ours.get(i) != theirs.get(i))
                .count() as u64;
        }
        at = upto;
    }
    lost
}
