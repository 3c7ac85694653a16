//! One shipper's stream into the spool: Data frames written in place,
//! synced, acked; heartbeats and history files.
//!
//! Acks report only what is fsynced, data and position file both. A burst
//! of frames (a catch-up) is written on and a sync started when the stream
//! pauses, after 16 MB or after 4 ms (1 ms while under 1 MB), whichever
//! comes first; a lone range is synced and acked at once, on the
//! connection's own thread. A burst's fdatasync runs on a blocking thread
//! on a duplicate of the partial's descriptor while the receiver reads and
//! writes the next burst (at most one sync at a time; what arrived
//! meanwhile is synced as soon as it returns). Its ack, and the recorded
//! durable position, cover only what was written when that sync began.
//! `--serve` is told as soon as the data's fdatasync returns, one
//! fdatasync (the position file's) before the ack.
//!
//! Liveness (the shipper's heartbeats, every poll) is kept in memory and
//! written to status.json at most once a second unless something else
//! changed: failover's `--alive-window` (2 s by default) reads it.
//!

use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tracing::info;

use super::{Refusal, Shared};
use crate::proto::{Frame, FrameReader, FrameWriter, ProtoError};
use crate::spool::writer::{PendingSync, SpoolWriter};
use crate::spool::{now_ms, Spool};
use crate::wal::{Lsn, TimelineId};

pub(super) async fn stream<R, W>(
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
    // Written but no sync started for it yet: since when, and how much.
    let mut unsynced: Option<Instant> = None;
    let mut unsynced_bytes = 0usize;
    // The sync under way, if any: at most one, beside the reads.
    let mut inflight: Option<SyncTask> = None;
    loop {
        let idle = shared.limits().idle_timeout;
        // While more of a burst is arriving, keep writing; a sync starts
        // when the stream pauses or the burst is big or old enough, and runs
        // while the next burst is read. Its ack goes out when it returns.
        let wait = if unsynced.is_some() {
            sync_delay(unsynced_bytes)
        } else {
            idle
        };
        let read = tokio::select! {
            biased;
            done = async { match inflight.as_mut() { Some(t) => t.await, None => std::future::pending().await } } => {
                inflight = None;
                let (pending, res) = done.context("the fdatasync task")?;
                let durable = writer
                    .synced(pending, res)
                    .context("making received WAL durable")?;
                ack(shared, w, writer, durable).await?;
                // What arrived during the sync is synced next, at once.
                if unsynced.take().is_some() {
                    unsynced_bytes = 0;
                    inflight = start_sync(shared, w, writer).await?;
                }
                if inflight.is_none() {
                    release(&mut held, &mut lock_file)?;
                }
                continue;
            }
            read = tokio::time::timeout(wait, r.read_frame()) => read,
        };
        let frame = match read {
            Err(_) if unsynced.is_some() => {
                if inflight.is_none() {
                    unsynced = None;
                    unsynced_bytes = 0;
                    inflight = start_sync(shared, w, writer).await?;
                    if inflight.is_none() {
                        release(&mut held, &mut lock_file)?;
                    }
                }
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
                    held = Some(lock_shared(f).await?);
                }
                if shared.spool.is_fenced() {
                    return Err(Refusal::fenced().into());
                }
                if writer.written().is_none() {
                    writer.start_at(tli, start)?;
                }
                writer
                    .write(tli, start, &bytes)
                    .with_context(|| format!("writing {} bytes at {start}", bytes.len()))?;
                bytes_written += bytes.len() as u64;
                unsynced_bytes += bytes.len();
                m.bytes_written.inc_by(bytes.len() as u64);
            }
            Frame::Heartbeat { flush, time_us: _ } => {
                let now = now_ms();
                if now >= last_status + STATUS_EVERY_MS {
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
        if inflight.is_none() && !more {
            // A lone range (the stream paused, nothing else is being
            // synced): synced on this thread and acked at once, without the
            // two thread hand-offs of a sync beside the reads, each a wait
            // in the run queue on a busy host.
            unsynced = None;
            unsynced_bytes = 0;
            m.time_fsync(|| writer.sync_data())
                .context("making received WAL durable")?;
            // The server, woken by the data's fdatasync onto this thread,
            // sends it to the standbys while the position is recorded.
            tokio::task::yield_now().await;
            let durable = writer.sync().context("making received WAL durable")?;
            ack(shared, w, writer, durable).await?;
            release(&mut held, &mut lock_file)?;
        } else if inflight.is_none()
            && (unsynced_bytes >= SYNC_BYTES || first.elapsed() >= sync_delay(unsynced_bytes))
        {
            unsynced = None;
            unsynced_bytes = 0;
            inflight = start_sync(shared, w, writer).await?;
            if inflight.is_none() {
                release(&mut held, &mut lock_file)?;
            }
        }
    }
}

/// An fdatasync running on a blocking thread, with what it covers.
type SyncTask = tokio::task::JoinHandle<(PendingSync, std::io::Result<()>)>;

/// Starts syncing what is written, beside the reads; when everything
/// written is durable already (a completed segment was synced as it was
/// renamed), acks at once and returns None.
async fn start_sync<W: tokio::io::AsyncWrite + Unpin>(
    shared: &Shared,
    w: &mut FrameWriter<W>,
    writer: &mut SpoolWriter,
) -> anyhow::Result<Option<SyncTask>> {
    match writer.begin_sync().context("making received WAL durable")? {
        Some(p) => Ok(Some(tokio::task::spawn_blocking(move || {
            let r = crate::metrics::receive().time_fsync(|| p.run());
            (p, r)
        }))),
        None => {
            if let Some((_, durable)) = writer.durable() {
                ack(shared, w, writer, durable).await?;
            }
            Ok(None)
        }
    }
}

/// Takes the spool's write lock, shared, for a batch of writes: at once
/// unless a failover holds it (exclusive, to fence), then on a blocking
/// thread, so that the server goes on streaming meanwhile.
async fn lock_shared(f: std::fs::File) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let f = match Flock::lock(f, FlockArg::LockSharedNonblock) {
        Ok(l) => return Ok(l),
        Err((f, nix::errno::Errno::EWOULDBLOCK)) => f,
        Err((_, e)) => anyhow::bail!("locking the spool: {e}"),
    };
    tokio::task::spawn_blocking(move || Flock::lock(f, FlockArg::LockShared))
        .await
        .context("locking the spool")?
        .map_err(|(_, e)| anyhow::anyhow!("locking the spool: {e}"))
}

/// Releases the write lock (nothing written is waiting for a sync).
fn release(
    held: &mut Option<nix::fcntl::Flock<std::fs::File>>,
    lock_file: &mut Option<std::fs::File>,
) -> anyhow::Result<()> {
    if let Some(h) = held.take() {
        let f = h
            .unlock()
            .map_err(|(_, e)| anyhow::anyhow!("unlocking: {e}"))?;
        *lock_file = Some(f);
    }
    Ok(())
}

/// Acks `durable`, which a returned fdatasync covers.
async fn ack<W: tokio::io::AsyncWrite + Unpin>(
    shared: &Shared,
    w: &mut FrameWriter<W>,
    writer: &SpoolWriter,
    durable: Lsn,
) -> anyhow::Result<()> {
    let m = crate::metrics::receive();
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

/// status.json is rewritten (a file and a rename) at most this often for
/// heartbeats alone: at idle it is the receiver's main cost.
const STATUS_EVERY_MS: u64 = 1000;

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
