//! START_REPLICATION: WAL from the spool's files to a standby, in CopyBoth.
//!
//! Which bytes may go: on the spool's current timeline, everything below
//! the receiver's durable position (the watch channel the receiver updates
//! after each fdatasync of the data, before it records the position and
//! acks); on an older timeline, everything below the point
//! where it ended (from the current timeline's history file), after which
//! the stream ends as a walsender ends it: CopyDone, the client's CopyDone,
//! a result set with the next timeline and where it starts, CommandComplete.
//!
//! Where the bytes come from: the segment file of the timeline being
//! streamed, complete or `.partial`, read at an offset into a fixed buffer
//! of [`MAX_SEND`] bytes (constant memory at any segment size). The segment
//! in which an older timeline ended is read from the next timeline's file,
//! as walsender does: the old timeline's copy of it may hold WAL past the
//! switch that the new timeline does not have.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::codec::{parse_standby_message, MsgReader, Out, StandbyMessage};
use crate::spool::Spool;
use crate::wal::history::parse_history;
use crate::wal::{Lsn, SegmentName, SegmentSize, TimelineId};

/// The most WAL in one XLogData message (walsender sends up to 128 kB too).
pub const MAX_SEND: usize = 128 << 10;

/// A keepalive goes out after this long without any message, so that
/// walreceiver's `wal_receiver_timeout` (60 s by default) never trips on an
/// idle primary.
pub const KEEPALIVE: Duration = Duration::from_secs(10);

/// The durable position the receiver publishes: `None` before any WAL.
pub type Durable = watch::Receiver<Option<(TimelineId, Lsn)>>;

/// Why a request cannot be served: an ErrorResponse the standby logs.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
}

fn refuse(code: &'static str, message: String, detail: Option<String>) -> anyhow::Error {
    anyhow::Error::new(Refusal {
        code,
        message,
        detail,
    })
}

/// How far timeline `tli` may be streamed, given the spool's current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// The current timeline: up to the durable position, growing.
    Live(Lsn),
    /// An older timeline: it ended at `end`, where `next` began.
    Ended { end: Lsn, next: TimelineId },
}

/// Where `tli` stands in the history of the spool's current timeline.
pub fn extent(
    spool: &Spool,
    tli: TimelineId,
    current: (TimelineId, Lsn),
) -> anyhow::Result<Extent> {
    if tli == current.0 {
        return Ok(Extent::Live(current.1));
    }
    let not_ours = || {
        refuse(
            "XX000",
            format!("requested timeline {tli} is not in this server's history"),
            None,
        )
    };
    if tli > current.0 {
        return Err(not_ours());
    }
    let text = spool.history(current.0)?.ok_or_else(|| {
        anyhow!(
            "the history file of timeline {} is missing from the spool",
            current.0
        )
    })?;
    let text = String::from_utf8_lossy(&text);
    let entries =
        parse_history(&text).map_err(|e| anyhow!("timeline {} history: {e}", current.0))?;
    let i = entries
        .iter()
        .position(|e| e.tli == tli)
        .ok_or_else(not_ours)?;
    let next = entries.get(i + 1).map(|e| e.tli).unwrap_or(current.0);
    Ok(Extent::Ended {
        end: entries[i].switchpoint,
        next,
    })
}

/// The spool file to read timeline `tli`'s WAL at `lsn` from.
struct Source {
    spool: Spool,
    seg_size: SegmentSize,
    open: Option<(SegmentName, File)>,
}

impl Source {
    fn read(
        &mut self,
        tli: TimelineId,
        extent: Extent,
        at: Lsn,
        buf: &mut [u8],
    ) -> anyhow::Result<usize> {
        let seg = SegmentName::of_lsn(tli, at, self.seg_size);
        if self.open.as_ref().map(|o| o.0) != Some(seg) {
            self.open = None;
            let mut names = vec![seg];
            if let Extent::Ended { end, next } = extent {
                if end.segment_number(self.seg_size) == seg.segno {
                    names.insert(0, SegmentName::new(next, seg.segno));
                }
            }
            for name in names {
                for p in [
                    self.spool.segment_path(name, self.seg_size),
                    self.spool.partial_path(name, self.seg_size),
                ] {
                    match File::open(&p) {
                        Ok(f) => {
                            self.open = Some((seg, f));
                            break;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(e).with_context(|| format!("opening {}", p.display()))
                        }
                    }
                }
                if self.open.is_some() {
                    break;
                }
            }
            if self.open.is_none() {
                return Err(refuse(
                    "58P01",
                    format!(
                        "requested WAL segment {} has already been removed",
                        seg.file_name(self.seg_size)
                    ),
                    None,
                ));
            }
        }
        let (_, f) = self.open.as_ref().expect("opened above");
        let off = at.segment_offset(self.seg_size);
        let n = buf.len().min((self.seg_size.bytes() - off) as usize);
        // Page-cache reads of at most MAX_SEND bytes: short enough to do in
        // line on the runtime.
        f.read_exact_at(&mut buf[..n], off)
            .with_context(|| format!("reading {} at offset {off}", seg.file_name(self.seg_size)))?;
        Ok(n)
    }
}

