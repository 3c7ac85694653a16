//! Segments, timelines and WAL file names (PostgreSQL's `XLogFileName` family).
//!
//! A WAL file name is `TTTTTTTTXXXXXXXXYYYYYYYY`: timeline, then the segment
//! number split into "log" (`segno / segments_per_xlogid`) and "seg"
//! (`segno % segments_per_xlogid`), each as exactly 8 uppercase hex digits.
//! Besides plain segments the parser recognises `<segment>.partial`,
//! `TTTTTTTT.history` and `<segment>.OOOOOOOO.backup`. Anything else is an
//! error; no input panics, whatever its length or bytes.

use std::fmt;

use super::lsn::Lsn;

/// A validated `wal_segment_size`: a power of two from 1 MB to 1 GB.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SegmentSize(u32);

impl SegmentSize {
    pub const MIN: u32 = 1 << 20;
    pub const MAX: u32 = 1 << 30;
    pub const DEFAULT: SegmentSize = SegmentSize(16 << 20);

    /// `IsValidWalSegSize`.
    pub fn new(bytes: u64) -> Option<SegmentSize> {
        let b = u32::try_from(bytes).ok()?;
        (b.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&b)).then_some(SegmentSize(b))
    }

    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// `XLogSegmentsPerXLogId`.
    pub fn segments_per_xlogid(self) -> u64 {
        0x1_0000_0000 / self.bytes()
    }
}

impl fmt::Display for SegmentSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}MB", self.0 >> 20)
    }
}

/// A WAL segment number (`XLogSegNo`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct SegmentNo(pub u64);

impl SegmentNo {
    /// `XLogSegNoOffsetToRecPtr(segno, 0)`.
    pub fn start_lsn(self, seg_size: SegmentSize) -> Lsn {
        Lsn(self.0.saturating_mul(seg_size.bytes()))
    }

    pub fn next(self) -> SegmentNo {
        SegmentNo(self.0.saturating_add(1))
    }
}

/// A timeline ID (`TimeLineID`).
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One segment of one timeline: what a segment file name denotes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SegmentName {
    pub tli: TimelineId,
    pub segno: SegmentNo,
}

impl SegmentName {
    pub fn new(tli: TimelineId, segno: SegmentNo) -> Self {
        SegmentName { tli, segno }
    }

    /// The segment holding `lsn` on timeline `tli`.
    pub fn of_lsn(tli: TimelineId, lsn: Lsn, seg_size: SegmentSize) -> Self {
        SegmentName::new(tli, lsn.segment_number(seg_size))
    }

    /// `XLogFileName`.
    pub fn file_name(&self, seg_size: SegmentSize) -> String {
        let per = seg_size.segments_per_xlogid();
        format!(
            "{:08X}{:08X}{:08X}",
            self.tli.0,
            self.segno.0 / per,
            self.segno.0 % per
        )
    }

    pub fn start_lsn(&self, seg_size: SegmentSize) -> Lsn {
        self.segno.start_lsn(seg_size)
    }

    pub fn end_lsn(&self, seg_size: SegmentSize) -> Lsn {
        self.segno.next().start_lsn(seg_size)
    }
}

/// A name PostgreSQL uses for a file in pg_wal or in a WAL archive.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WalFileName {
    /// `000000010000000000000003`
    Segment(SegmentName),
    /// `000000010000000000000003.partial`
    Partial(SegmentName),
    /// `00000002.history`
    History(TimelineId),
    /// `000000010000000000000003.00000028.backup`
    Backup { segment: SegmentName, offset: u32 },
}

/// Why a string is not a WAL file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{0:?} is not a WAL file name (expected 24 uppercase hex digits, optionally followed by .partial, or TTTTTTTT.history, or <segment>.XXXXXXXX.backup)")]
    Malformed(String),
    #[error("{name:?}: segment part {seg:#X} is out of range for {size} segments")]
    OutOfRange {
        name: String,
        seg: u32,
        size: SegmentSize,
    },
    #[error("{0:?}: timeline 0 does not exist")]
    TimelineZero(String),
}

fn hex8(s: &[u8]) -> Option<u32> {
    if s.len() != 8
        || !s
            .iter()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b))
    {
        return None;
    }
    // The bytes are ASCII hex digits, so this cannot fail; stay total anyway.
    u32::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

impl WalFileName {
    /// `IsXLogFileName`, `IsPartialXLogFileName`, `IsTLHistoryFileName`,
    /// `IsBackupHistoryFileName`, then `XLogFromFileName`.
    pub fn parse(name: &str, seg_size: SegmentSize) -> Result<WalFileName, NameError> {
        let malformed = || NameError::Malformed(name.to_string());
        let b = name.as_bytes();
        if b.len() == 8 + ".history".len() && b.ends_with(b".history") {
            let tli = hex8(&b[..8]).ok_or_else(malformed)?;
            if tli == 0 {
                return Err(NameError::TimelineZero(name.to_string()));
            }
            return Ok(WalFileName::History(TimelineId(tli)));
        }
        if b.len() < 24 {
            return Err(malformed());
        }
        let tli = hex8(&b[0..8]).ok_or_else(malformed)?;
        let log = hex8(&b[8..16]).ok_or_else(malformed)?;
        let seg = hex8(&b[16..24]).ok_or_else(malformed)?;
        if tli == 0 {
            return Err(NameError::TimelineZero(name.to_string()));
        }
        let per = seg_size.segments_per_xlogid();
        if u64::from(seg) >= per {
            return Err(NameError::OutOfRange {
                name: name.to_string(),
                seg,
                size: seg_size,
            });
        }
        let segment = SegmentName::new(
            TimelineId(tli),
            SegmentNo(u64::from(log) * per + u64::from(seg)),
        );
        match &b[24..] {
            b"" => Ok(WalFileName::Segment(segment)),
            b".partial" => Ok(WalFileName::Partial(segment)),
            rest if rest.len() == 1 + 8 + ".backup".len()
                && rest[0] == b'.'
                && rest.ends_with(b".backup") =>
            {
                let offset = hex8(&rest[1..9]).ok_or_else(malformed)?;
                Ok(WalFileName::Backup { segment, offset })
            }
            _ => Err(malformed()),
        }
    }

