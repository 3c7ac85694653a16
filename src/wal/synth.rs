//! Synthetic WAL, laid out exactly as PostgreSQL lays it out: page headers
//! (long at each segment start), MAXALIGNed records with correct CRC-32C and
//! `xl_prev` chain, continuation pages with `xlp_rem_len`. For unit tests and
//! benchmarks that need WAL of a shape or size no fixture has; the
//! integration tests use real servers instead.

use super::lsn::{Lsn, XLOG_BLCKSZ};
use super::page::{LongHeader, PageHeader, XLP_FIRST_IS_CONTRECORD, XLP_LONG_HEADER};
use super::record::{record_crc, RecordHeader, SIZE_OF_XLOG_RECORD, XLOG_SWITCH};
use super::segment::{SegmentSize, TimelineId};

pub struct WalBuilder {
    pub seg_size: SegmentSize,
    pub sysid: u64,
    pub tli: TimelineId,
    pub magic: u16,
    start: Lsn,
    buf: Vec<u8>,
    prev: Lsn,
}

impl WalBuilder {
    /// WAL starting at `start`, a segment boundary.
    pub fn new(start: Lsn, seg_size: SegmentSize) -> Self {
        assert_eq!(
            start.segment_offset(seg_size),
            0,
            "start on a segment boundary"
        );
        WalBuilder {
            seg_size,
            sysid: 7_000_000_000_000_000_001,
            tli: TimelineId(1),
            magic: 0xD110,
            start,
            buf: Vec::new(),
            prev: Lsn::INVALID,
        }
    }

    pub fn pos(&self) -> Lsn {
        Lsn(self.start.0 + self.buf.len() as u64)
    }

    fn page_header(&mut self, rem_len: u32) {
        self.page_header_with(rem_len, 0)
    }

    fn page_header_with(&mut self, rem_len: u32, extra_info: u16) {
        let at = self.pos();
        let long = at.segment_offset(self.seg_size) == 0;
        let mut info = extra_info
            | if rem_len > 0 {
                XLP_FIRST_IS_CONTRECORD
            } else {
                0
            };
        if long {
            info |= XLP_LONG_HEADER;
        }
        let h = PageHeader {
            magic: self.magic,
            info,
            tli: self.tli,
            pageaddr: at,
            rem_len,
            long: long.then_some(LongHeader {
                sysid: self.sysid,
                seg_size: self.seg_size.bytes() as u32,
                xlog_blcksz: XLOG_BLCKSZ as u32,
            }),
        };
        self.buf.extend_from_slice(&h.encode());
    }

    /// Appends a record with this resource manager, info and payload; returns its LSN.
    pub fn record(&mut self, rmid: u8, info: u8, payload: &[u8]) -> Lsn {
        if self.pos().page_offset() == 0 {
            self.page_header(0);
        }
        let lsn = self.pos();
        let mut h = RecordHeader {
            tot_len: (SIZE_OF_XLOG_RECORD + payload.len()) as u32,
            xid: 1000,
            prev: self.prev,
            info,
            rmid,
            crc: 0,
        };
        let mut rec = h.encode().to_vec();
        rec.extend_from_slice(payload);
        h.crc = record_crc(&rec);
        rec[..SIZE_OF_XLOG_RECORD].copy_from_slice(&h.encode());
        let mut i = 0;
        loop {
            if self.pos().page_offset() == 0 {
                self.page_header((rec.len() - i) as u32);
            }
            let space = (XLOG_BLCKSZ - self.pos().page_offset()) as usize;
            let n = space.min(rec.len() - i);
            self.buf.extend_from_slice(&rec[i..i + n]);
            i += n;
            if i == rec.len() {
                break;
            }
        }
        let pad = (8 - self.buf.len() % 8) % 8;
        self.buf.extend(std::iter::repeat_n(0, pad));
        self.prev = lsn;
        lsn
    }

    /// What a crash leaves and crash recovery then writes: a record of `len`
    /// bytes begun on this page and abandoned at its end, then on the next
    /// page (flagged `XLP_FIRST_IS_OVERWRITE_CONTRECORD`) an
    /// `XLOG_OVERWRITE_CONTRECORD` naming it. Returns (abandoned, overwrite).
    pub fn abandon_and_overwrite(&mut self, len: usize) -> (Lsn, Lsn) {
        if self.pos().page_offset() == 0 {
            self.page_header(0);
        }
        let abandoned = self.pos();
        let space = (XLOG_BLCKSZ - abandoned.page_offset()) as usize;
        assert!(
            len + SIZE_OF_XLOG_RECORD > space,
            "the record must cross the page"
        );
        let mut h = RecordHeader {
            tot_len: (SIZE_OF_XLOG_RECORD + len) as u32,
            xid: 1000,
            prev: self.prev,
            info: 0,
            rmid: 21,
            crc: 0,
        };
        let mut rec = h.encode().to_vec();
        rec.extend((0..len).map(|i| (i % 251) as u8));
        h.crc = record_crc(&rec);
        rec[..SIZE_OF_XLOG_RECORD].copy_from_slice(&h.encode());
        self.buf.extend_from_slice(&rec[..space]);
        self.page_header_with(0, super::page::XLP_FIRST_IS_OVERWRITE_CONTRECORD);
        let mut payload = vec![0xFF, 16];
        payload.extend_from_slice(&abandoned.0.to_le_bytes());
        payload.extend_from_slice(&0i64.to_le_bytes());
        let ow = self.record(0, super::record::XLOG_OVERWRITE_CONTRECORD, &payload);
        (abandoned, ow)
    }

