//! WAL page headers (`XLogPageHeaderData`, `XLogLongPageHeaderData`).
//!
//! Layout (little-endian, as written by x86-64 and aarch64 servers):
//!
//! ```text
//! short header, 24 bytes (SizeOfXLogShortPHD):
//!   0  u16 xlp_magic      WAL format version, one per major release
//!   2  u16 xlp_info       XLP_* flags
//!   4  u32 xlp_tli        timeline of the first record on the page
//!   8  u64 xlp_pageaddr   LSN of this page
//!  16  u32 xlp_rem_len    bytes of a continued record on this page
//!  20  pad to MAXALIGN
//! long header, 40 bytes (SizeOfXLogLongPHD), first page of every segment:
//!  24  u64 xlp_sysid        system identifier of the cluster
//!  32  u32 xlp_seg_size     wal_segment_size
//!  36  u32 xlp_xlog_blcksz  XLOG_BLCKSZ
//! ```
//!
//! Parsing checks only that the bytes are there; what a header must say at a
//! given position (address, timeline, flags) is checked by [`PageHeader::validate`],
//! which follows `XLogReaderValidatePageHeader`.

use super::lsn::{Lsn, XLOG_BLCKSZ};
use super::segment::{SegmentSize, TimelineId};

pub const SIZE_OF_SHORT_PHD: usize = 24;
pub const SIZE_OF_LONG_PHD: usize = 40;

pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
pub const XLP_LONG_HEADER: u16 = 0x0002;
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
pub const XLP_ALL_FLAGS: u16 = 0x000F;

/// `XLOG_PAGE_MAGIC` of each supported major version.
pub const MAGICS: [(u16, u32); 6] = [
    (0xD106, 13),
    (0xD10D, 14),
    (0xD110, 15),
    (0xD113, 16),
    (0xD116, 17),
    (0xD118, 18),
];

/// The PostgreSQL major version whose WAL carries this page magic.
pub fn major_version_of_magic(magic: u16) -> Option<u32> {
    MAGICS.iter().find(|(m, _)| *m == magic).map(|(_, v)| *v)
}

/// The page magic of a PostgreSQL major version.
pub fn magic_of_major_version(major: u32) -> Option<u16> {
    MAGICS.iter().find(|(_, v)| *v == major).map(|(m, _)| *m)
}

/// Fields only present in a long page header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongHeader {
    pub sysid: u64,
    pub seg_size: u32,
    pub xlog_blcksz: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHeader {
    pub magic: u16,
    pub info: u16,
    pub tli: TimelineId,
    pub pageaddr: Lsn,
    pub rem_len: u32,
    pub long: Option<LongHeader>,
}

