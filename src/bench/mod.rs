//! `waltail bench`: waltail against the other ways of getting WAL to a
//! standby host, measured the same way, on the same machine, in one run.
//!
//! Methods: waltail with its defaults (woken by inotify, the 250 ms poll as
//! the safety net), woken by a replication connection's walsender
//! (`--wake walsender`), and polling alone every 1 ms, each with a hot
//! standby fed from the spool by `receive --serve` (init-standby's stream
//! style); PostgreSQL's streaming
//! replication; `pg_receivewal --synchronous` with a slot; `archive_command`
//! with `archive_timeout` 1 s and 60 s. Each gets a fresh primary with the
//! same settings, `fsync = on` on every cluster (a durability comparison
//! with fsync off would compare nothing).
//!
//! **Idle CPU**: after `pgbench -i` and a checkpoint, with nothing running
//! but the method, the CPU time (utime + stime from `/proc/<pid>/stat`) over
//! a fixed window of every process the method runs on both hosts: waltail
//! ship, the backend answering its polls (found by its `application_name`)
//! and waltail receive; the walsender and the walreceiver of streaming
//! replication; pg_receivewal and its walsender; the archiver.
//!
//! **Commit-to-durable latency**, measured identically for every method:
//! a probe client commits a single-row INSERT every 100 ms; when COMMIT
//! returns it reads `pg_current_wal_flush_lsn()` (at or past the end of its
//! commit record) and notes the time. A poller asks the method, every
//! millisecond, how far WAL is durable on the standby side, and records for
//! each probe commit when that position first reaches its LSN:
//!
//! | method | "durable on the standby side" is read from |
//! |---|---|
//! | waltail | the spool's position file (advanced after fdatasync) |
//! | streaming | `pg_last_wal_receive_lsn()` on the standby (flushed by the walreceiver) |
//! | pg_receivewal | `flush_lsn` in `pg_stat_replication` (reported after its fsync) |
//! | archive_command | the end of the last segment in the archive directory (cp, no fsync) |
//!
//! Workloads: probe commits alone (idle), and probe commits while
//! `pgbench -c 4` runs. A bulk load (INSERT ... SELECT of 1.5 GB of rows)
//! measures the shipping rate, and the CPU time and peak RSS of the
//! shipping processes (waltail ship and receive, pg_receivewal) per GB.
//! The **catch-up** rate is the ceiling: the receiving side is stopped, the
//! primary writes the same bulk load again, the receiving side starts, and
//! the rate at which its durable position then reaches the end is recorded.

