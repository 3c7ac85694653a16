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
//! heartbeat; `--wake poll` turns the events off and leaves only it. Why not
//! a replication connection as the wake-up: its walsender would stream the
//! WAL bytes a second time to a process that already reads them from
//! pg_wal, and tokio-postgres has no replication protocol; the watch costs
//! nothing while the server is idle.
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
//! Faults: a lost primary or receiver connection is retried with backoff
//! (logged), resuming at the receiver's durable position. WAL that is gone
//! before it was shipped, another cluster, or a refusal by the receiver
//! (fenced, wrong cluster) stops the shipper with an error that says what to do.

pub mod poll;
pub mod source;
pub mod wake;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::pg::client::{connect, server_info, wal_point, FlushPoint, ServerInfo};
use crate::proto::conn::{client_auth, HANDSHAKE_TIMEOUT};
use crate::proto::tls::TlsOptions;
use crate::proto::{
    BoxIo, Frame, FrameReader, FrameWriter, Hello, ProtoError, RefuseCode, Secret, MAX_DATA,
};
use crate::spool::now_us;
use crate::wal::history::{parse_history, switchpoint_of};
use crate::wal::segment::history_file_name;
use crate::wal::{Lsn, SegmentName, TimelineId};
pub use poll::check_name_quirk;
use poll::{Backoff, Chase};
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
enum Fault {
    /// The primary connection: reconnect to it.
    Pg(anyhow::Error),
    /// The receiver connection: reconnect to it.
    Receiver(anyhow::Error),
    /// Cannot go on.
    Fatal(anyhow::Error),
}

struct Primary {
    client: Client,
    poll: tokio_postgres::Statement,
    info: ServerInfo,
    source: WalSource,
    pg_wal: PathBuf,
    wake: Wake,
}

