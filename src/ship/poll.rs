//! When the shipper asks the primary for its flush position, and how it
//! reads the answer.
//!
//! Three things make it look: the fixed `--interval` tick (the safety net,
//! and the only source with `--wake poll`), a write event from [`super::wake`],
//! and the [`Chase`] that follows an event. PostgreSQL writes WAL before it
//! flushes it, so the look an event triggers often finds the insert position
//! (`pg_current_wal_insert_lsn()`) ahead of the flush position: WAL is on
//! its way to disk. (Not the write position: XLogWrite, in PostgreSQL 15 at least, publishes it
//! with the flush position, after the fdatasync.) The chase then looks
//! again at once, a few times (an `fdatasync` of a commit takes a fraction
//! of a millisecond on a local disk, about a round trip to the backend),
//! then after 1 ms, 2 ms, 4 ms ... up to the interval, until the flush
//! position has caught up with the insert position it saw. WAL inserted but
//! left for the walwriter (an open transaction's records on a partly filled
//! page) is therefore looked at no more often than every interval once the
//! quick looks are spent.
//!
//! Also here: the cross-check of `pg_walfile_name_offset`'s segment name,
//! and the reconnect backoff.

use std::time::{Duration, Instant};

use tracing::warn;

use crate::pg::client::FlushPoint;
use crate::wal::{Lsn, SegmentName, SegmentSize, TimelineId};

/// Looks taken at once after an event before the chase waits between them
/// (each is a round trip to the backend, 0.1 to 0.3 ms: together about the
/// time an fdatasync of a commit takes).
const QUICK_LOOKS: u32 = 8;
/// Then looks 1 ms apart (the timer's resolution), this many.
const STEADY_LOOKS: u32 = 10;
/// While a chase runs, an event makes the shipper look at once only if its
/// last look is at least this old.
const MIN_GAP: Duration = Duration::from_millis(1);

/// The follow-up looks after a write event, while WAL is on its way to disk.
///
/// A server under load always has WAL on its way, so while a chase runs an
/// event makes the shipper look at once only when its last look is at
/// least [`MIN_GAP`] old, and brings the chase back to its 1 ms steps. The
/// shipper so looks at most about once a millisecond under load, and right
/// away after a write on an idle server.
#[derive(Debug, Default)]
pub struct Chase {
    due: Option<Instant>,
    looks: u32,
    last: Option<Instant>,
}

impl Chase {
    /// When to look again, if a flush is being chased.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// A write event. Returns whether to look now.
    pub fn woken(&mut self) -> bool {
        if self.due.is_none() {
            self.looks = 0;
            return true;
        }
        self.looks = self.looks.min(QUICK_LOOKS);
        self.last.is_none_or(|t| t.elapsed() >= MIN_GAP)
    }

    /// Forgets the chase (the primary connection is gone).
    pub fn reset(&mut self) {
        self.due = None;
        self.looks = 0;
    }

    /// The chase is over (everything inserted is flushed).
    fn done(&mut self) {
        self.due = None;
        self.looks = 0;
    }

    /// After a look that found WAL inserted up to `inserted` and flushed to
    /// `flush`: keep chasing while the insert position is ahead, at most
    /// every `cap` once the quick and the 1 ms looks are spent.
    pub fn looked(&mut self, inserted: Lsn, flush: Lsn, cap: Duration) {
        self.last = Some(Instant::now());
        if inserted <= flush {
            self.done();
            return;
        }
        self.looks += 1;
        let wait = if self.looks <= QUICK_LOOKS {
            Duration::ZERO
        } else if self.looks <= QUICK_LOOKS + STEADY_LOOKS {
            Duration::from_millis(1)
        } else {
            let n = (self.looks - QUICK_LOOKS - STEADY_LOOKS).min(16);
            Duration::from_millis(1u64 << n)
        };
        self.due = Some(Instant::now() + wait.min(cap));
    }
}

