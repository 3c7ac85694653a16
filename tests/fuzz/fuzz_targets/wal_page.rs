//! WAL page header parsing and validation on arbitrary pages.
//!
//! Input: `cfg[4] | pages`: `cfg` picks the segment size, the page number the
//! first page claims to be at, and whether a system identifier and maximum
//! timeline are required; `pages` are 8 kB pages (the last may be short).
//!
//! Properties: no panic; `PageHeader::parse` fails exactly when the bytes
//! are shorter than the header they announce, and re-encodes the fields it
//! read; `PageChecker::check` only accepts a header at its own address with
//! a known magic and the segment's size, never a timeline going backwards;
//! `check_page_headers` over the whole run agrees with checking page by page.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waltail::wal::page::{
    major_version_of_magic, SIZE_OF_LONG_PHD, SIZE_OF_SHORT_PHD, XLP_LONG_HEADER,
};
use waltail::wal::scan::check_page_headers;
use waltail::wal::{Lsn, PageChecker, PageHeader, SegmentSize, TimelineId, XLOG_BLCKSZ};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (cfg, bytes) = data.split_at(4);
    let seg_size = SegmentSize::new(1 << (20 + u32::from(cfg[0] % 11))).unwrap();
    // Pages near the start of a segment, anywhere, or at the top of the LSN space.
    let page_no = u64::from(u16::from_le_bytes([cfg[1], cfg[2]]));
    let start = match cfg[3] >> 6 {
        0 => Lsn(page_no * XLOG_BLCKSZ),
        1 => Lsn(u64::MAX - u64::MAX % XLOG_BLCKSZ - page_no.min(4) * XLOG_BLCKSZ),
        _ => Lsn((page_no << 24) * XLOG_BLCKSZ),
    };

    // Parsing.
    let hdr = PageHeader::parse(bytes, start);
    let announced =
        if bytes.len() >= 4 && u16::from_le_bytes([bytes[2], bytes[3]]) & XLP_LONG_HEADER != 0 {
            SIZE_OF_LONG_PHD
        } else {
            SIZE_OF_SHORT_PHD
        };
    assert_eq!(hdr.is_ok(), bytes.len() >= announced, "{hdr:?}");
    if let Ok(h) = hdr {
        assert_eq!(h.size(), announced);
        let enc = h.encode();
        assert_eq!(enc.len(), announced);
        assert_eq!(enc[..20], bytes[..20]);
        assert_eq!(enc[24..], bytes[24..announced]);
        let _ = h.major_version();
    }

    // Validation, page by page.
    let mut checker = PageChecker::new(seg_size);
    if cfg[3] & 1 != 0 {
        checker.sysid = Some(7_300_000_000_000_000_001);
    }
    if cfg[3] & 2 != 0 {
        checker.max_tli = Some(TimelineId(u32::from(cfg[3] >> 2 & 0xF)));
    }
    let mut seq = checker.clone();
    let mut first_bad = None;
    let mut last_tli = None::<TimelineId>;
    for (i, page) in bytes.chunks(XLOG_BLCKSZ as usize).enumerate() {
        let Some(at) = start.checked_add(i as u64 * XLOG_BLCKSZ) else {
            break;
        };
        match seq.check(page, at) {
            Ok(h) => {
                assert_eq!(h.pageaddr, at);
                assert!(major_version_of_magic(h.magic).is_some());
                assert_eq!(h.long.is_some(), h.size() == SIZE_OF_LONG_PHD);
                if at.segment_offset(seg_size) == 0 {
                    let l = h.long.expect("a segment's first page has a long header");
                    assert_eq!(u64::from(l.seg_size), seg_size.bytes());
                }
                if let Some(max) = seq.max_tli {
                    assert!(h.tli <= max);
                }
                if let Some(t) = last_tli {
                    assert!(h.tli >= t, "timeline went back from {t} to {}", h.tli);
                }
                last_tli = Some(h.tli);
            }
            Err(e) => {
                let _ = e.to_string();
                first_bad = Some(e);
                break;
            }
        }
    }
    let whole = check_page_headers(&mut checker, start, bytes);
    match (whole, first_bad) {
        (Ok(()), None) => {}
        (Err(a), Some(b)) => assert_eq!(a, b),
        (a, b) => panic!("whole run: {a:?}, page by page: {b:?}"),
    }
});
