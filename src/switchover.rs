//! `waltail switchover`: a planned role change with zero loss and no rewind,
//! run on the standby's host (as repmgr's `standby switchover` is).
//!
//! Steps; a refusal before step 4 changes nothing:
//! 1. **Check**: the spool is live (not fenced), the standby answers, is of
//!    the spool's cluster and in recovery.
//! 2. **Stop the primary** with `--stop-command` (e.g. `ssh a pg_ctlcluster
//!    15 main stop -m fast`), or verify that it is stopped: `--primary`, when
//!    given, must not take connections.
//! 3. **Wait for its end of WAL**: the spool must end, exactly, with the
//!    primary's shutdown checkpoint, which `waltail ship` sends when the
//!    primary stops cleanly ([`crate::ship`]'s `stop`). Then the spool holds
//!    every byte the primary ever wrote; nothing can follow a shutdown
//!    checkpoint. A spool that does not end so within `--timeout` (a crash,
//!    no shipper, a shipper that is not connected) is refused: use failover.
//! 4. **Promote**: a physical slot is created on the standby first (so the
//!    new primary keeps the WAL its new standby will need from the switch
//!    point on), then failover's fence, cut and promote run, with nothing to
//!    cut: the standby replays to the shutdown checkpoint and its new
//!    timeline begins right after it.
//! 5. **Rejoin** with `--rejoin-command` (e.g. `ssh a waltail rejoin ...`):
//!    the old primary stopped exactly at the switch point, so it follows the
//!    new timeline without pg_rewind ([`crate::rejoin`] checks and says so).
//!
//! The report (`switchover.json` in the spool too) gives the LSN at which the
//! roles changed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tracing::info;

use crate::fence::FenceOutcome;
use crate::fsio::write_atomic;
use crate::spool::Spool;
use crate::standby::Precondition;
use crate::wal::{Lsn, TimelineId};

/// The spool file the report is kept in.
pub const SWITCHOVER: &str = "switchover.json";

