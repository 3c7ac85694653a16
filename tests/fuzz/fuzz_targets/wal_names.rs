//! WAL file names, history files and LSNs on arbitrary text.
//!
//! Input: `size | text`: `size` picks the segment size (1 MB .. 1 GB).
//!
//! Properties: no panic; a name that parses prints back as itself; an LSN
//! that parses prints as an LSN that parses to the same value; a history
//! that parses has increasing timelines, one entry per line that is neither
//! blank nor a comment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waltail::wal::history::{parse_history, switchpoint_of};
use waltail::wal::{Lsn, SegmentSize, WalFileName};

fuzz_target!(|data: &[u8]| {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let seg_size = SegmentSize::new(1 << (20 + u32::from(size % 11))).unwrap();
    let _ = SegmentSize::new(u64::from_le_bytes({
        let mut a = [0u8; 8];
        let n = rest.len().min(8);
        a[..n].copy_from_slice(&rest[..n]);
        a
    }));
    let text = String::from_utf8_lossy(rest);

    match WalFileName::parse(&text, seg_size) {
        Ok(n) => {
            assert_eq!(n.to_file_name(seg_size), text, "{n:?}");
            let _ = n.to_file_name(SegmentSize::DEFAULT);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    if let Ok(l) = text.parse::<Lsn>() {
        let shown = l.to_string();
        assert_eq!(shown.parse::<Lsn>(), Ok(l), "{text:?} -> {shown}");
    }

    match parse_history(&text) {
        Ok(h) => {
            assert!(h.windows(2).all(|w| w[0].tli < w[1].tli));
            let lines = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .count();
            assert_eq!(h.len(), lines);
            for e in &h {
                assert_eq!(switchpoint_of(&h, e.tli), Some(e.switchpoint));
            }
        }
        Err(e) => assert!(e.starts_with("history line ")),
    }
});