/// Cross-checks `pg_walfile_name_offset` against our own segment math and
/// logs a disagreement (13-16: an LSN on a boundary is named after the
/// previous segment with offset 0; 17+: after the new segment).
pub fn check_name_quirk(fp: &FlushPoint, seg_size: SegmentSize, major: u32) -> bool {
    let expected = if fp.file_offset == 0 && major < 17 {
        fp.lsn.prev_segment_number(seg_size)
    } else {
        fp.lsn.segment_number(seg_size)
    };
    let tli = fp.timeline(seg_size).unwrap_or(TimelineId(1));
    let name = SegmentName::new(tli, expected).file_name(seg_size);
    if name != fp.file_name {
        warn!(lsn = %fp.lsn, file = %fp.file_name, expected = %name, "pg_walfile_name_offset names an unexpected segment");
        return false;
    }
    true
}

/// Exponential backoff from 100 ms up to a maximum.
pub struct Backoff {
    pub failures: u32,
    until: Instant,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Backoff {
            failures: 0,
            until: Instant::now(),
            max,
        }
    }
    pub fn due(&self) -> bool {
        Instant::now() >= self.until
    }
    pub fn fail(&mut self) -> Duration {
        self.failures += 1;
        let d =
            Duration::from_millis(100u64.saturating_mul(1 << self.failures.min(10))).min(self.max);
        self.until = Instant::now() + d;
        d
    }
    pub fn reset(&mut self) {
        self.failures = 0;
        self.until = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_quirk_is_understood_for_both_behaviours() {
        let s16 = SegmentSize::DEFAULT;
        let on_boundary = |name: &str| FlushPoint {
            lsn: "0/3000000".parse().unwrap(),
            file_name: name.into(),
            file_offset: 0,
        };
        // 13-16: the previous segment.
        assert!(check_name_quirk(
            &on_boundary("000000010000000000000002"),
            s16,
            15
        ));
        assert!(!check_name_quirk(
            &on_boundary("000000010000000000000003"),
            s16,
            15
        ));
        // 17+: the new segment.
        assert!(check_name_quirk(
            &on_boundary("000000010000000000000003"),
            s16,
            17
        ));
        let mid = FlushPoint {
            lsn: "0/3000028".parse().unwrap(),
            file_name: "000000010000000000000003".into(),
            file_offset: 0x28,
        };
        assert!(check_name_quirk(&mid, s16, 15));
    }

    #[test]
    fn a_chase_looks_at_once_then_every_ms_then_backs_off_and_ends_when_flushed() {
        let (ins, f) = (Lsn(200), Lsn(100));
        let cap = Duration::from_millis(5);
        let mut c = Chase::default();
        assert_eq!(c.due(), None);
        assert!(c.woken(), "an idle shipper looks at once");
        let mut waits = Vec::new();
        for _ in 0..20 {
            let before = Instant::now();
            c.looked(ins, f, cap);
            waits.push(c.due().unwrap().saturating_duration_since(before));
        }
        let q = QUICK_LOOKS as usize;
        assert!(waits[..q].iter().all(|d| *d < Duration::from_millis(1)));
        assert!(waits[q..q + STEADY_LOOKS as usize]
            .iter()
            .all(|d| *d >= Duration::from_millis(1) && *d < Duration::from_millis(2)));
        assert!(waits.iter().all(|d| *d <= cap + Duration::from_millis(1)));
        // An event during a chase looks at once only after a gap; it steps
        // at 1 ms again.
        assert!(!c.woken());
        std::thread::sleep(MIN_GAP);
        assert!(c.woken());
        let before = Instant::now();
        c.looked(ins, f, cap);
        assert!(c.due().unwrap().saturating_duration_since(before) < Duration::from_millis(2));
        c.looked(ins, ins, cap);
        assert_eq!(c.due(), None, "flushed: the chase ends");
    }
}
