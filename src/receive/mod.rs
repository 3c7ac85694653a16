//! `waltail receive`: the daemon on the standby host that takes WAL from a
//! shipper and keeps it durably in the spool.
//!
//! One shipper streams at a time. A second shipper for the same cluster is
//! refused with "busy" while the first is connected (the first may be a
//! stalled process that still holds the primary's slot; it is dropped after
//! `idle_timeout` without frames, after which the next one is taken). A
//! shipper from another cluster, or any shipper after a failover fenced the
//! spool, is refused with the reason. Authentication comes first, with a
//! deadline on each step, and at most `max_connections` connections are
//! served at once, so idle or hostile clients cannot exhaust the receiver.
//!
//! The streaming session itself, frames into the spool with its syncs and
//! acks, is in `stream.rs`.
//!
//! On a write error (a full disk, a failed
//! fsync) the receiver logs the reason, acks nothing more, drops what was not
//! durable and closes the connection; the shipper reconnects and resumes at
//! the durable position once the problem is gone.

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::proto::conn::{server_auth, HANDSHAKE_TIMEOUT};
use crate::proto::tls::TlsOptions;
use crate::proto::{BoxIo, Frame, FrameReader, FrameWriter, Hello, ProtoError, RefuseCode, Secret};
use crate::spool::writer::SpoolWriter;
use crate::spool::{now_ms, ReceiverState, ReceiverStatus, Spool, SpoolMeta, RECEIVER_LOCK};
use crate::wal::{SegmentSize, TimelineId};

mod stream;

use stream::stream;

#[derive(Clone, Debug)]
pub struct ReceiveConfig {
    pub listen: String,
    pub spool: PathBuf,
    pub secret: Secret,
    pub tls: TlsOptions,
    /// A streaming connection with no frame for this long is closed.
    pub idle_timeout: Duration,
    /// Connections served at once (streaming or handshaking).
    pub max_connections: usize,
    /// New values of the limits on SIGHUP (see [`ReceiveLimits`]).
    pub reload: Option<tokio::sync::watch::Receiver<ReceiveLimits>>,
    /// Serve the spool to standbys over the replication protocol (`--serve`).
    pub serve: Option<crate::serve::ServeConfig>,
}

/// The receiver's settings a SIGHUP can change while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiveLimits {
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl ReceiveConfig {
    pub fn new(listen: &str, spool: PathBuf, secret: Secret) -> Self {
        ReceiveConfig {
            listen: listen.to_string(),
            spool,
            secret,
            tls: TlsOptions::default(),
            idle_timeout: Duration::from_secs(30),
            max_connections: 8,
            reload: None,
            serve: None,
        }
    }
}

struct Shared {
    cfg: ReceiveConfig,
    spool: Spool,
    /// The writer, created when the spool's segment size is known; the lock
    /// also makes sure only one session streams at a time.
    writer: Mutex<Option<SpoolWriter>>,
    status: std::sync::Mutex<ReceiverStatus>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Where the spool's bytes are on disk, published after every
    /// fdatasync of the data that moved it (before the position file's own
    /// fdatasync and the ack): what `--serve` streams up to, and wakes on.
    durable: tokio::sync::watch::Sender<Option<(TimelineId, crate::wal::Lsn)>>,
}

impl Shared {
    fn publish_durable(&self, d: Option<(TimelineId, crate::wal::Lsn)>) {
        if let Some((tli, lsn)) = d {
            publish(&self.durable, tli, lsn);
        }
    }
}

/// Moves what `--serve` may stream to `lsn` of `tli`: forward only on a
/// timeline (a position file that failed to record bytes already on disk
/// sends the writer back to its recorded position, but not the bytes).
fn publish(
    tx: &tokio::sync::watch::Sender<Option<(TimelineId, crate::wal::Lsn)>>,
    tli: TimelineId,
    lsn: crate::wal::Lsn,
) {
    tx.send_if_modified(|cur| {
        let forward = cur.is_none_or(|(t, l)| t != tli || lsn > l);
        if forward {
            *cur = Some((tli, lsn));
        }
        forward
    });
}