    /// The timeline the file belongs to.
    pub fn timeline(&self) -> TimelineId {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) => s.tli,
            WalFileName::Backup { segment, .. } => segment.tli,
            WalFileName::History(t) => *t,
        }
    }

    pub fn to_file_name(&self, seg_size: SegmentSize) -> String {
        match self {
            WalFileName::Segment(s) => s.file_name(seg_size),
            WalFileName::Partial(s) => format!("{}.partial", s.file_name(seg_size)),
            WalFileName::History(t) => history_file_name(*t),
            WalFileName::Backup { segment, offset } => {
                format!("{}.{:08X}.backup", segment.file_name(seg_size), offset)
            }
        }
    }
}

/// `TLHistoryFileName`.
pub fn history_file_name(tli: TimelineId) -> String {
    format!("{:08X}.history", tli.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_sizes() -> impl Iterator<Item = SegmentSize> {
        (20..=30).map(|s| SegmentSize::new(1 << s).unwrap())
    }

    #[test]
    fn segment_sizes() {
        assert!(SegmentSize::new(1 << 20).is_some());
        assert!(SegmentSize::new(1 << 30).is_some());
        assert!(SegmentSize::new(1 << 19).is_none());
        assert!(SegmentSize::new(1 << 31).is_none());
        assert!(SegmentSize::new(3 << 20).is_none());
        assert!(SegmentSize::new(u64::MAX).is_none());
        assert_eq!(SegmentSize::DEFAULT.segments_per_xlogid(), 256);
    }

    #[test]
    fn file_names_match_postgresql() {
        let s16 = SegmentSize::DEFAULT;
        let n = SegmentName::new(TimelineId(1), SegmentNo(1));
        assert_eq!(n.file_name(s16), "000000010000000000000001");
        let n = SegmentName::new(TimelineId(2), SegmentNo(0x1FF));
        assert_eq!(n.file_name(s16), "0000000200000001000000FF");
        let s1 = SegmentSize::new(1 << 20).unwrap();
        assert_eq!(n.file_name(s1), "0000000200000000000001FF");
        let s1g = SegmentSize::new(1 << 30).unwrap();
        let n = SegmentName::new(TimelineId(1), SegmentNo(5));
        assert_eq!(n.file_name(s1g), "000000010000000100000001");
    }

    #[test]
    fn names_round_trip_for_every_segment_size() {
        for size in all_sizes() {
            for segno in [0u64, 1, 255, 256, 4095, 4096, 1 << 20, (1 << 32) + 7] {
                for tli in [1u32, 2, 0xFFFF_FFFF] {
                    let seg = SegmentName::new(TimelineId(tli), SegmentNo(segno));
                    for w in [
                        WalFileName::Segment(seg),
                        WalFileName::Partial(seg),
                        WalFileName::Backup {
                            segment: seg,
                            offset: 0x28,
                        },
                        WalFileName::History(TimelineId(tli)),
                    ] {
                        let s = w.to_file_name(size);
                        assert_eq!(WalFileName::parse(&s, size), Ok(w), "{s} at {size}");
                    }
                }
            }
        }
    }

    #[test]
    fn segment_start_lsn() {
        let s16 = SegmentSize::DEFAULT;
        let n = SegmentName::new(TimelineId(1), SegmentNo(0x301));
        assert_eq!(n.start_lsn(s16), "3/1000000".parse().unwrap());
        assert_eq!(n.end_lsn(s16), "3/2000000".parse().unwrap());
        assert_eq!(
            SegmentName::of_lsn(TimelineId(1), "3/1FFFFFF".parse().unwrap(), s16),
            n
        );
    }

    #[test]
    fn rejects_everything_else() {
        let s16 = SegmentSize::DEFAULT;
        for bad in [
            "",
            "00000001000000000000000",
            "0000000100000000000000011",
            "00000001000000000000000a",
            "00000001000000000000000G",
            "000000010000000000000001.partia",
            "000000010000000000000001.partial.partial",
            "000000010000000000000001.backup",
            "000000010000000000000001.0000002.backup",
            "000000010000000000000001.0000002g.backup",
            "0000000a.history",
            "00000001.History",
            "1.history",
            "../../etc/passwd",
            "/000000010000000000000001",
            "000000010000000000000001/",
            "00000001000000000000\u{e9}001",
            "000000010000000000000100", // seg part 0x100 >= 256 segments per xlogid
            "000000000000000000000001",
            "00000000.history",
            "00000001000000000000000\0",
        ] {
            assert!(WalFileName::parse(bad, s16).is_err(), "{bad:?} parsed");
        }
    }
}
