//! Hostile bytes: the page, record and name parsers and the scanner get
//! arbitrary and mutated input and must never panic or read out of bounds.
//! Bounded: PROPTEST_CASES (default 256 here) cases per property.

use proptest::prelude::*;

use crate::util::fixtures;
use waltail::wal::{
    scan_segment, Lsn, PageChecker, PageHeader, ScanConfig, Scanner, SegmentSize, WalFileName,
    WalView,
};

fn seg1() -> SegmentSize {
    SegmentSize::new(1 << 20).unwrap()
}

/// (segment start, bytes) of every fixture holding records.
fn fixture_bytes() -> &'static [(Lsn, Vec<u8>)] {
    static F: std::sync::OnceLock<Vec<(Lsn, Vec<u8>)>> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        fixtures(15)
            .into_iter()
            .filter(|f| f.kind != "recycled")
            .map(|f| match WalFileName::parse(&f.name, seg1()) {
                Ok(WalFileName::Segment(s)) => (s.start_lsn(seg1()), f.bytes),
                other => panic!("fixture name {}: {other:?}", f.name),
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40000),
                                   start_page in 0u64..1000) {
        let start = Lsn(start_page * 8192);
        let _ = PageHeader::parse(&bytes, start);
        let _ = PageChecker::new(seg1()).check(&bytes, start);
        let s = scan_segment(start, &bytes, ScanConfig::new(seg1()));
        prop_assert!(s.end_lsn.0 <= start.0 + (1 << 20));
        if let Some(v) = WalView::new(start, &bytes) {
            let mut sc = Scanner::at_record(v, ScanConfig::new(seg1()), Lsn(start.0 + 40), None);
            for _ in 0..100 { if sc.next_record().is_err() { break } }
        }
    }

    #[test]
    fn mutated_real_segments_never_panic(which in 0usize..16, flips in proptest::collection::vec((any::<u32>(), any::<u8>()), 1..20),
                                          cut in any::<u32>()) {
        let fx = fixture_bytes();
        let (start, orig) = &fx[which % fx.len()];
        let mut b = orig.clone();
        for (at, x) in flips {
            let i = at as usize % b.len();
            b[i] ^= x;
        }
        let cut = cut as usize % (b.len() + 1);
        let s = scan_segment(*start, &b[..cut], ScanConfig::new(seg1()));
        // Never claims WAL past the bytes it was given.
        prop_assert!(s.end_lsn.0 <= start.0 + cut as u64 || s.end.kind == waltail::wal::EndKind::Switch);
        prop_assert!(s.last_record.is_none_or(|l| l < s.end_lsn));
    }

    #[test]
    fn names_never_panic(s in "\\PC{0,64}") {
        for size in [1u64 << 20, 16 << 20, 1 << 30] {
            let _ = WalFileName::parse(&s, SegmentSize::new(size).unwrap());
        }
    }

    #[test]
    fn lsn_parse_never_panics(s in "\\PC{0,24}") {
        let _ = s.parse::<Lsn>();
    }
}

/// The case the fuzz test found: bytes that end exactly where a record ends,
/// short of its alignment padding. The scan keeps the record and claims no
/// byte past those given.
#[test]
fn bytes_ending_at_a_records_unaligned_end_claim_nothing_past_them() {
    let fx = fixture_bytes();
    let (start, b) = fx
        .iter()
        .find(|(s, _)| *s == Lsn(0x600000))
        .expect("the switch fixture, segment 000000010000000000000006");
    let cut = 0x680c6; // the end of the record at 0/668058, 2 bytes short of 0/6680C8
    let s = scan_segment(*start, &b[..cut], ScanConfig::new(seg1()));
    assert_eq!(s.last_record, Some(Lsn(0x668058)));
    assert_eq!(s.end_lsn, Lsn(start.0 + cut as u64), "{:?}", s.end);
    assert_eq!(s.end.kind, waltail::wal::EndKind::Truncated);
}
