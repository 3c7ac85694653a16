//! `waltail failover`: end the spool and turn the standby into the primary,
//! keeping every byte of valid WAL that arrived.
//!
//! Steps, each safe to run again if the hook is interrupted:
//!
//! 1. **Refuse a split brain**: if the receiver heard from a live primary
//!    within `alive_window`, stop (unless `--force`).
//!    Then, with `--fence-command`, fence the old primary itself
//!    ([`crate::fence`]): only its exit 0 lets the failover go on.
//! 2. **Fence**: create `FENCED`, then take the spool's write lock
//!    exclusively, which waits out a batch being written; from then on the
//!    receiver refuses data for this spool.
//! 3. **Cut**: scan the newest segment (with the one before it, so a record
//!    continued into it is checked whole) and keep the bytes up to the end of
//!    the last complete, CRC-valid record; zero the rest to the segment size and
//!    publish it under its final name (temp file, fsync, rename, fsync dir).
//!    `failover.json` records this: a waiting restore_command now serves it and
//!    then answers not-found.
//! 4. **Promote** (with `--standby`): wait until the standby has replayed to
//!    the cut, then `pg_promote()` (standby.signal), or wait for the server to
//!    leave recovery by itself (recovery.signal); read the new timeline.
//! 5. **Report**: final LSN, timelines, bytes kept and discarded, seconds.
//!
//! Run again after it finished, it prints the stored report and changes nothing.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::fsio::{map_readonly, write_atomic};
use crate::spool::{now_ms, ReceiverState, Spool, FAILOVER, FENCED};
use crate::wal::{
    scan_segment, Lsn, ScanConfig, ScanSummary, Scanner, SegmentName, TimelineId, WalView,
};

#[derive(Clone, Debug)]
pub struct FailoverConfig {
    pub spool: PathBuf,
    pub standby: Option<String>,
    pub force: bool,
    /// A primary heard from within this window counts as alive.
    pub alive_window: Duration,
    /// How long to wait for replay and promotion (and for the fence command).
    pub timeout: Duration,
    /// Run before anything is fenced: only its exit 0 lets the failover go on.
    pub fence_command: Option<String>,
}

/// How far a failover got (`state` in failover.json).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailoverState {
    /// The final segment is in place (a failover without `--standby` ends here).
    Published,
    /// The standby was promoted.
    Done,
}

/// The failover's record and report (`failover.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailoverReport {
    pub state: FailoverState,
    pub final_lsn: Lsn,
    pub last_record_lsn: Option<Lsn>,
    pub segment: String,
    pub old_timeline: TimelineId,
    pub new_timeline: Option<TimelineId>,
    pub bytes_kept: u64,
    pub bytes_discarded: u64,
    /// What `--fence-command` did (absent without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<crate::fence::FenceOutcome>,
    pub end_reason: String,
    pub seconds: f64,
    pub promoted: bool,
    pub already_done: bool,
}

/// Where the spool's valid WAL ends: the cut point and the segment it is in.
#[derive(Clone, Debug)]
pub struct Cut {
    pub segment: SegmentName,
    pub summary: ScanSummary,
    /// Bytes of the segment to keep.
    pub keep: u64,
    /// Bytes received past the cut.
    pub discarded: u64,
    pub has_partial: bool,
}

