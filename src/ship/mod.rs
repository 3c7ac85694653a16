//! `waltail ship`: the sidecar on the primary host that sends flushed WAL to
//! a receiver as it is written.
//!
//! **When it looks.** An inotify watch on pg_wal ([`wake`]) wakes the shipper
//! the moment PostgreSQL writes into a segment; it then asks for
//! `pg_walfile_name_offset(pg_current_wal_flush_lsn())` together with the
//! insert position `pg_current_wal_insert_lsn()`. PostgreSQL writes WAL
//! before it fdatasyncs it, so while the insert position is ahead of the
//! flush position the shipper looks again at once (8 round trips), then every
//! millisecond, then with backoff up to the interval ([`poll::Chase`]); under
//! load, when WAL is always on its way, that is at most about one look a
//! millisecond. Beside the events a fixed poll every
//! `interval` (default 250 ms) keeps running: the safety net for events that
//! never came (a full inotify queue, a watch that failed) and the shipper's
//! heartbeat; `--wake poll` turns the events off and leaves only it.
//!
//! With a replication connection (`--wake walsender`, and always in
//! synchronous mode, [`sync`]) the walsender's XLogData wakes the shipper
//! instead, and its WAL end is the primary's flush position: what it
//! reports on the stream's timeline is shipped at once, without a query.
//! The watch is then waited on only while that connection is down. Why it
//! is not the default: it needs a `replication` line in pg_hba.conf and a
//! walsender slot, and its walsender streams the WAL a second time to a
//! process that reads it from pg_wal; the watch needs nothing and costs
//! nothing while the server is idle. Under load it is the faster of the two
//! (no query per look: `bench --visible` in the README), so a hot standby
//! fed by `receive --serve` is set up with it.
//!
//! **What it sends.** Only WAL at or below the flush position, whatever woke
//! it: the bytes from the last position to the flush LSN, read out of
//! the memory-mapped segment in pg_wal ([`source`]). Segments are finished to
//! their very end, padding included, before the next one starts, however many
//! passed between two polls. The segment is computed from the LSN itself, so
//! `pg_walfile_name_offset`'s boundary quirk (PostgreSQL 13-16 name the
//! previous segment for an LSN exactly on a boundary; 17 names the new one) is
//! only cross-checked, never relied on.
//!
//! Timelines: when the server is on a newer timeline than the stream, the
//! shipper first finishes the old timeline up to its switch point (from the
//! new timeline's history file), then sends the history files, then the new
//! timeline's data from the switch point.
//!
//! Retention: a physical replication slot (created if missing, reserving WAL
//! at once) is advanced to what the receiver acked as durable, so the primary
//! keeps every segment not yet shipped.
//!
//! A clean stop: the shutdown checkpoint comes after the shipper's session
//! was ended, so when the connection breaks the shipper reads the primary's
//! control file, and once it says "shut down" ships up to the end of that
//! checkpoint record ([`stop`]): the spool then holds all of the primary's
//! WAL, for `waltail switchover`.
//!
//! Faults: a lost primary or receiver connection is retried with backoff
//! (logged), resuming at the receiver's durable position. WAL that is gone
//! before it was shipped, another cluster, or a refusal by the receiver
//! (fenced, wrong cluster) stops the shipper with an error that says what to do.

pub mod poll;
mod send;
mod session;
pub mod source;
mod stop;
pub mod sync;
pub mod wake;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::pg::client::{connect, server_info, wal_point, FlushPoint, ServerInfo};
use crate::proto::tls::TlsOptions;
use crate::proto::Secret;
use crate::wal::{Lsn, TimelineId};
pub use poll::check_name_quirk;
use poll::{Backoff, Chase};
use send::ship_once;
use session::{open_session, Session};
pub use session::{Misconfigured, Refused};
use source::WalSource;
use wake::{Wake, WakeMode};