#[derive(Clone, Debug)]
pub struct SwitchoverConfig {
    pub spool: PathBuf,
    /// conninfo of the standby to promote.
    pub standby: String,
    /// conninfo of the old primary: it must not answer once stopped.
    pub primary: Option<String>,
    pub stop_command: Option<String>,
    pub rejoin_command: Option<String>,
    /// How long to wait for each step.
    pub timeout: Duration,
    /// Physical slot to create on the standby before its promotion.
    pub slot: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SwitchoverReport {
    /// Where the old primary's WAL ends and the new timeline begins.
    pub switch_lsn: Lsn,
    /// The old primary's shutdown checkpoint, the last record it wrote.
    pub shutdown_checkpoint: Lsn,
    pub old_timeline: TimelineId,
    pub new_timeline: Option<TimelineId>,
    /// Bytes of WAL the switchover did not keep: 0.
    pub bytes_discarded: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<FenceOutcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejoin: Option<FenceOutcome>,
    /// Why the rejoin command failed, when it did (the switchover itself is done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejoin_error: Option<String>,
    pub slot: Option<String>,
    pub seconds: f64,
}

impl SwitchoverReport {
    pub fn to_text(&self) -> String {
        format!(
            "switched over at {}: the old primary's shutdown checkpoint at {} is the last record of timeline {}; the standby now writes timeline {}; 0 bytes lost{}\n",
            self.switch_lsn,
            self.shutdown_checkpoint,
            self.old_timeline,
            self.new_timeline
                .map_or("?".to_string(), |t| t.to_string()),
            match (&self.rejoin, &self.rejoin_error) {
                (_, Some(e)) => format!("; the rejoin command FAILED: {e}"),
                (Some(_), None) => "; the old primary was rejoined as a standby".into(),
                (None, None) => "; rejoin the old primary with waltail rejoin".into(),
            }
        )
    }
}

/// The spool's end, when it is the primary's clean end: (the shutdown
/// checkpoint, where it ends). Err says what the spool ends with instead.
pub fn clean_end(spool: &Spool) -> Result<(Lsn, Lsn, TimelineId), String> {
    let cut = crate::failover::find_cut(spool).map_err(|e| format!("{e:#}"))?;
    let s = &cut.summary;
    let (Some(at), Some(h)) = (s.last_record, s.last_header) else {
        return Err("no complete record in the spool's newest segment".into());
    };
    if !h.is_shutdown_checkpoint() {
        return Err(format!(
            "its last record, at {at}, is not a shutdown checkpoint (rmgr {} info {:#x}): the primary has not stopped cleanly, or its shipper did not send the checkpoint yet",
            h.rmid, h.info
        ));
    }
    let pos = spool.position().map_err(|e| format!("{e:#}"))?;
    if pos.map(|p| p.1) != Some(s.end_lsn) || cut.discarded != 0 {
        return Err(format!(
            "the spool holds WAL past the shutdown checkpoint at {at} (durable to {}): the primary was started again",
            pos.map_or("nothing".into(), |p| p.1.to_string())
        ));
    }
    Ok((at, s.end_lsn, cut.segment.tli))
}

/// Runs the switchover (see the module header).
pub async fn run(cfg: &SwitchoverConfig) -> Result<SwitchoverReport> {
    let t0 = Instant::now();
    let spool = Spool::open(&cfg.spool)?;
    if spool.is_fenced() {
        return Err(Precondition(format!(
            "the spool {} is fenced (failed or switched over already): reset it with `waltail spool reset` once this host follows the new primary",
            spool.dir.display()
        ))
        .into());
    }
    crate::failover::check_standby(&cfg.standby, &spool)
        .await
        .map_err(|e| Precondition(format!("{e:#}")))?;
    let mut stop = None;
    if let Some(cmd) = &cfg.stop_command {
        let peer = spool.status().and_then(|s| s.peer);
        stop = Some(
            crate::fence::run_hook(
                "stop command",
                "nothing was promoted",
                cmd,
                &spool.dir,
                peer.as_deref(),
                cfg.timeout,
            )
            .await?,
        );
    }
    if let Some(p) = &cfg.primary {
        if let Ok(c) = crate::pg::client::connect(p).await {
            let recovering = crate::pg::client::server_info(&c)
                .await
                .map(|i| i.in_recovery)
                .unwrap_or(false);
            if !recovering {
                return Err(Precondition(format!(
                    "the primary at --primary {:?} still takes connections: stop it cleanly first (pg_ctl stop -m fast), or give --stop-command; nothing was changed",
                    crate::pg::client::redact(p)
                ))
                .into());
            }
        }
    }
    // 3. The spool must end with the primary's shutdown checkpoint.
    let deadline = Instant::now() + cfg.timeout;
    // The scan reads the newest segment whole: only again when the spool moved.
    let mut scanned = None;
    let mut last = Err(String::new());
    let (ckpt, end, old_tli) = loop {
        let pos = spool.position().ok().flatten();
        if scanned != Some(pos) {
            scanned = Some(pos);
            last = clean_end(&spool);
        }
        match &last {
            Ok(x) => break *x,
            Err(why) if Instant::now() >= deadline => {
                return Err(Precondition(format!(
                    "the spool does not end with the primary's shutdown checkpoint after {:?}: {why}. A switchover needs the primary stopped cleanly (pg_ctl stop -m fast) while waltail ship runs beside it; after a crash use waltail failover. Nothing was changed",
                    cfg.timeout
                ))
                .into())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    info!(checkpoint = %ckpt, end = %end, "the spool ends with the primary's shutdown checkpoint");
    // 4. A slot on the standby, then promote.
    if let Some(slot) = &cfg.slot {
        let c = crate::pg::client::connect(&cfg.standby).await?;
        let exists = c
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[slot],
            )
            .await?;
        if exists.is_none() {
            c.query_one(
                "SELECT lsn::text FROM pg_create_physical_replication_slot($1, true)",
                &[slot],
            )
            .await
            .with_context(|| format!("creating the replication slot {slot:?} on the standby"))?;
            info!("created physical replication slot {slot:?} on the standby");
        }
    }
    let f = crate::failover::run(&crate::failover::FailoverConfig {
        spool: cfg.spool.clone(),
        standby: Some(cfg.standby.clone()),
        force: true,
        alive_window: Duration::ZERO,
        timeout: cfg.timeout,
        fence_command: None,
    })
    .await?;
    if f.final_lsn != end || f.bytes_discarded != 0 {
        bail!(
            "the failover step cut at {} ({} bytes discarded), not at the shutdown checkpoint's end {end}",
            f.final_lsn,
            f.bytes_discarded
        );
    }
    let mut report = SwitchoverReport {
        switch_lsn: end,
        shutdown_checkpoint: ckpt,
        old_timeline: old_tli,
        new_timeline: f.new_timeline,
        bytes_discarded: 0,
        stop,
        rejoin: None,
        rejoin_error: None,
        slot: cfg.slot.clone(),
        seconds: 0.0,
    };
    // 5. The old primary follows.
    if let Some(cmd) = &cfg.rejoin_command {
        match crate::fence::run_hook(
            "rejoin command",
            "the standby is promoted; rejoin the old primary by hand",
            cmd,
            &spool.dir,
            None,
            cfg.timeout,
        )
        .await
        {
            Ok(o) => report.rejoin = Some(o),
            Err(e) => report.rejoin_error = Some(format!("{e:#}")),
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    write_atomic(
        &spool.path(SWITCHOVER),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    spool.own(&spool.path(SWITCHOVER))?;
    Ok(report)
}