/// Finds the cut: the end of the last complete, valid record in the spool.
pub fn find_cut(spool: &Spool) -> Result<Cut> {
    let meta = spool
        .meta()?
        .ok_or_else(|| anyhow!("{}: no WAL was ever received here", spool.dir.display()))?;
    let seg_size = meta
        .seg_size()
        .ok_or_else(|| anyhow!("bad segment size in spool.json"))?;
    let (tli, pos) = spool
        .position()?
        .ok_or_else(|| anyhow!("{}: no WAL was ever received here", spool.dir.display()))?;
    // The newest segment in the spool: of the position's timeline, else of
    // the newest older one. Not the position alone: it is rewritten without
    // fsync, so after a power loss it may lag the (fsynced) data.
    let mut newest: Option<SegmentName> = None;
    for (_, w) in spool.wal_files(seg_size)? {
        if let crate::wal::WalFileName::Segment(s) | crate::wal::WalFileName::Partial(s) = w {
            if s.tli <= tli && newest.is_none_or(|n| (s.tli, s.segno) > (n.tli, n.segno)) {
                newest = Some(s);
            }
        }
    }
    let last =
        newest.ok_or_else(|| anyhow!("{}: the spool holds no segment", spool.dir.display()))?;
    let tli = last.tli;
    let partial = spool.partial_path(last, seg_size);
    let complete = spool.segment_path(last, seg_size);
    let has_partial = partial.exists() && !complete.exists();
    let file = if has_partial { &partial } else { &complete };
    let cur = fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let cur = map_readonly(&cur)?;
    let mut cfg = ScanConfig::new(seg_size);
    cfg.sysid = meta.sysid();
    cfg.max_tli = Some(tli);
    let start = last.start_lsn(seg_size);
    // With the segment before it (on any timeline up to ours), a record that
    // began there and ends here is checked whole.
    let prev = spool
        .wal_files(seg_size)?
        .into_iter()
        .filter_map(|(_, w)| match w {
            crate::wal::WalFileName::Segment(s)
                if s.tli <= tli && s.segno.0.checked_add(1) == Some(last.segno.0) =>
            {
                Some(s)
            }
            _ => None,
        })
        .max_by_key(|s| s.tli)
        .and_then(|s| fs::read(spool.segment_path(s, seg_size)).ok());
    let summary = match prev.filter(|p| p.len() as u64 == seg_size.bytes()) {
        Some(mut both) => {
            both.extend_from_slice(&cur);
            let prev_start = Lsn(start.0 - seg_size.bytes());
            let view = WalView::new(prev_start, &both).ok_or_else(|| anyhow!("bad view"))?;
            let mut c = cfg;
            c.limit = Some(last.end_lsn(seg_size));
            let s = ScanSummary::run(Scanner::find_first(view, c, prev_start));
            // Only when no record starts in the previous segment at all (it is
            // one record's middle) is the last segment read on its own; a
            // record that fails anywhere else ends valid WAL there.
            if s.records == 0 && s.end.kind == crate::wal::EndKind::NoRecord {
                scan_segment(start, &cur, cfg)
            } else {
                s
            }
        }
        None => scan_segment(start, &cur, cfg),
    };
    let end = summary.end_lsn.max(start).min(last.end_lsn(seg_size));
    let keep = end.0 - start.0;
    let discarded = pos.0.saturating_sub(end.0).min(seg_size.bytes());
    Ok(Cut {
        segment: last,
        summary,
        keep,
        discarded,
        has_partial,
    })
}

