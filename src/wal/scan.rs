//! Finding the valid end of WAL: the scanner that failover trusts with data.
//!
//! [`Scanner`] reads records from a contiguous run of WAL bytes ([`WalView`])
//! the way PostgreSQL's `xlogreader.c` does, and stops at the first thing
//! PostgreSQL's recovery would stop at:
//!
//! * zeroed space (a pre-sized `.partial`, or the unused tail of a segment);
//! * a page header that does not belong here: wrong magic or flags, or a
//!   stale page left from a recycled segment file (`xlp_pageaddr` is another
//!   segment's), or a timeline that goes backwards or past the expected one;
//! * a record header that is invalid (length, resource manager, `xl_prev`
//!   chain) or a record whose CRC-32C does not match;
//! * a continuation piece that is missing or of the wrong length (a torn page);
//! * the end of the bytes given, or of the segment being read.
//!
//! The checks and their order follow `XLogReaderValidatePageHeader`,
//! `XLogFindNextRecord`, `XLogDecodeNextRecord`, `ValidXLogRecordHeader` and
//! `ValidXLogRecord` in PostgreSQL 15. The one check PostgreSQL makes that this
//! scanner does not is decoding the record body (`DecodeXLogRecord`); a body
//! can only be malformed if its CRC-32C also matches.
//!
//! Invariants: no input makes the scanner panic or read outside the view, and
//! `end_lsn` only ever advances past records that are complete and valid.

use serde::Serialize;

use super::lsn::{maxalign, Lsn, XLOG_BLCKSZ};
use super::page::{PageChecker, PageError, PageHeader, XLP_FIRST_IS_OVERWRITE_CONTRECORD};
use super::record::{
    RecordCrc, RecordHeader, MAX_RECORD_LEN, RM_XLOG_ID, SIZE_OF_XLOG_RECORD,
    XLOG_OVERWRITE_CONTRECORD, XLR_INFO_MASK,
};
use super::segment::{SegmentSize, TimelineId};

/// Contiguous WAL bytes starting at a page boundary.
#[derive(Clone, Copy)]
pub struct WalView<'a> {
    start: Lsn,
    bytes: &'a [u8],
}

impl<'a> WalView<'a> {
    /// `start` must be a page boundary; returns `None` otherwise.
    pub fn new(start: Lsn, bytes: &'a [u8]) -> Option<Self> {
        (start.page_offset() == 0 && start.checked_add(bytes.len() as u64).is_some())
            .then_some(WalView { start, bytes })
    }

    pub fn start(&self) -> Lsn {
        self.start
    }

    pub fn end(&self) -> Lsn {
        Lsn(self.start.0 + self.bytes.len() as u64)
    }

    /// `len` bytes at `at`, if all of them are in the view.
    pub fn get(&self, at: Lsn, len: u64) -> Option<&'a [u8]> {
        let from = at.0.checked_sub(self.start.0)?;
        let to = from.checked_add(len)?;
        if to > self.bytes.len() as u64 {
            return None;
        }
        Some(&self.bytes[from as usize..to as usize])
    }

    /// The bytes from `at` to the end of its page or of the view.
    fn page_rest(&self, at: Lsn) -> Option<&'a [u8]> {
        let from = at.0.checked_sub(self.start.0)? as usize;
        if from >= self.bytes.len() {
            return None;
        }
        let to = (from + (XLOG_BLCKSZ - at.page_offset()) as usize).min(self.bytes.len());
        Some(&self.bytes[from..to])
    }
}

/// Why reading stopped, as a stable code (`end_reason` in JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndKind {
    /// Zeroed space where the next record would be: the normal end of WAL.
    Zeroes,
    /// The last record was an `XLOG_SWITCH`; the rest of the segment is padding.
    Switch,
    /// The next record starts in, or continues into, the following segment.
    SegmentEnd,
    /// The bytes given end before the next record does.
    Truncated,
    /// A page header from another place: a recycled segment file's old page.
    StalePage,
    /// A page header that is invalid (magic, flags, long header).
    BadPageHeader,
    /// A page on an unexpected timeline.
    Timeline,
    /// A record header that is invalid (length, resource manager).
    BadRecordHeader,
    /// A record whose `xl_prev` does not point at the record before it.
    BadPrevLink,
    /// A record whose CRC-32C does not match.
    BadCrc,
    /// A continuation piece is missing or has the wrong length.
    TornPage,
    /// No record starts in the bytes given.
    NoRecord,
}