/// What a stream ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The timeline ended; the standby goes on with `next` from `start`.
    Timeline { next: TimelineId, start: Lsn },
    /// The standby sent CopyDone (it is shutting down or reconnecting).
    ByStandby,
    /// The connection closed.
    Closed,
}

/// Checks a START_REPLICATION request against the spool (before CopyBoth).
pub fn check_start(extent: Extent, tli: TimelineId, start: Lsn) -> anyhow::Result<()> {
    match extent {
        Extent::Live(durable) if start > durable => Err(refuse(
            "XX000",
            format!("requested starting point {start} is ahead of the WAL flush position of this server {durable}"),
            None,
        )),
        Extent::Ended { end, next } if start > end => Err(refuse(
            "XX000",
            format!("requested starting point {start} on timeline {tli} is not in this server's history"),
            Some(format!("This server's history forked from timeline {tli} at {end}; timeline {next} follows.")),
        )),
        _ => Ok(()),
    }
}

/// Streams timeline `tli` from `start` until it ends, the standby stops,
/// or `cancel` fires. The CopyBothResponse has been sent.
#[allow(clippy::too_many_arguments)]
pub async fn stream<R, W>(
    spool: &Spool,
    seg_size: SegmentSize,
    mut durable: Durable,
    r: &mut MsgReader<R>,
    w: &mut W,
    tli: TimelineId,
    start: Lsn,
    cancel: &CancellationToken,
) -> anyhow::Result<Ended>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut src = Source {
        spool: spool.clone(),
        seg_size,
        open: None,
    };
    let mut buf = vec![0u8; MAX_SEND];
    let mut out = Out::default();
    let mut pos = start;
    let mut sent_since_poll = 0usize;
    let mut last_sent = tokio::time::Instant::now();
    let mut applied = Lsn(0);
    // An older timeline's end, read from the history file once per current timeline.
    let mut ended: Option<(TimelineId, Extent)> = None;
    loop {
        let current =
            (*durable.borrow_and_update()).ok_or_else(|| anyhow!("the spool lost its position"))?;
        let ext = match ended {
            _ if current.0 == tli => Extent::Live(current.1),
            Some((cur, e)) if cur == current.0 => e,
            _ => {
                let e = extent(spool, tli, current)?;
                ended = Some((current.0, e));
                e
            }
        };
        let end = match ext {
            Extent::Live(d) => d,
            Extent::Ended { end, .. } => end,
        };
        if pos < end {
            let want = ((end.0 - pos.0) as usize).min(MAX_SEND);
            let n = src.read(tli, ext, pos, &mut buf[..want])?;
            out.xlog_data(pos, end, super::codec::pg_now(), &buf[..n]);
            out.flush(w).await.context("sending WAL to the standby")?;
            pos = Lsn(pos.0 + n as u64);
            last_sent = tokio::time::Instant::now();
            sent_since_poll += n;
            // In a long catch-up, still read what the standby says.
            if sent_since_poll >= 4 << 20 {
                sent_since_poll = 0;
                if let Ok(m) = tokio::time::timeout(Duration::ZERO, r.next()).await {
                    if let Some(e) = handle(m?, &mut out, w, end, &mut applied).await? {
                        return Ok(e);
                    }
                }
            }
            continue;
        }
        if let Extent::Ended { end, next } = ext {
            info!(%tli, %end, %next, "timeline ended: telling the standby to follow timeline {next}");
            out.copy_done();
            out.flush(w).await?;
            // The standby answers with CopyDone; status updates may come first.
            loop {
                match r.next().await? {
                    Some((b'c', _)) => break,
                    Some((b'd', _)) => continue,
                    Some((b'X', _)) | None => return Ok(Ended::Closed),
                    Some((k, _)) => bail!(
                        "unexpected message {:?} after the end of the timeline",
                        k as char
                    ),
                }
            }
            return Ok(Ended::Timeline { next, start: end });
        }
        let idle = tokio::time::sleep_until(last_sent + KEEPALIVE);
        tokio::select! {
            _ = cancel.cancelled() => bail!("waltail is shutting down"),
            c = durable.changed() => {
                if c.is_err() {
                    bail!("the receiver stopped");
                }
            }
            m = r.next() => {
                if let Some(e) = handle(m?, &mut out, w, end, &mut applied).await? {
                    return Ok(e);
                }
            }
            _ = idle => {
                out.keepalive(end, super::codec::pg_now(), false);
                out.flush(w).await?;
                last_sent = tokio::time::Instant::now();
            }
        }
    }
}