fn load_report(spool: &Spool) -> Option<FailoverReport> {
    fs::read(spool.path(FAILOVER))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn save_report(spool: &Spool, r: &FailoverReport) -> Result<()> {
    write_atomic(&spool.path(FAILOVER), &serde_json::to_vec_pretty(r)?)?;
    spool.own(&spool.path(FAILOVER))?;
    Ok(())
}

/// Runs the failover (see the module header).
pub async fn run(cfg: &FailoverConfig) -> Result<FailoverReport> {
    let t0 = Instant::now();
    let spool = Spool::open(&cfg.spool)?;
    if let Some(mut r) = load_report(&spool) {
        if r.state == FailoverState::Done {
            r.already_done = true;
            return Ok(r);
        }
    }
    // 0. The standby must be of the spool's cluster: check before anything
    // is fenced or published.
    if let Some(conninfo) = &cfg.standby {
        check_standby(conninfo, &spool).await?;
    }
    // 1. Split brain.
    if !cfg.force && !spool.is_fenced() {
        if let Some(st) = spool.status() {
            let seen = st.primary_seen_at_ms.unwrap_or(0);
            let age = now_ms().saturating_sub(seen);
            if st.state == ReceiverState::Streaming && age < cfg.alive_window.as_millis() as u64 {
                bail!(
                    "refusing to fail over: the receiver heard from a live primary {:.1} s ago (shipper {}). Promoting now would give two primaries (split brain). Stop the primary first, or use --force if you are sure it is gone",
                    age as f64 / 1000.0,
                    st.peer.unwrap_or_default()
                );
            }
        }
    }
    // 1b. Fence the old primary, before anything here changes.
    let mut fenced_by = None;
    if let Some(cmd) = &cfg.fence_command {
        let peer = spool.status().and_then(|s| s.peer);
        let outcome = crate::fence::run(cmd, &spool.dir, peer.as_deref(), cfg.timeout).await?;
        info!(command = %cmd, "fence command succeeded: {}", outcome.output);
        fenced_by = Some(outcome);
    }
    // 2. Fence.
    if !spool.is_fenced() {
        write_atomic(
            &spool.path(FENCED),
            format!("fenced by waltail failover at {} ms\n", now_ms()).as_bytes(),
        )?;
        spool.own(&spool.path(FENCED))?;
        info!("spool fenced");
    }
    let lock = tokio::task::spawn_blocking({
        let s = spool.clone();
        move || s.write_lock(true)
    })
    .await??;
    // 3. Cut and publish.
    let mut report = match load_report(&spool) {
        Some(r) => r,
        None => {
            let cut = find_cut(&spool)?;
            let seg_size = spool.seg_size()?;
            let name = cut.segment.file_name(seg_size);
            if cut.has_partial {
                let src = fs::read(spool.partial_path(cut.segment, seg_size))?;
                let mut out = vec![0u8; seg_size.bytes() as usize];
                let k = (cut.keep as usize).min(src.len());
                out[..k].copy_from_slice(&src[..k]);
                write_atomic(&spool.segment_path(cut.segment, seg_size), &out)?;
                spool.own(&spool.segment_path(cut.segment, seg_size))?;
                info!(segment = %name, kept = cut.keep, "published the final segment");
            }
            let r = FailoverReport {
                state: FailoverState::Published,
                final_lsn: cut.summary.end_lsn,
                last_record_lsn: cut.summary.last_record,
                segment: name,
                old_timeline: cut.segment.tli,
                new_timeline: None,
                bytes_kept: cut.keep,
                bytes_discarded: cut.discarded,
                fence: None,
                end_reason: cut.summary.end.to_string(),
                seconds: 0.0,
                promoted: false,
                already_done: false,
            };
            save_report(&spool, &r)?;
            r
        }
    };
    drop(lock);
    if fenced_by.is_some() {
        report.fence = fenced_by;
        save_report(&spool, &report)?;
    }
    // 4. Promote.
    if let Some(conninfo) = &cfg.standby {
        promote(conninfo, &spool, &mut report, cfg.timeout).await?;
        report.promoted = true;
    }
    report.state = if cfg.standby.is_some() {
        FailoverState::Done
    } else {
        FailoverState::Published
    };
    report.seconds = t0.elapsed().as_secs_f64();
    save_report(&spool, &report)?;
    Ok(report)
}

/// How long failover tries to reach the standby before it gives up,
/// having changed nothing.
const STANDBY_ANSWER: Duration = Duration::from_secs(10);

/// Checks, before anything is fenced, that `--standby` names a server that
/// answers, is of the spool's cluster and is in recovery (unless an earlier
/// run already published, and may have promoted it). A server that is up
/// but not yet taking connections ("the database system is starting up",
/// a recovery.signal standby before consistency) answers too: promote()
/// waits for it and checks again.
pub(crate) async fn check_standby(conninfo: &str, spool: &Spool) -> Result<()> {
    let deadline = Instant::now() + STANDBY_ANSWER;
    let c = loop {
        match crate::pg::client::connect(conninfo).await {
            Ok(c) => break c,
            Err(e) if starting_up(&e) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("standby not reachable yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!(
                "cannot reach the standby at --standby {:?} ({e:#}); nothing was fenced or published: fix the conninfo, or leave out --standby to only publish the final segment",
                crate::pg::client::redact(conninfo)
            ),
        }
    };
    let info = crate::pg::client::server_info(&c).await?;
    same_cluster(&info, spool)?;
    if !info.in_recovery && load_report(spool).is_none() {
        bail!(
            "the server at --standby {:?} is not in recovery: it is a primary (the old primary itself?); refusing to fail over to it, nothing was fenced",
            crate::pg::client::redact(conninfo)
        );
    }
    Ok(())
}

/// Whether a connection failed because the server is still starting (SQLSTATE 57P03).
fn starting_up(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .any(|pe| pe.code() == Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW))
}

/// The standby must be the cluster whose WAL the spool holds.
fn same_cluster(info: &crate::pg::client::ServerInfo, spool: &Spool) -> Result<()> {
    if let Some(m) = spool.meta()? {
        if m.sysid() != Some(info.sysid) {
            bail!(
                "the standby is system {}, but the spool holds WAL of system {}: refusing to feed it another cluster's WAL",
                info.sysid,
                m.system_identifier
            );
        }
    }
    Ok(())
}

