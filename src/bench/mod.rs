//! `waltail bench`: waltail against the other ways of getting WAL to a
//! standby host, measured the same way, on the same machine, in one run.
//!
//! Methods: waltail at `--interval` 1 ms and 10 ms; PostgreSQL's streaming
//! replication; `pg_receivewal --synchronous` with a slot; `archive_command`
//! with `archive_timeout` 1 s and 60 s. Each gets a fresh primary with the
//! same settings.
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
pub mod visible;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio_postgres::Client;

use crate::pg::client::connect;
use crate::pg::cluster::RunAs;
use crate::pg::process::{cpu_seconds, rss_mb, spawn_logged, start_pair};
use crate::pg::{Cluster, ClusterOptions};
use crate::spool::Spool;
use crate::wal::scan::{scan_segment, ScanConfig};
use crate::wal::{Lsn, SegmentSize, WalFileName};
pub use loss::LossSummary;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Method {
    Waltail { interval_ms: u64 },
    Streaming,
    Receivewal,
    Archive { timeout_s: u32 },
}

impl Method {
    pub fn label(&self) -> String {
        match self {
            Method::Waltail { interval_ms } => format!("waltail --interval {interval_ms}ms"),
            Method::Streaming => "streaming replication".into(),
            Method::Receivewal => "pg_receivewal --synchronous".into(),
            Method::Archive { timeout_s } => {
                format!("archive_command, archive_timeout {timeout_s}s")
            }
        }
    }

