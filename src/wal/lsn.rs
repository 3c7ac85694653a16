//! Log sequence numbers.
//!
//! `Lsn` is the one type for a byte position in the WAL stream. It prints the
//! way PostgreSQL prints an LSN (`X/X`, high and low 32 bits in uppercase hex),
//! parses that form (and the zero-padded `X/XXXXXXXX` of PostgreSQL 18 and
//! pg_waldump), serialises to JSON as that string, and only offers checked
//! arithmetic: an LSN that would overflow is an error, never a wrap.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::segment::{SegmentNo, SegmentSize};

/// Size of a WAL page (`XLOG_BLCKSZ`). Every supported PostgreSQL build uses 8 kB;
/// a long page header announcing anything else is rejected.
pub const XLOG_BLCKSZ: u64 = 8192;

/// PostgreSQL's `MAXIMUM_ALIGNOF` on every 64-bit platform it supports.
pub const MAXALIGN: u64 = 8;

/// `MAXALIGN` of a length.
pub const fn maxalign(len: u64) -> u64 {
    len.div_ceil(MAXALIGN) * MAXALIGN
}

/// A position in the WAL stream (`XLogRecPtr`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

/// Why a string is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hex numbers separated by '/', like 0/16B3748")]
pub struct LsnParseError(pub String);

impl Lsn {
    /// `InvalidXLogRecPtr`.
    pub const INVALID: Lsn = Lsn(0);

    pub fn is_valid(self) -> bool {
        self.0 != 0
    }

    pub fn checked_add(self, n: u64) -> Option<Lsn> {
        self.0.checked_add(n).map(Lsn)
    }

    pub fn checked_sub(self, n: u64) -> Option<Lsn> {
        self.0.checked_sub(n).map(Lsn)
    }

    /// Bytes from `earlier` to `self`, or `None` if `earlier` is later.
    pub fn bytes_since(self, earlier: Lsn) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }

    /// `XLByteToSeg`: the segment holding this byte.
    pub fn segment_number(self, seg_size: SegmentSize) -> SegmentNo {
        SegmentNo(self.0 / seg_size.bytes())
    }

    /// `XLByteToPrevSeg`: the segment holding the byte just before this one,
    /// which is how PostgreSQL 13-16 name the segment of an LSN that sits
    /// exactly on a segment boundary.
    pub fn prev_segment_number(self, seg_size: SegmentSize) -> SegmentNo {
        SegmentNo(self.0.saturating_sub(1) / seg_size.bytes())
    }

    /// `XLogSegmentOffset`.
    pub fn segment_offset(self, seg_size: SegmentSize) -> u64 {
        self.0 % seg_size.bytes()
    }

    /// Offset within the WAL page.
    pub fn page_offset(self) -> u64 {
        self.0 % XLOG_BLCKSZ
    }

    /// Start of the page holding this byte.
    pub fn page_lsn(self) -> Lsn {
        Lsn(self.0 - self.page_offset())
    }

    /// Start of the segment holding this byte.
    pub fn segment_lsn(self, seg_size: SegmentSize) -> Lsn {
        Lsn(self.0 - self.segment_offset(seg_size))
    }

    /// `MAXALIGN`: rounded up to the next multiple of 8.
    pub fn maxalign(self) -> Option<Lsn> {
        self.0
            .checked_add(MAXALIGN - 1)
            .map(|v| Lsn(v & !(MAXALIGN - 1)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(p, 16).map_err(|_| err())
        };
        Ok(Lsn((u64::from(part(hi)?) << 32) | u64::from(part(lo)?)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for (v, s) in [
            (0u64, "0/0"),
            (0x16B3748, "0/16B3748"),
            (0x1_0000_0028, "1/28"),
            (u64::MAX, "FFFFFFFF/FFFFFFFF"),
        ] {
            assert_eq!(Lsn(v).to_string(), s);
            assert_eq!(s.parse::<Lsn>().unwrap(), Lsn(v));
        }
        assert_eq!("0/01000028".parse::<Lsn>().unwrap(), Lsn(0x0100_0028));
        assert_eq!("a/b".parse::<Lsn>().unwrap(), Lsn(0xa_0000_000b));
    }

    #[test]
    fn parse_rejects_garbage() {
        for s in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "0/1/2",
            "g/0",
            "0/123456789",
            " 0/1",
            "0/-1",
            "+0/1",
        ] {
            assert!(s.parse::<Lsn>().is_err(), "{s:?} parsed");
        }
    }

    #[test]
    fn arithmetic_is_checked() {
        assert_eq!(Lsn(u64::MAX).checked_add(1), None);
        assert_eq!(Lsn(0).checked_sub(1), None);
        assert_eq!(Lsn(u64::MAX - 3).maxalign(), None);
        assert_eq!(Lsn(9).maxalign(), Some(Lsn(16)));
        assert_eq!(Lsn(16).maxalign(), Some(Lsn(16)));
        assert_eq!(Lsn(5).bytes_since(Lsn(7)), None);
    }

    #[test]
    fn segment_math() {
        let s16 = SegmentSize::new(16 << 20).unwrap();
        let lsn = Lsn(0x3_0100_2028);
        assert_eq!(lsn.segment_number(s16), SegmentNo(0x301));
        assert_eq!(lsn.segment_offset(s16), 0x2028);
        assert_eq!(lsn.page_lsn(), Lsn(0x3_0100_2000));
        assert_eq!(Lsn(0x200_0000).prev_segment_number(s16), SegmentNo(1));
        assert_eq!(Lsn(0x200_0000).segment_number(s16), SegmentNo(2));
    }

    #[test]
    fn json_is_a_string() {
        assert_eq!(
            serde_json::to_string(&Lsn(0x1_0000_0028)).unwrap(),
            "\"1/28\""
        );
        let l: Lsn = serde_json::from_str("\"0/16B3748\"").unwrap();
        assert_eq!(l, Lsn(0x16B3748));
    }
}
