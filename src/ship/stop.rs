//! The primary's clean stop: shipping the shutdown checkpoint, the last
//! record a clean shutdown writes, before the shipper lets go.
//!
//! A fast or smart shutdown first ends every session, the shipper's too, and
//! only then writes the shutdown checkpoint, so the shipper never sees that
//! record's flush position over SQL. When the connection breaks, it reads the
//! primary's own files instead ([`crate::pg::control`]):
//!
//! * `postmaster.pid` says `stopping`, or the control file says "shutting
//!   down": a shutdown is under way; look again every few milliseconds;
//! * the control file says "shut down": its latest checkpoint is the shutdown
//!   checkpoint, flushed before the control file was written. Read that
//!   record in pg_wal (CRC-checked, and it must be a shutdown checkpoint of
//!   the stream's timeline), ship up to its end, and wait for the ack;
//! * anything else (a running server whose connection broke, a crash, no
//!   control file to read): nothing is proven flushed, nothing is shipped,
//!   and the shipper reconnects as before.
//!
//! So only WAL that the control file proves flushed goes out. With the record
//! in the spool, the standby can be promoted exactly at the primary's end of
//! WAL (`waltail switchover`), and the old primary can follow it without a
//! rewind.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::send::send_upto;
use super::session::Session;
use super::{Fault, Primary, ShipConfig};
use crate::pg::control::{self, DbState, PostmasterStatus};
use crate::proto::Frame;
use crate::spool::now_us;
use crate::wal::Lsn;

/// How long a shutdown may take to write its checkpoint (a fast shutdown
/// writes every dirty buffer first).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(600);
const LOOK_EVERY: Duration = Duration::from_millis(5);

/// What the primary's files say after its connection broke.
enum Seen {
    /// Stopped cleanly: the shutdown checkpoint is at this LSN.
    ShutDown(control::ControlFile),
    /// A shutdown is under way.
    Stopping,
    /// Nothing proven: running, crashed, or unreadable.
    Nothing(String),
}

fn look(pgdata: &Path) -> Seen {
    let ctl = match control::read(pgdata) {
        Ok(c) => c,
        Err(e) => return Seen::Nothing(e),
    };
    match (ctl.state, control::postmaster_status(pgdata)) {
        (DbState::ShutDown, _) => Seen::ShutDown(ctl),
        (DbState::ShuttingDown, _) => Seen::Stopping,
        (DbState::InProduction, PostmasterStatus::Stopping) => Seen::Stopping,
        (state, pm) => Seen::Nothing(format!("state {state:?}, postmaster {pm:?}")),
    }
}

/// Called when the connection to the primary broke while a receiver
/// session is open: ships the shutdown checkpoint if the primary stopped
/// cleanly (see the module header). Returns the end of WAL shipped then.
pub(super) async fn ship_shutdown_checkpoint(
    cfg: &ShipConfig,
    p: &mut Primary,
    s: &mut Session,
    shutdown: &CancellationToken,
) -> Result<Option<Lsn>, Fault> {
    let pgdata = std::path::PathBuf::from(&p.info.data_directory);
    let deadline = Instant::now() + SHUTDOWN_WAIT;
    let ctl = loop {
        match look(&pgdata) {
            Seen::ShutDown(c) => break c,
            Seen::Stopping if Instant::now() < deadline => {}
            Seen::Stopping => {
                warn!("the primary has been shutting down for {SHUTDOWN_WAIT:?}; not waiting for its shutdown checkpoint any longer");
                return Ok(None);
            }
            Seen::Nothing(why) => {
                debug!("primary connection lost, no clean shutdown seen ({why})");
                return Ok(None);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(LOOK_EVERY) => {}
        }
    };
    let (tli, at) = s.next;
    if ctl.sysid != p.info.sysid || ctl.tli != tli {
        warn!(
            "the stopped primary's control file names system {} timeline {}, the stream is of {} timeline {tli}: its shutdown checkpoint is not shipped",
            ctl.sysid, ctl.tli, p.info.sysid
        );
        return Ok(None);
    }
    let rec = match p.source.record_at(tli, ctl.checkpoint) {
        Ok(Ok(r)) if r.header.is_shutdown_checkpoint() => r,
        Ok(Ok(r)) => {
            warn!(
                "the record at {} (the control file's latest checkpoint) is rmgr {} info {:#x}, not a shutdown checkpoint: not shipped",
                ctl.checkpoint, r.header.rmid, r.header.info
            );
            return Ok(None);
        }
        Ok(Err(why)) => {
            warn!(
                "cannot read the shutdown checkpoint at {} in pg_wal ({why}): not shipped",
                ctl.checkpoint
            );
            return Ok(None);
        }
        Err(e) => return Err(Fault::Fatal(e.into())),
    };
    let end = rec.next;
    if end > at {
        send_upto(p, s, end).await?;
    }
    s.w.send(&Frame::Heartbeat {
        flush: end,
        time_us: now_us(),
    })
    .await
    .map_err(|e| Fault::Receiver(e.into()))?;
    // The ack: the spool holds the primary's whole WAL.
    let wait = tokio::time::timeout(cfg.ack_timeout, async {
        loop {
            if s.acks.borrow().durable.is_some_and(|d| d >= (tli, end)) {
                return true;
            }
            if s.acks.borrow().closed.is_some() || s.acks.changed().await.is_err() {
                return false;
            }
        }
    })
    .await;
    if wait == Ok(true) {
        info!(checkpoint = %ctl.checkpoint, end = %end, "the primary stopped cleanly: its shutdown checkpoint is durable in the spool, which now holds all of its WAL");
        Ok(Some(end))
    } else {
        warn!(checkpoint = %ctl.checkpoint, end = %end, "shipped the primary's shutdown checkpoint, but the receiver did not ack it");
        Ok(None)
    }
}
