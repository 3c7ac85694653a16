//! `waltail bench --visible`: the hot standby fed by `receive --serve`
//! (init-standby's stream style) against native streaming replication, in
//! the same run, with fsync on in every cluster.
//!
//! For each segment size (16 MB and 1 GB by default), two rigs, each with
//! its own primary:
//!
//! * **stream**: `waltail ship` with its defaults into `waltail receive
//!   --serve` (SCRAM, loopback), and a standby made by `init-standby
//!   --style stream`;
//! * **native**: a standby streaming from the primary itself.
//!
//! What is measured, the same way on both:
//!
//! * *commit-to-visible*: a probe commits one row every 100 ms, then polls
//!   the hot standby every 0.5 ms until the row is there; idle, and while
//!   `pgbench -c 4` runs on the primary;
//! * *standby host CPU*, percent of one core, from `/proc/<pid>/stat`
//!   (utime + stime, plus cutime + cstime, which holds the restore_command
//!   children the startup process has waited for): the standby's startup
//!   process and walreceiver, and for the stream rig `waltail receive`
//!   (receiver and server are one process). Over 20 s idle just after a
//!   segment switch, 20 s idle with the current segment about 90 % full,
//!   and during the pgbench probe;
//! * *standby log lines at idle*: lines the standby's log gained during the
//!   idle windows (a style that retries restore_command logs per retry).
//!
//! Written to `--out`: visible.json (with every sample), visible.md (the
//! table, the profile, the targets) and visible-cdf.svg (the
//! commit-to-visible CDFs of every rig).
//!
//! Targets (reported, not asserted): commit-to-visible p50 within 2x of
//! native, idle and under pgbench; idle CPU within 2x of native and under
//! 1 % of a core; no standby log lines at idle.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::pg::client::connect;
use crate::pg::cluster::RunAs;
use crate::pg::{Cluster, ClusterOptions};
use crate::standby::Style;

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
    /// Stream rig, the profile: commit to durable in the spool (ship and
    /// receive), the part of commit-to-visible the walsender cannot shorten.
    pub durable_idle_ms: Option<Percentiles>,
    pub durable_pgbench_ms: Option<Percentiles>,
    /// Percent of one core, summed over the standby host's processes.
    pub cpu_idle_segment_start: f64,
    pub cpu_idle_segment_end: f64,
    pub cpu_pgbench: f64,
    /// Per process, in the idle windows at the start and near the end of a segment.
    pub cpu_by_process_idle_start: Vec<(String, f64)>,
    pub cpu_by_process_idle_end: Vec<(String, f64)>,
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
        &primary.conninfo(),
        work.path(),
        &[],
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

/// CPU seconds of a process and of the children it waited for.
fn cpu_with_children(pid: u32) -> f64 {
    crate::pg::process::proc_cpu_seconds(pid, true)
}

/// The standby host's processes of a rig: (label, pid).
fn standby_processes(r: &Rig) -> Vec<(String, u32)> {
    let mut v = Vec::new();
    let pm: u32 = std::fs::read_to_string(r.standby.data.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse().ok())
        .unwrap_or(0);
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid: u32 = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0);
            if ppid != pm || pm == 0 {
                continue;
            }
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            for what in ["startup", "walreceiver"] {
                if cmd.contains(what) {
                    v.push((format!("postgres {what}"), pid));
                }
            }
        }
    }
    // The receiver is started first (receive, then ship).
    if let Some(d) = r.daemons.first() {
        v.push(("waltail receive (+ server)".into(), d.id()));
    }
    v
}

/// CPU percent of one core over `window`, per process and summed.
async fn cpu_over(r: &Rig, window: Duration) -> (f64, Vec<(String, f64)>) {
    let procs = standby_processes(r);
    let before: Vec<f64> = procs.iter().map(|p| cpu_with_children(p.1)).collect();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t0.elapsed().as_secs_f64();
    let per: Vec<(String, f64)> = procs
        .iter()
        .zip(before)
        .map(|((l, pid), b)| {
            (
                l.clone(),
                (cpu_with_children(*pid) - b).max(0.0) / secs * 100.0,
            )
        })
        .collect();
    (per.iter().map(|p| p.1).sum(), per)
}

