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
//! Acks report only what is fsynced. A burst of frames (a catch-up) is
//! written on and synced once when the stream pauses, after 16 MB or after
//! 4 ms (1 ms while under 1 MB), whichever comes first; a lone range is synced and acked at once.
//! On a write error (a full disk, a failed
//! fsync) the receiver logs the reason, acks nothing more, drops what was not
//! durable and closes the connection; the shipper reconnects and resumes at
//! the durable position once the problem is gone.

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::proto::conn::{server_auth, HANDSHAKE_TIMEOUT};
use crate::proto::tls::TlsOptions;
use crate::proto::{BoxIo, Frame, FrameReader, FrameWriter, Hello, ProtoError, Secret};
use crate::spool::writer::SpoolWriter;
use crate::spool::{now_ms, ReceiverStatus, Spool, SpoolMeta, RECEIVER_LOCK};
use crate::wal::{SegmentSize, TimelineId};

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
    /// The durable position, published after every fdatasync that moved it:
    /// what `--serve` streams up to, and wakes on.
    durable: tokio::sync::watch::Sender<Option<(TimelineId, crate::wal::Lsn)>>,
}

impl Shared {
    fn publish_durable(&self, d: Option<(TimelineId, crate::wal::Lsn)>) {
        if d.is_some() {
            self.durable
                .send_if_modified(|cur| std::mem::replace(cur, d) != d);
        }
    }
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

impl Receiver {
    pub async fn bind(cfg: ReceiveConfig) -> anyhow::Result<Receiver> {
        let spool = Spool::create(&cfg.spool)?;
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
            state: if spool.is_fenced() {
                "fenced"
            } else {
                "waiting"
            }
            .into(),
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
            let _ =
                tokio::task::block_in_place(|| crate::metrics::receive().time_fsync(|| w.sync()));
        }
        self.shared.update_status(|s| {
            s.state = "stopped".into();
            s.peer = None;
        });
        if let Some(h) = serving {
            let _ = h.await;
        }
        info!("receiver stopped");
        Ok(())
    }
}

async fn session(shared: Arc<Shared>, sock: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
    let _ = sock.set_nodelay(true);
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
        let reason = "busy: another shipper is streaming into this spool".to_string();
        let _ = w
            .send(&Frame::Refuse {
                reason: reason.clone(),
            })
            .await;
        bail!("{reason}");
    };
    if let Err(reason) = admit(&shared, &hello, &mut guard) {
        warn!("refused shipper: {reason}");
        let _ = w
            .send(&Frame::Refuse {
                reason: reason.clone(),
            })
            .await;
        bail!("{reason}");
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
        s.state = "streaming".into();
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
        let _ = w
            .send(&Frame::Refuse {
                reason: format!("{e:#}"),
            })
            .await;
    }
    crate::metrics::receive().connected.set(0);
    shared.update_status(|s| {
        if s.state == "streaming" {
            s.state = "waiting".into();
        }
        s.peer = None;
    });
    r
}