impl EndKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EndKind::Zeroes => "zeroes",
            EndKind::Switch => "switch",
            EndKind::SegmentEnd => "segment_end",
            EndKind::Truncated => "truncated",
            EndKind::StalePage => "stale_page",
            EndKind::BadPageHeader => "bad_page_header",
            EndKind::Timeline => "timeline",
            EndKind::BadRecordHeader => "bad_record_header",
            EndKind::BadPrevLink => "bad_prev_link",
            EndKind::BadCrc => "bad_crc",
            EndKind::TornPage => "torn_page",
            EndKind::NoRecord => "no_record",
        }
    }

    /// True where the scanner stopped because the WAL simply ends (or goes on
    /// elsewhere), false where it found something damaged or foreign.
    pub fn is_clean(self) -> bool {
        matches!(
            self,
            EndKind::Zeroes | EndKind::Switch | EndKind::SegmentEnd | EndKind::Truncated
        )
    }
}

/// Where and why reading stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct End {
    pub kind: EndKind,
    /// The LSN where the problem was seen.
    pub at: Lsn,
    pub detail: String,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}: {}", self.kind.as_str(), self.at, self.detail)
    }
}

fn end(kind: EndKind, at: Lsn, detail: impl Into<String>) -> End {
    End {
        kind,
        at,
        detail: detail.into(),
    }
}

impl From<PageError> for End {
    fn from(e: PageError) -> End {
        let (kind, at) = match &e {
            PageError::Short { at } => (EndKind::Truncated, *at),
            PageError::Zeroed { at } => (EndKind::Zeroes, *at),
            PageError::Stale { at, .. } => (EndKind::StalePage, *at),
            PageError::TimelineBackwards { at, .. } | PageError::TimelineTooNew { at, .. } => {
                (EndKind::Timeline, *at)
            }
            PageError::UnsupportedMagic { at, .. }
            | PageError::MagicChanged { at, .. }
            | PageError::InfoBits { at, .. }
            | PageError::LongHeader { at, .. } => (EndKind::BadPageHeader, *at),
        };
        end(kind, at, e.to_string())
    }
}

/// What the scanner should hold the WAL to.
#[derive(Clone, Copy, Debug)]
pub struct ScanConfig {
    pub seg_size: SegmentSize,
    /// Refuse segment headers of another cluster.
    pub sysid: Option<u64>,
    /// Refuse pages of a newer timeline than this one.
    pub max_tli: Option<TimelineId>,
    /// Do not read at or past this LSN (the end of the segment being inspected).
    pub limit: Option<Lsn>,
}

impl ScanConfig {
    pub fn new(seg_size: SegmentSize) -> Self {
        ScanConfig {
            seg_size,
            sysid: None,
            max_tli: None,
            limit: None,
        }
    }
}

/// One complete, valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub lsn: Lsn,
    pub header: RecordHeader,
    /// Where the next record would start (`NextRecPtr`).
    pub next: Lsn,
}

enum Step {
    Record(Record),
    /// The record at `abandoned` was overwritten from page `page` on.
    Restart {
        page: Lsn,
        abandoned: Lsn,
    },
}

/// Reads records one at a time (see the module header).
pub struct Scanner<'a> {
    view: WalView<'a>,
    cfg: ScanConfig,
    checker: PageChecker,
    page: Option<(Lsn, PageHeader)>,
    next: Lsn,
    prev: Option<Lsn>,
    major: u32,
    done: Option<End>,
}