/// The fixed poll's default: the safety net beside the write events.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Clone, Debug)]
pub struct ShipConfig {
    /// libpq conninfo of the primary (PG* variables fill in the rest).
    pub conninfo: String,
    /// host:port of the receiver.
    pub receiver: String,
    pub secret: Secret,
    pub tls: TlsOptions,
    /// The fixed poll: beside the write events, or alone with `WakeMode::Poll`.
    pub interval: Duration,
    /// How the shipper learns of new WAL between polls.
    pub wake: WakeMode,
    /// Heartbeat at least this often while idle.
    pub heartbeat: Duration,
    /// Reconnect when sent WAL goes unacknowledged this long, or a send
    /// blocks this long: a link that died without closing.
    pub ack_timeout: Duration,
    /// Replication slot to create/use and advance; None: no slot.
    pub slot: Option<String>,
    /// Where a new spool starts (rounded down to its segment); default: the
    /// slot's restart LSN, or the current segment without a slot.
    pub start_lsn: Option<Lsn>,
    pub max_backoff: Duration,
    /// pg_wal directory; default `<data_directory>/pg_wal` from the server.
    pub pg_wal: Option<PathBuf>,
    /// A new poll interval on SIGHUP.
    pub reload_interval: Option<watch::Receiver<Duration>>,
    /// Synchronous mode: the application_name under which a replication
    /// connection reports the receiver's durable position ([`sync`]).
    pub synchronous: Option<String>,
}

impl ShipConfig {
    /// Checks the settings that cannot work whatever the network does: the
    /// receiver's address, and TLS (certificates that load, a server name
    /// that can be checked). Errors are for exit 2 at start.
    pub fn check(&self) -> Result<(), String> {
        let host = crate::proto::host_of(&self.receiver, "--receiver")?;
        self.tls.connector(host)?;
        Ok(())
    }

    pub fn new(conninfo: &str, receiver: &str, secret: Secret) -> Self {
        ShipConfig {
            conninfo: conninfo.into(),
            receiver: receiver.into(),
            secret,
            tls: TlsOptions::default(),
            interval: DEFAULT_INTERVAL,
            wake: WakeMode::Inotify,
            heartbeat: Duration::from_millis(100),
            ack_timeout: Duration::from_secs(30),
            slot: Some("waltail".into()),
            start_lsn: None,
            max_backoff: Duration::from_secs(5),
            pg_wal: None,
            reload_interval: None,
            synchronous: None,
        }
    }
}

/// Progress, for status reporting and tests.
#[derive(Clone, Debug, Default)]
pub struct ShipProgress {
    pub primary_flush: Option<Lsn>,
    pub shipped: Option<(TimelineId, Lsn)>,
    pub durable: Option<(TimelineId, Lsn)>,
    pub connected: bool,
    pub reconnects: u64,
    pub last_error: Option<String>,
}

/// Why a step failed, which decides what is retried.
pub(super) enum Fault {
    /// The primary connection: reconnect to it.
    Pg(anyhow::Error),
    /// The receiver connection: reconnect to it.
    Receiver(anyhow::Error),
    /// Cannot go on.
    Fatal(anyhow::Error),
}

pub(super) struct Primary {
    client: Client,
    poll: tokio_postgres::Statement,
    info: ServerInfo,
    source: WalSource,
    pg_wal: PathBuf,
    wake: Wake,
}

