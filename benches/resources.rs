//! Resident memory and CPU of `waltail ship` and `waltail receive`.
//!
//!     cargo bench --bench resources
//!
//! Starts a throwaway primary (64 MB segments unless WALTAIL_BENCH_SEGSIZE_MB
//! says otherwise), runs the release binaries of receive and ship as real
//! daemons, drives pgbench for 20 s while sampling their RSS every 100 ms,
//! then leaves them idle for 20 s and reads the CPU time they used.
//! Targets: RSS under 32 MB each; idle polling at 10 ms under 2% of one core.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use waltail::pg::cluster::RunAs;
use waltail::pg::process::{cpu_seconds, rss_mb, start_pair};
use waltail::pg::{Cluster, ClusterOptions};

fn main() {
    let seg_mb: u32 = std::env::var("WALTAIL_BENCH_SEGSIZE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let exe = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/waltail");
    let st = Command::new("cargo")
        .args(["build", "--release", "--bin", "waltail"])
        .status()
        .unwrap();
    assert!(st.success());
    let mut c = Cluster::init(
        "bench-res",
        &ClusterOptions {
            wal_segsize_mb: seg_mb,
            ..Default::default()
        },
    )
    .unwrap();
    c.start().unwrap();
    let run_as = RunAs::for_servers().unwrap();
    let work = tempfile::tempdir().unwrap();
    if let Some(r) = run_as {
        r.chown(work.path()).unwrap();
    }
    let pair = start_pair(
        &exe,
        &c.conninfo(),
        work.path(),
        Duration::from_millis(10),
        run_as,
    )
    .unwrap();
    let (mut rx, mut tx) = (pair.receive, pair.ship);
    let pgbench = |args: &[&str]| {
        c.pgbench(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    assert!(pgbench(&["-i", "-s", "10", "-q"]).wait().unwrap().success());
    let mut load = pgbench(&["-c", "4", "-T", "20", "-n"]);
    let (mut max_tx, mut max_rx) = (0, 0);
    let t0 = Instant::now();
    while load.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(60) {
        max_tx = max_tx.max((rss_mb(tx.id()) * 1024.0) as u64);
        max_rx = max_rx.max((rss_mb(rx.id()) * 1024.0) as u64);
        std::thread::sleep(Duration::from_millis(100));
    }
    let wal: String = c
        .psql("select pg_size_pretty(pg_current_wal_flush_lsn() - '0/0')")
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (tx0, rx0) = (cpu_seconds(tx.id()), cpu_seconds(rx.id()));
    let idle = Duration::from_secs(20);
    std::thread::sleep(idle);
    let (tx1, rx1) = (cpu_seconds(tx.id()), cpu_seconds(rx.id()));
    let (end_tx, end_rx) = (
        (rss_mb(tx.id()) * 1024.0) as u64,
        (rss_mb(rx.id()) * 1024.0) as u64,
    );
    println!("segment size {seg_mb} MB, pgbench -c 4 -T 20 (WAL written in total: {wal})");
    println!(
        "peak RSS under load: ship {:.1} MB, receive {:.1} MB",
        max_tx as f64 / 1024.0,
        max_rx as f64 / 1024.0
    );
    println!(
        "RSS after 20 s idle: ship {:.1} MB, receive {:.1} MB",
        end_tx as f64 / 1024.0,
        end_rx as f64 / 1024.0
    );
    println!(
        "idle CPU at --interval 10ms: ship {:.2}% of one core, receive {:.2}%",
        (tx1 - tx0) / idle.as_secs_f64() * 100.0,
        (rx1 - rx0) / idle.as_secs_f64() * 100.0
    );
    let _ = tx.kill();
    let _ = rx.kill();
    let _ = tx.wait();
    let _ = rx.wait();
}