/// What is wrong with a page header at a given position.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("page header at {at} is cut short")]
    Short { at: Lsn },
    #[error("page at {at} is zeroed")]
    Zeroed { at: Lsn },
    #[error("unsupported WAL version 0x{magic:04X} in page header at {at}")]
    UnsupportedMagic { at: Lsn, magic: u16 },
    #[error(
        "WAL version 0x{found:04X} at {at} differs from 0x{expected:04X} earlier in the stream"
    )]
    MagicChanged { at: Lsn, expected: u16, found: u16 },
    #[error("invalid info bits {info:04X} in page header at {at}")]
    InfoBits { at: Lsn, info: u16 },
    #[error(
        "stale page at {at}: its header says {found} (left over from a recycled segment file)"
    )]
    Stale { at: Lsn, found: Lsn },
    #[error("out-of-sequence timeline {found} (after {previous}) in page at {at}")]
    TimelineBackwards {
        at: Lsn,
        found: TimelineId,
        previous: TimelineId,
    },
    #[error("page at {at} is on timeline {found}, newer than the expected timeline {max}")]
    TimelineTooNew {
        at: Lsn,
        found: TimelineId,
        max: TimelineId,
    },
    #[error("segment header at {at}: {what}")]
    LongHeader { at: Lsn, what: String },
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl PageHeader {
    /// Parses the header at the start of `page`. `at` is only used in errors.
    /// Returns `Short` if fewer bytes than the header needs are given.
    pub fn parse(page: &[u8], at: Lsn) -> Result<PageHeader, PageError> {
        if page.len() < SIZE_OF_SHORT_PHD {
            return Err(PageError::Short { at });
        }
        let info = u16_at(page, 2);
        let long = if info & XLP_LONG_HEADER != 0 {
            if page.len() < SIZE_OF_LONG_PHD {
                return Err(PageError::Short { at });
            }
            Some(LongHeader {
                sysid: u64_at(page, 24),
                seg_size: u32_at(page, 32),
                xlog_blcksz: u32_at(page, 36),
            })
        } else {
            None
        };
        Ok(PageHeader {
            magic: u16_at(page, 0),
            info,
            tli: TimelineId(u32_at(page, 4)),
            pageaddr: Lsn(u64_at(page, 8)),
            rem_len: u32_at(page, 16),
            long,
        })
    }

    /// `XLogPageHeaderSize`: 40 with the long-header flag, else 24.
    pub fn size(&self) -> usize {
        if self.info & XLP_LONG_HEADER != 0 {
            SIZE_OF_LONG_PHD
        } else {
            SIZE_OF_SHORT_PHD
        }
    }

    pub fn is_contrecord(&self) -> bool {
        self.info & XLP_FIRST_IS_CONTRECORD != 0
    }

    pub fn major_version(&self) -> Option<u32> {
        major_version_of_magic(self.magic)
    }

    /// Encodes the header (used to build test pages and fixtures).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size()];
        v[0..2].copy_from_slice(&self.magic.to_le_bytes());
        v[2..4].copy_from_slice(&self.info.to_le_bytes());
        v[4..8].copy_from_slice(&self.tli.0.to_le_bytes());
        v[8..16].copy_from_slice(&self.pageaddr.0.to_le_bytes());
        v[16..20].copy_from_slice(&self.rem_len.to_le_bytes());
        if let Some(l) = self.long {
            v[24..32].copy_from_slice(&l.sysid.to_le_bytes());
            v[32..36].copy_from_slice(&l.seg_size.to_le_bytes());
            v[36..40].copy_from_slice(&l.xlog_blcksz.to_le_bytes());
        }
        v
    }
}

/// What a reader expects of the pages it reads, and what it has seen so far.
/// Follows `XLogReaderValidatePageHeader`, plus two checks PostgreSQL's
/// reader leaves to its callers: a maximum timeline and a system identifier.
#[derive(Clone, Debug)]
pub struct PageChecker {
    pub seg_size: SegmentSize,
    /// Set from the first valid page when not given.
    pub magic: Option<u16>,
    pub sysid: Option<u64>,
    pub max_tli: Option<TimelineId>,
    latest_page: Lsn,
    latest_tli: TimelineId,
}

impl PageChecker {
    pub fn new(seg_size: SegmentSize) -> Self {
        PageChecker {
            seg_size,
            magic: None,
            sysid: None,
            max_tli: None,
            latest_page: Lsn::INVALID,
            latest_tli: TimelineId(0),
        }
    }