struct Session {
    w: FrameWriter<tokio::io::WriteHalf<BoxIo>>,
    acks: watch::Receiver<AckState>,
    reader: tokio::task::JoinHandle<()>,
    /// Next byte to send.
    next: (TimelineId, Lsn),
    last_heartbeat: Instant,
    /// The last durable position acked, and since when it has not moved.
    last_ack: (Option<(TimelineId, Lsn)>, Instant),
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[derive(Clone, Debug, Default)]
struct AckState {
    durable: Option<(TimelineId, Lsn)>,
    /// Why the receiver's side of the connection ended.
    closed: Option<String>,
    /// The receiver's refusal, when it ended with one.
    refused: Option<(RefuseCode, String)>,
}

/// The receiver refuses this shipper for good (a fenced spool, another
/// cluster, a failed authentication): retrying cannot help, an operator
/// must act. The command exits with its own status for it, which the
/// systemd unit does not restart on.
#[derive(Debug, thiserror::Error)]
#[error("receiver {receiver} refused this shipper: {reason}")]
pub struct Refused {
    pub receiver: String,
    pub code: RefuseCode,
    pub reason: String,
}

impl Refused {
    fn new(cfg: &ShipConfig, code: RefuseCode, reason: String) -> Refused {
        Refused {
            receiver: cfg.receiver.clone(),
            code,
            reason,
        }
    }
}

/// The two sides' settings cannot work together (TLS on one side only, a
/// certificate that cannot match): exit 2, as for a bad argument.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Misconfigured(pub String);

/// What a refusal means for the shipper: stop for good, or try again.
fn refused(cfg: &ShipConfig, code: RefuseCode, reason: String) -> Fault {
    if code == RefuseCode::Config {
        Fault::Fatal(Misconfigured(format!("receiver {}: {reason}", cfg.receiver)).into())
    } else if code.is_permanent() {
        Fault::Fatal(Refused::new(cfg, code, reason).into())
    } else {
        Fault::Receiver(anyhow!("receiver refused: {reason}"))
    }
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

    let mut chase = Chase::default();
    loop {
        let chase_due = chase.due();
        // A look due now is taken without the timer, which rounds every
        // deadline up to its next millisecond tick.
        if shutdown.is_cancelled() {
            break;
        }
        let due_now = chase_due.is_some_and(|t| t <= Instant::now());
        if !due_now {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                () = async { match primary.as_mut() { Some(p) => p.wake.wait().await, None => std::future::pending().await } } => {
                    if !chase.woken() {
                        continue;
                    }
                }
                () = async { match chase_due { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => {}
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
        m.polls.inc();
        let fp = match wal_point(&p.client, &p.poll).await {
            Ok((fp, inserted)) => {
                chase.looked(inserted, fp.lsn, tick.period());
                fp
            }
            Err(e) => {
                let wait = pg_backoff.fail();
                warn!("lost the primary ({e:#}); reconnecting in {wait:?}");
                primary = None;
                continue;
            }
        };
        check_name_quirk(&fp, p.info.seg_size, p.info.major());
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
            match open_session(&cfg, p, &fp, server_tli).await {
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
        // Let the primary recycle what is durable on the standby host.
        if let (Some(slot), Some((_, durable))) = (&cfg.slot, acks.durable) {
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

async fn connect_receiver(cfg: &ShipConfig) -> Result<BoxIo, Fault> {
    let sock = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(&cfg.receiver))
        .await
        .map_err(|_| Fault::Receiver(anyhow!("connecting to {} timed out", cfg.receiver)))?
        .with_context(|| format!("cannot connect to receiver {}", cfg.receiver))
        .map_err(Fault::Receiver)?;
    let _ = sock.set_nodelay(true);
    let misconfigured = |e: String| Fault::Fatal(Misconfigured(e).into());
    let host = crate::proto::host_of(&cfg.receiver, "--receiver").map_err(misconfigured)?;
    match cfg.tls.connector(host).map_err(misconfigured)? {
        Some((c, name)) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, c.connect(name, sock)).await {
                Err(_) => Err(Fault::Receiver(anyhow!("TLS handshake timed out"))),
                Ok(Ok(s)) => Ok(Box::new(s)),
                Ok(Err(e)) => {
                    use tokio_rustls::rustls::Error as TlsError;
                    Err(match e.get_ref().and_then(|i| i.downcast_ref::<TlsError>()) {
                    // What came back is not TLS: the receiver speaks plain frames.
                    Some(TlsError::InvalidMessage(_)) => misconfigured(format!(
                        "the receiver {} does not speak TLS, and this shipper has --tls-ca: give the receiver --tls-cert and --tls-key, or drop --tls-ca here",
                        cfg.receiver
                    )),
                    Some(TlsError::InvalidCertificate(why)) => misconfigured(format!(
                        "the receiver {}'s certificate is not accepted ({why:?}): it must be signed by --tls-ca and name {host}",
                        cfg.receiver
                    )),
                    _ => Fault::Receiver(anyhow::Error::new(e).context("TLS handshake with the receiver")),
                })
                }
            }
        }
        None => Ok(Box::new(sock)),
    }
}

async fn open_session(
    cfg: &ShipConfig,
    p: &mut Primary,
    fp: &FlushPoint,
    server_tli: TimelineId,
) -> Result<Session, Fault> {
    let io = connect_receiver(cfg).await?;
    let (r, w) = tokio::io::split(io);
    let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
    client_auth(&mut r, &mut w, &cfg.secret)
        .await
        .map_err(|e| match e {
            e @ ProtoError::Auth(_) => {
                crate::metrics::ship().auth_failures.inc();
                Fault::Fatal(Refused::new(cfg, RefuseCode::Auth, e.to_string()).into())
            }
            ProtoError::Refused {
                code: RefuseCode::Config,
                reason,
            } => Fault::Fatal(Misconfigured(format!("receiver {}: {reason}", cfg.receiver)).into()),
            ProtoError::Refused { code, reason } => {
                crate::metrics::ship().auth_failures.inc();
                Fault::Fatal(Refused::new(cfg, code, reason).into())
            }
            e => Fault::Receiver(e.into()),
        })?;
    let hello = Hello {
        sysid: p.info.sysid,
        tli: server_tli,
        seg_size: p.info.seg_size.bytes() as u32,
        pg_version: p.info.version_num,
        flush: fp.lsn,
    };
    w.send(&Frame::Hello(hello))
        .await
        .map_err(|e| Fault::Receiver(e.into()))?;
    let position = match r.expect(HANDSHAKE_TIMEOUT, "Welcome").await {
        Ok(Frame::Welcome { position }) => position,
        Ok(other) => {
            return Err(Fault::Receiver(anyhow!(
                "expected Welcome, got {}",
                other.name()
            )))
        }
        Err(ProtoError::Refused { code, reason }) => return Err(refused(cfg, code, reason)),
        Err(e) => return Err(Fault::Receiver(e.into())),
    };
    let next = match position {
        Some(pos) => pos,
        None => {
            let start = match cfg.start_lsn {
                Some(l) => l,
                None => match &cfg.slot {
                    Some(slot) => {
                        let row = p
                            .client
                            .query_one("SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[slot])
                            .await
                            .map_err(|e| Fault::Pg(e.into()))?;
                        let l: Option<String> = row.get(0);
                        l.and_then(|l| l.parse().ok()).unwrap_or(fp.lsn)
                    }
                    None => fp.lsn,
                },
            };
            let start = start.segment_lsn(p.info.seg_size);
            info!(%start, "new spool: starting at the beginning of segment {}", SegmentName::of_lsn(server_tli, start, p.info.seg_size).file_name(p.info.seg_size));
            (server_tli, start)
        }
    };
    let (tx, acks) = watch::channel(AckState {
        durable: position,
        ..Default::default()
    });
    let reader = tokio::spawn(async move {
        loop {
            match r.read_frame().await {
                Ok(Some(Frame::Ack { tli, durable })) => {
                    crate::metrics::ship().acks.inc();
                    tx.send_modify(|a| a.durable = Some((tli, durable)))
                }
                Ok(Some(Frame::Refuse { code, reason })) => {
                    tx.send_modify(|a| {
                        a.closed = Some(format!("receiver refused: {reason}"));
                        a.refused = Some((code, reason));
                    });
                    return;
                }
                Ok(Some(other)) => {
                    tx.send_modify(|a| {
                        a.closed = Some(format!(
                            "unexpected {} frame from the receiver",
                            other.name()
                        ))
                    });
                    return;
                }
                Ok(None) => {
                    tx.send_modify(|a| a.closed = Some("receiver closed the connection".into()));
                    return;
                }
                Err(e) => {
                    tx.send_modify(|a| a.closed = Some(e.to_string()));
                    return;
                }
            }
        }
    });
    Ok(Session {
        w,
        acks,
        reader,
        next,
        last_heartbeat: Instant::now() - Duration::from_secs(1),
        last_ack: (None, Instant::now()),
    })
}

/// Reads a history file from the primary's pg_wal.
fn read_history(pg_wal: &std::path::Path, tli: TimelineId) -> Result<Vec<u8>, Fault> {
    let p = pg_wal.join(history_file_name(tli));
    std::fs::read(&p)
        .map_err(|e| Fault::Fatal(anyhow!("cannot read timeline history {}: {e}", p.display())))
}

/// Sends what was flushed since the last poll, and a heartbeat when due.
async fn ship_once(
    cfg: &ShipConfig,
    p: &mut Primary,
    s: &mut Session,
    fp: &FlushPoint,
    server_tli: TimelineId,
) -> Result<(), Fault> {
    let closed = {
        let a = s.acks.borrow();
        a.closed.clone().map(|why| (why, a.refused.clone()))
    };
    if let Some((why, refusal)) = closed {
        return Err(match refusal {
            Some((code, reason)) => refused(cfg, code, reason),
            None => Fault::Receiver(anyhow!(why)),
        });
    }
    // A link that died without closing: what was sent is never acked.
    let acked = s.acks.borrow().durable;
    if acked != s.last_ack.0 {
        s.last_ack = (acked, Instant::now());
    } else if acked.map(|a| a.1) < Some(s.next.1) && s.last_ack.1.elapsed() >= cfg.ack_timeout {
        return Err(Fault::Receiver(anyhow!(
            "no ack for {:?} while {} is sent and {} acked: the receiver or the link is stuck",
            cfg.ack_timeout,
            s.next.1,
            acked.map_or("nothing".to_string(), |a| a.1.to_string())
        )));
    }
    let seg_size = p.info.seg_size;
    // The stream is behind the server's timeline: finish the old one up to
    // its switch point, then move over.
    let mut end = fp.lsn;
    if s.next.0 != server_tli {
        let history = read_history(&p.pg_wal, server_tli)?;
        let text = String::from_utf8_lossy(&history);
        let entries = parse_history(&text)
            .map_err(|e| Fault::Fatal(anyhow!("{}: {e}", history_file_name(server_tli))))?;
        let Some(sp) = switchpoint_of(&entries, s.next.0) else {
            return Err(Fault::Fatal(anyhow!(
                "timeline {} of the spool is not an ancestor of the server's timeline {server_tli}: the spool holds another history",
                s.next.0
            )));
        };
        if s.next.1 >= sp {
            // Send every history file from the old timeline's child up.
            for e in entries
                .iter()
                .filter(|e| e.tli > s.next.0)
                .map(|e| e.tli)
                .chain([server_tli])
            {
                let content = read_history(&p.pg_wal, e)?;
                s.w.send(&Frame::History { tli: e, content })
                    .await
                    .map_err(|e| Fault::Receiver(e.into()))?;
            }
            // The new timeline may branch off from the one after ours; find where ours ends.
            info!(from = %s.next.0, to = %server_tli, switchpoint = %sp, "timeline switch");
            s.next = (server_tli, sp);
        } else {
            end = end.min(sp);
        }
    }
    let (tli, mut at) = s.next;
    let mut sent = false;
    while at < end {
        let seg_end = SegmentName::of_lsn(tli, at, seg_size).end_lsn(seg_size);
        let to = end.min(seg_end).min(Lsn(at.0 + MAX_DATA as u64));
        let (got, bytes) = match p.source.read(tli, at, to, end >= seg_end) {
            Ok(x) => x,
            Err(e) => return Err(Fault::Fatal(e.into())),
        };
        if got <= at {
            break;
        }
        let n = bytes.len() as u64;
        s.w.send_data(tli, at, bytes)
            .await
            .map_err(|e| Fault::Receiver(e.into()))?;
        crate::metrics::ship().bytes_shipped.inc_by(n);
        sent = true;
        at = got;
        s.next = (tli, at);
    }
    if sent {
        p.source.release_below(at.page_lsn());
    }
    if sent || s.last_heartbeat.elapsed() >= cfg.heartbeat {
        s.w.send(&Frame::Heartbeat {
            flush: fp.lsn,
            time_us: now_us(),
        })
        .await
        .map_err(|e| Fault::Receiver(e.into()))?;
        s.last_heartbeat = Instant::now();
    }
    Ok(())
}
