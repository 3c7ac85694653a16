//! `waltail bench --visible`: the hot standby fed by `receive --serve`
//! (init-standby's stream style) against native streaming replication, in
//! the same run, with fsync on in every cluster.
//!
//! For each segment size (16 MB and 1 GB by default), two rigs, each with
//! its own primary:
//!
//! * **stream**: `waltail ship --wake walsender` into `waltail receive
//!   --serve` (SCRAM, loopback), and a standby made by `init-standby
//!   --style stream`;
//! * **native**: a standby streaming from the primary itself.
//!
//! What is measured, the same way on both:
//!
//! * *commit-to-visible*: a probe commits one row every 100 ms, then polls
//!   the hot standby every 0.2 ms (plus the query's round trip) until the
//!   row is there; idle, and while
//!   `pgbench -c 4` runs on the primary;
//! * *standby host CPU*, percent of one core, from `/proc/<pid>/stat`
//!   (utime + stime, plus cutime + cstime, which holds the restore_command
//!   children the startup process has waited for): the standby's startup
//!   process and walreceiver, and for the stream rig `waltail receive`
//!   (receiver and server are one process). Over 20 s idle just after a
//!   segment switch, 20 s idle with the current segment about 90 % full,
//!   and during the pgbench probe;
//! * *standby log lines at idle*: lines the standby's log gained during the
//!   idle windows (a style that retries restore_command logs per retry);
//! * *the profile*: for each probe commit, when its WAL was on disk in the
//!   spool (stream rig; the position file, polled) and on the standby's
//!   disk (`pg_last_wal_receive_lsn()`, its walreceiver's flush), beside
//!   when it became visible; and under pgbench, for every process on the
//!   WAL's path of both hosts (walsender, ship and its backend, receive,
//!   walreceiver, startup), its CPU and the time it was runnable but
//!   waiting for a CPU (`/proc/<pid>/task/*/schedstat`), with the machine's
//!   busy share ([`crate::bench::procs`]).
//!
//! Written to `--out`: visible.json (with every sample), visible.md (the
//! table, the profile, the targets: [`table`]) and visible-cdf.svg (the
//! commit-to-visible CDFs of every rig).
//!
//! Targets (reported, not asserted): commit-to-visible p50 within 2x of
//! native, idle and under pgbench; idle CPU within 2x of native and under
//! 1 % of a core; no standby log lines at idle.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

mod table;

pub use table::table;

use crate::bench::procs::WindowUse;
use crate::bench::rig::SHIP_APP;
use crate::pg::client::connect;
use crate::pg::cluster::RunAs;
use crate::pg::{Cluster, ClusterOptions};
use crate::standby::Style;
use crate::wal::Lsn;

#[derive(Clone, Debug)]
pub struct VisibleOptions {
    pub out: PathBuf,
    pub segment_mb: Vec<u32>,
    /// Seconds of probe commits per workload.
    pub seconds: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub n: usize,
}