impl Shared {
    fn limits(&self) -> ReceiveLimits {
        match &self.cfg.reload {
            Some(r) => *r.borrow(),
            None => ReceiveLimits {
                idle_timeout: self.cfg.idle_timeout,
                max_connections: self.cfg.max_connections,
            },
        }
    }

    fn update_status(&self, f: impl FnOnce(&mut ReceiverStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        s.updated_at_ms = now_ms();
        if let Err(e) = self.spool.write_status(&s) {
            warn!(
                "cannot write {}: {e}",
                self.spool.path("status.json").display()
            );
        }
    }
}

/// A bound receiver, ready to run (bind first so callers learn the port).
pub struct Receiver {
    listener: TcpListener,
    serve: Option<crate::serve::Server>,
    shared: Arc<Shared>,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Why a receiver will not start on its spool; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum StartRefused {
    /// A failover finalized the spool: exit 3, an operator must act.
    #[error("spool {0} is fenced: a failover finalized it and it takes no more WAL. To receive a new primary's WAL, run `waltail spool reset --spool {0}` (it archives the old files under {0}/archived/ and leaves a new, empty spool)")]
    Fenced(String),
    /// The spool cannot be used as it is (its mode, files this user cannot
    /// write): exit 2, with the fix.
    #[error("{0}")]
    Unusable(String),
}

/// The spool checks done before the receiver listens.
fn check_spool(spool: &Spool) -> Result<(), StartRefused> {
    let dir = spool.dir.display().to_string();
    if spool.is_fenced() {
        return Err(StartRefused::Fenced(dir));
    }
    crate::access::check_private_dir(&spool.dir).map_err(StartRefused::Unusable)?;
    let me = crate::access::Who::current();
    let bad = crate::access::unwritable_files(&spool.dir, &me)
        .map_err(|e| StartRefused::Unusable(format!("cannot list spool {dir}: {e}")))?;
    if !bad.is_empty() {
        let user = crate::access::me();
        return Err(StartRefused::Unusable(format!(
            "this receiver runs as {user} and cannot write {} file(s) in spool {dir}, left by another user (a receiver run by hand as root?): {}. Fix: chown -R {} {dir}",
            bad.len(),
            bad.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
            user.split(' ').next().unwrap_or_default()
        )));
    }
    Ok(())
}

impl Receiver {
    pub async fn bind(cfg: ReceiveConfig) -> anyhow::Result<Receiver> {
        let spool = Spool::create(&cfg.spool)?;
        check_spool(&spool)?;
        let lock_file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(spool.path(RECEIVER_LOCK))
            .with_context(|| format!("opening {}", spool.path(RECEIVER_LOCK).display()))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| {
                anyhow::anyhow!(
                    "another waltail receive is already running on spool {}",
                    spool.dir.display()
                )
            })?;
        let tls = cfg.tls.acceptor().map_err(anyhow::Error::msg)?;
        if cfg.secret.is_none() {
            warn!("AUTHENTICATION IS OFF (--insecure-no-auth): anyone who can reach {} can write WAL into this standby's spool; use this for local demos only", cfg.listen);
        }
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let status = ReceiverStatus {
            pid: std::process::id(),
            listen: listener.local_addr()?.to_string(),
            state: ReceiverState::Waiting,
            started_at_ms: now_ms(),
            ..Default::default()
        };
        let (durable, durable_rx) =
            tokio::sync::watch::channel(crate::serve::initial_position(&spool));
        let serve = match &cfg.serve {
            Some(sc) => {
                Some(crate::serve::Server::bind(sc.clone(), spool.clone(), durable_rx).await?)
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            spool,
            writer: Mutex::new(None),
            status: std::sync::Mutex::new(status),
            tls,
            cfg,
            durable,
        });
        shared.update_status(|_| {});
        Ok(Receiver {
            listener,
            serve,
            shared,
            _lock: lock,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The `--serve` address, when serving standbys.
    pub fn serve_addr(&self) -> Option<SocketAddr> {
        self.serve.as_ref().map(|s| s.local_addr())
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let serving = self
            .serve
            .take()
            .map(|s| tokio::spawn(s.run(shutdown.clone())));
        info!(listen = %self.local_addr(), spool = %self.shared.spool.dir.display(), "receiver listening");
        let mut max = self.shared.cfg.max_connections;
        let slots = Arc::new(Semaphore::new(max));
        loop {
            let (sock, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => { warn!("accept failed: {e}"); tokio::time::sleep(Duration::from_millis(50)).await; continue; }
                },
            };
            let want = self.shared.limits().max_connections.max(1);
            if want > max {
                slots.add_permits(want - max);
                max = want;
            } else if want < max {
                max -= slots.forget_permits(max - want);
            }
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                warn!(%peer, "refused: {max} connections already open");
                continue;
            };
            let shared = self.shared.clone();
            let stop = shutdown.clone();
            tokio::spawn(
                async move {
                    let _permit = permit;
                    tokio::select! {
                        r = session(shared.clone(), sock, peer) => match r {
                            Ok(()) => info!("shipper disconnected"),
                            Err(e) => {
                                warn!("connection closed: {e:#}");
                                shared.update_status(|s| s.last_error = Some(format!("{e:#}")));
                            }
                        },
                        _ = stop.cancelled() => {}
                    }
                }
                .instrument(info_span!("conn", %peer)),
            );
        }
        // Shut down cleanly: make what was written durable.
        let mut w = self.shared.writer.lock().await;
        if let Some(w) = w.as_mut() {
            let _ = crate::metrics::receive().time_fsync(|| w.sync());
        }
        self.shared.update_status(|s| {
            s.state = ReceiverState::Stopped;
            s.peer = None;
        });
        if let Some(h) = serving {
            let _ = h.await;
        }
        info!("receiver stopped");
        Ok(())
    }
}

/// The first byte of a TLS handshake record (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// Catches TLS on one side only before it turns into an obscure error on
/// both: a plain shipper at a TLS receiver, or a TLS shipper at a plain
/// one, is told so in a plain Refuse frame (which a TLS client takes as a
/// corrupt record and reports as such) and the connection closed.
async fn check_tls_on_both_sides(shared: &Shared, sock: &mut TcpStream) -> anyhow::Result<()> {
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, sock.peek(&mut first))
        .await
        .map_err(|_| ProtoError::Timeout("ClientHello"))??;
    if n == 0 {
        bail!("the peer closed the connection before saying anything");
    }
    let tls = first[0] == TLS_HANDSHAKE;
    let why = match (shared.tls.is_some(), tls) {
        (true, false) => "the receiver speaks TLS and this shipper has no --tls-ca",
        (false, true) => {
            "this receiver has no --tls-cert/--tls-key, and the shipper speaks TLS (--tls-ca)"
        }
        _ => return Ok(()),
    };
    let mut w = FrameWriter::new(&mut *sock);
    let _ = w
        .send(&Frame::Refuse {
            code: RefuseCode::Config,
            reason: why.into(),
        })
        .await;
    bail!("refused: {why}")
}

async fn session(shared: Arc<Shared>, mut sock: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
    let _ = sock.set_nodelay(true);
    check_tls_on_both_sides(&shared, &mut sock).await?;
    let io: BoxIo = match &shared.tls {
        Some(acc) => Box::new(
            tokio::time::timeout(HANDSHAKE_TIMEOUT, acc.accept(sock))
                .await
                .map_err(|_| anyhow::anyhow!("TLS handshake timed out"))?
                .context("TLS handshake")?,
        ),
        None => Box::new(sock),
    };
    let (r, w) = tokio::io::split(io);
    let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
    crate::metrics::receive().connections.inc();
    if let Err(e) = server_auth(&mut r, &mut w, &shared.cfg.secret).await {
        crate::metrics::receive().auth_failures.inc();
        warn!("refused unauthenticated peer: {e}");
        bail!("authentication: {e}");
    }
    let hello = match r.expect(HANDSHAKE_TIMEOUT, "Hello").await? {
        Frame::Hello(h) => h,
        other => bail!("expected Hello, got {}", other.name()),
    };
    // One streaming session at a time.
    let Ok(mut guard) = shared.writer.try_lock() else {
        let r = Refusal::new(
            RefuseCode::Busy,
            "busy: another shipper is streaming into this spool",
        );
        let _ = w.send(&r.frame()).await;
        return Err(r.into());
    };
    if let Err(r) = admit(&shared, &hello, &mut guard) {
        warn!("refused shipper: {}", r.reason);
        let _ = w.send(&r.frame()).await;
        return Err(r.into());
    }
    let writer = guard.as_mut().expect("admit set the writer");
    // A session that ended in the middle of a burst (a bad frame, a cut,
    // an idle timeout) leaves bytes written but not synced; the shipper
    // resumes at the durable position, so the writer does too.
    writer.reset_to_durable();
    let position = writer.durable();
    shared.publish_durable(position);
    w.send(&Frame::Welcome { position }).await?;
    info!(sysid = hello.sysid, tli = %hello.tli, ?position, "shipper admitted");
    shared.update_status(|s| {
        s.state = ReceiverState::Streaming;
        s.peer = Some(peer.to_string());
        s.timeline = position.map(|p| p.0);
        s.durable_lsn = position.map(|p| p.1);
        s.primary_flush_lsn = Some(hello.flush);
        s.primary_seen_at_ms = Some(now_ms());
        s.last_error = None;
        s.connections += 1;
        s.note_durable(position.map(|p| p.1), now_ms());
    });
    crate::metrics::receive().connected.set(1);
    let r = stream(&shared, &mut r, &mut w, writer).await;
    if let Err(e) = &r {
        let code = e
            .downcast_ref::<Refusal>()
            .map_or(RefuseCode::Other, |r| r.code);
        let _ = w
            .send(&Frame::Refuse {
                code,
                reason: format!("{e:#}"),
            })
            .await;
    }
    crate::metrics::receive().connected.set(0);
    shared.update_status(|s| {
        if s.state == ReceiverState::Streaming {
            s.state = ReceiverState::Waiting;
        }
        s.peer = None;
    });
    r
}

/// A refusal to send the shipper: its code decides what the shipper does.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
struct Refusal {
    code: RefuseCode,
    reason: String,
}

impl Refusal {
    fn new(code: RefuseCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason: reason.into(),
        }
    }

