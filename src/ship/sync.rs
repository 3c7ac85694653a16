//! The shipper's replication connection to the primary, for synchronous
//! mode and for `--wake walsender`.
//!
//! Synchronous mode (`ship --synchronous`): the shipper also holds a
//! physical replication connection to the primary, under its
//! `application_name` (default `waltail`), and reports the receiver's
//! durable position as that connection's write and flush position. Listed
//! in `synchronous_standby_names`, it makes every commit wait until its WAL
//! is durable in the spool, as Barman's and pgrwl's receivers do.
//!
//! The WAL itself still goes from pg_wal through the shipper's own session:
//! the walsender's XLogData is read and dropped, and used only as the
//! wake-up and its flush position: a walsender sends only flushed WAL, and
//! each message's WAL end is the server's flush position when it was sent
//! (`GetFlushRecPtr`), so the shipper sends up to it at once without asking
//! the server again. The apply position is reported as invalid, as
//! pg_receivewal does: nothing is replayed here, so `synchronous_commit =
//! remote_apply` would wait for ever; `on` (remote flush) is the setting.
//!
//! The connection names the shipper's slot, so the walsender moves the
//! slot's restart LSN to the reported flush position, and the shipper's
//! SQL slot advance is off in this mode (an active slot cannot be advanced).
//! A status update goes out on every ack, on every keepalive that asks,
//! and every 10 seconds. A lost connection is retried with backoff; while
//! it is down, commits wait, as with any synchronous standby.
//!
//! `--wake walsender` without `--synchronous` opens the same connection
//! only for its wake-ups (and the slot's reports); unlisted in
//! `synchronous_standby_names`, it holds no commit back.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::poll::Backoff;
use crate::pg::replication::{ReplicationConn, ServerMessage};
use crate::wal::{Lsn, TimelineId};

/// The primary's flush position as its walsender last reported it.
pub type Flushed = watch::Sender<Option<(TimelineId, Lsn)>>;

/// Status updates go out at least this often (wal_receiver_status_interval's default).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct SyncConfig {
    pub conninfo: String,
    /// The name `synchronous_standby_names` lists.
    pub application_name: String,
    /// Whether commits are meant to wait for it (only what it logs differs).
    pub synchronous: bool,
    pub slot: Option<String>,
    pub max_backoff: Duration,
}

/// Keeps the replication connection up until `shutdown`, reporting
/// `durable` (the receiver's durable LSN) and publishing in `wake` the
/// primary's flush position each time it has flushed more WAL.
pub async fn run(
    cfg: SyncConfig,
    mut durable: watch::Receiver<Option<Lsn>>,
    wake: Arc<Flushed>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(cfg.max_backoff);
    let m = crate::metrics::ship();
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let err = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = stream(&cfg, &mut durable, &wake, &shutdown, &mut backoff) => match r {
                Ok(()) => return,
                Err(e) => e,
            },
        };
        m.sync_connected.set(0);
        // No flush position until the connection is back: the shipper
        // wakes on WAL writes (inotify) and the poll meanwhile.
        wake.send_replace(None);
        let wait = backoff.fail();
        if cfg.synchronous {
            warn!(
                "synchronous mode: the replication connection to the primary failed ({err:#}); commits wait until it is back; retrying in {wait:?}"
            );
        } else {
            warn!(
                "the replication connection to the primary failed ({err:#}); waking on WAL writes and the poll until it is back; retrying in {wait:?}"
            );
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn stream(
    cfg: &SyncConfig,
    durable: &mut watch::Receiver<Option<Lsn>>,
    wake: &Flushed,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    // Injected: the replication connection cannot be made.
    fail::fail_point!("ship-walsender-connect", |_| Err(anyhow::anyhow!(
        "injected by failpoint ship-walsender-connect"
    )));
    let mut c = ReplicationConn::connect(&cfg.conninfo, &cfg.application_name).await?;
    let id = c.identify_system().await?;
    c.start_replication(cfg.slot.as_deref(), id.xlogpos).await?;
    if cfg.synchronous {
        info!(
            application_name = %cfg.application_name,
            "synchronous mode: reporting the spool's durable position to the primary (list {:?} in synchronous_standby_names)",
            cfg.application_name
        );
    } else {
        info!("waking on the walsender's flushed WAL (a replication connection)");
    }
    backoff.reset();
    crate::metrics::ship().sync_connected.set(1);
    // IDENTIFY_SYSTEM's position is the server's flush position.
    wake.send_replace(Some((id.timeline, id.xlogpos)));
    let mut reported = Lsn(0);
    let mut status = tokio::time::interval(STATUS_INTERVAL);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = durable.borrow_and_update().unwrap_or(Lsn(0));
        if now != reported {
            c.send_status(now, now, false).await?;
            reported = now;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                c.close().await;
                return Ok(());
            }
            r = durable.changed() => {
                if r.is_err() {
                    c.close().await;
                    return Ok(());
                }
            }
            _ = status.tick() => c.send_status(reported, reported, false).await?,
            m = c.recv() => match m? {
                ServerMessage::XLogData { start, len, wal_end } => {
                    let end = start.checked_add(len as u64).map_or(wal_end, |e| e.max(wal_end));
                    debug!(%start, len, %end, "walsender: more WAL flushed");
                    crate::metrics::ship().wakeups.inc();
                    wake.send_replace(Some((id.timeline, end)));
                }
                ServerMessage::Keepalive { reply, .. } => {
                    if reply {
                        c.send_status(reported, reported, false).await?;
                    }
                }
                ServerMessage::Done => anyhow::bail!("the primary ended the replication stream"),
            },
        }
    }
}