/// One message from the standby while streaming; `Some` when the stream ends.
async fn handle<W: AsyncWrite + Unpin>(
    m: Option<(u8, Vec<u8>)>,
    out: &mut Out,
    w: &mut W,
    end: Lsn,
    applied: &mut Lsn,
) -> anyhow::Result<Option<Ended>> {
    match m {
        None | Some((b'X', _)) => Ok(Some(Ended::Closed)),
        Some((b'c', _)) => {
            out.copy_done();
            out.flush(w).await?;
            Ok(Some(Ended::ByStandby))
        }
        Some((b'd', body)) => {
            match parse_standby_message(&body)? {
                StandbyMessage::Status {
                    flush,
                    apply,
                    reply,
                    ..
                } => {
                    if apply != *applied {
                        debug!(%flush, %apply, "standby status");
                        *applied = apply;
                    }
                    if reply {
                        out.keepalive(end, super::codec::pg_now(), false);
                        out.flush(w).await?;
                    }
                }
                StandbyMessage::HotStandbyFeedback => {}
            }
            Ok(None)
        }
        Some((k, _)) => bail!(
            "unexpected message {:?} from the standby while streaming",
            k as char
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::writer::SpoolWriter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads backend messages off `r` until `n` WAL bytes arrived; checks
    /// that no XLogData reaches past `limit`.
    async fn read_wal<R: AsyncRead + Unpin>(r: &mut R, n: usize, limit: Lsn) -> (Lsn, Vec<u8>) {
        let mut wal = Vec::new();
        let mut first = None;
        while wal.len() < n {
            let mut h = [0u8; 5];
            r.read_exact(&mut h).await.unwrap();
            let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize - 4;
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).await.unwrap();
            assert_eq!(h[0], b'd');
            if body[0] == b'w' {
                let start = Lsn(u64::from_be_bytes(body[1..9].try_into().unwrap()));
                first.get_or_insert(start);
                assert!(
                    start.0 + (len - 25) as u64 <= limit.0,
                    "sent past the durable {limit}"
                );
                wal.extend_from_slice(&body[25..]);
            }
        }
        (first.unwrap(), wal)
    }

    #[tokio::test]
    async fn wal_goes_out_up_to_the_durable_position_and_follows_it() {
        let seg = SegmentSize::new(1 << 20).unwrap();
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::create(d.path()).unwrap();
        let mut w = SpoolWriter::open(sp.clone(), seg).unwrap();
        w.start_at(TimelineId(1), Lsn(1 << 20)).unwrap();
        let data: Vec<u8> = (0..1_300_000u32).map(|i| (i % 251) as u8).collect();
        w.write(TimelineId(1), Lsn(1 << 20), &data[..700_000])
            .unwrap();
        w.sync().unwrap();
        // Written but not synced: must not be sent.
        w.write(
            TimelineId(1),
            Lsn((1 << 20) + 700_000),
            &data[700_000..900_000],
        )
        .unwrap();
        let (tx, rx) = watch::channel(Some((TimelineId(1), Lsn((1 << 20) + 700_000))));
        let (client, server) = tokio::io::duplex(1 << 20);
        let (sr, mut sw) = tokio::io::split(server);
        let (mut cr, mut cw) = tokio::io::split(client);
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        let task = tokio::spawn(async move {
            let mut r = MsgReader::new(sr);
            stream(
                &sp,
                seg,
                rx,
                &mut r,
                &mut sw,
                TimelineId(1),
                Lsn(1 << 20),
                &c2,
            )
            .await
        });
        let (start, got) = read_wal(&mut cr, 700_000, Lsn((1 << 20) + 700_000)).await;
        assert_eq!(start, Lsn(1 << 20));
        assert_eq!(got, &data[..700_000]);
        // The writer syncs across the segment end; the stream follows.
        w.write(TimelineId(1), Lsn((1 << 20) + 900_000), &data[900_000..])
            .unwrap();
        let durable = w.sync().unwrap();
        tx.send_replace(Some((TimelineId(1), durable)));
        let (start, got) = read_wal(&mut cr, 600_000, durable).await;
        assert_eq!(start, Lsn((1 << 20) + 700_000));
        assert_eq!(got, &data[700_000..]);
        // CopyDone from the standby ends the stream with a CopyDone back.
        cw.write_all(&[b'c', 0, 0, 0, 4]).await.unwrap();
        let mut h = [0u8; 5];
        cr.read_exact(&mut h).await.unwrap();
        assert_eq!(h[0], b'c');
        assert_eq!(task.await.unwrap().unwrap(), Ended::ByStandby);
        cancel.cancel();
    }
}