    /// An `XLOG_NOOP` record whose body is `len` bytes (at least 2): a main
    /// data block in the encoding `DecodeXLogRecord` expects, so pg_waldump
    /// reads these records as it reads real ones.
    pub fn message(&mut self, len: usize) -> Lsn {
        let len = len.max(2);
        let mut body = Vec::with_capacity(len);
        if len - 2 <= 255 {
            body.extend_from_slice(&[0xFF, (len - 2) as u8]);
        } else {
            body.push(0xFE);
            body.extend_from_slice(&((len - 5) as u32).to_le_bytes());
        }
        body.extend((0..len - body.len()).map(|i| (i * 31 % 251) as u8));
        self.record(0, 0x20, &body)
    }

    /// An `XLOG_SWITCH`, then the zero padding to the segment's end.
    pub fn switch(&mut self) -> Lsn {
        let lsn = self.record(0, XLOG_SWITCH, &[]);
        self.zero_to_segment_end();
        lsn
    }

    /// Zero bytes up to the end of the current segment (unused WAL space).
    pub fn zero_to_segment_end(&mut self) {
        let off = self.pos().segment_offset(self.seg_size);
        if off != 0 {
            let n = (self.seg_size.bytes() - off) as usize;
            self.buf.extend(std::iter::repeat_n(0, n));
        }
    }