impl<'a> Scanner<'a> {
    /// A scanner that reads the record at `lsn`, whose predecessor is `prev`
    /// (`None`: unknown, the prev-link is only checked to point backwards).
    pub fn at_record(view: WalView<'a>, cfg: ScanConfig, lsn: Lsn, prev: Option<Lsn>) -> Self {
        let mut checker = PageChecker::new(cfg.seg_size);
        checker.sysid = cfg.sysid;
        checker.max_tli = cfg.max_tli;
        Scanner {
            view,
            cfg,
            checker,
            page: None,
            next: lsn,
            prev,
            major: 0,
            done: None,
        }
    }

    /// `XLogFindNextRecord`: a scanner positioned at the first record that
    /// starts at or after the page boundary `from`, skipping the remainder of
    /// a record continued from before it.
    pub fn find_first(view: WalView<'a>, cfg: ScanConfig, from: Lsn) -> Self {
        let mut s = Scanner::at_record(view, cfg, from, None);
        let mut p = from.page_lsn();
        loop {
            let hdr = match s.page(p) {
                Ok(h) => h,
                Err(mut e) => {
                    if e.kind == EndKind::SegmentEnd || e.kind == EndKind::Truncated {
                        e.kind = EndKind::NoRecord;
                        e.detail = format!("no record starts between {from} and {p}");
                    }
                    s.next = from;
                    s.done = Some(e);
                    return s;
                }
            };
            let hsize = hdr.size() as u64;
            if hdr.is_contrecord() {
                if maxalign(u64::from(hdr.rem_len)) >= XLOG_BLCKSZ - hsize {
                    p = Lsn(p.0 + XLOG_BLCKSZ);
                    continue;
                }
                let after = Lsn(p.0 + hsize + maxalign(u64::from(hdr.rem_len)));
                if after > s.view.end() {
                    // The continued record's tail is not in the bytes given.
                    s.next = from;
                    s.done = Some(end(
                        EndKind::NoRecord,
                        p,
                        format!("the bytes given end inside a record continued from before {p}"),
                    ));
                    return s;
                }
                s.next = after;
            } else {
                s.next = Lsn(p.0 + hsize);
            }
            return s;
        }
    }

    /// Where the next record would start: the end of valid WAL so far.
    pub fn end_lsn(&self) -> Lsn {
        self.next
    }

    /// The first page header read, once one was.
    pub fn checker(&self) -> &PageChecker {
        &self.checker
    }

    /// Validated header of the page at `p`.
    fn page(&mut self, p: Lsn) -> Result<PageHeader, End> {
        if let Some((at, h)) = self.page {
            if at == p {
                return Ok(h);
            }
        }
        if let Some(limit) = self.cfg.limit {
            if p >= limit {
                return Err(end(
                    EndKind::SegmentEnd,
                    p,
                    format!("WAL continues past {limit}, the end of this segment"),
                ));
            }
        }
        let Some(bytes) = self.view.page_rest(p) else {
            return Err(end(
                EndKind::Truncated,
                p,
                format!("the bytes given end at {}", self.view.end()),
            ));
        };
        let h = self.checker.check(bytes, p)?;
        if self.major == 0 {
            self.major = h.major_version().unwrap_or(0);
        }
        self.page = Some((p, h));
        Ok(h)
    }

    fn truncated(&self, at: Lsn) -> End {
        end(
            EndKind::Truncated,
            at,
            format!(
                "record at {at} is cut short: the bytes given end at {}",
                self.view.end()
            ),
        )
    }

