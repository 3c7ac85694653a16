//! WAL record headers (`XLogRecord`) and their CRC-32C.
//!
//! ```text
//! XLogRecord, 24 bytes (SizeOfXLogRecord):
//!   0  u32 xl_tot_len  length of the whole record, header included
//!   4  u32 xl_xid      transaction id
//!   8  u64 xl_prev     start LSN of the previous record
//!  16  u8  xl_info     flag bits; the high nibble is the rmgr's record type
//!  17  u8  xl_rmid     resource manager
//!  18  2 bytes padding
//!  20  u32 xl_crc      CRC-32C of the record data, then of bytes 0..20 of this header
//! ```
//!
//! Records start MAXALIGNed and may span pages and segments; the continuation
//! pieces are announced by `XLP_FIRST_IS_CONTRECORD` and `xlp_rem_len`.
//! [`RecordCrc`] computes the checksum the way `ValidXLogRecord` does, piece by
//! piece, so a record spread over pages is never copied to be checked.

use super::lsn::Lsn;

pub const SIZE_OF_XLOG_RECORD: usize = 24;
/// Offset of `xl_crc` in the header: the CRC covers the header up to here.
pub const XL_CRC_OFFSET: usize = 20;
pub const RM_XLOG_ID: u8 = 0;
pub const XLOG_SWITCH: u8 = 0x40;
/// The checkpoint a clean shutdown writes last.
pub const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
/// Written by crash recovery where a record was abandoned mid-way.
pub const XLOG_OVERWRITE_CONTRECORD: u8 = 0xD0;
pub const XLR_INFO_MASK: u8 = 0x0F;
/// Last built-in resource manager (`RM_LOGICALMSG_ID`) in PostgreSQL 13-18.
pub const RM_MAX_BUILTIN_ID: u8 = 21;
/// First custom resource manager id (PostgreSQL 15+).
pub const RM_MIN_CUSTOM_ID: u8 = 128;
/// Upper bound on `xl_tot_len`: `XLogRecordMaxSize` (1020 MB). Anything
/// larger is garbage, not a record.
pub const MAX_RECORD_LEN: u32 = 1020 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub tot_len: u32,
    pub xid: u32,
    pub prev: Lsn,
    pub info: u8,
    pub rmid: u8,
    pub crc: u32,
}

impl RecordHeader {
    pub fn parse(b: &[u8; SIZE_OF_XLOG_RECORD]) -> RecordHeader {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut prev = [0u8; 8];
        prev.copy_from_slice(&b[8..16]);
        RecordHeader {
            tot_len: u32_at(0),
            xid: u32_at(4),
            prev: Lsn(u64::from_le_bytes(prev)),
            info: b[16],
            rmid: b[17],
            crc: u32_at(20),
        }
    }

    pub fn encode(&self) -> [u8; SIZE_OF_XLOG_RECORD] {
        let mut b = [0u8; SIZE_OF_XLOG_RECORD];
        b[0..4].copy_from_slice(&self.tot_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.xid.to_le_bytes());
        b[8..16].copy_from_slice(&self.prev.0.to_le_bytes());
        b[16] = self.info;
        b[17] = self.rmid;
        b[20..24].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// An `XLOG_SWITCH` record: WAL after it is padding to the segment's end.
    pub fn is_switch(&self) -> bool {
        self.rmid == RM_XLOG_ID && (self.info & !XLR_INFO_MASK) == XLOG_SWITCH
    }

    /// The checkpoint record a clean shutdown writes as the last of its WAL.
    pub fn is_shutdown_checkpoint(&self) -> bool {
        self.rmid == RM_XLOG_ID && (self.info & !XLR_INFO_MASK) == XLOG_CHECKPOINT_SHUTDOWN
    }

    /// `RmgrIdIsValid` of the given major version: built-in ids, plus the
    /// custom range from PostgreSQL 15 on.
    pub fn rmid_is_valid(&self, major: u32) -> bool {
        self.rmid <= RM_MAX_BUILTIN_ID || (major >= 15 && self.rmid >= RM_MIN_CUSTOM_ID)
    }
}

/// CRC-32C of a record fed in pieces, as `ValidXLogRecord` computes it:
/// first everything after the header, then the header up to `xl_crc`.
#[derive(Default)]
pub struct RecordCrc {
    header: [u8; SIZE_OF_XLOG_RECORD],
    fed: usize,
    data_crc: u32,
}

impl RecordCrc {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next piece of the record, in order.
    pub fn feed(&mut self, mut piece: &[u8]) {
        if self.fed < SIZE_OF_XLOG_RECORD {
            let n = piece.len().min(SIZE_OF_XLOG_RECORD - self.fed);
            self.header[self.fed..self.fed + n].copy_from_slice(&piece[..n]);
            self.fed += n;
            piece = &piece[n..];
        }
        if !piece.is_empty() {
            self.data_crc = crc32c::crc32c_append(self.data_crc, piece);
            self.fed += piece.len();
        }
    }

    /// The header, once at least `SIZE_OF_XLOG_RECORD` bytes were fed.
    pub fn header(&self) -> Option<RecordHeader> {
        (self.fed >= SIZE_OF_XLOG_RECORD).then(|| RecordHeader::parse(&self.header))
    }

    /// The CRC PostgreSQL would compute for what was fed.
    pub fn finish(&self) -> u32 {
        crc32c::crc32c_append(self.data_crc, &self.header[..XL_CRC_OFFSET])
    }
}

/// CRC of a whole record held in one slice.
pub fn record_crc(record: &[u8]) -> u32 {
    let mut c = RecordCrc::new();
    c.feed(record);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &[u8]) -> Vec<u8> {
        let mut h = RecordHeader {
            tot_len: (SIZE_OF_XLOG_RECORD + payload.len()) as u32,
            xid: 7,
            prev: Lsn(0x100_0028),
            info: 0,
            rmid: 21,
            crc: 0,
        };
        let mut v = h.encode().to_vec();
        v.extend_from_slice(payload);
        h.crc = record_crc(&v);
        v[..24].copy_from_slice(&h.encode());
        v
    }

    #[test]
    fn crc_is_data_then_header() {
        let r = record(b"hello world");
        let mut expect = crc32c::crc32c(b"hello world");
        expect = crc32c::crc32c_append(expect, &r[..20]);
        assert_eq!(RecordHeader::parse(r[..24].try_into().unwrap()).crc, expect);
    }

    #[test]
    fn crc_of_pieces_equals_crc_of_whole() {
        let r = record(&(0..5000u32).map(|i| i as u8).collect::<Vec<_>>());
        for cut in [1usize, 7, 20, 23, 24, 25, 100, 4000] {
            let mut c = RecordCrc::new();
            c.feed(&r[..cut]);
            c.feed(&r[cut..]);
            assert_eq!(c.finish(), record_crc(&r));
            assert_eq!(c.header().unwrap().crc, c.finish());
        }
    }

    #[test]
    fn switch_and_rmids() {
        let mut h = RecordHeader::parse(&[0u8; 24]);
        h.info = XLOG_SWITCH;
        assert!(h.is_switch());
        h.info = XLOG_SWITCH | 0x01;
        assert!(h.is_switch());
        h.rmid = 1;
        assert!(!h.is_switch());
        h.rmid = 22;
        assert!(!h.rmid_is_valid(15));
        h.rmid = 130;
        assert!(h.rmid_is_valid(15));
        assert!(!h.rmid_is_valid(14));
    }
}
