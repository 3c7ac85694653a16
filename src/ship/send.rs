//! One look's worth of sending: the WAL flushed since the last look, read
//! from pg_wal up to the flush position and never past it, the timeline
//! switch when the server moved on, and the heartbeat.

use std::time::Instant;

use anyhow::anyhow;
use tracing::info;

use super::session::{refused, Session};
use super::{Fault, Primary, ShipConfig};
use crate::pg::client::FlushPoint;
use crate::proto::{Frame, MAX_DATA};
use crate::spool::now_us;
use crate::wal::history::{parse_history, switchpoint_of};
use crate::wal::segment::history_file_name;
use crate::wal::{Lsn, SegmentName, TimelineId};

/// Reads a history file from the primary's pg_wal.
pub(super) fn read_history(pg_wal: &std::path::Path, tli: TimelineId) -> Result<Vec<u8>, Fault> {
    let p = pg_wal.join(history_file_name(tli));
    std::fs::read(&p)
        .map_err(|e| Fault::Fatal(anyhow!("cannot read timeline history {}: {e}", p.display())))
}

/// Sends what was flushed since the last poll, and a heartbeat when due.
pub(super) async fn ship_once(
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
    let sent = send_upto(p, s, end).await?;
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

/// Sends the stream's timeline from where it stands up to `end`, which
/// must be flushed; whole segments are finished, padding included, before
/// the next one starts. Returns whether anything was sent.
pub(super) async fn send_upto(p: &mut Primary, s: &mut Session, end: Lsn) -> Result<bool, Fault> {
    let seg_size = p.info.seg_size;
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
    Ok(sent)
}
