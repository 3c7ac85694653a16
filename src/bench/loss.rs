//! The loss window: how much committed WAL each method loses when the
//! primary is SIGKILLed in the middle of a load and the standby side takes
//! over.
//!
//! A trial runs `pgbench -c 4` on the primary, SIGKILLs the primary and all
//! its backends after a random 1.0 to 2.5 s (the seed is recorded), lets the
//! receiving side settle, and compares two positions:
//!
//! - the end of the primary's WAL as crash recovery would find it, read with
//!   waltail's own scanner from the dead primary's `pg_wal`;
//! - the end of the WAL durable on the standby side (see `Rig::durable_after_kill`).
//!
//! The bytes between them are lost, and the commit records among those bytes
//! are the commits lost. Then the primary restarts (crash recovery) and the
//! next trial starts once the standby side has caught up. The last trial of
//! waltail and of streaming replication ends with a real failover instead:
//! the standby is promoted and the commits it holds are counted
//! (`pgbench_history` rows, one per pgbench transaction) against the
//! restarted primary's, a check of the WAL arithmetic by what a user sees.

use crate::ship::wake::WakeMode;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::{Method, Rig};
use crate::pg::client::connect;
use crate::wal::scan::{ScanConfig, Scanner, WalView};
use crate::wal::{Lsn, SegmentName, SegmentSize, TimelineId};

/// `RM_XACT_ID` and the commit record types (`XLOG_XACT_COMMIT`,
/// `XLOG_XACT_COMMIT_PREPARED`) under `XLOG_XACT_OPMASK`.
const RM_XACT_ID: u8 = 1;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;

/// At most this many segment files are read past the durable position.
const MAX_SEGMENTS: u64 = 64;

#[derive(Clone, Debug, Serialize)]
pub struct Trial {
    /// How long pgbench ran before the kill.
    pub load_ms: u64,
    /// WAL rate of the load, MB/s.
    pub wal_mb_s: f64,
    pub primary_end: Lsn,
    pub standby_end: Lsn,
    pub lost_bytes: u64,
    pub lost_commits: u64,
    /// The WAL the load wrote in one poll interval (waltail polling only).
    pub interval_bytes: Option<u64>,
}

/// A real failover after the last trial: commits counted on both sides.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverCheck {
    /// `pgbench_history` rows on the restarted primary.
    pub primary_commits: i64,
    /// `pgbench_history` rows on the promoted standby.
    pub standby_commits: i64,
    /// The WAL arithmetic's count for the same trial.
    pub lost_commits_by_wal: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LossSummary {
    pub seed: u64,
    pub trials: Vec<Trial>,
    pub max_bytes: u64,
    pub median_bytes: u64,
    pub max_commits: u64,
    pub median_commits: u64,
    /// Trials that lost at most one interval's worth of WAL (waltail polling only).
    pub within_one_interval: Option<usize>,
    pub failover_check: Option<FailoverCheck>,
}

/// A small xorshift generator: the trials are replayable from the seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// The end of valid WAL in `pg_wal` from the segment holding `from` on, and
/// how many commit records end after `from`.
pub fn wal_after(
    pg_wal: &Path,
    seg: SegmentSize,
    tli: TimelineId,
    from: Lsn,
) -> Result<(Lsn, u64)> {
    let first = SegmentName::of_lsn(tli, from, seg);
    let start = first.start_lsn(seg);
    let mut bytes = Vec::new();
    let mut name = first;
    for _ in 0..MAX_SEGMENTS {
        match std::fs::read(pg_wal.join(name.file_name(seg))) {
            Ok(b) if b.len() as u64 == seg.bytes() => bytes.extend_from_slice(&b),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => return Err(e).context(format!("reading {}", name.file_name(seg))),
        }
        name = SegmentName::new(tli, name.segno.next());
    }
    if bytes.is_empty() {
        bail!(
            "{} holds no segment {}",
            pg_wal.display(),
            first.file_name(seg)
        );
    }
    let view = WalView::new(start, &bytes).context("segment start not page aligned")?;
    let mut cfg = ScanConfig::new(seg);
    cfg.max_tli = Some(tli);
    let mut s = Scanner::find_first(view, cfg, start);
    let mut commits = 0;
    while let Ok(r) = s.next_record() {
        let op = r.header.info & XLOG_XACT_OPMASK;
        if r.header.rmid == RM_XACT_ID
            && (op == XLOG_XACT_COMMIT || op == XLOG_XACT_COMMIT_PREPARED)
            && r.next > from
        {
            commits += 1;
        }
    }
    Ok((s.end_lsn(), commits))
}