    pub fn all() -> Vec<Method> {
        vec![
            Method::Waltail { interval_ms: 1 },
            Method::Waltail { interval_ms: 10 },
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
}

/// One method's running set-up: the primary and whatever receives its WAL.
struct Rig {
    method: Method,
    primary: Cluster,
    standby: Option<Cluster>,
    /// waltail's hot standby (standby.signal style, fed from the spool).
    hot_standby: Option<Cluster>,
    /// A connection to the hot standby, for commit-to-visible.
    hot: Option<Client>,
    children: Vec<(String, Child)>,
    work: tempfile::TempDir,
    archive_seg: SegmentSize,
    probe: Option<Client>,
    /// How to start the receiving side again (index 0 of `children`).
    restart: Option<(PathBuf, Vec<String>, PathBuf)>,
    run_as: Option<RunAs>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn rig(method: Method, exe: &Path) -> Result<Rig> {
    let run_as = RunAs::for_servers()?;
    let work = tempfile::Builder::new()
        .prefix("waltail-bench-")
        .tempdir()?;
    if let Some(r) = run_as {
        r.chown(work.path())?;
    }
    let mut opts = ClusterOptions::default();
    if let Method::Archive { timeout_s } = method {
        opts.archive = true;
        opts.archive_timeout = timeout_s;
    }
    let mut primary = Cluster::init("bench-primary", &opts)?;
    primary.start()?;
    let mut r = Rig {
        method,
        standby: None,
        hot_standby: None,
        hot: None,
        children: Vec::new(),
        archive_seg: SegmentSize::DEFAULT,
        probe: None,
        restart: None,
        run_as,
        primary,
        work,
    };
    let p = |n: &str| r.work.path().join(n);
    match method {
        Method::Waltail { interval_ms } => {
            let pair = start_pair(
                exe,
                &r.primary.conninfo(),
                r.work.path(),
                Duration::from_millis(interval_ms),
                run_as,
            )?;
            r.restart = Some((exe.to_path_buf(), pair.receive_args, p("receive2.log")));
            r.children.push(("waltail receive".into(), pair.receive));
            r.children.push(("waltail ship".into(), pair.ship));
            // A hot standby fed from the spool, as init-standby makes it.
            let pgdata = p("standby");
            crate::standby::init_standby(
                exe,
                &r.primary.conninfo(),
                &pgdata,
                &p("spool"),
                crate::standby::Style::Standby,
                Duration::from_millis(100),
                crate::standby::Method::Auto,
            )
            .await?;
            let mut s = Cluster::adopt("bench-standby", &pgdata)?;
            s.start()?;
            r.hot = Some(connect(&s.conninfo()).await?);
            r.hot_standby = Some(s);
        }
        Method::Streaming => {
            let mut s =
                Cluster::from_base_backup(&r.primary, "bench-standby", &ClusterOptions::default())?;
            // A slot, as pg_receivewal and waltail have, so a stopped
            // standby can always catch up.
            r.primary
                .psql("select pg_create_physical_replication_slot('bench_standby', true)")?;
            s.append_conf(&format!(
                "primary_conninfo = '{}'\nprimary_slot_name = 'bench_standby'\n",
                r.primary.conninfo()
            ))?;
            s.touch("standby.signal")?;
            s.start()?;
            r.probe = Some(connect(&s.conninfo()).await?);
            r.hot = Some(connect(&s.conninfo()).await?);
            r.standby = Some(s);
        }
        Method::Receivewal => {
            let dir = p("receivewal");
            std::fs::create_dir_all(&dir)?;
            if let Some(ra) = run_as {
                ra.chown(&dir)?;
            }
            r.primary
                .psql("select pg_create_physical_replication_slot('bench', true)")?;
            let args: Vec<String> = [
                "-D",
                dir.to_str().unwrap_or(""),
                "--slot",
                "bench",
                "--synchronous",
                "--no-loop",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
                &r.primary.port.to_string(),
            ]
            .iter()
            .map(|x| x.to_string())
            .collect();
            let tool = r.primary.bin.tool("pg_receivewal");
            let child = spawn_logged(&tool, &args, &p("receivewal.log"), run_as)?;
            r.children.push(("pg_receivewal".into(), child));
            r.restart = Some((tool, args, p("receivewal2.log")));
            r.probe = Some(connect(&r.primary.conninfo()).await?);
            let c = r.probe.as_ref().expect("set above");
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.query_opt("SELECT 1 FROM pg_stat_replication WHERE application_name = 'pg_receivewal' AND flush_lsn IS NOT NULL", &[]).await?.is_none() {
                if Instant::now() > deadline {
                    bail!("pg_receivewal did not connect");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Method::Archive { .. } => {}
    }
    Ok(r)
}

impl Rig {
    /// How far WAL is durable on the standby side (see the module header).
    async fn durable(&self) -> Result<Lsn> {
        Ok(match self.method {
            Method::Waltail { .. } => Spool::open(&self.work.path().join("spool"))?
                .position()?
                .map(|p| p.1)
                .unwrap_or_default(),
            Method::Streaming => {
                let c = self.probe.as_ref().context("no probe")?;
                let s: Option<String> = c
                    .query_one("SELECT pg_last_wal_receive_lsn()::text", &[])
                    .await?
                    .get(0);
                s.and_then(|s| s.parse().ok()).unwrap_or_default()
            }
            Method::Receivewal => {
                let c = self.probe.as_ref().context("no probe")?;
                let row = c
                    .query_opt("SELECT flush_lsn::text FROM pg_stat_replication WHERE application_name = 'pg_receivewal'", &[])
                    .await?;
                row.and_then(|r| r.get::<_, Option<String>>(0))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_default()
            }
            Method::Archive { .. } => {
                let dir = self.primary.archive.clone().context("no archive")?;
                let mut best = Lsn(0);
                for e in std::fs::read_dir(dir)?.flatten() {
                    if let Ok(WalFileName::Segment(s)) =
                        WalFileName::parse(&e.file_name().to_string_lossy(), self.archive_seg)
                    {
                        best = best.max(s.end_lsn(self.archive_seg));
                    }
                }
                best
            }
        })
    }

    /// What the standby side holds durably once the primary is dead: as
    /// [`Rig::durable`], except that pg_receivewal's position is read from
    /// its directory (the end of valid WAL in its newest file), since the
    /// primary that reported it is gone.
    async fn durable_after_kill(&self) -> Result<Lsn> {
        if self.method != Method::Receivewal {
            return self.durable().await;
        }
        let dir = self.work.path().join("receivewal");
        let seg = SegmentSize::DEFAULT;
        let mut newest = None;
        for e in std::fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let (s, partial) = match WalFileName::parse(&name, seg) {
                Ok(WalFileName::Segment(s)) => (s, false),
                Ok(WalFileName::Partial(s)) => (s, true),
                _ => continue,
            };
            if newest.as_ref().is_none_or(|(n, _, _)| s > *n) {
                newest = Some((s, partial, e.path()));
            }
        }
        let Some((s, partial, path)) = newest else {
            return Ok(Lsn(0));
        };
        if !partial {
            return Ok(s.end_lsn(seg));
        }
        let bytes = std::fs::read(&path)?;
        Ok(scan_segment(s.start_lsn(seg), &bytes, ScanConfig::new(seg)).end_lsn)
    }

    /// After a crash restart of the primary: what needs reconnecting.
    async fn after_primary_restart(&mut self) -> Result<()> {
        if self.method == Method::Receivewal {
            // pg_receivewal --no-loop exits when its primary dies.
            if let Some((_, c)) = self.children.first_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            self.start_receiving().await?;
            self.probe = Some(connect(&self.primary.conninfo()).await?);
            let c = self.probe.as_ref().context("no probe")?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.query_opt("SELECT 1 FROM pg_stat_replication WHERE application_name = 'pg_receivewal' AND flush_lsn IS NOT NULL", &[]).await?.is_none() {
                if Instant::now() > deadline {
                    bail!("pg_receivewal did not reconnect");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Promotes the standby (waltail: the failover hook; streaming:
    /// `pg_promote()`); returns its conninfo.
    async fn fail_over(&mut self) -> Result<String> {
        match self.method {
            Method::Waltail { .. } => {
                let s = self.hot_standby.as_ref().context("no standby")?;
                let cfg = crate::failover::FailoverConfig {
                    spool: self.work.path().join("spool"),
                    standby: Some(s.conninfo()),
                    force: false,
                    alive_window: Duration::from_secs(1),
                    timeout: Duration::from_secs(120),
                };
                let rep = crate::failover::run(&cfg).await?;
                eprintln!(
                    "    failover: {}",
                    rep.to_text().lines().next().unwrap_or("")
                );
                Ok(s.conninfo())
            }
            Method::Streaming => {
                let s = self.standby.as_ref().context("no standby")?;
                let c = connect(&s.conninfo()).await?;
                let ok: bool = c
                    .query_one("SELECT pg_promote(true, 60)", &[])
                    .await?
                    .get(0);
                if !ok {
                    bail!("pg_promote() did not finish within 60 s");
                }
                Ok(s.conninfo())
            }
            _ => bail!("no standby to promote for {}", self.method.label()),
        }
    }

    fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .map(|(n, c)| (n.clone(), c.id()))
            .collect()
    }
}

impl Rig {
    /// Stops whatever receives WAL, so the primary runs ahead of it.
    async fn stop_receiving(&mut self) -> Result<()> {
        if let Some(s) = &mut self.standby {
            self.probe = None;
            s.stop()?;
        } else if let Some((_, c)) = self.children.first_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Starts the receiving side again.
    async fn start_receiving(&mut self) -> Result<()> {
        if let Some(s) = &mut self.standby {
            s.start()?;
            self.probe = Some(connect(&s.conninfo()).await?);
        } else if let Some((exe, args, log)) = &self.restart {
            let child = spawn_logged(exe, args, log, self.run_as)?;
            if let Some(slot) = self.children.first_mut() {
                slot.1 = child;
            }
        }
        Ok(())
    }
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

fn lat(l: &Option<Latency>) -> String {
    match l {
        Some(l) => format!("{:.1} / {:.1} / {:.1}", l.p50_ms, l.p99_ms, l.max_ms),
        None => "-".into(),
    }
}

fn num(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into())
}

/// The markdown report: latency and cost, visibility and loss, targets.
pub fn table(rs: &[MethodResult]) -> String {
    let mut s = String::from(
        "| method | commit-to-durable idle, ms (p50 / p99 / max) | under pgbench -c 4, ms (p50 / p99 / max) | bulk: WAL durable MB/s | catch-up MB/s | CPU s per GB, peak RSS |\n|---|---|---|---|---|---|\n",
    );
    for r in rs {
        let cost = r
            .cost
            .iter()
            .map(|c| {
                format!(
                    "{}: {:.1} s/GB, {:.0} MB",
                    c.process, c.cpu_s_per_gb, c.peak_rss_mb
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.label,
            lat(&r.idle),
            lat(&r.pgbench),
            num(r.bulk_mb_s),
            num(r.catch_up_mb_s),
            if cost.is_empty() { "-".into() } else { cost }
        ));
    }
    s.push_str(
        "\n| method | commit-to-visible idle, ms (p50 / p99 / max) | under pgbench -c 4, ms | SIGKILL trials | bytes lost (median / max) | commits lost (median / max) | real failover: commits primary / standby |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rs {
        let (trials, bytes, commits, check) = match &r.loss {
            Some(l) => (
                l.trials.len().to_string(),
                format!("{} / {}", l.median_bytes, l.max_bytes),
                format!("{} / {}", l.median_commits, l.max_commits),
                l.failover_check
                    .as_ref()
                    .map(|c| {
                        format!(
                            "{} / {} (WAL count: {} lost)",
                            c.primary_commits, c.standby_commits, c.lost_commits_by_wal
                        )
                    })
                    .unwrap_or_else(|| "-".into()),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {trials} | {bytes} | {commits} | {check} |\n",
            r.label,
            lat(&r.idle_visible),
            lat(&r.pgbench_visible),
        ));
    }
    s.push('\n');
    s.push_str(&targets(rs));
    s
}

/// The targets, each with the figures it was judged on.
pub fn targets(rs: &[MethodResult]) -> String {
    let find = |m: Method| rs.iter().find(|r| r.method == m);
    let w1 = find(Method::Waltail { interval_ms: 1 });
    let streaming = find(Method::Streaming);
    let receivewal = find(Method::Receivewal);
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    let mut s = String::from("Targets:\n\n");
    match (w1, streaming) {
        (Some(w), Some(st)) => {
            for (name, a, b) in [
                ("idle", &w.idle, &st.idle),
                ("under pgbench -c 4", &w.pgbench, &st.pgbench),
            ] {
                if let (Some(a), Some(b)) = (a, b) {
                    s.push_str(&format!(
                        "- commit-to-durable p50 {name}: waltail 1 ms {:.1} ms vs streaming {:.1} ms ({:.2}x; target within 2x): {}\n",
                        a.p50_ms,
                        b.p50_ms,
                        a.p50_ms / b.p50_ms.max(1e-9),
                        verdict(a.p50_ms <= 2.0 * b.p50_ms)
                    ));
                }
            }
        }
        _ => s.push_str("- latency vs streaming: not measured (needs waltail-1 and streaming)\n"),
    }
    for r in rs
        .iter()
        .filter(|r| matches!(r.method, Method::Waltail { .. }))
    {
        if let Some(l) = &r.loss {
            let within = l.within_one_interval.unwrap_or(0);
            s.push_str(&format!(
                "- loss window, {}: at most one interval's worth of WAL in {within} of {} trials (target at least 9 of 10): {}\n",
                r.label,
                l.trials.len(),
                verdict(within * 10 >= l.trials.len() * 9)
            ));
        }
    }
    let best = rs
        .iter()
        .filter(|r| matches!(r.method, Method::Waltail { .. }))
        .filter_map(|r| r.catch_up_mb_s)
        .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
    if let Some(c) = best {
        s.push_str(&format!(
            "- shipping ceiling (catch-up): {c:.0} MB/s (target 1024 MB/s): {}\n",
            verdict(c >= 1024.0)
        ));
    }
    let per = |r: &MethodResult, p: &str| {
        r.cost
            .iter()
            .find(|c| c.process == p)
            .map(|c| c.cpu_s_per_gb)
    };
    if let (Some(w), Some(rw)) = (w1, receivewal) {
        if let (Some(rx), Some(tx), Some(base)) = (
            per(w, "waltail receive"),
            per(w, "waltail ship"),
            per(rw, "pg_receivewal"),
        ) {
            s.push_str(&format!(
                "- CPU per GB: waltail receive {rx:.2} s (ship {tx:.2} s, both {:.2} s) vs pg_receivewal {base:.2} s: receive {}, both {}\n",
                rx + tx,
                verdict(rx <= base),
                verdict(rx + tx <= base)
            ));
        }
    }
    s
}
