//! Reading flushed WAL straight out of the primary's `pg_wal`.
//!
//! The live segment is memory-mapped once (PostgreSQL writes it in place, and
//! a shared mapping sees those writes) and every page header of a range is
//! checked (magic, `xlp_pageaddr`, timeline, system identifier) before the
//! range is handed out, so the bytes of a recycled file are never shipped as
//! current WAL. A segment that is gone, or whose pages belong elsewhere, is
//! [`SourceError::Gone`]: the WAL needed was removed before it was shipped.

use std::fs::File;
use std::io;
use std::path::PathBuf;

use memmap2::Mmap;

use crate::fsio::map_readonly;
use crate::wal::page::{SIZE_OF_LONG_PHD, SIZE_OF_SHORT_PHD};
use crate::wal::scan::{check_page_headers, Record};
use crate::wal::{
    Lsn, PageChecker, PageError, ScanConfig, Scanner, SegmentName, SegmentSize, TimelineId, WalView,
};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("WAL segment {name} is gone from {dir} ({why}): it was removed or recycled before waltail shipped it. The spool cannot continue from here: keep the replication slot (the default) so this cannot happen, and rebuild the standby and its spool from a new base backup (waltail init-standby)")]
    Gone {
        name: String,
        dir: String,
        why: String,
    },
    #[error("reading {path}: {err}")]
    Io { path: String, err: io::Error },
}

pub struct WalSource {
    pg_wal: PathBuf,
    seg_size: SegmentSize,
    sysid: u64,
    cur: Option<(SegmentName, Mmap)>,
    /// How much of `cur` (from its start, whole pages) was released.
    released: usize,
}

/// Mapped pages are let go of in steps of at least this much: one madvise
/// per step, over the new pages only (a call over the whole sent prefix of
/// a 1 GB segment on every send cost the shipper a page-table walk of up to
/// a gigabyte).
const RELEASE_STEP: usize = 1 << 20;

impl WalSource {
    pub fn new(pg_wal: PathBuf, seg_size: SegmentSize, sysid: u64) -> Self {
        WalSource {
            pg_wal,
            seg_size,
            sysid,
            cur: None,
            released: 0,
        }
    }

    fn map(&mut self, seg: SegmentName) -> Result<&Mmap, SourceError> {
        if self.cur.as_ref().map(|c| c.0) != Some(seg) {
            self.cur = None;
            let name = seg.file_name(self.seg_size);
            // After a promotion with archiving on, PostgreSQL renames the old
            // timeline's last segment to .partial.
            let candidates = [
                self.pg_wal.join(&name),
                self.pg_wal.join(format!("{name}.partial")),
            ];
            let Some(path) = candidates.iter().find(|p| p.exists()) else {
                return Err(SourceError::Gone {
                    name,
                    dir: self.pg_wal.display().to_string(),
                    why: "no such file".into(),
                });
            };
            let io = |err| SourceError::Io {
                path: path.display().to_string(),
                err,
            };
            let f = File::open(path).map_err(io)?;
            let len = f.metadata().map_err(io)?.len();
            if len != self.seg_size.bytes() {
                return Err(SourceError::Gone {
                    name,
                    dir: self.pg_wal.display().to_string(),
                    why: format!("{len} bytes, not a segment"),
                });
            }
            let m = map_readonly(&f).map_err(io)?;
            self.cur = Some((seg, m));
            self.released = 0;
        }
        Ok(&self.cur.as_ref().expect("mapped above").1)
    }

    /// The complete, valid record that starts at `lsn` on timeline `tli`
    /// (read from a copy of at most a few pages, so a record that runs into
    /// the next segment is read whole), or why there is none.
    pub fn record_at(
        &mut self,
        tli: TimelineId,
        lsn: Lsn,
    ) -> Result<Result<Record, String>, SourceError> {
        const WINDOW: u64 = 64 * 1024;
        let seg_size = self.seg_size;
        let seg = SegmentName::of_lsn(tli, lsn, seg_size);
        let seg_start = seg.start_lsn(seg_size);
        let page = lsn.page_lsn();
        let to = seg.end_lsn(seg_size).min(Lsn(page.0 + WINDOW));
        let map = self.map(seg)?;
        let mut bytes =
            map[(page.0 - seg_start.0) as usize..(to.0 - seg_start.0) as usize].to_vec();
        if to == seg.end_lsn(seg_size) {
            let next = SegmentName::of_lsn(tli, to, seg_size);
            if let Ok(m) = self.map(next) {
                bytes.extend_from_slice(&m[..(WINDOW as usize).min(m.len())]);
            }
        }
        let Some(view) = WalView::new(page, &bytes) else {
            return Ok(Err(format!("{lsn} gives no view of WAL")));
        };
        let mut cfg = ScanConfig::new(seg_size);
        cfg.sysid = Some(self.sysid);
        cfg.max_tli = Some(tli);
        Ok(Scanner::at_record(view, cfg, lsn, None)
            .next_record()
            .map_err(|e| e.to_string()))
    }

    /// Lets go of the mapped pages below `upto` (already sent), keeping the
    /// resident set small whatever the segment size.
    pub fn release_below(&mut self, upto: Lsn) {
        if let Some((seg, map)) = &self.cur {
            let start = seg.start_lsn(self.seg_size);
            if upto > start {
                let n = ((upto.0 - start.0) as usize).min(map.len());
                if n >= self.released + RELEASE_STEP || n == map.len() {
                    self.released =
                        crate::fsio::release_pages(map, self.released, n - self.released);
                }
            }
        }
    }