    /// `ValidXLogRecordHeader`.
    fn validate_header(&self, h: &RecordHeader, at: Lsn) -> Result<(), End> {
        if (h.tot_len as usize) < SIZE_OF_XLOG_RECORD {
            return Err(end(
                EndKind::BadRecordHeader,
                at,
                format!(
                    "invalid record length: wanted {SIZE_OF_XLOG_RECORD}, got {}",
                    h.tot_len
                ),
            ));
        }
        if !h.rmid_is_valid(self.major) {
            return Err(end(
                EndKind::BadRecordHeader,
                at,
                format!("invalid resource manager ID {}", h.rmid),
            ));
        }
        match self.prev {
            None if h.prev >= at => Err(end(
                EndKind::BadPrevLink,
                at,
                format!("record with incorrect prev-link {}", h.prev),
            )),
            Some(p) if h.prev != p => Err(end(
                EndKind::BadPrevLink,
                at,
                format!("record with incorrect prev-link {} (expected {p})", h.prev),
            )),
            _ => Ok(()),
        }
    }

    /// The next complete, valid record, or why there is none. Once it has
    /// returned an `End` it keeps returning it.
    pub fn next_record(&mut self) -> Result<Record, End> {
        if let Some(e) = &self.done {
            return Err(e.clone());
        }
        let r = self.read_record();
        match &r {
            Ok(rec) => {
                self.prev = Some(rec.lsn);
                self.next = rec.next;
            }
            Err(e) => self.done = Some(e.clone()),
        }
        r
    }

    /// Reads the record at `self.next`; when a continuation page says the
    /// record was abandoned and overwritten (`XLP_FIRST_IS_OVERWRITE_CONTRECORD`,
    /// written by crash recovery), restarts at that page as PostgreSQL does
    /// and requires an `XLOG_OVERWRITE_CONTRECORD` naming the abandoned record.
    fn read_record(&mut self) -> Result<Record, End> {
        let start = self.next;
        let mut aborted: Option<Lsn> = None;
        loop {
            match self.read_one() {
                Ok(Step::Record(r)) => {
                    if let Some(a) = aborted {
                        let named = self
                            .view
                            .get(Lsn(r.lsn.0 + SIZE_OF_XLOG_RECORD as u64), 10)
                            .and_then(|b| {
                                (b[0] == 0xFF && b[1] >= 8).then(|| {
                                    let mut l = [0u8; 8];
                                    l.copy_from_slice(&b[2..10]);
                                    Lsn(u64::from_le_bytes(l))
                                })
                            });
                        if r.header.rmid != RM_XLOG_ID
                            || r.header.info & !XLR_INFO_MASK != XLOG_OVERWRITE_CONTRECORD
                            || named != Some(a)
                        {
                            self.next = start;
                            return Err(end(
                                EndKind::TornPage,
                                r.lsn,
                                format!("the record at {a} was abandoned, but {} is not the XLOG_OVERWRITE_CONTRECORD for it", r.lsn),
                            ));
                        }
                    }
                    return Ok(r);
                }
                Ok(Step::Restart { page, abandoned }) => {
                    aborted = Some(abandoned);
                    self.next = page;
                }
                Err(e) => {
                    self.next = start;
                    return Err(e);
                }
            }
        }
    }