    /// Fills with messages of the given sizes, cycling, until `bytes` of WAL
    /// are written; then zero-fills to the segment end.
    pub fn fill(&mut self, bytes: u64, sizes: &[usize]) -> Vec<Lsn> {
        let mut out = Vec::new();
        let mut i = 0;
        while (self.buf.len() as u64) < bytes {
            let n = sizes[i % sizes.len()];
            let left = bytes - self.buf.len() as u64;
            if (n as u64) + 64 > left {
                break;
            }
            out.push(self.message(n));
            i += 1;
        }
        out
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::scan::{scan_segment, EndKind, ScanConfig};

    fn s1() -> SegmentSize {
        SegmentSize::new(1 << 20).unwrap()
    }

    #[test]
    fn scanner_reads_everything_the_builder_wrote() {
        let mut b = WalBuilder::new(Lsn(1 << 20), s1());
        let lsns = b.fill(900_000, &[40, 100, 8000, 8200, 20000, 3, 16]);
        b.zero_to_segment_end();
        let s = scan_segment(Lsn(1 << 20), b.bytes(), ScanConfig::new(s1()));
        assert_eq!(s.records, lsns.len() as u64);
        assert_eq!(s.last_record, lsns.last().copied());
        assert_eq!(s.end.kind, EndKind::Zeroes);
    }

    #[test]
    fn record_header_split_across_pages() {
        let mut b = WalBuilder::new(Lsn(0), s1());
        // Bring a record start to 8 bytes before a page end.
        b.message(8088);
        assert_eq!(b.pos().page_offset(), 8192 - 8 - 32);
        b.message(2);
        assert_eq!(b.pos().page_offset(), 8192 - 8);
        let split = b.message(100);
        b.message(10);
        b.zero_to_segment_end();
        let s = scan_segment(Lsn(0), b.bytes(), ScanConfig::new(s1()));
        assert_eq!(s.records, 4);
        assert!(s.last_record > Some(split));
    }

    #[test]
    fn an_abandoned_record_overwritten_by_crash_recovery_is_skipped() {
        let mut b = WalBuilder::new(Lsn(0), s1());
        b.fill(20_000, &[100, 300]);
        let (abandoned, ow) = b.abandon_and_overwrite(9000);
        let after = b.fill(60_000, &[200]);
        b.zero_to_segment_end();
        let good = b.into_bytes();
        let s = scan_segment(Lsn(0), &good, ScanConfig::new(s1()));
        assert_eq!(s.last_record, after.last().copied(), "{:?}", s.end);
        assert!(s.records > after.len() as u64);
        // An overwrite record that names another record is not accepted.
        let mut bad = good.clone();
        let at = ow.0 as usize + 26;
        bad[at] ^= 0x08;
        // Re-sign the record so only the named LSN is wrong.
        let tot = 24 + 18;
        let mut r = bad[ow.0 as usize..ow.0 as usize + tot].to_vec();
        let crc = crate::wal::record::record_crc(&r);
        r[20..24].copy_from_slice(&crc.to_le_bytes());
        bad[ow.0 as usize..ow.0 as usize + tot].copy_from_slice(&r);
        let s = scan_segment(Lsn(0), &bad, ScanConfig::new(s1()));
        assert_eq!(s.end.kind, EndKind::TornPage);
        assert_eq!(
            s.end_lsn, abandoned,
            "valid WAL ends where the abandoned record began"
        );
    }

    /// Found by the wal_scan fuzz target: bytes that end inside a record's
    /// alignment padding made the scanner claim an end past them.
    #[test]
    fn bytes_ending_in_alignment_padding_are_not_claimed() {
        let mut b = WalBuilder::new(Lsn(0), s1());
        let first = b.message(10);
        let second = b.message(11);
        let at = second.0 as usize;
        let tot = u32::from_le_bytes(b.bytes()[at..at + 4].try_into().unwrap()) as usize;
        assert_ne!(tot % 8, 0, "the test needs a record of unaligned length");
        let cut = at + tot;
        let s = scan_segment(Lsn(0), &b.bytes()[..cut], ScanConfig::new(s1()));
        assert!(s.end_lsn.0 <= cut as u64, "end {} past {cut:#X}", s.end_lsn);
        // The record is whole (xlogreader reads xl_tot_len bytes) and kept;
        // the end is where the bytes end, not past them.
        assert_eq!(
            (s.last_record, s.end_lsn, s.end.kind),
            (Some(second), Lsn(cut as u64), EndKind::Truncated)
        );
        let _ = first;
        let whole = cut.div_ceil(8) * 8;
        let s = scan_segment(Lsn(0), &b.bytes()[..whole], ScanConfig::new(s1()));
        assert_eq!(
            (s.last_record, s.end_lsn),
            (Some(second), Lsn(whole as u64))
        );
    }

    #[test]
    fn switch_ends_the_segment() {
        let mut b = WalBuilder::new(Lsn(0), s1());
        b.message(10);
        let sw = b.switch();
        let s = scan_segment(Lsn(0), b.bytes(), ScanConfig::new(s1()));
        assert_eq!(s.last_record, Some(sw));
        assert_eq!(s.end.kind, EndKind::Switch);
        assert_eq!(s.end_lsn, Lsn(1 << 20));
    }

    #[test]
    fn each_kind_of_damage_stops_the_scan_where_it_is() {
        let mut b = WalBuilder::new(Lsn(0), s1());
        let lsns = b.fill(100_000, &[100, 9000]);
        b.zero_to_segment_end();
        let good = b.into_bytes();
        let third = lsns[3];
        let scan = |bytes: &[u8]| scan_segment(Lsn(0), bytes, ScanConfig::new(s1()));

        // CRC: flip a payload byte of the 4th record.
        let mut x = good.clone();
        x[third.0 as usize + 30] ^= 0x10;
        let s = scan(&x);
        assert_eq!(
            (s.records, s.end.kind, s.end_lsn),
            (3, EndKind::BadCrc, third)
        );

        // Broken prev link.
        let mut x = good.clone();
        x[third.0 as usize + 8] ^= 0x08;
        let s = scan(&x);
        assert_eq!((s.records, s.end.kind), (3, EndKind::BadPrevLink));

        // Stale page: the page after the 2nd record's start says it is elsewhere.
        let mut x = good.clone();
        let p = (lsns[1].0 / 8192 + 1) * 8192;
        x[p as usize + 8..p as usize + 16].copy_from_slice(&(p + (1 << 20)).to_le_bytes());
        let s = scan(&x);
        assert_eq!(s.end.kind, EndKind::StalePage);
        assert!(s.records >= 1 && s.records < lsns.len() as u64);

        // Torn page: a continuation page that lost its contrecord flag.
        let mut x = good.clone();
        x[p as usize + 2] &= !1;
        let s = scan(&x);
        assert_eq!(s.end.kind, EndKind::TornPage);

        // A prefix: the last record is cut.
        let cut = lsns[5].0 as usize + 50;
        let s = scan(&good[..cut]);
        assert_eq!(
            (s.records, s.end.kind, s.end_lsn),
            (5, EndKind::Truncated, lsns[5])
        );

        // Timeline past the expected one.
        let mut cfg = ScanConfig::new(s1());
        cfg.max_tli = Some(TimelineId(0));
        assert_eq!(scan_segment(Lsn(0), &good, cfg).end.kind, EndKind::Timeline);
        // Another cluster's segment.
        let mut cfg = ScanConfig::new(s1());
        cfg.sysid = Some(1);
        assert_eq!(
            scan_segment(Lsn(0), &good, cfg).end.kind,
            EndKind::BadPageHeader
        );
    }
}