pub(super) fn percentiles(mut v: Vec<f64>) -> Option<Percentiles> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some(Percentiles {
        p50: at(0.5),
        p99: at(0.99),
        max: v[v.len() - 1],
        n: v.len(),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct RigResult {
    pub rig: String,
    pub segment_mb: u32,
    pub visible_idle_ms: Option<Percentiles>,
    pub visible_pgbench_ms: Option<Percentiles>,
    /// The profile, stage by stage from the commit: on disk in the spool
    /// (stream rig: ship and receive), then on the standby's disk (its
    /// walreceiver's flush, `pg_last_wal_receive_lsn()`); the rest of
    /// commit-to-visible is replay and the probe's own polling.
    pub durable_idle_ms: Option<Percentiles>,
    pub durable_pgbench_ms: Option<Percentiles>,
    pub received_idle_ms: Option<Percentiles>,
    pub received_pgbench_ms: Option<Percentiles>,
    /// Percent of one core, summed over the standby host's processes.
    pub cpu_idle_segment_start: f64,
    pub cpu_idle_segment_end: f64,
    pub cpu_pgbench: f64,
    /// Per process on the WAL's path, both hosts: in the idle windows at
    /// the start and near the end of a segment, and under pgbench (CPU and
    /// run-queue wait), with the machine's busy share.
    pub idle_start: WindowUse,
    pub idle_end: WindowUse,
    pub pgbench: WindowUse,
    pub standby_log_lines_idle: usize,
    /// Every commit-to-visible sample, sorted (ms): the plot's lines.
    pub visible_idle_all_ms: Vec<f64>,
    pub visible_pgbench_all_ms: Vec<f64>,
}

/// One rig: a primary, a hot standby, and (stream) the waltail daemons.
struct Rig {
    name: String,
    primary: Cluster,
    standby: Cluster,
    daemons: Vec<std::process::Child>,
    /// Stream rig: the spool, whose durable position is polled too.
    spool: Option<PathBuf>,
    _work: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

fn opts(seg_mb: u32) -> ClusterOptions {
    ClusterOptions {
        wal_segsize_mb: seg_mb,
        fsync: true,
        ..Default::default()
    }
}

async fn stream_rig(exe: &Path, seg_mb: u32, run_as: Option<RunAs>) -> Result<Rig> {
    let work = tempfile::Builder::new()
        .prefix("waltail-bench-visible-")
        .tempdir()?;
    if let Some(r) = run_as {
        r.chown(work.path())?;
    }
    let mut primary = Cluster::init("visible-stream-primary", &opts(seg_mb))?;
    primary.start()?;
    let (extra, target) = crate::pg::process::serve_on_loopback(work.path(), run_as)?;
    let pair = crate::pg::process::start_pair_with(
        exe,
        &format!("{} application_name={SHIP_APP}", primary.conninfo()),
        work.path(),
        // Woken by the primary's walsender, as the README sets up a hot
        // standby fed by `--serve`.
        &["--wake", "walsender"],
        run_as,
        &extra,
    )?;
    let pgdata = work.path().join("standby");
    let conninfo = primary.conninfo();
    crate::standby::init_standby(
        exe,
        &crate::standby::InitStandby {
            style: Style::Stream,
            stream: Some(&target),
            ..crate::standby::InitStandby::new(&conninfo, &pgdata, &pair.spool)
        },
    )
    .await?;
    let mut standby = Cluster::adopt("visible-stream-standby", &pgdata)?;
    standby.start()?;
    Ok(Rig {
        name: "waltail stream style (receive --serve)".into(),
        primary,
        standby,
        daemons: vec![pair.receive, pair.ship],
        spool: Some(pair.spool),
        _work: work,
    })
}

async fn native_rig(seg_mb: u32) -> Result<Rig> {
    let work = tempfile::Builder::new()
        .prefix("waltail-bench-visible-")
        .tempdir()?;
    let mut primary = Cluster::init("visible-native-primary", &opts(seg_mb))?;
    primary.start()?;
    let mut standby = Cluster::from_base_backup(&primary, "visible-native-standby", &opts(seg_mb))?;
    standby.append_conf(&format!(
        "primary_conninfo = '{}'\nhot_standby = on\n",
        primary.conninfo()
    ))?;
    standby.touch("standby.signal")?;
    standby.start()?;
    Ok(Rig {
        name: "native streaming replication".into(),
        primary,
        standby,
        daemons: Vec::new(),
        spool: None,
        _work: work,
    })
}

/// The processes to watch: the standby host's (startup, walreceiver, and
/// for the stream rig `waltail receive` with its server), then, on the
/// primary, the rest of the WAL's path (walsenders; `waltail ship` and its
/// SQL backend). (label, pid, on the standby host).
async fn wal_path_processes(r: &Rig) -> Result<Vec<(String, u32, bool)>> {
    let mut v: Vec<(String, u32, bool)> = crate::bench::procs::standby_processes(&r.standby.data)
        .into_iter()
        .map(|(l, p)| (l, p, true))
        .collect();
    // The receiver is started first (receive, then ship).
    if let Some(d) = r.daemons.first() {
        v.push(("waltail receive (+ server)".into(), d.id(), true));
    }
    if let Some(d) = r.daemons.get(1) {
        v.push(("waltail ship".into(), d.id(), false));
    }
    let c = connect(&r.primary.conninfo()).await?;
    for row in c
        .query(
            &format!("SELECT CASE WHEN backend_type = 'walsender' THEN 'postgres walsender' ELSE 'waltail ship backend' END, pid FROM pg_stat_activity WHERE backend_type = 'walsender' OR application_name = '{SHIP_APP}' ORDER BY 1"),
            &[],
        )
        .await?
    {
        v.push((row.get(0), row.get::<_, i32>(1) as u32, false));
    }
    Ok(v)
}

/// What the WAL path's processes cost over `window`.
async fn usage_over(r: &Rig, window: Duration) -> Result<WindowUse> {
    let procs = wal_path_processes(r).await?;
    let labels: Vec<(String, u32)> = procs.iter().map(|p| (p.0.clone(), p.1)).collect();
    let mut w = crate::bench::procs::over(&labels, window).await;
    for (u, p) in w.processes.iter_mut().zip(&procs) {
        u.standby_host = p.2;
    }
    Ok(w)
}

fn log_lines(c: &Cluster) -> usize {
    std::fs::read_to_string(c.log_path())
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// How often a probe commit is looked for (after each look's round trip).
const POLL: Duration = Duration::from_micros(200);

/// One workload's probe samples, ms from the commit.
#[derive(Default)]
struct Samples {
    visible: Vec<f64>,
    /// Stream rig only.
    durable: Vec<f64>,
    received: Vec<f64>,
}

/// Probe commits every 100 ms for `secs`; each polled on the standby until
/// visible and received (and, stream rig, in the spool until durable).
async fn probe(r: &Rig, secs: u64) -> Result<Samples> {
    let spool = r
        .spool
        .as_ref()
        .map(|d| crate::spool::Spool { dir: d.clone() });
    let mut out = Samples::default();
    let p = connect(&r.primary.conninfo()).await?;
    let s = connect(&r.standby.conninfo()).await?;
    let check = s
        .prepare("SELECT EXISTS (SELECT 1 FROM visible_probe WHERE id = $1), coalesce(pg_last_wal_receive_lsn()::text, '0/0')")
        .await?;
    let start = Instant::now();
    let mut id: i64 = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        id += 1;
        let tick = Instant::now();
        p.execute("INSERT INTO visible_probe VALUES ($1)", &[&id])
            .await?;
        let committed = Instant::now();
        let ms = || committed.elapsed().as_secs_f64() * 1000.0;
        // At or past the end of the commit record; asked while the standby
        // is already being polled, so that the question delays nothing.
        let lsn_q = p.query_one("SELECT pg_current_wal_flush_lsn()::text", &[]);
        tokio::pin!(lsn_q);
        let mut lsn: Option<Lsn> = None;
        let mut seen_durable = spool.is_none();
        let (mut seen_visible, mut seen_received) = (false, false);
        let deadline = committed + Duration::from_secs(30);
        loop {
            if lsn.is_none() {
                if let Ok(row) = tokio::time::timeout(Duration::ZERO, &mut lsn_q).await {
                    lsn = Some(parse_lsn(&row?.get::<_, String>(0))?);
                }
            }
            if let (false, Some(sp), Some(l)) = (seen_durable, &spool, lsn) {
                if sp.position().ok().flatten().is_some_and(|(_, d)| d >= l) {
                    out.durable.push(ms());
                    seen_durable = true;
                }
            }
            if !(seen_visible && seen_received) {
                let row = s.query_one(&check, &[&id]).await?;
                if !seen_received
                    && lsn
                        .is_some_and(|l| parse_lsn(&row.get::<_, String>(1)).is_ok_and(|r| r >= l))
                {
                    out.received.push(ms());
                    seen_received = true;
                }
                if !seen_visible && row.get::<_, bool>(0) {
                    out.visible.push(ms());
                    seen_visible = true;
                }
            }
            if seen_visible && seen_durable && seen_received {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{}: probe {id} not visible on the standby within 30 s",
                    r.name
                );
            }
            // tokio's timer has a 1 ms resolution, coarser than what is
            // measured: the poll waits on this thread instead.
            std::thread::sleep(POLL);
        }
        if lsn.is_none() {
            let _ = lsn_q.await?;
        }
        let next = tick + Duration::from_millis(100);
        tokio::time::sleep_until(next.into()).await;
    }
    // Ids restart per run: empty the table for the next one.
    p.execute("TRUNCATE visible_probe", &[]).await?;
    Ok(out)
}

fn parse_lsn(s: &str) -> Result<Lsn> {
    s.parse().map_err(|e| anyhow::anyhow!("{s:?}: {e:?}"))
}

/// Writes WAL until the current segment is about 90 % full.
async fn fill_segment(r: &Rig, seg_mb: u32) -> Result<()> {
    let c = connect(&r.primary.conninfo()).await?;
    let seg = u64::from(seg_mb) << 20;
    loop {
        let lsn = parse_lsn(
            &c.query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await?
                .get::<_, String>(0),
        )?;
        if lsn.0 % seg >= seg * 9 / 10 {
            return Ok(());
        }
        let left = seg * 9 / 10 - lsn.0 % seg;
        // About 120 bytes of WAL per row; at most 64 MB per statement.
        let rows = (left / 120).clamp(100, 500_000) as i64;
        c.execute(
            "INSERT INTO visible_fill SELECT g, repeat('x', 40) FROM generate_series(1, $1::int8) g",
            &[&rows],
        )
        .await?;
    }
}

async fn wait_caught_up(r: &Rig) -> Result<()> {
    let p = connect(&r.primary.conninfo()).await?;
    let s = connect(&r.standby.conninfo()).await?;
    let target: String = p
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await?
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ok: bool = s
            .query_one(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                &[&target],
            )
            .await?
            .get(0);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{}: the standby did not replay to {target} within 300 s",
                r.name
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each idle CPU window (clock ticks are 10 ms: 0.05 % resolution).
const IDLE_WINDOW: Duration = Duration::from_secs(20);

async fn measure(r: &Rig, seg_mb: u32, secs: u64) -> Result<RigResult> {
    r.primary.psql(
        "CREATE TABLE visible_probe(id int8 primary key); CREATE TABLE visible_fill(i int8, t text)",
    )?;
    let init = r.primary.pgbench(&["-i", "-q", "-s", "4"]).output()?;
    if !init.status.success() {
        anyhow::bail!("pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    }
    wait_caught_up(r).await?;
    // Idle at the start of a segment.
    r.primary.psql("SELECT pg_switch_wal()")?;
    r.primary.psql("CHECKPOINT")?;
    wait_caught_up(r).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let lines0 = log_lines(&r.standby);
    let idle_start = usage_over(r, IDLE_WINDOW).await?;
    let lines1 = log_lines(&r.standby);
    let idle = probe(r, secs).await?;
    // Idle near the end of a segment.
    fill_segment(r, seg_mb).await?;
    wait_caught_up(r).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let lines2 = log_lines(&r.standby);
    let idle_end = usage_over(r, IDLE_WINDOW).await?;
    let lines3 = log_lines(&r.standby);
    // Under pgbench -c 4.
    let mut bench = r
        .primary
        .pgbench(&["-c", "4", "-j", "2", "-T", &(secs + 3).to_string(), "-n"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting pgbench")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (busy, pgbench) = tokio::join!(probe(r, secs), usage_over(r, Duration::from_secs(secs)));
    let _ = bench.wait();
    let (busy, pgbench) = (busy?, pgbench?);
    let sorted = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v
    };
    Ok(RigResult {
        rig: r.name.clone(),
        segment_mb: seg_mb,
        visible_idle_all_ms: sorted(&idle.visible),
        visible_pgbench_all_ms: sorted(&busy.visible),
        visible_idle_ms: percentiles(idle.visible),
        visible_pgbench_ms: percentiles(busy.visible),
        durable_idle_ms: percentiles(idle.durable),
        durable_pgbench_ms: percentiles(busy.durable),
        received_idle_ms: percentiles(idle.received),
        received_pgbench_ms: percentiles(busy.received),
        cpu_idle_segment_start: idle_start.standby_cpu_pct(),
        cpu_idle_segment_end: idle_end.standby_cpu_pct(),
        cpu_pgbench: pgbench.standby_cpu_pct(),
        idle_start,
        idle_end,
        pgbench,
        standby_log_lines_idle: (lines1 - lines0) + (lines3 - lines2),
    })
}

pub async fn run(o: &VisibleOptions) -> Result<Vec<RigResult>> {
    let exe = std::env::current_exe()?;
    let run_as = RunAs::for_servers()?;
    let mut out = Vec::new();
    for &seg in &o.segment_mb {
        for stream in [true, false] {
            let rig = if stream {
                stream_rig(&exe, seg, run_as).await?
            } else {
                native_rig(seg).await?
            };
            eprintln!("bench --visible: {} with {seg} MB segments", rig.name);
            out.push(measure(&rig, seg, o.seconds).await?);
        }
    }
    std::fs::create_dir_all(&o.out)?;
    std::fs::write(o.out.join("visible.json"), serde_json::to_vec_pretty(&out)?)?;
    std::fs::write(o.out.join("visible.md"), table(&out))?;
    let series: Vec<crate::bench::plot::Series> = out
        .iter()
        .map(|r| crate::bench::plot::Series {
            label: format!("{}, {} MB segments", r.rig, r.segment_mb),
            idle: r.visible_idle_all_ms.clone(),
            pgbench: r.visible_pgbench_all_ms.clone(),
        })
        .collect();
    crate::bench::plot::cdfs(&series, "commit-to-visible", &o.out.join("visible-cdf.svg"))?;
    Ok(out)
}