/// Runs the shipper until `shutdown` is cancelled or a fatal error.
pub async fn run(
    cfg: ShipConfig,
    shutdown: CancellationToken,
    progress: watch::Sender<ShipProgress>,
) -> anyhow::Result<()> {
    if cfg.secret.is_none() {
        warn!("AUTHENTICATION IS OFF (--insecure-no-auth): WAL goes to {} without proving who either side is; use this for local demos only", cfg.receiver);
    }
    let mut primary: Option<Primary> = None;
    let mut session: Option<Session> = None;
    let mut sysid: Option<u64> = None;
    let mut pg_backoff = Backoff::new(cfg.max_backoff);
    let mut rx_backoff = Backoff::new(cfg.max_backoff);
    let mut slot_done: Option<Lsn> = None;
    let mut last_slot_advance = Instant::now() - Duration::from_secs(60);
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reload = cfg.reload_interval.clone();
    let m = crate::metrics::ship();
    m.interval_seconds.set(cfg.interval.as_secs_f64());

    // What the receiver acked as durable, as soon as it says so: the
    // synchronous mode reports it to the primary.
    let (durable_tx, durable_rx) = watch::channel(None::<Lsn>);
    // The walsender's flush position (synchronous mode, `--wake walsender`).
    let (flushed_tx, mut flushed_rx) = watch::channel(None::<(TimelineId, Lsn)>);
    let sync_wake = std::sync::Arc::new(flushed_tx);
    // A flush position the walsender reported since the last look.
    let mut hinted: Option<(TimelineId, Lsn)> = None;
    // Started once the primary is reached (and the slot it names exists).
    let mut sync_task: Option<tokio::task::JoinHandle<()>> = None;
    let mut durable_rx = Some(durable_rx);

    let mut chase = Chase::default();
    loop {
        let chase_due = chase.due();
        // A look due now is taken without the timer, which rounds every
        // deadline up to its next millisecond tick.
        if shutdown.is_cancelled() {
            break;
        }
        let due_now = chase_due.is_some_and(|t| t <= Instant::now());
        // While the walsender reports flushes, the write events are not
        // needed (`--wake walsender`); they are while it is down.
        let walsender_up = sync_task.is_some() && flushed_rx.borrow().is_some();
        if !due_now {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                () = async { match primary.as_mut() { Some(p) if !walsender_up => p.wake.wait().await, _ => std::future::pending().await } } => {
                    if !chase.woken() {
                        continue;
                    }
                }
                () = async { match chase_due { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => {}
                // The walsender of the synchronous mode sent flushed WAL.
                Ok(()) = flushed_rx.changed(), if sync_task.is_some() => {
                    hinted = *flushed_rx.borrow_and_update();
                }
                Ok(()) = async { match reload.as_mut() { Some(r) => r.changed().await, None => std::future::pending().await } } => {
                    let every = *reload.as_mut().expect("changed above").borrow_and_update();
                    if every != tick.period() {
                        info!("poll interval now {}", humantime::format_duration(every));
                        tick = tokio::time::interval(every);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        m.interval_seconds.set(every.as_secs_f64());
                    }
                    continue;
                }
            }
        }
        // The primary.
        if primary.is_none() {
            chase.reset();
            if !pg_backoff.due() {
                continue;
            }
            match open_primary(&cfg).await {
                Ok(p) => {
                    if let Some(s) = sysid {
                        if s != p.info.sysid {
                            bail!("the server at the conninfo is now a different cluster (system identifier {} instead of {s}); refusing to mix their WAL", p.info.sysid);
                        }
                    }
                    sysid = Some(p.info.sysid);
                    if pg_backoff.failures > 0 {
                        info!(
                            "primary reachable again after {} attempts",
                            pg_backoff.failures
                        );
                    }
                    pg_backoff.reset();
                    primary = Some(p);
                    let replication = (cfg.synchronous.is_some()
                        || cfg.wake == WakeMode::Walsender)
                        .then(|| durable_rx.take())
                        .flatten();
                    if let Some(rx) = replication {
                        sync_task = Some(tokio::spawn(sync::run(
                            sync::SyncConfig {
                                conninfo: cfg.conninfo.clone(),
                                application_name: cfg
                                    .synchronous
                                    .clone()
                                    .unwrap_or_else(|| "waltail".into()),
                                synchronous: cfg.synchronous.is_some(),
                                slot: cfg.slot.clone(),
                                max_backoff: cfg.max_backoff,
                            },
                            rx,
                            sync_wake.clone(),
                            shutdown.child_token(),
                        )));
                    }
                }
                Err(Fault::Fatal(e)) => return Err(e),
                Err(Fault::Pg(e)) | Err(Fault::Receiver(e)) => {
                    let wait = pg_backoff.fail();
                    warn!("primary unreachable ({e:#}); retrying in {wait:?}");
                    progress.send_modify(|p| p.last_error = Some(format!("{e:#}")));
                    continue;
                }
            }
        }
        let p = primary.as_mut().expect("connected above");
        // What the walsender reported flushed on the stream's own timeline
        // is shipped without asking the server (the poll's and the chase's
        // looks still ask it).
        let hint = hinted
            .take()
            .filter(|h| session.as_ref().is_some_and(|s| s.next.0 == h.0));
        if let Some((_, lsn)) = hint {
            if session.as_ref().is_some_and(|s| s.next.1 >= lsn) {
                continue;
            }
        }
        let fp = match hint {
            Some((tli, lsn)) => FlushPoint::on_timeline(tli, lsn, p.info.seg_size),
            None => {
                m.polls.inc();
                match wal_point(&p.client, &p.poll).await {
                    Ok((fp, inserted)) => {
                        chase.looked(inserted, fp.lsn, tick.period());
                        fp
                    }
                    Err(e) => {
                        warn!("lost the primary ({e:#})");
                        if let Some(s) = session.as_mut() {
                            match stop::ship_shutdown_checkpoint(&cfg, p, s, &shutdown).await {
                                Ok(Some(_)) => {
                                    let acked = s.acks.borrow().durable;
                                    m.observe(s.next.1, s.next.1, acked.map(|d| d.1));
                                    progress.send_modify(|x| {
                                        x.primary_flush = Some(s.next.1);
                                        x.shipped = Some(s.next);
                                        x.durable = acked;
                                    });
                                }
                                Ok(None) => {}
                                Err(Fault::Fatal(e)) => return Err(e),
                                Err(Fault::Pg(e)) | Err(Fault::Receiver(e)) => {
                                    warn!(
                                "lost the receiver while shipping the shutdown checkpoint ({e:#})"
                            );
                                    session = None;
                                }
                            }
                        }
                        let wait = pg_backoff.fail();
                        info!("reconnecting to the primary in {wait:?}");
                        primary = None;
                        continue;
                    }
                }
            }
        };
        if hint.is_none() {
            check_name_quirk(&fp, p.info.seg_size, p.info.major());
        }
        let Some(server_tli) = fp.timeline(p.info.seg_size) else {
            bail!(
                "cannot read the timeline from WAL file name {:?}",
                fp.file_name
            );
        };

        // The receiver.
        if session.is_none() {
            if !rx_backoff.due() {
                continue;
            }
            match open_session(&cfg, p, &fp, server_tli, &durable_tx).await {
                Ok(s) => {
                    if rx_backoff.failures > 0 {
                        info!(
                            "receiver reachable again after {} attempts",
                            rx_backoff.failures
                        );
                    }
                    rx_backoff.reset();
                    info!(tli = %s.next.0, lsn = %s.next.1, "streaming to {}", cfg.receiver);
                    m.connected.set(1);
                    progress.send_modify(|x| {
                        x.connected = true;
                        x.shipped = Some(s.next);
                    });
                    session = Some(s);
                }
                Err(Fault::Fatal(e)) => return Err(e),
                Err(Fault::Pg(e)) => {
                    warn!("lost the primary ({e:#})");
                    primary = None;
                    continue;
                }
                Err(Fault::Receiver(e)) => {
                    let wait = rx_backoff.fail();
                    warn!("receiver unreachable ({e:#}); retrying in {wait:?}");
                    m.connected.set(0);
                    progress.send_modify(|x| {
                        x.connected = false;
                        x.last_error = Some(format!("{e:#}"));
                    });
                    continue;
                }
            }
        }
        let s = session.as_mut().expect("connected above");
        let sent = tokio::time::timeout(cfg.ack_timeout, ship_once(&cfg, p, s, &fp, server_tli))
            .await
            .unwrap_or_else(|_| {
                Err(Fault::Receiver(anyhow!(
                    "sending blocked for {:?}: the receiver or the link is stuck",
                    cfg.ack_timeout
                )))
            });
        match sent {
            Ok(()) => {}
            Err(Fault::Fatal(e)) => return Err(e),
            Err(Fault::Pg(e)) => {
                warn!("lost the primary ({e:#}); reconnecting");
                primary = None;
                continue;
            }
            Err(Fault::Receiver(e)) => {
                warn!(
                    "lost the receiver ({e:#}); reconnecting and resuming at its durable position"
                );
                session = None;
                m.connected.set(0);
                m.reconnects.inc();
                progress.send_modify(|x| {
                    x.connected = false;
                    x.reconnects += 1;
                    x.last_error = Some(format!("{e:#}"));
                });
                rx_backoff.fail();
                continue;
            }
        }
        let acks = s.acks.borrow().clone();
        m.observe(fp.lsn, s.next.1, acks.durable.map(|d| d.1));
        progress.send_modify(|x| {
            x.primary_flush = Some(fp.lsn);
            x.shipped = Some(s.next);
            x.durable = acks.durable;
        });
        // Let the primary recycle what is durable on the standby host (in
        // synchronous mode the replication connection's reports do it).
        if let (Some(slot), Some((_, durable)), None) = (&cfg.slot, acks.durable, &sync_task) {
            if slot_done.is_none_or(|d| durable > d)
                && last_slot_advance.elapsed() >= Duration::from_millis(500)
            {
                last_slot_advance = Instant::now();
                match p
                    .client
                    .query_one(
                        "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)::text",
                        &[slot, &durable.to_string()],
                    )
                    .await
                {
                    Ok(_) => slot_done = Some(durable),
                    Err(e) => debug!("advancing slot {slot} to {durable}: {e}"),
                }
            }
        }
    }
    if let Some(mut s) = session.take() {
        let _ = s.w.flush().await;
        s.w.shutdown().await;
    }
    if let Some(t) = sync_task {
        let _ = t.await;
    }
    info!("shipper stopped");
    Ok(())
}

async fn open_primary(cfg: &ShipConfig) -> Result<Primary, Fault> {
    let client = connect(&cfg.conninfo).await.map_err(Fault::Pg)?;
    let info = server_info(&client).await.map_err(Fault::Pg)?;
    if info.in_recovery {
        return Err(Fault::Pg(anyhow!(
            "the server is in recovery (a standby); waltail ships from a primary"
        )));
    }
    if info.major() < 13 {
        return Err(Fault::Fatal(anyhow!(
            "PostgreSQL {} is not supported (13 to 18 are)",
            info.version_num
        )));
    }
    if let Some(slot) = &cfg.slot {
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[slot],
            )
            .await
            .map_err(|e| Fault::Pg(e.into()))?;
        if exists.is_none() {
            client
                .query_one(
                    "SELECT lsn::text FROM pg_create_physical_replication_slot($1, true)",
                    &[slot],
                )
                .await
                .map_err(|e| {
                    Fault::Fatal(anyhow!("cannot create replication slot {slot:?}: {e}"))
                })?;
            info!("created physical replication slot {slot:?} (reserving WAL from now on)");
        }
    }
    let pg_wal = cfg
        .pg_wal
        .clone()
        .unwrap_or_else(|| PathBuf::from(&info.data_directory).join("pg_wal"));
    if !pg_wal.is_dir() {
        return Err(Fault::Fatal(anyhow!(
            "{} is not a directory: waltail ship runs on the primary's host and reads its pg_wal (use --pg-wal if it lives elsewhere)",
            pg_wal.display()
        )));
    }
    let source = WalSource::new(pg_wal.clone(), info.seg_size, info.sysid);
    let wake = Wake::watch(cfg.wake, &pg_wal);
    let poll = client
        .prepare(crate::pg::client::WAL_POINT_SQL)
        .await
        .map_err(|e| Fault::Pg(e.into()))?;
    Ok(Primary {
        client,
        poll,
        info,
        source,
        pg_wal,
        wake,
    })
}
