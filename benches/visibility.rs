//! Hot-standby visibility lag of the standby.signal style: from COMMIT
//! returning on the primary to the row being visible on the standby, which
//! reads the growing partial segment every `wal_retrieve_retry_interval`.
//!
//!     cargo bench --bench visibility
//!
//! For each retry interval (100ms, the init-standby default, and 20ms) it
//! makes a primary and a standby, ships with --interval 10ms, and times 60
//! single-row commits at idle (one every 150 ms), polling the standby every 2 ms.

use std::process::Command;
use std::time::{Duration, Instant};

use waltail::pg::cluster::RunAs;
use waltail::pg::process::start_pair;
use waltail::pg::{Cluster, ClusterOptions};
use waltail::standby::Style;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn one(retry_ms: u64, exe: &std::path::Path) {
    let mut c = Cluster::init("bench-vis", &ClusterOptions::default()).unwrap();
    c.start().unwrap();
    let run_as = RunAs::for_servers().unwrap();
    let work = tempfile::tempdir().unwrap();
    if let Some(r) = run_as {
        r.chown(work.path()).unwrap();
    }
    c.psql("create table v(id int primary key)").unwrap();
    let pair = start_pair(
        exe,
        &c.conninfo(),
        work.path(),
        Duration::from_millis(10),
        run_as,
    )
    .unwrap();
    let spool = pair.spool.clone();
    let (mut rx, mut tx) = (pair.receive, pair.ship);
    let pgdata = work.path().join("standby");
    waltail::standby::init_standby(
        exe,
        &waltail::standby::InitStandby {
            style: Style::Standby,
            retry: Duration::from_millis(retry_ms),
            ..waltail::standby::InitStandby::new(&c.conninfo(), &pgdata, &spool)
        },
    )
    .await
    .unwrap();
    let mut s = Cluster::adopt("bench-vis-standby", &pgdata).unwrap();
    s.start().unwrap();
    let p = waltail::pg::client::connect(&c.conninfo()).await.unwrap();
    let q = waltail::pg::client::connect(&s.conninfo()).await.unwrap();
    let ins = p.prepare("insert into v values ($1)").await.unwrap();
    let sel = q.prepare("select 1 from v where id = $1").await.unwrap();
    let mut lags = Vec::new();
    for id in 1..=60i32 {
        p.execute(&ins, &[&id]).await.unwrap();
        let t0 = Instant::now();
        while q.query_opt(&sel, &[&id]).await.unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(30) {
                panic!("row {id} never became visible");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        if ms > 1000.0 {
            println!("  commit {id} took {ms:.0} ms to become visible");
            println!("--- standby\n{}", s.log_tail(6));
        }
        lags.push(ms);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    println!(
        "wal_retrieve_retry_interval {retry_ms:>3}ms: commit-to-visible p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} commits)",
        pct(&mut lags, 0.5),
        pct(&mut lags, 0.99),
        pct(&mut lags, 1.0),
        lags.len()
    );
    let _ = tx.kill();
    let _ = rx.kill();
    let _ = tx.wait();
    let _ = rx.wait();
    drop(s);
}

fn main() {
    let st = Command::new("cargo")
        .args(["build", "--release", "--bin", "waltail"])
        .status()
        .unwrap();
    assert!(st.success());
    let exe = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/waltail");
    let rt = tokio::runtime::Runtime::new().unwrap();
    for retry in [100, 20] {
        rt.block_on(one(retry, &exe));
    }
}