async fn promote(
    conninfo: &str,
    spool: &Spool,
    report: &mut FailoverReport,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let c = loop {
        match crate::pg::client::connect(conninfo).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("standby not reachable yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let info = crate::pg::client::server_info(&c).await?;
    same_cluster(&info, spool)?;
    if info.in_recovery {
        let standby_style: bool = c
            .query_one(
                "SELECT (pg_stat_file('standby.signal', true)).size IS NOT NULL",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(true);
        if standby_style {
            // Replay to the cut, then promote.
            let target = report.last_record_lsn.unwrap_or(report.final_lsn);
            loop {
                let row = c
                    .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
                    .await?;
                let replayed: Option<String> = row.get(0);
                let replayed: Lsn = replayed.and_then(|s| s.parse().ok()).unwrap_or_default();
                if replayed > target {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the standby replayed only to {replayed}, not past {target}, within {timeout:?}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            c.query_one(
                "SELECT pg_promote(true, $1)",
                &[&(timeout.as_secs().max(1) as i32)],
            )
            .await
            .context("pg_promote()")?;
        }
        // recovery.signal: the waiting restore_command now ends recovery.
        loop {
            let r: bool = c.query_one("SELECT pg_is_in_recovery()", &[]).await?.get(0);
            if !r {
                break;
            }
            if Instant::now() > deadline {
                bail!("the standby did not leave recovery within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let name: String = c
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await?
        .get(0);
    report.new_timeline = crate::pg::client::timeline_of(&name, spool.seg_size()?);
    Ok(())
}

impl FailoverReport {
    pub fn to_text(&self) -> String {
        let tl = self
            .new_timeline
            .map(|t| t.to_string())
            .unwrap_or_else(|| "-".into());
        format!(
            "{}final LSN:        {}\nlast record:      {}\nsegment:          {}\ntimeline:         {} -> {}\nbytes kept:       {}\nbytes discarded:  {}\nend of WAL:       {}\nseconds:          {:.3}\n",
            if self.already_done { "failover already done; nothing changed\n" } else { "" },
            self.final_lsn,
            self.last_record_lsn.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            self.segment,
            self.old_timeline,
            tl,
            self.bytes_kept,
            self.bytes_discarded,
            self.end_reason,
            self.seconds
        ) + &match &self.fence {
            Some(f) => format!("fence command:    {} (exit {})\n", f.command, f.exit_code.unwrap_or(-1)),
            None => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::SpoolMeta;
    use crate::wal::synth::WalBuilder;
    use crate::wal::SegmentSize;

    /// A spool holding segment 1 complete and segment 2 as a partial that
    /// ends `tail` bytes into a record.
    fn spool_with(bytes: &[u8], received: u64, dir: &std::path::Path) -> Spool {
        let seg = SegmentSize::new(1 << 20).unwrap();
        let sp = Spool::create(dir).unwrap();
        sp.write_meta(&SpoolMeta {
            system_identifier: "7000000000000000001".into(),
            segment_size: seg.bytes(),
            pg_version: 150000,
        })
        .unwrap();
        fs::write(sp.path("000000010000000000000001"), &bytes[..1 << 20]).unwrap();
        let mut part = vec![0u8; 1 << 20];
        let n = (received as usize) - (1 << 20);
        part[..n].copy_from_slice(&bytes[1 << 20..received as usize]);
        fs::write(sp.path("000000010000000000000002.partial"), &part).unwrap();
        let f = sp.position_file().unwrap();
        Spool::set_position(&f, TimelineId(1), Lsn((1 << 20) + received), true).unwrap();
        sp
    }

    #[test]
    fn the_cut_is_the_end_of_the_last_complete_record_across_segments() {
        let seg = SegmentSize::new(1 << 20).unwrap();
        let mut b = WalBuilder::new(Lsn(1 << 20), seg);
        let lsns = b.fill((1 << 20) + 300_000, &[150, 20_000, 9000]);
        let bytes = b.into_bytes();
        // Received up to the middle of the last record.
        let last = *lsns.last().unwrap();
        let received = last.0 - (1 << 20) + 100;
        let d = tempfile::tempdir().unwrap();
        let sp = spool_with(&bytes, received, d.path());
        let cut = find_cut(&sp).unwrap();
        assert_eq!(
            cut.summary.end_lsn, last,
            "valid WAL ends where the cut record began"
        );
        assert_eq!(cut.keep, last.0 - (2 << 20));
        assert!(cut.has_partial);
    }

    #[test]
    fn a_bad_record_in_the_previous_segment_keeps_nothing_of_the_last() {
        let seg = SegmentSize::new(1 << 20).unwrap();
        let mut b = WalBuilder::new(Lsn(1 << 20), seg);
        let lsns = b.fill((1 << 20) + 100_000, &[300]);
        let mut bytes = b.into_bytes();
        // Damage a record late in segment 1.
        let victim = lsns
            .iter()
            .rev()
            .find(|l| l.0 < (2 << 20) - 10_000)
            .unwrap();
        let off = (victim.0 - (1 << 20)) as usize + 40;
        bytes[off] ^= 0x55;
        let d = tempfile::tempdir().unwrap();
        let sp = spool_with(&bytes, bytes.len() as u64, d.path());
        let cut = find_cut(&sp).unwrap();
        assert_eq!(cut.summary.end.kind, crate::wal::EndKind::BadCrc);
        assert_eq!(cut.summary.end_lsn, *victim);
        assert_eq!(cut.keep, 0);
    }
}