fn log_lines(c: &Cluster) -> usize {
    std::fs::read_to_string(c.log_path())
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Probe commits every 100 ms for `secs`; each polled on the standby until
/// visible (and, stream rig, in the spool until durable). Milliseconds:
/// (commit-to-visible, commit-to-durable).
async fn probe(r: &Rig, secs: u64) -> Result<(Vec<f64>, Vec<f64>)> {
    let spool = r
        .spool
        .as_ref()
        .map(|d| crate::spool::Spool { dir: d.clone() });
    let mut durable = Vec::new();
    let p = connect(&r.primary.conninfo()).await?;
    let s = connect(&r.standby.conninfo()).await?;
    let check = s
        .prepare("SELECT 1 FROM visible_probe WHERE id = $1")
        .await?;
    let mut out = Vec::new();
    let start = Instant::now();
    let mut id: i64 = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        id += 1;
        let tick = Instant::now();
        p.execute("INSERT INTO visible_probe VALUES ($1)", &[&id])
            .await?;
        let committed = Instant::now();
        // At or past the end of the commit record; asked while the standby
        // is already being polled, so that the question delays nothing.
        let lsn_q = p.query_one("SELECT pg_current_wal_flush_lsn()::text", &[]);
        tokio::pin!(lsn_q);
        let mut lsn: Option<crate::wal::Lsn> = None;
        let mut seen_durable = spool.is_none();
        let mut seen_visible = false;
        let deadline = committed + Duration::from_secs(30);
        loop {
            if lsn.is_none() {
                if let Ok(row) = tokio::time::timeout(Duration::ZERO, &mut lsn_q).await {
                    let l: String = row?.get(0);
                    lsn = Some(l.parse().map_err(|e| anyhow::anyhow!("{e:?}"))?);
                }
            }
            if let (false, Some(sp), Some(l)) = (seen_durable, &spool, lsn) {
                if sp.position().ok().flatten().is_some_and(|(_, d)| d >= l) {
                    durable.push(committed.elapsed().as_secs_f64() * 1000.0);
                    seen_durable = true;
                }
            }
            if !seen_visible && !s.query(&check, &[&id]).await?.is_empty() {
                out.push(committed.elapsed().as_secs_f64() * 1000.0);
                seen_visible = true;
            }
            if seen_visible && seen_durable {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{}: probe {id} not visible on the standby within 30 s",
                    r.name
                );
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        if lsn.is_none() {
            let _ = lsn_q.await?;
        }
        let next = tick + Duration::from_millis(100);
        tokio::time::sleep_until(next.into()).await;
    }
    // Ids restart per run: empty the table for the next one.
    p.execute("TRUNCATE visible_probe", &[]).await?;
    Ok((out, durable))
}

/// Writes WAL until the current segment is about 90 % full.
async fn fill_segment(r: &Rig, seg_mb: u32) -> Result<()> {
    let c = connect(&r.primary.conninfo()).await?;
    let seg = u64::from(seg_mb) << 20;
    loop {
        let lsn: String = c
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        let lsn: crate::wal::Lsn = lsn.parse().map_err(|e| anyhow::anyhow!("{e:?}"))?;
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
    let (cpu_start, per_start) = cpu_over(r, IDLE_WINDOW).await;
    let lines1 = log_lines(&r.standby);
    let (idle, idle_durable) = probe(r, secs).await?;
    // Idle near the end of a segment.
    fill_segment(r, seg_mb).await?;
    wait_caught_up(r).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let lines2 = log_lines(&r.standby);
    let (cpu_end, per) = cpu_over(r, IDLE_WINDOW).await;
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
    let (busy, cpu) = tokio::join!(probe(r, secs), cpu_over(r, Duration::from_secs(secs)));
    let _ = bench.wait();
    let (busy, busy_durable) = busy?;
    let sorted = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v
    };
    let (visible_idle_all_ms, visible_pgbench_all_ms) = (sorted(&idle), sorted(&busy));
    Ok(RigResult {
        visible_idle_all_ms,
        visible_pgbench_all_ms,
        rig: r.name.clone(),
        segment_mb: seg_mb,
        visible_idle_ms: percentiles(idle),
        visible_pgbench_ms: percentiles(busy),
        durable_idle_ms: percentiles(idle_durable),
        durable_pgbench_ms: percentiles(busy_durable),
        cpu_idle_segment_start: cpu_start,
        cpu_idle_segment_end: cpu_end,
        cpu_pgbench: cpu.0,
        cpu_by_process_idle_start: per_start,
        cpu_by_process_idle_end: per,
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
    let series: Vec<super::plot::Series> = out
        .iter()
        .map(|r| super::plot::Series {
            label: format!("{}, {} MB segments", r.rig, r.segment_mb),
            idle: r.visible_idle_all_ms.clone(),
            pgbench: r.visible_pgbench_all_ms.clone(),
        })
        .collect();
    super::plot::cdfs(&series, "commit-to-visible", &o.out.join("visible-cdf.svg"))?;
    Ok(out)
}

fn lat(p: &Option<Percentiles>) -> String {
    p.as_ref()
        .map(|p| format!("{:.1} / {:.1} / {:.1}", p.p50, p.p99, p.max))
        .unwrap_or_else(|| "-".into())
}

/// The tables and the targets, as markdown.
pub fn table(rs: &[RigResult]) -> String {
    let mut s = String::from(
        "| rig | segment | commit-to-visible idle, ms (p50 / p99 / max) | under pgbench -c 4 | standby host CPU idle, segment start / near its end | under pgbench | standby log lines at idle |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rs {
        s.push_str(&format!(
            "| {} | {} MB | {} | {} | {:.2}% / {:.2}% | {:.1}% | {} |\n",
            r.rig,
            r.segment_mb,
            lat(&r.visible_idle_ms),
            lat(&r.visible_pgbench_ms),
            r.cpu_idle_segment_start,
            r.cpu_idle_segment_end,
            r.cpu_pgbench,
            r.standby_log_lines_idle
        ));
    }
    s.push_str("\nCPU by process at idle, % of a core (segment start; near its end):\n\n");
    let fmt = |v: &[(String, f64)]| {
        v.iter()
            .map(|(l, c)| format!("{l} {c:.2}%"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for r in rs {
        s.push_str(&format!(
            "- {} ({} MB): {}; {}\n",
            r.rig,
            r.segment_mb,
            fmt(&r.cpu_by_process_idle_start),
            fmt(&r.cpu_by_process_idle_end)
        ));
    }
    s.push_str("\nProfile of the stream rig's commit-to-visible: commit to durable in the spool (ship + receive with its fdatasync), p50 / p99 / max ms; the rest is the walsender, the standby's walreceiver (its own fsync) and replay:\n\n");
    for r in rs.iter().filter(|r| r.durable_idle_ms.is_some()) {
        s.push_str(&format!(
            "- {} MB: idle {}; under pgbench -c 4 {}\n",
            r.segment_mb,
            lat(&r.durable_idle_ms),
            lat(&r.durable_pgbench_ms)
        ));
    }
    s.push_str("\nTargets:\n\n");
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    for pair in rs.chunks(2) {
        let [w, n] = pair else { continue };
        let seg = w.segment_mb;
        for (what, a, b) in [
            ("idle", &w.visible_idle_ms, &n.visible_idle_ms),
            (
                "under pgbench -c 4",
                &w.visible_pgbench_ms,
                &n.visible_pgbench_ms,
            ),
        ] {
            if let (Some(a), Some(b)) = (a, b) {
                let ratio = a.p50 / b.p50.max(0.001);
                s.push_str(&format!(
                    "- {seg} MB, commit-to-visible p50 {what}: stream {:.1} ms vs native {:.1} ms ({ratio:.2}x; target within 2x): {}\n",
                    a.p50,
                    b.p50,
                    verdict(ratio <= 2.0)
                ));
            }
        }
        let idle_w = w.cpu_idle_segment_start.max(w.cpu_idle_segment_end);
        let idle_n = n.cpu_idle_segment_start.max(n.cpu_idle_segment_end);
        let ratio = idle_w / idle_n.max(0.001);
        s.push_str(&format!(
            "- {seg} MB, standby host CPU idle: stream {idle_w:.2}% vs native {idle_n:.2}% ({ratio:.1}x; target within 2x): {}; under 1% of a core: {}\n",
            verdict(ratio <= 2.0),
            verdict(idle_w < 1.0)
        ));
        s.push_str(&format!(
            "- {seg} MB, standby log lines at idle: {} (target 0): {}\n",
            w.standby_log_lines_idle,
            verdict(w.standby_log_lines_idle == 0)
        ));
    }
    s
}