/// Checks a shipper's Hello against the spool; sets up the writer.
fn admit(shared: &Shared, hello: &Hello, writer: &mut Option<SpoolWriter>) -> Result<(), String> {
    if shared.spool.is_fenced() {
        return Err("fenced: a failover has finalized this spool; it takes no more WAL".into());
    }
    let seg_size = SegmentSize::new(u64::from(hello.seg_size))
        .ok_or_else(|| format!("invalid segment size {}", hello.seg_size))?;
    let meta = shared.spool.meta().map_err(|e| e.to_string())?;
    match meta {
        Some(m) => {
            if m.sysid() != Some(hello.sysid) {
                return Err(format!(
                    "this spool belongs to the cluster with system identifier {}, not {}",
                    m.system_identifier, hello.sysid
                ));
            }
            if m.segment_size != seg_size.bytes() {
                return Err(format!(
                    "this spool holds {} byte segments, the shipper has {}",
                    m.segment_size,
                    seg_size.bytes()
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
            .map_err(|e| e.to_string())?,
    }
    if writer.is_none() {
        *writer =
            Some(SpoolWriter::open(shared.spool.clone(), seg_size).map_err(|e| e.to_string())?);
    }
    Ok(())
}

async fn stream<R, W>(
    shared: &Shared,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    writer: &mut SpoolWriter,
) -> anyhow::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let m = crate::metrics::receive();
    let mut lock_file = Some(open_write_lock(&shared.spool)?);
    let mut held: Option<nix::fcntl::Flock<std::fs::File>> = None;
    let mut last_status = 0u64;
    let mut bytes_written = 0u64;
    // Written but not yet synced: since when, and how much.
    let mut unsynced: Option<Instant> = None;
    let mut unsynced_bytes = 0usize;
    loop {
        let idle = shared.limits().idle_timeout;
        // While more of a burst is arriving, keep writing and sync once;
        // when the stream pauses, sync and ack at once.
        let wait = if unsynced.is_some() {
            sync_delay(unsynced_bytes)
        } else {
            idle
        };
        let frame = match tokio::time::timeout(wait, r.read_frame()).await {
            Err(_) if unsynced.is_some() => {
                sync_and_ack(shared, w, writer, &mut held, &mut lock_file).await?;
                unsynced = None;
                unsynced_bytes = 0;
                continue;
            }
            Err(_) => bail!("no frame for {idle:?}: closing an idle connection"),
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(ProtoError::Frame(e))) => {
                m.frames_rejected.inc();
                bail!("rejected a bad frame, nothing of it written: {e}")
            }
            Ok(Err(e)) => return Err(e.into()),
        };
        match frame {
            Frame::Data { tli, start, bytes } => {
                if held.is_none() {
                    let f = lock_file.take().expect("lock file is back when not held");
                    held = Some(tokio::task::block_in_place(|| {
                        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockShared)
                            .map_err(|(_, e)| anyhow::anyhow!("locking the spool: {e}"))
                    })?);
                }
                if shared.spool.is_fenced() {
                    bail!("fenced: a failover has finalized this spool; it takes no more WAL");
                }
                if writer.written().is_none() {
                    writer.start_at(tli, start)?;
                }
                tokio::task::block_in_place(|| writer.write(tli, start, &bytes))
                    .with_context(|| format!("writing {} bytes at {start}", bytes.len()))?;
                bytes_written += bytes.len() as u64;
                unsynced_bytes += bytes.len();
                m.bytes_written.inc_by(bytes.len() as u64);
            }
            Frame::Heartbeat { flush, time_us: _ } => {
                let now = now_ms();
                if now >= last_status + 200 {
                    last_status = now;
                    let (durable, written, seg) =
                        (writer.durable(), writer.written(), writer.current_segment());
                    shared.update_status(|s| {
                        s.primary_flush_lsn = Some(flush);
                        s.primary_seen_at_ms = Some(now);
                        s.timeline = durable.map(|d| d.0);
                        s.note_durable(durable.map(|d| d.1), now);
                        s.written_lsn = written.map(|d| d.1);
                        s.current_segment = seg;
                        s.bytes_written += bytes_written;
                    });
                    bytes_written = 0;
                } else {
                    let mut s = shared.status.lock().unwrap_or_else(|p| p.into_inner());
                    s.primary_flush_lsn = Some(flush);
                    s.primary_seen_at_ms = Some(now);
                    s.note_durable(None, now);
                }
                m.observe(Some(flush), None);
            }
            Frame::History { tli, content } => {
                shared.spool.write_history(tli, &content)?;
                info!(%tli, "received timeline history file");
            }
            other => bail!("unexpected {} frame while streaming", other.name()),
        }
        if held.is_none() {
            continue;
        }
        let first = *unsynced.get_or_insert_with(Instant::now);
        // Whether the sender is in the middle of a burst: bytes of the next
        // frame are here already, or arrive without waiting.
        let more = r.buffered() > 0 || r.read_ready().await?;
        if !more || unsynced_bytes >= SYNC_BYTES || first.elapsed() >= sync_delay(unsynced_bytes) {
            sync_and_ack(shared, w, writer, &mut held, &mut lock_file).await?;
            unsynced = None;
            unsynced_bytes = 0;
        }
    }
}

/// Makes what was written durable, releases the write lock and acks.
async fn sync_and_ack<W: tokio::io::AsyncWrite + Unpin>(
    shared: &Shared,
    w: &mut FrameWriter<W>,
    writer: &mut SpoolWriter,
    held: &mut Option<nix::fcntl::Flock<std::fs::File>>,
    lock_file: &mut Option<std::fs::File>,
) -> anyhow::Result<()> {
    let Some(h) = held.take() else {
        return Ok(());
    };
    let m = crate::metrics::receive();
    let durable = tokio::task::block_in_place(|| m.time_fsync(|| writer.sync()));
    let f = h
        .unlock()
        .map_err(|(_, e)| anyhow::anyhow!("unlocking: {e}"))?;
    *lock_file = Some(f);
    let durable = durable.context("making received WAL durable")?;
    let tli = writer.durable().map(|d| d.0).unwrap_or(TimelineId(1));
    shared.publish_durable(writer.durable());
    w.send(&Frame::Ack { tli, durable }).await?;
    m.acks.inc();
    m.observe(None, Some(durable));
    let mut s = shared.status.lock().unwrap_or_else(|p| p.into_inner());
    s.acks += 1;
    s.note_durable(Some(durable), now_ms());
    Ok(())
}

/// The longest a burst of frames goes unsynced, and the most bytes it may
/// hold: while frames keep arriving the receiver writes on and syncs once
/// per burst, so a catch-up is not one fdatasync per frame.
const SYNC_DELAY: Duration = Duration::from_millis(4);
const SYNC_BYTES: usize = 16 << 20;

/// A burst of small ranges (OLTP commits arriving every millisecond) is
/// synced after 1 ms, not 4: what a hot standby fed by `--serve` can show
/// waits for this sync. Large bursts (a catch-up) keep the longer delay.
const SMALL_BURST: usize = 1 << 20;

fn sync_delay(unsynced_bytes: usize) -> Duration {
    if unsynced_bytes < SMALL_BURST {
        Duration::from_millis(1)
    } else {
        SYNC_DELAY
    }
}

fn open_write_lock(spool: &Spool) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(spool.path(crate::spool::WRITE_LOCK))
        .context("opening the spool's write lock")
}