    fn read_one(&mut self) -> Result<Step, End> {
        let mut rec = self.next;
        if rec >= self.view.end() && self.cfg.limit.is_none_or(|l| rec < l) {
            // The bytes given end here (inside the last record's padding,
            // when `rec` is not aligned): nothing more to read.
            return Err(end(
                EndKind::Truncated,
                rec,
                format!("the bytes given end at {rec}"),
            ));
        }
        let page_lsn = rec.page_lsn();
        let hdr = self.page(page_lsn)?;
        let hsize = hdr.size() as u64;
        let mut off = rec.page_offset();
        if off == 0 {
            rec = Lsn(rec.0 + hsize);
            off = hsize;
        } else if off < hsize {
            return Err(end(EndKind::BadRecordHeader, rec, "invalid record offset"));
        }
        if hdr.is_contrecord() && off == hsize {
            return Err(end(
                EndKind::TornPage,
                rec,
                format!("contrecord is requested by {rec}"),
            ));
        }
        if off % 8 != 0 {
            return Err(end(
                EndKind::BadRecordHeader,
                rec,
                "record is not MAXALIGNed",
            ));
        }

        // The part of the record header on this page (at least 8 bytes).
        let on_page = (XLOG_BLCKSZ - off).min(SIZE_OF_XLOG_RECORD as u64);
        let Some(first) = self.view.get(rec, on_page) else {
            return Err(self.truncated(rec));
        };
        if first.iter().all(|&b| b == 0) {
            return Err(end(
                EndKind::Zeroes,
                rec,
                "zeroed space where a record would start",
            ));
        }
        let tot_len = u32::from_le_bytes([first[0], first[1], first[2], first[3]]);
        let mut crc = RecordCrc::new();
        let mut header = None;
        if on_page == SIZE_OF_XLOG_RECORD as u64 {
            let mut hb = [0u8; SIZE_OF_XLOG_RECORD];
            hb.copy_from_slice(first);
            let h = RecordHeader::parse(&hb);
            self.validate_header(&h, rec)?;
            header = Some(h);
        } else if (tot_len as usize) < SIZE_OF_XLOG_RECORD {
            return Err(end(
                EndKind::BadRecordHeader,
                rec,
                format!("invalid record length: wanted {SIZE_OF_XLOG_RECORD}, got {tot_len}"),
            ));
        }
        if tot_len > MAX_RECORD_LEN {
            return Err(end(
                EndKind::BadRecordHeader,
                rec,
                format!("record length {tot_len} too long"),
            ));
        }
        let tot = u64::from(tot_len);

        let next = if off + tot <= XLOG_BLCKSZ {
            let Some(data) = self.view.get(rec, tot) else {
                return Err(self.truncated(rec));
            };
            crc.feed(data);
            Lsn(rec.0 + maxalign(tot))
        } else {
            let Some(piece) = self.view.get(rec, XLOG_BLCKSZ - off) else {
                return Err(self.truncated(rec));
            };
            crc.feed(piece);
            let mut got = XLOG_BLCKSZ - off;
            let mut p = page_lsn;
            loop {
                p = Lsn(p.0 + XLOG_BLCKSZ);
                let ph = self.page(p).map_err(|mut e| {
                    if e.kind == EndKind::Zeroes {
                        e.kind = EndKind::TornPage;
                        e.detail = format!("record at {rec} continues onto a zeroed page at {p}");
                    }
                    e
                })?;
                if ph.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0 {
                    return Ok(Step::Restart {
                        page: p,
                        abandoned: rec,
                    });
                }
                if !ph.is_contrecord() {
                    return Err(end(
                        EndKind::TornPage,
                        p,
                        format!("there is no contrecord flag at {p} for the record at {rec}"),
                    ));
                }
                let rem = u64::from(ph.rem_len);
                if rem == 0 || tot != rem + got {
                    return Err(end(
                        EndKind::TornPage,
                        p,
                        format!(
                            "invalid contrecord length {rem} (expected {}) at {p}",
                            tot - got
                        ),
                    ));
                }
                let hs = ph.size() as u64;
                let len = (XLOG_BLCKSZ - hs).min(rem);
                let Some(piece) = self.view.get(Lsn(p.0 + hs), len) else {
                    return Err(self.truncated(rec));
                };
                crc.feed(piece);
                got += len;
                if header.is_none() {
                    let Some(h) = crc.header() else {
                        return Err(end(EndKind::BadRecordHeader, rec, "record header is cut"));
                    };
                    self.validate_header(&h, rec)?;
                    header = Some(h);
                }
                if got >= tot {
                    break Lsn(p.0 + hs + maxalign(rem));
                }
            }
        };
        let Some(header) = header else {
            return Err(end(EndKind::BadRecordHeader, rec, "record header is cut"));
        };
        let computed = crc.finish();
        if computed != header.crc {
            return Err(end(
                EndKind::BadCrc,
                rec,
                format!(
                    "incorrect resource manager data checksum in record at {rec} (computed {computed:08X}, stored {:08X})",
                    header.crc
                ),
            ));
        }
        let next = if header.is_switch() {
            let seg = self.cfg.seg_size.bytes();
            Lsn(next.0.div_ceil(seg) * seg)
        } else {
            // Bytes that end inside the record's alignment padding: the
            // record is whole (xlogreader reads xl_tot_len bytes), but the
            // WAL known ends with the bytes given, not past them.
            next.min(self.view.end())
        };
        Ok(Step::Record(Record {
            lsn: rec,
            header,
            next,
        }))
    }
}