/// Waits until `f` gives the same position twice `settle` apart (at most `max`).
async fn settled(r: &Rig, settle: Duration, max: Duration) -> Result<Lsn> {
    let deadline = Instant::now() + max;
    let mut last = r.durable_after_kill().await?;
    loop {
        tokio::time::sleep(settle).await;
        let now = r.durable_after_kill().await?;
        if now == last || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

async fn flush_lsn(conninfo: &str) -> Result<Lsn> {
    let c = connect(conninfo).await?;
    let s: String = c
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await?
        .get(0);
    Ok(s.parse()?)
}

async fn history_rows(conninfo: &str) -> Result<i64> {
    let c = connect(conninfo).await?;
    Ok(c.query_one("SELECT count(*) FROM pgbench_history", &[])
        .await?
        .get(0))
}

/// Runs `n` kill trials on a rig whose pgbench tables exist.
pub(super) async fn trials(r: &mut Rig, n: usize, seed: u64) -> Result<LossSummary> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut check = None;
    let seg = SegmentSize::DEFAULT;
    for i in 0..n {
        let last = i + 1 == n;
        let start = flush_lsn(&r.primary.conninfo()).await?;
        let load_ms = 1000 + rng.below(1500);
        let mut load = r
            .primary
            .pgbench(&["-c", "4", "-T", "30", "-n"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting pgbench")?;
        tokio::time::sleep(Duration::from_millis(load_ms)).await;
        r.primary.kill();
        let _ = load.kill();
        let _ = load.wait();
        let standby_end = settled(r, Duration::from_millis(500), Duration::from_secs(10)).await?;
        let (primary_end, lost_commits) =
            wal_after(&r.primary.pg_wal(), seg, TimelineId(1), standby_end)
                .context("reading the dead primary's WAL")?;
        let wal = primary_end.bytes_since(start).unwrap_or(0);
        let wal_mb_s = wal as f64 / f64::from(1u32 << 20) / (load_ms as f64 / 1000.0);
        let interval_bytes = match r.method {
            Method::Waltail {
                interval_ms,
                wake: WakeMode::Poll,
            } => Some((wal as f64 * interval_ms as f64 / load_ms as f64) as u64),
            _ => None,
        };
        let t = Trial {
            load_ms,
            wal_mb_s,
            primary_end,
            standby_end,
            lost_bytes: primary_end.bytes_since(standby_end).unwrap_or(0),
            lost_commits,
            interval_bytes,
        };
        eprintln!(
            "    trial {}: {} ms of load, lost {} bytes, {} commits",
            i + 1,
            t.load_ms,
            t.lost_bytes,
            t.lost_commits
        );
        if last && matches!(r.method, Method::Waltail { .. } | Method::Streaming) {
            // The failover hook refuses while the receiver heard the
            // primary within its alive window (1 s here): wait that out.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let standby = r
                .fail_over()
                .await
                .context("failover after the last trial")?;
            r.primary.start()?;
            check = Some(FailoverCheck {
                primary_commits: history_rows(&r.primary.conninfo()).await?,
                standby_commits: history_rows(&standby).await?,
                lost_commits_by_wal: t.lost_commits,
            });
        } else {
            r.primary.start()?;
            r.after_primary_restart().await?;
            if !matches!(r.method, Method::Archive { .. }) {
                let end = flush_lsn(&r.primary.conninfo()).await?;
                let deadline = Instant::now() + Duration::from_secs(60);
                while r.durable().await.unwrap_or_default() < end {
                    if Instant::now() > deadline {
                        bail!("the standby side did not catch up after the primary restarted");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        out.push(t);
    }
    let mut bytes: Vec<u64> = out.iter().map(|t| t.lost_bytes).collect();
    let mut commits: Vec<u64> = out.iter().map(|t| t.lost_commits).collect();
    bytes.sort_unstable();
    commits.sort_unstable();
    let within = match r.method {
        Method::Waltail {
            wake: WakeMode::Poll,
            ..
        } => Some(
            out.iter()
                .filter(|t| t.lost_bytes <= t.interval_bytes.unwrap_or(0))
                .count(),
        ),
        _ => None,
    };
    Ok(LossSummary {
        seed,
        max_bytes: bytes.last().copied().unwrap_or(0),
        median_bytes: bytes.get(bytes.len() / 2).copied().unwrap_or(0),
        max_commits: commits.last().copied().unwrap_or(0),
        median_commits: commits.get(commits.len() / 2).copied().unwrap_or(0),
        within_one_interval: within,
        failover_check: check,
        trials: out,
    })
}
