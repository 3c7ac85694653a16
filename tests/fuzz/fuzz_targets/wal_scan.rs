//! The WAL scanner over arbitrary bytes and over mutated real segments.
//!
//! Input: `mode | ...`. Even mode: `page[2] | bytes` are scanned as the
//! start of a 1 MB segment (or from a record offset inside one). Odd mode:
//! `fixture | cut[3] | (offset[3] xor[1])*` picks a real PostgreSQL 15
//! segment from fixtures/pg15, cuts it (cut = 0: whole segment), and XORs
//! bytes at the given offsets (relative to the last page the cut keeps, so
//! the damage lands where the scan ends).
//!
//! Properties: no panic; the end LSN never passes the bytes given (unless
//! the last record is an XLOG_SWITCH, which claims the rest of the segment)
//! nor goes back; records come in strictly increasing order, each ending
//! after it starts; `scan_segment`'s summary matches stepping the scanner
//! by hand; a stopped scanner stays stopped with the same reason.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waltail::wal::{
    scan_segment, EndKind, Lsn, ScanConfig, ScanSummary, Scanner, WalView, XLOG_BLCKSZ,
};
use waltail_fuzz::{fixtures, seg1};

fn check(start: Lsn, bytes: &[u8], from: Option<Lsn>) {
    let seg = seg1();
    let end_of_bytes = start.0 + bytes.len() as u64;
    let s = scan_segment(start, bytes, ScanConfig::new(seg));
    let claims = if s.end.kind == EndKind::Switch {
        start.0 + seg.bytes()
    } else {
        end_of_bytes
    };
    assert!(
        s.end_lsn >= start && s.end_lsn.0 <= claims,
        "end {} outside {start}..{} ({})",
        s.end_lsn,
        Lsn(end_of_bytes),
        s.end
    );
    assert!(s.last_record.is_none_or(|l| l < s.end_lsn));
    assert_eq!(s.records == 0, s.first_record.is_none());
    assert!(s.first_record <= s.last_record);
    let _ = s.end.to_string();

    // Step by hand: the same records, in order, then the same end.
    let view = WalView::new(start, bytes).expect("a page-aligned view");
    let mut cfg = ScanConfig::new(seg);
    cfg.limit = start.checked_add(seg.bytes());
    let mut sc = match from {
        None => Scanner::find_first(view, cfg, start),
        Some(at) => Scanner::at_record(view, cfg, at, None),
    };
    let mut n = 0u64;
    let mut last: Option<Lsn> = None;
    let mut end_lsn = sc.end_lsn();
    let stop = loop {
        match sc.next_record() {
            Ok(r) => {
                n += 1;
                assert!(
                    last.is_none_or(|l| l < r.lsn),
                    "record {} after {last:?}",
                    r.lsn
                );
                assert!(r.lsn >= end_lsn && r.next > r.lsn);
                assert_eq!(sc.end_lsn(), r.next);
                end_lsn = r.next;
                last = Some(r.lsn);
            }
            Err(e) => {
                assert!(sc.end_lsn() == end_lsn, "the end moved on a stop");
                break e;
            }
        }
    };
    assert_eq!(
        sc.next_record().unwrap_err(),
        stop,
        "a stopped scanner stays stopped"
    );
    if from.is_none() {
        assert_eq!(n, s.records);
        assert_eq!(last, s.last_record);
        assert_eq!(sc.end_lsn(), s.end_lsn);
        let again = ScanSummary::run(Scanner::find_first(view, cfg, start));
        assert_eq!((again.records, again.end.kind), (s.records, s.end.kind));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if rest.len() < 2 {
            return;
        }
        let (p, bytes) = rest.split_at(2);
        let page = u64::from(u16::from_le_bytes([p[0], p[1]]));
        let start = Lsn(page * XLOG_BLCKSZ);
        check(start, bytes, None);
        // From a record offset on the first page (the bytes say where).
        let off = u64::from(mode >> 1) * 8;
        check(start, bytes, Some(Lsn(start.0 + off)));
    } else {
        let fx = fixtures();
        if rest.len() < 4 {
            return;
        }
        let (start, orig) = &fx[usize::from(rest[0]) % fx.len()];
        let cut = u32::from_le_bytes([rest[1], rest[2], rest[3], 0]) as usize;
        let cut = if cut == 0 {
            orig.len()
        } else {
            cut % (orig.len() + 1)
        };
        let mut b = orig[..cut].to_vec();
        let base = cut.saturating_sub(1) / XLOG_BLCKSZ as usize * XLOG_BLCKSZ as usize;
        for m in rest[4..].chunks_exact(4) {
            if b.is_empty() {
                break;
            }
            let off = u32::from_le_bytes([m[0], m[1], m[2], 0]) as usize;
            let i = if mode & 2 != 0 {
                off % b.len()
            } else {
                (base + off) % b.len()
            };
            b[i] ^= m[3];
        }
        check(*start, &b, None);
    }
});