/// What a scan of a run of WAL found.
#[derive(Clone, Debug)]
pub struct ScanSummary {
    /// Complete, valid records read.
    pub records: u64,
    pub first_record: Option<Lsn>,
    pub last_record: Option<Lsn>,
    /// The last record's header (a shutdown checkpoint at the very end says
    /// the primary stopped cleanly there).
    pub last_header: Option<RecordHeader>,
    /// Where the next record would start: keep the bytes before this LSN.
    pub end_lsn: Lsn,
    pub end: End,
}

impl ScanSummary {
    /// Reads records until the scanner stops.
    pub fn run(mut s: Scanner<'_>) -> ScanSummary {
        let mut records = 0;
        let mut first_record = None;
        let mut last: Option<Record> = None;
        let mut e = loop {
            match s.next_record() {
                Ok(r) => {
                    records += 1;
                    first_record.get_or_insert(r.lsn);
                    last = Some(r);
                }
                Err(e) => break e,
            }
        };
        if let Some(r) = last {
            if r.header.is_switch() && e.kind == EndKind::SegmentEnd {
                e.kind = EndKind::Switch;
                e.detail = format!(
                    "XLOG_SWITCH at {}: the rest of the segment is padding",
                    r.lsn
                );
            }
        }
        // Bytes that end exactly where the last record does, short of its
        // alignment padding: the next record would start past them, but the
        // WAL found ends with the bytes given.
        let mut end_lsn = s.end_lsn();
        if e.kind == EndKind::Truncated {
            end_lsn = end_lsn.min(s.view.end());
        }
        ScanSummary {
            records,
            first_record,
            last_record: last.map(|r| r.lsn),
            last_header: last.map(|r| r.header),
            end_lsn,
            end: e,
        }
    }
}

/// Scans one segment's bytes (or a prefix of them) the way `pg_waldump FILE`
/// reads a single file: from the first record that starts in it to the last
/// one that is complete within it.
pub fn scan_segment(seg_start: Lsn, bytes: &[u8], mut cfg: ScanConfig) -> ScanSummary {
    let limit = seg_start.checked_add(cfg.seg_size.bytes());
    cfg.limit = limit;
    let Some(view) = WalView::new(seg_start, bytes) else {
        return ScanSummary {
            records: 0,
            first_record: None,
            last_record: None,
            last_header: None,
            end_lsn: seg_start,
            end: end(
                EndKind::BadPageHeader,
                seg_start,
                "segment start is not page aligned",
            ),
        };
    };
    ScanSummary::run(Scanner::find_first(view, cfg, seg_start))
}

/// Checks every page header that starts in `[from, from + bytes.len())`:
/// what a shipper checks before it sends a range read from a live segment
/// file, so that stale bytes of a recycled file never leave as current WAL.
/// `bytes` starts at `from`; returns the first page that fails.
pub fn check_page_headers(
    checker: &mut PageChecker,
    from: Lsn,
    bytes: &[u8],
) -> Result<(), PageError> {
    let first_page = if from.page_offset() == 0 {
        from.0
    } else {
        match from.page_lsn().0.checked_add(XLOG_BLCKSZ) {
            Some(p) => p,
            None => return Ok(()),
        }
    };
    let end = from.0.saturating_add(bytes.len() as u64);
    let mut p = first_page;
    while p < end {
        let off = (p - from.0) as usize;
        let len = (bytes.len() - off).min(XLOG_BLCKSZ as usize);
        checker.check(&bytes[off..off + len], Lsn(p))?;
        let Some(n) = p.checked_add(XLOG_BLCKSZ) else {
            break;
        };
        p = n;
    }
    Ok(())
}