    /// The flushed bytes `[from, to)` of timeline `tli`, within one segment,
    /// after checking every page header they touch. `to` is trimmed back to
    /// a page start if it would end inside a page header.
    /// `complete` says the server has flushed the whole segment (so it may
    /// end in switch padding).
    pub fn read(
        &mut self,
        tli: TimelineId,
        from: Lsn,
        to: Lsn,
        complete: bool,
    ) -> Result<(Lsn, &[u8]), SourceError> {
        let seg_size = self.seg_size;
        let seg = SegmentName::of_lsn(tli, from, seg_size);
        let seg_start = seg.start_lsn(seg_size);
        let mut to = to.min(seg.end_lsn(seg_size));
        // Flushed WAL never ends inside a page header; if `to` would, it is
        // not flushed yet. Only the segment's first page has the long header.
        let header = if to.page_lsn() == seg.start_lsn(seg_size) {
            SIZE_OF_LONG_PHD
        } else {
            SIZE_OF_SHORT_PHD
        } as u64;
        if to.page_offset() != 0 && to.page_offset() < header {
            to = to.page_lsn();
        }
        if to <= from {
            return Ok((from, &[]));
        }
        let sysid = self.sysid;
        let dir = self.pg_wal.display().to_string();
        self.map(seg)?;
        let page = from.page_lsn();
        let lo = (page.0 - seg_start.0) as usize;
        let hi = (to.0 - seg_start.0) as usize;
        // Reading again what was released (a resumed stream) maps it back
        // in: release it again as the stream passes it.
        self.released = self.released.min(lo);
        let map = &self.cur.as_ref().expect("mapped above").1;
        let mut checker = PageChecker::new(seg_size);
        checker.max_tli = Some(tli);
        checker.sysid = Some(sysid);
        match check_page_headers(&mut checker, page, &map[lo..hi]) {
            Ok(()) => {}
            // After an XLOG_SWITCH, PostgreSQL (11+) fills the rest of the
            // segment with pages that are entirely zero, headers included. A
            // completed segment may end in such a run; nothing else may.
            Err(PageError::Zeroed { at })
                if complete
                    && map[(at.0 - seg_start.0) as usize..hi]
                        .iter()
                        .all(|&b| b == 0) => {}
            // The padding is written through wal_buffers, so while a switch
            // fills a segment bigger than wal_buffers (64 MB segments, 1 MB
            // of buffers) the flush position walks through zero pages before
            // it reaches the segment's end. Send what lies before them and
            // look again at the next poll: the segment either completes (the
            // case above) or was not zero there after all.
            Err(PageError::Zeroed { at }) if !complete => {
                if at <= from {
                    return Ok((from, &[]));
                }
                let a = (from.0 - seg_start.0) as usize;
                return Ok((at, &map[a..(at.0 - seg_start.0) as usize]));
            }
            Err(e) => {
                return Err(SourceError::Gone {
                    name: seg.file_name(seg_size),
                    dir,
                    why: e.to_string(),
                })
            }
        }
        let a = (from.0 - seg_start.0) as usize;
        Ok((to, &map[a..hi]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::synth::WalBuilder;
    use crate::wal::XLOG_BLCKSZ;

    /// A segment half-way through its switch padding: flushed up to the
    /// middle of the zero pages, not yet to the segment's end.
    #[test]
    fn zero_pages_of_a_switch_being_flushed_are_waited_for_not_fatal() {
        let seg = SegmentSize::new(1 << 20).unwrap();
        let start = Lsn(1 << 20);
        let mut b = WalBuilder::new(start, seg);
        b.fill(20_000, &[100, 3000]);
        let switch = b.switch();
        let sysid = b.sysid;
        let bytes = b.into_bytes();
        let dir = tempfile::tempdir().unwrap();
        let name = SegmentName::of_lsn(TimelineId(1), start, seg).file_name(seg);
        std::fs::write(dir.path().join(&name), &bytes).unwrap();
        let mut src = WalSource::new(dir.path().to_path_buf(), seg, sysid);
        let first_zero_page = Lsn(switch.0 + XLOG_BLCKSZ - switch.page_offset());
        let mid_padding = Lsn(start.0 + 600_000);
        // Flushed into the padding: everything up to the first zero page.
        let (got, data) = src.read(TimelineId(1), start, mid_padding, false).unwrap();
        assert_eq!(got, first_zero_page);
        assert_eq!(data, &bytes[..(got.0 - start.0) as usize]);
        // Nothing more until the segment is complete.
        let (again, data) = src.read(TimelineId(1), got, mid_padding, false).unwrap();
        assert_eq!((again, data.len()), (got, 0));
        // Complete: the padding goes out.
        let end = Lsn(start.0 + seg.bytes());
        let (done, data) = src.read(TimelineId(1), got, end, true).unwrap();
        assert_eq!(done, end);
        assert!(data.iter().all(|&x| x == 0));
    }

    #[test]
    fn a_stale_page_below_the_flush_position_is_gone() {
        let seg = SegmentSize::new(1 << 20).unwrap();
        let start = Lsn(1 << 20);
        let mut b = WalBuilder::new(start, seg);
        b.fill(40_000, &[100, 3000]);
        b.zero_to_segment_end();
        let sysid = b.sysid;
        let mut bytes = b.into_bytes();
        // The third page claims to be from another segment (a recycled file).
        let p = 2 * XLOG_BLCKSZ as usize;
        bytes[p + 8..p + 16].copy_from_slice(&(3u64 << 20).to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let name = SegmentName::of_lsn(TimelineId(1), start, seg).file_name(seg);
        std::fs::write(dir.path().join(&name), &bytes).unwrap();
        let mut src = WalSource::new(dir.path().to_path_buf(), seg, sysid);
        let err = src
            .read(TimelineId(1), start, Lsn(start.0 + 30_000), false)
            .unwrap_err();
        assert!(matches!(err, SourceError::Gone { .. }), "{err}");
    }
}
