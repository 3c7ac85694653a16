//! `waltail bench --sync`: what a synchronous commit costs. Each rig gets a
//! fresh primary (`fsync = on`, like every cluster it runs) with
//! `synchronous_standby_names = '*'` once its receiving side is up:
//!
//! | rig | a commit returns when |
//! |---|---|
//! | asynchronous (no synchronous standby) | the primary flushed it |
//! | waltail ship --synchronous | the spool on the receiver holds it (fdatasync) |
//! | streaming replication, synchronous | the standby's walreceiver flushed it |
//! | pg_receivewal --synchronous | pg_receivewal fsynced it |
//!
//! A probe client commits a one-row INSERT every 10 ms for `seconds` and
//! times each COMMIT, first with nothing else running, then while
//! `pgbench -c 4` runs against the same primary. The report gives p50, p99
//! and max, and waltail's ratio to synchronous streaming.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::visible::{percentiles, Percentiles};
use crate::pg::client::connect;
use crate::pg::cluster::RunAs;
use crate::pg::process::{spawn_logged, start_pair_with};
use crate::pg::{Cluster, ClusterOptions};

#[derive(Clone, Debug, Serialize)]
pub struct SyncResult {
    pub rig: String,
    pub commit_idle_ms: Option<Percentiles>,
    pub commit_pgbench_ms: Option<Percentiles>,
}

struct SyncRig {
    name: String,
    primary: Cluster,
    _standby: Option<Cluster>,
    children: Vec<std::process::Child>,
    _work: tempfile::TempDir,
}

impl Drop for SyncRig {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const RIGS: [&str; 4] = [
    "asynchronous (no synchronous standby)",
    "waltail ship --synchronous",
    "streaming replication, synchronous",
    "pg_receivewal --synchronous",
];

async fn sync_rig(which: usize, exe: &Path, run_as: Option<RunAs>) -> Result<SyncRig> {
    let work = tempfile::Builder::new()
        .prefix("waltail-bench-sync-")
        .tempdir()?;
    if let Some(r) = run_as {
        r.chown(work.path())?;
    }
    let opts = ClusterOptions {
        fsync: true,
        ..ClusterOptions::default()
    };
    let mut primary = Cluster::init("bench-sync-primary", &opts)?;
    primary.start()?;
    let mut children = vec![];
    let mut standby = None;
    match which {
        0 => {}
        1 => {
            let pair = start_pair_with(
                exe,
                &primary.conninfo(),
                work.path(),
                &["--synchronous"],
                run_as,
                &[],
            )?;
            children.push(pair.receive);
            children.push(pair.ship);
        }
        2 => {
            let mut s = Cluster::from_base_backup(&primary, "bench-sync-standby", &opts)?;
            s.append_conf(&format!(
                "primary_conninfo = '{} application_name=standby'\n",
                primary.conninfo()
            ))?;
            s.touch("standby.signal")?;
            s.start()?;
            standby = Some(s);
        }
        _ => {
            let dir = work.path().join("receivewal");
            std::fs::create_dir_all(&dir)?;
            if let Some(r) = run_as {
                r.chown(&dir)?;
            }
            let args = super::rig::receivewal_args(&dir, primary.port, None);
            let tool = primary.bin.tool("pg_receivewal");
            children.push(spawn_logged(
                &tool,
                &args,
                &work.path().join("receivewal.log"),
                run_as,
            )?);
        }
    }
    if which > 0 {
        primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'")?;
        primary.psql("SELECT pg_reload_conf()")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while primary.psql("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'")?
            != "1"
        {
            if Instant::now() > deadline {
                bail!("{}: no synchronous standby after 60 s", RIGS[which]);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(SyncRig {
        name: RIGS[which].into(),
        primary,
        _standby: standby,
        children,
        _work: work,
    })
}

/// Commit latencies of one-row INSERTs, one every 10 ms for `secs`.
async fn probe(conninfo: &str, secs: u64, first_id: i64) -> Result<Vec<f64>> {
    let c = connect(conninfo).await?;
    let ins = c.prepare("INSERT INTO sync_probe VALUES ($1)").await?;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut out = vec![];
    let mut id = first_id;
    while Instant::now() < end {
        let t = Instant::now();
        c.execute(&ins, &[&id]).await?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
        id += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(out)
}

async fn measure(r: &SyncRig, secs: u64) -> Result<SyncResult> {
    r.primary
        .psql("CREATE TABLE sync_probe(id int8 primary key)")?;
    let init = r.primary.pgbench(&["-i", "-q", "-s", "4"]).output()?;
    if !init.status.success() {
        bail!("pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    }
    r.primary.psql("CHECKPOINT")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = probe(&r.primary.conninfo(), secs, 1).await?;
    let mut bench = r
        .primary
        .pgbench(&["-c", "4", "-j", "2", "-T", &(secs + 2).to_string(), "-n"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting pgbench")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy = probe(&r.primary.conninfo(), secs, 1_000_000).await;
    let _ = bench.wait();
    Ok(SyncResult {
        rig: r.name.clone(),
        commit_idle_ms: percentiles(idle),
        commit_pgbench_ms: percentiles(busy?),
    })
}

pub async fn run(out: &Path, secs: u64) -> Result<Vec<SyncResult>> {
    let exe = std::env::current_exe()?;
    let run_as = RunAs::for_servers()?;
    let mut res = vec![];
    for (which, name) in RIGS.iter().enumerate() {
        eprintln!("bench --sync: {name}");
        let rig = sync_rig(which, &exe, run_as).await?;
        res.push(measure(&rig, secs).await?);
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("sync.json"), serde_json::to_vec_pretty(&res)?)?;
    std::fs::write(out.join("sync.md"), table(&res))?;
    Ok(res)
}

fn lat(p: &Option<Percentiles>) -> String {
    p.as_ref()
        .map(|p| format!("{:.2} / {:.2} / {:.1}", p.p50, p.p99, p.max))
        .unwrap_or_else(|| "-".into())
}

/// The table, and waltail's ratios to synchronous streaming.
pub fn table(rs: &[SyncResult]) -> String {
    let mut s = String::from(
        "| rig | commit latency idle, ms (p50 / p99 / max) | under pgbench -c 4 |\n|---|---|---|\n",
    );
    for r in rs {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            r.rig,
            lat(&r.commit_idle_ms),
            lat(&r.commit_pgbench_ms)
        ));
    }
    let find = |n: &str| rs.iter().find(|r| r.rig == n);
    if let (Some(w), Some(st)) = (find(RIGS[1]), find(RIGS[2])) {
        let ratio = |a: &Option<Percentiles>,
                     b: &Option<Percentiles>,
                     f: fn(&Percentiles) -> f64| match (a, b) {
            (Some(a), Some(b)) if f(b) > 0.0 => format!("{:.2}x", f(a) / f(b)),
            _ => "-".into(),
        };
        s.push_str(&format!(
            "\nwaltail --synchronous / synchronous streaming: idle p50 {}, p99 {}; under pgbench p50 {}, p99 {}\n",
            ratio(&w.commit_idle_ms, &st.commit_idle_ms, |p| p.p50),
            ratio(&w.commit_idle_ms, &st.commit_idle_ms, |p| p.p99),
            ratio(&w.commit_pgbench_ms, &st.commit_pgbench_ms, |p| p.p50),
            ratio(&w.commit_pgbench_ms, &st.commit_pgbench_ms, |p| p.p99),
        ));
    }
    s
}