pub mod loss;
pub mod plot;
mod procs;
pub mod report;
mod rig;
pub mod sync;
pub mod visible;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::pg::client::connect;
use crate::pg::process::{cpu_seconds, rss_mb};
use crate::wal::Lsn;
pub use loss::LossSummary;
pub use report::{table, targets};
use rig::{idle_cpu, rig, Rig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Method {
    /// `ship --wake W --interval I`: woken by inotify or by a replication
    /// connection's walsender (the interval the safety net), or polling.
    Waltail {
        interval_ms: u64,
        wake: crate::ship::wake::WakeMode,
    },
    Streaming,
    Receivewal,
    Archive {
        timeout_s: u32,
    },
}

impl Method {
    pub fn label(&self) -> String {
        match self {
            Method::Waltail { interval_ms, wake } => {
                format!("waltail --wake {} --interval {interval_ms}ms", wake.name())
            }
            Method::Streaming => "streaming replication".into(),
            Method::Receivewal => "pg_receivewal --synchronous".into(),
            Method::Archive { timeout_s } => {
                format!("archive_command, archive_timeout {timeout_s}s")
            }
        }
    }

    /// waltail as a user who sets nothing runs it.
    pub const WALTAIL_DEFAULTS: Method = Method::Waltail {
        interval_ms: crate::ship::DEFAULT_INTERVAL.as_millis() as u64,
        wake: crate::ship::wake::WakeMode::Inotify,
    };

    pub fn all() -> Vec<Method> {
        vec![
            Method::WALTAIL_DEFAULTS,
            Method::Waltail {
                interval_ms: 1,
                wake: crate::ship::wake::WakeMode::Poll,
            },
            Method::Streaming,
            Method::Receivewal,
            Method::Archive { timeout_s: 1 },
            Method::Archive { timeout_s: 60 },
        ]
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Every sample, for CDFs.
    pub all_ms: Vec<f64>,
}

impl Latency {
    fn from(mut v: Vec<f64>) -> Option<Latency> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Some(Latency {
            samples: v.len(),
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            max_ms: q(1.0),
            all_ms: v,
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Cost {
    pub process: String,
    pub cpu_s_per_gb: f64,
    pub peak_rss_mb: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MethodResult {
    pub method: Method,
    pub label: String,
    pub idle: Option<Latency>,
    pub pgbench: Option<Latency>,
    /// Commit-to-visible on a hot standby (waltail's standby.signal style
    /// and streaming replication only).
    pub idle_visible: Option<Latency>,
    pub pgbench_visible: Option<Latency>,
    pub loss: Option<LossSummary>,
    /// MB/s of WAL made durable during the bulk load.
    pub bulk_mb_s: Option<f64>,
    pub bulk_wal_mb: Option<f64>,
    /// MB/s at which a stopped receiving side catches up: the ceiling.
    pub catch_up_mb_s: Option<f64>,
    pub catch_up_mb: Option<f64>,
    pub cost: Vec<Cost>,
    /// Idle CPU, % of one core, per process (see the module header).
    pub idle_cpu: Vec<IdleCpu>,
    pub idle_cpu_window_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct IdleCpu {
    pub process: String,
    pub pct: f64,
}

/// Catch-up rate: with the receiving side stopped, the primary writes a bulk
/// load; then the receiving side starts and the rate at which the durable
/// position moves to the end, from its first move, is the shipping ceiling.
async fn catch_up(r: &mut Rig, rows: i64) -> Result<(f64, f64)> {
    r.stop_receiving().await?;
    let c = connect(&r.primary.conninfo()).await?;
    c.batch_execute(&format!(
        "CREATE TABLE catchup AS SELECT g AS id, repeat('c', 200) AS pad FROM generate_series(1, {rows}) g"
    ))
    .await?;
    let end: Lsn = c
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await?
        .get::<_, String>(0)
        .parse()?;
    r.start_receiving().await?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let before = r.durable().await.unwrap_or_default();
    let (from, t0) = loop {
        let p = r.durable().await.unwrap_or_default();
        if p > before {
            break (p, Instant::now());
        }
        if Instant::now() > deadline {
            bail!("the receiving side never moved after restart");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    while r.durable().await.unwrap_or_default() < end {
        if Instant::now() > deadline {
            bail!("catch-up did not finish");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let mb = end.bytes_since(from).unwrap_or(0) as f64 / f64::from(1u32 << 20);
    Ok((mb / secs.max(1e-6), mb))
}

/// Probe commits every 100 ms for `dur` (plus `settle` to let the slowest
/// method catch up); returns commit-to-durable latencies in ms, and
/// commit-to-visible ones when the rig has a hot standby.
async fn probe_latency(
    r: &Rig,
    dur: Duration,
    settle: Duration,
    base: i64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let conninfo = r.primary.conninfo();
    crate::load::create_table(&conninfo, "probe").await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(i64, Lsn, Instant)>();
    let committer = tokio::spawn(async move {
        let c = connect(&conninfo).await?;
        let ins = c.prepare("INSERT INTO probe (id) VALUES ($1)").await?;
        let t0 = Instant::now();
        let mut id = base;
        while t0.elapsed() < dur {
            id += 1;
            c.execute(&ins, &[&id]).await?;
            let at = Instant::now();
            let l: String = c
                .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                .await?
                .get(0);
            let _ = tx.send((id, l.parse()?, at));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    });
    // Prepared once the probe table has reached the standby.
    let mut visible_sql = None;
    let mut pending: Vec<(i64, Lsn, Instant)> = Vec::new();
    let mut unseen: Vec<(i64, Instant)> = Vec::new();
    let (mut durable, mut visible) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + dur + settle;
    loop {
        while let Ok(x) = rx.try_recv() {
            pending.push(x);
            if r.hot.is_some() {
                unseen.push((x.0, x.2));
            }
        }
        let pos = r.durable().await.unwrap_or_default();
        let now = Instant::now();
        pending.retain(|(_, l, at)| {
            if *l <= pos {
                durable.push(now.duration_since(*at).as_secs_f64() * 1000.0);
                false
            } else {
                true
            }
        });
        if let (Some(h), Some(first)) = (&r.hot, unseen.first()) {
            // The probe table appears on the standby only once replayed.
            if visible_sql.is_none() {
                visible_sql = h
                    .prepare("SELECT coalesce(max(id), 0) FROM probe WHERE id > $1")
                    .await
                    .ok();
            }
            let seen = match &visible_sql {
                Some(q) => h
                    .query_one(q, &[&(first.0 - 1)])
                    .await
                    .map(|row| row.get::<_, i64>(0))
                    .unwrap_or(0),
                None => 0,
            };
            let now = Instant::now();
            unseen.retain(|(id, at)| {
                if *id <= seen {
                    visible.push(now.duration_since(*at).as_secs_f64() * 1000.0);
                    false
                } else {
                    true
                }
            });
        }
        let done =
            committer.is_finished() && rx.is_empty() && pending.is_empty() && unseen.is_empty();
        if done || now > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    committer.await??;
    Ok((durable, visible))
}

fn pgbench(r: &Rig, args: &[&str]) -> Result<Child> {
    Ok(r.primary
        .pgbench(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub out: PathBuf,
    pub methods: Vec<Method>,
    /// Seconds of probe commits per workload.
    pub seconds: u64,
    /// Rows in the bulk load (about 250 bytes of WAL each).
    pub bulk_rows: i64,
    /// Kill trials per method for the loss window (0: none).
    pub trials: usize,
    /// Seed of the kill timings.
    pub seed: u64,
    /// The idle CPU window, seconds.
    pub idle_cpu_secs: u64,
}

async fn run_method(m: Method, exe: &Path, o: &BenchOptions) -> Result<MethodResult> {
    let mut r = rig(m, exe).await?;
    let settle = match m {
        Method::Archive { timeout_s } => Duration::from_secs(2 * u64::from(timeout_s) + 20),
        _ => Duration::from_secs(5),
    };
    let dur = Duration::from_secs(o.seconds);
    // pgbench's tables first: every method starts the measurements warm.
    let init = pgbench(&r, &["-i", "-s", "5", "-q"])?.wait()?;
    if !init.success() {
        bail!("pgbench -i failed");
    }
    let window = Duration::from_secs(o.idle_cpu_secs);
    eprintln!("  {}: idle CPU over {window:?}", m.label());
    let idle_cpu = idle_cpu(&r, window).await?;
    eprintln!("  {}: idle probe commits", m.label());
    let (idle, idle_visible) = probe_latency(&r, dur, settle, 0).await?;
    eprintln!("  {}: probe commits under pgbench -c 4", m.label());
    let mut load = pgbench(&r, &["-c", "4", "-T", &o.seconds.to_string(), "-n"])?;
    let (under, under_visible) = probe_latency(&r, dur, settle, 1_000_000_000).await?;
    let _ = load.wait();
    // Bulk: how fast WAL becomes durable on the standby side.
    let (mut bulk_mb_s, mut bulk_wal_mb, mut cost) = (None, None, Vec::new());
    if !matches!(m, Method::Archive { .. }) {
        eprintln!("  {}: bulk load", m.label());
        let c = connect(&r.primary.conninfo()).await?;
        let start: Lsn = c
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await?
            .get::<_, String>(0)
            .parse()?;
        let pids = r.pids();
        let cpu0: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
        let mut peak = vec![0f64; pids.len()];
        let t0 = Instant::now();
        let bulk = {
            let ci = r.primary.conninfo();
            let rows = o.bulk_rows;
            tokio::spawn(async move {
                let c = connect(&ci).await?;
                c.batch_execute(&format!(
                    "CREATE TABLE bulk AS SELECT g AS id, repeat('b', 200) AS pad FROM generate_series(1, {rows}) g"
                ))
                .await?;
                let l: String = c
                    .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                    .await?
                    .get(0);
                anyhow::Ok(l.parse::<Lsn>()?)
            })
        };
        let mut end: Option<Lsn> = None;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            for (i, (_, p)) in pids.iter().enumerate() {
                peak[i] = peak[i].max(rss_mb(*p));
            }
            if end.is_none() && bulk.is_finished() {
                end = Some(bulk.await??);
                // `bulk` is consumed; the loop only waits for durability now.
                let pos = r.durable().await?;
                if pos >= end.unwrap_or_default() {
                    break;
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    for (i, (_, p)) in pids.iter().enumerate() {
                        peak[i] = peak[i].max(rss_mb(*p));
                    }
                    if r.durable().await? >= end.unwrap_or_default() || Instant::now() > deadline {
                        break;
                    }
                }
                break;
            }
            if Instant::now() > deadline {
                bail!("bulk load did not finish");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let secs = t0.elapsed().as_secs_f64();
        let wal = end.unwrap_or(start).bytes_since(start).unwrap_or(0) as f64;
        let gb = wal / f64::from(1u32 << 30);
        bulk_mb_s = Some(wal / f64::from(1u32 << 20) / secs);
        bulk_wal_mb = Some(wal / f64::from(1u32 << 20));
        for (i, (name, p)) in pids.iter().enumerate() {
            cost.push(Cost {
                process: name.clone(),
                cpu_s_per_gb: (cpu_seconds(*p) - cpu0[i]) / gb.max(1e-9),
                peak_rss_mb: peak[i],
            });
        }
    }
    let (mut catch_up_mb_s, mut catch_up_mb) = (None, None);
    if !matches!(m, Method::Archive { .. }) {
        eprintln!(
            "  {}: catch-up after the receiving side was stopped",
            m.label()
        );
        let (rate, mb) = catch_up(&mut r, o.bulk_rows).await?;
        catch_up_mb_s = Some(rate);
        catch_up_mb = Some(mb);
    }
    let mut loss = None;
    if o.trials > 0 {
        eprintln!(
            "  {}: {} kill trials (seed {})",
            m.label(),
            o.trials,
            o.seed
        );
        loss = Some(loss::trials(&mut r, o.trials, o.seed).await?);
    }
    Ok(MethodResult {
        idle: Latency::from(idle),
        pgbench: Latency::from(under),
        idle_visible: Latency::from(idle_visible),
        pgbench_visible: Latency::from(under_visible),
        loss,
        catch_up_mb_s,
        catch_up_mb,
        method: m,
        label: m.label(),
        bulk_mb_s,
        bulk_wal_mb,
        cost,
        idle_cpu,
        idle_cpu_window_s: window.as_secs_f64(),
    })
}

pub async fn run(o: &BenchOptions) -> Result<Vec<MethodResult>> {
    let exe = std::env::current_exe()?;
    let mut out = Vec::new();
    for m in &o.methods {
        eprintln!("method: {}", m.label());
        out.push(run_method(*m, &exe, o).await.with_context(|| m.label())?);
    }
    std::fs::create_dir_all(&o.out)?;
    std::fs::write(o.out.join("bench.json"), serde_json::to_vec_pretty(&out)?)?;
    std::fs::write(o.out.join("bench.md"), table(&out))?;
    plot::latency_cdfs(&out, &o.out.join("latency-cdf.svg"))?;
    Ok(out)
}