    /// Parses and validates the page header found at `at` (a page boundary).
    pub fn check(&mut self, page: &[u8], at: Lsn) -> Result<PageHeader, PageError> {
        let hdr = PageHeader::parse(page, at)?;
        if hdr.magic == 0 && hdr.info == 0 && hdr.pageaddr == Lsn(0) {
            return Err(PageError::Zeroed { at });
        }
        match self.magic {
            Some(m) if m != hdr.magic => {
                return Err(if major_version_of_magic(hdr.magic).is_some() {
                    PageError::MagicChanged {
                        at,
                        expected: m,
                        found: hdr.magic,
                    }
                } else {
                    PageError::UnsupportedMagic {
                        at,
                        magic: hdr.magic,
                    }
                })
            }
            Some(_) => {}
            None => {
                if major_version_of_magic(hdr.magic).is_none() {
                    return Err(PageError::UnsupportedMagic {
                        at,
                        magic: hdr.magic,
                    });
                }
            }
        }
        if hdr.info & !XLP_ALL_FLAGS != 0 {
            return Err(PageError::InfoBits { at, info: hdr.info });
        }
        if hdr.long.is_none() && at.segment_offset(self.seg_size) == 0 {
            return Err(PageError::InfoBits { at, info: hdr.info });
        }
        if let Some(long) = hdr.long {
            if let Some(sysid) = self.sysid {
                if long.sysid != sysid {
                    return Err(PageError::LongHeader {
                        at,
                        what: format!(
                            "WAL file is from a different database system: system identifier {} in the file, {} expected",
                            long.sysid, sysid
                        ),
                    });
                }
            }
            if u64::from(long.seg_size) != self.seg_size.bytes() {
                return Err(PageError::LongHeader {
                    at,
                    what: format!(
                        "segment size {} in the header, {} expected",
                        long.seg_size,
                        self.seg_size.bytes()
                    ),
                });
            }
            if u64::from(long.xlog_blcksz) != XLOG_BLCKSZ {
                return Err(PageError::LongHeader {
                    at,
                    what: format!(
                        "block size {} in the header, {XLOG_BLCKSZ} expected",
                        long.xlog_blcksz
                    ),
                });
            }
        }
        if hdr.pageaddr != at {
            return Err(PageError::Stale {
                at,
                found: hdr.pageaddr,
            });
        }
        if at > self.latest_page && hdr.tli < self.latest_tli {
            return Err(PageError::TimelineBackwards {
                at,
                found: hdr.tli,
                previous: self.latest_tli,
            });
        }
        if let Some(max) = self.max_tli {
            if hdr.tli > max {
                return Err(PageError::TimelineTooNew {
                    at,
                    found: hdr.tli,
                    max,
                });
            }
        }
        self.magic = Some(hdr.magic);
        self.latest_page = at;
        self.latest_tli = hdr.tli;
        Ok(hdr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long_page(at: Lsn, tli: u32) -> Vec<u8> {
        let mut p = PageHeader {
            magic: 0xD110,
            info: XLP_LONG_HEADER,
            tli: TimelineId(tli),
            pageaddr: at,
            rem_len: 0,
            long: Some(LongHeader {
                sysid: 42,
                seg_size: 16 << 20,
                xlog_blcksz: 8192,
            }),
        }
        .encode();
        p.resize(8192, 0);
        p
    }

    #[test]
    fn magic_table() {
        assert_eq!(major_version_of_magic(0xD110), Some(15));
        assert_eq!(major_version_of_magic(0xD118), Some(18));
        assert_eq!(major_version_of_magic(0xD101), None);
        assert_eq!(magic_of_major_version(13), Some(0xD106));
    }

    #[test]
    fn long_header_round_trip_and_checks() {
        let at = Lsn(0x100_0000);
        let page = long_page(at, 1);
        let mut c = PageChecker::new(SegmentSize::DEFAULT);
        let h = c.check(&page, at).unwrap();
        assert_eq!(h.size(), SIZE_OF_LONG_PHD);
        assert_eq!(h.long.unwrap().sysid, 42);
        assert_eq!(c.magic, Some(0xD110));

        let mut c = PageChecker::new(SegmentSize::DEFAULT);
        assert!(matches!(
            c.check(&page, Lsn(0x200_0000)),
            Err(PageError::Stale { .. })
        ));
        let mut c = PageChecker::new(SegmentSize::DEFAULT);
        c.sysid = Some(7);
        assert!(matches!(
            c.check(&page, at),
            Err(PageError::LongHeader { .. })
        ));
        let mut c = PageChecker::new(SegmentSize::new(1 << 20).unwrap());
        assert!(matches!(
            c.check(&page, at),
            Err(PageError::LongHeader { .. })
        ));
        let mut bad = page.clone();
        bad[0] = 0x01;
        let mut c = PageChecker::new(SegmentSize::DEFAULT);
        let e = c.check(&bad, at).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported WAL version 0xD101 in page header at 0/1000000"
        );
        let mut c = PageChecker::new(SegmentSize::DEFAULT);
        assert!(matches!(
            c.check(&[0u8; 8192], at),
            Err(PageError::Zeroed { .. })
        ));
        assert!(matches!(
            c.check(&page[..30], at),
            Err(PageError::Short { .. })
        ));
    }

    #[test]
    fn timeline_never_goes_backwards() {
        let mut c = PageChecker::new(SegmentSize::DEFAULT);
        c.check(&long_page(Lsn(0x100_0000), 2), Lsn(0x100_0000))
            .unwrap();
        let short = PageHeader {
            magic: 0xD110,
            info: 0,
            tli: TimelineId(1),
            pageaddr: Lsn(0x100_2000),
            rem_len: 0,
            long: None,
        }
        .encode();
        assert!(matches!(
            c.check(&short, Lsn(0x100_2000)),
            Err(PageError::TimelineBackwards { .. })
        ));
        c.max_tli = Some(TimelineId(1));
        assert!(matches!(
            c.check(&long_page(Lsn(0x100_0000), 2), Lsn(0x100_0000)),
            Err(PageError::TimelineTooNew { .. })
        ));
    }
}