    fn other(e: impl std::fmt::Display) -> Refusal {
        Refusal::new(RefuseCode::Other, e.to_string())
    }

    fn fenced() -> Refusal {
        Refusal::new(
            RefuseCode::Fenced,
            "fenced: a failover has finalized this spool; it takes no more WAL",
        )
    }

    fn frame(&self) -> Frame {
        Frame::Refuse {
            code: self.code,
            reason: self.reason.clone(),
        }
    }
}

/// Checks a shipper's Hello against the spool; sets up the writer.
fn admit(shared: &Shared, hello: &Hello, writer: &mut Option<SpoolWriter>) -> Result<(), Refusal> {
    if shared.spool.is_fenced() {
        return Err(Refusal::fenced());
    }
    let seg_size = SegmentSize::new(u64::from(hello.seg_size)).ok_or_else(|| {
        Refusal::new(
            RefuseCode::OtherCluster,
            format!("invalid segment size {}", hello.seg_size),
        )
    })?;
    let meta = shared.spool.meta().map_err(Refusal::other)?;
    match meta {
        Some(m) => {
            if m.sysid() != Some(hello.sysid) {
                return Err(Refusal::new(
                    RefuseCode::OtherCluster,
                    format!(
                        "this spool belongs to the cluster with system identifier {}, not {}",
                        m.system_identifier, hello.sysid
                    ),
                ));
            }
            if m.segment_size != seg_size.bytes() {
                return Err(Refusal::new(
                    RefuseCode::OtherCluster,
                    format!(
                        "this spool holds {} byte segments, the shipper has {}",
                        m.segment_size,
                        seg_size.bytes()
                    ),
                ));
            }
        }
        None => shared
            .spool
            .write_meta(&SpoolMeta {
                system_identifier: hello.sysid.to_string(),
                segment_size: seg_size.bytes(),
                pg_version: hello.pg_version,
            })
            .map_err(Refusal::other)?,
    }
    if writer.is_none() {
        let mut w = SpoolWriter::open(shared.spool.clone(), seg_size).map_err(Refusal::other)?;
        // `--serve` streams bytes once they are on disk, before the
        // position file's own fdatasync and the ack.
        let tx = shared.durable.clone();
        w.on_synced(Box::new(move |tli, lsn| publish(&tx, tli, lsn)));
        *writer = Some(w);
    }
    Ok(())
}
