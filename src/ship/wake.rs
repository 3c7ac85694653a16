//! What wakes the shipper: a write into the primary's live WAL segment.
//!
//! PostgreSQL writes WAL into the segment files of `pg_wal` with `pwrite`
//! (backends at commit, the walwriter every `wal_writer_delay` for
//! asynchronous commits, any backend whose `wal_buffers` are full) and then
//! makes it durable with `fdatasync` (the default `wal_sync_method` on
//! Linux) before it advances the flush position. An inotify watch on
//! `pg_wal` reports each such write as `IN_MODIFY` on a file named like a
//! segment: that is the moment to look at the flush position. The write
//! comes *before* the flush, so one look is often too early; the shipper
//! then looks again shortly, with backoff, while the server's insert position
//! is ahead of its flush position ([`super::poll::Chase`]).
//!
//! Only the wake-up comes from here. What may be shipped is still decided by
//! `pg_current_wal_flush_lsn()` alone, and the fixed poll every `--interval`
//! keeps running beside the events, so WAL whose event was lost (a full
//! inotify queue, a watch that failed, a file system without inotify) is
//! still shipped within one interval. Overflow of the kernel's queue is a
//! wake-up like any other; an error of the watch ends it and leaves the poll.
//!
//! Events for other files (the `xlogtemp.*` files PostgreSQL zero-fills
//! before it renames them into place, history files, `archive_status`) do
//! not wake the shipper. Identical events that pile up unread are merged by
//! the kernel, so a busy server costs at most one look per pass of the loop.
//!
//! `--wake walsender`: the shipper holds a physical replication connection
//! ([`super::sync`]), and each XLogData its walsender sends (which it does
//! only once WAL is flushed) is the wake-up, at the moment of the flush
//! rather than of the write, with the flush position in it. The watch is
//! set up too, and waited on only while that connection is down.

use std::ffi::OsStr;
use std::path::Path;
use std::pin::Pin;
use std::task::Poll;

use futures_util::Stream;
use inotify::{EventMask, EventStream, Inotify, WatchMask};
use tracing::{info, warn};

/// How the shipper learns that WAL was written (`ship --wake`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum WakeMode {
    /// inotify on pg_wal, with the interval poll as the safety net.
    Inotify,
    /// The interval poll only.
    Poll,
    /// A replication connection's walsender, which sends only flushed WAL.
    Walsender,
}

impl WakeMode {
    /// As `--wake` spells it.
    pub fn name(self) -> &'static str {
        match self {
            WakeMode::Inotify => "inotify",
            WakeMode::Poll => "poll",
            WakeMode::Walsender => "walsender",
        }
    }
}

/// The event source of one connection to the primary.
pub struct Wake {
    events: Option<EventStream<Vec<u8>>>,
}

impl Wake {
    /// Watches `pg_wal` for writes; without one (mode `Poll`, or the watch
    /// could not be set up, which is logged) [`Wake::wait`] never returns.
    pub fn watch(mode: WakeMode, pg_wal: &Path) -> Wake {
        if mode == WakeMode::Poll {
            return Wake { events: None };
        }
        let r = (|| -> std::io::Result<EventStream<Vec<u8>>> {
            // Injected: the event source cannot be set up.
            fail::fail_point!("ship-wake-init", |_| Err(std::io::Error::other(
                "injected by failpoint ship-wake-init"
            )));
            let ino = Inotify::init()?;
            ino.watches().add(pg_wal, WatchMask::MODIFY)?;
            ino.into_event_stream(vec![0u8; 16 << 10])
        })();
        match r {
            Ok(events) => {
                if mode == WakeMode::Inotify {
                    info!(dir = %pg_wal.display(), "waking on WAL writes (inotify), polling as the fallback");
                }
                Wake {
                    events: Some(events),
                }
            }
            Err(e) => {
                warn!(dir = %pg_wal.display(), "cannot watch pg_wal for WAL writes ({e}); polling only");
                Wake { events: None }
            }
        }
    }

    /// Whether events arrive (the watch is set up and has not failed).
    pub fn active(&self) -> bool {
        self.events.is_some()
    }

    /// Waits for a write into a WAL segment; every event already queued is
    /// taken with it. Cancel-safe. Never returns without a watch.
    pub async fn wait(&mut self) {
        loop {
            let Some(events) = self.events.as_mut() else {
                return std::future::pending().await;
            };
            let mut woke = false;
            let mut failed = None;
            // The first event waits; the queued rest are taken at once.
            let first = std::future::poll_fn(|cx| Pin::new(&mut *events).poll_next(cx)).await;
            let mut next = Some(first);
            while let Some(item) = next.take() {
                match item {
                    Some(Ok(ev)) => woke |= wakes(ev.mask, ev.name.as_deref()),
                    Some(Err(e)) => failed = Some(e.to_string()),
                    None => failed = Some("the inotify stream ended".into()),
                }
                if failed.is_some() {
                    break;
                }
                next = std::future::poll_fn(|cx| {
                    Poll::Ready(match Pin::new(&mut *events).poll_next(cx) {
                        Poll::Ready(x) => Some(x),
                        Poll::Pending => None,
                    })
                })
                .await;
            }
            if let Some(e) = failed {
                warn!("watching pg_wal failed ({e}); polling only from now on");
                self.events = None;
                continue;
            }
            // Injected: events are lost (as when the kernel's queue overflows
            // and the shipper never hears of a write).
            fail::fail_point!("ship-wake-drop", |_| {
                woke = false;
            });
            if woke {
                crate::metrics::ship().wakeups.inc();
                return;
            }
        }
    }
}

/// Whether an event means WAL may have been written: a modified segment
/// file (24 hex digits), or a queue overflow (events were lost).
fn wakes(mask: EventMask, name: Option<&OsStr>) -> bool {
    if mask.contains(EventMask::Q_OVERFLOW) {
        return true;
    }
    mask.contains(EventMask::MODIFY)
        && name.is_some_and(|n| {
            n.len() == 24 && n.as_encoded_bytes().iter().all(u8::is_ascii_hexdigit)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_segment_writes_and_overflows_wake() {
        let seg = OsStr::new("000000010000000000000003");
        assert!(wakes(EventMask::MODIFY, Some(seg)));
        assert!(!wakes(EventMask::MODIFY, Some(OsStr::new("xlogtemp.1234"))));
        assert!(!wakes(
            EventMask::MODIFY,
            Some(OsStr::new("00000002.history"))
        ));
        assert!(!wakes(EventMask::MODIFY, None));
        assert!(wakes(EventMask::Q_OVERFLOW, None));
    }

    #[tokio::test]
    async fn a_write_into_a_segment_file_wakes() {
        let d = tempfile::tempdir().unwrap();
        let seg = d.path().join("000000010000000000000003");
        std::fs::write(&seg, b"x").unwrap();
        let mut w = Wake::watch(WakeMode::Inotify, d.path());
        assert!(w.active());
        std::fs::write(d.path().join("xlogtemp.1"), b"y").unwrap();
        std::fs::write(&seg, b"z").unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), w.wait())
            .await
            .expect("woken by the write");
    }
}
