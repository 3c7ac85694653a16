//! Frames of the waltail wire protocol: layout, encoding and decoding.
//!
//! ```text
//! frame   := length:u32 | body | crc:u32          (little-endian)
//! body    := type:u8 | payload                    (length = bytes of body)
//! crc     := crc32fast (CRC-32/IEEE) of body
//! ```
//!
//! | type | frame | direction | payload |
//! |---|---|---|---|
//! | 1 | ClientHello | ship → receive | version u16, nonce [32] |
//! | 2 | ServerChallenge | receive → ship | version u16, nonce [32], proof [32] |
//! | 3 | ClientProof | ship → receive | proof [32] |
//! | 4 | Hello | ship → receive | sysid u64, tli u32, seg_size u32, pg_version u32, flush u64 |
//! | 5 | Welcome | receive → ship | has_position u8, tli u32, lsn u64 |
//! | 6 | Refuse | either | code u8 ([`RefuseCode`]), reason (UTF-8) |
//! | 7 | Data | ship → receive | tli u32, start u64, bytes |
//! | 8 | Ack | receive → ship | tli u32, durable u64 |
//! | 9 | Heartbeat | ship → receive | flush u64, unix time µs u64 |
//! | 10 | History | ship → receive | tli u32, file content |
//!
//! Decoding is `check`-then-`parse` in one step: an incomplete frame is
//! `Ok(None)` (read more), a frame longer than the maximum, a checksum
//! mismatch, an unknown type or a payload of the wrong size is an error, and
//! nothing of such a frame is acted on. No input panics the decoder.

use crate::wal::{Lsn, TimelineId};

/// Protocol version spoken by this build. Any change to a frame's layout,
/// or a new [`RefuseCode`], is a new version; peers of different versions
/// refuse each other in the handshake, naming both versions. (2: Refuse
/// carries a code.)
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest frame body accepted by default (a Data frame carries at most
/// [`MAX_DATA`] bytes of WAL).
pub const MAX_FRAME: usize = 4 << 20;
/// Most WAL bytes one Data frame carries.
pub const MAX_DATA: usize = 1 << 20;
pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;
/// length + crc
pub const OVERHEAD: usize = 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    ClientHello {
        version: u16,
        nonce: [u8; NONCE_LEN],
    },
    ServerChallenge {
        version: u16,
        nonce: [u8; NONCE_LEN],
        proof: [u8; PROOF_LEN],
    },
    ClientProof {
        proof: [u8; PROOF_LEN],
    },
    Hello(Hello),
    Welcome {
        position: Option<(TimelineId, Lsn)>,
    },
    Refuse {
        code: RefuseCode,
        reason: String,
    },
    Data {
        tli: TimelineId,
        start: Lsn,
        bytes: Vec<u8>,
    },
    Ack {
        tli: TimelineId,
        durable: Lsn,
    },
    Heartbeat {
        flush: Lsn,
        time_us: u64,
    },
    History {
        tli: TimelineId,
        content: Vec<u8>,
    },
}

/// Why a peer refuses, for the other side to branch on (the reason beside
/// it is for people and may be reworded freely).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RefuseCode {
    /// Anything else (a write error, a protocol violation): try again later.
    Other = 0,
    /// Another shipper is streaming into the spool: try again later.
    Busy = 1,
    /// A failover has finalized the spool: it takes no more WAL, ever.
    Fenced = 2,
    /// The spool belongs to another cluster (or segment size).
    OtherCluster = 3,
    /// Authentication failed, or the protocol versions differ.
    Auth = 4,
    /// The two sides' settings cannot work together (TLS on one side only).
    Config = 5,
}

impl RefuseCode {
    fn from_u8(b: u8) -> Option<RefuseCode> {
        Some(match b {
            0 => RefuseCode::Other,
            1 => RefuseCode::Busy,
            2 => RefuseCode::Fenced,
            3 => RefuseCode::OtherCluster,
            4 => RefuseCode::Auth,
            5 => RefuseCode::Config,
            _ => return None,
        })
    }

    /// Whether trying again can help: a fenced spool, another cluster or a
    /// failed authentication stay what they are until an operator acts.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            RefuseCode::Fenced | RefuseCode::OtherCluster | RefuseCode::Auth | RefuseCode::Config
        )
    }
}

/// What a shipper says about the cluster it ships from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub sysid: u64,
    pub tli: TimelineId,
    pub seg_size: u32,
    pub pg_version: u32,
    pub flush: Lsn,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the maximum of {max}")]
    TooBig { len: usize, max: usize },
    #[error("frame checksum mismatch (computed {computed:08x}, received {received:08x})")]
    Checksum { computed: u32, received: u32 },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("malformed {kind} frame: {what}")]
    Malformed { kind: &'static str, what: String },
}

impl Frame {
    pub fn type_byte(&self) -> u8 {
        match self {
            Frame::ClientHello { .. } => 1,
            Frame::ServerChallenge { .. } => 2,
            Frame::ClientProof { .. } => 3,
            Frame::Hello(_) => 4,
            Frame::Welcome { .. } => 5,
            Frame::Refuse { .. } => 6,
            Frame::Data { .. } => 7,
            Frame::Ack { .. } => 8,
            Frame::Heartbeat { .. } => 9,
            Frame::History { .. } => 10,
        }
    }

    pub fn name(&self) -> &'static str {
        type_name(self.type_byte())
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut body = Vec::with_capacity(64);
        body.push(self.type_byte());
        match self {
            Frame::ClientHello { version, nonce } => {
                body.extend_from_slice(&version.to_le_bytes());
                body.extend_from_slice(nonce);
            }
            Frame::ServerChallenge {
                version,
                nonce,
                proof,
            } => {
                body.extend_from_slice(&version.to_le_bytes());
                body.extend_from_slice(nonce);
                body.extend_from_slice(proof);
            }
            Frame::ClientProof { proof } => body.extend_from_slice(proof),
            Frame::Hello(h) => {
                body.extend_from_slice(&h.sysid.to_le_bytes());
                body.extend_from_slice(&h.tli.0.to_le_bytes());
                body.extend_from_slice(&h.seg_size.to_le_bytes());
                body.extend_from_slice(&h.pg_version.to_le_bytes());
                body.extend_from_slice(&h.flush.0.to_le_bytes());
            }
            Frame::Welcome { position } => {
                let (has, tli, lsn) = match position {
                    Some((t, l)) => (1u8, t.0, l.0),
                    None => (0, 0, 0),
                };
                body.push(has);
                body.extend_from_slice(&tli.to_le_bytes());
                body.extend_from_slice(&lsn.to_le_bytes());
            }
            Frame::Refuse { code, reason } => {
                body.push(*code as u8);
                body.extend_from_slice(reason.as_bytes());
            }
            Frame::Data { tli, start, bytes } => {
                return encode_data(*tli, *start, bytes, out);
            }
            Frame::Ack { tli, durable } => {
                body.extend_from_slice(&tli.0.to_le_bytes());
                body.extend_from_slice(&durable.0.to_le_bytes());
            }
            Frame::Heartbeat { flush, time_us } => {
                body.extend_from_slice(&flush.0.to_le_bytes());
                body.extend_from_slice(&time_us.to_le_bytes());
            }
            Frame::History { tli, content } => {
                body.extend_from_slice(&tli.0.to_le_bytes());
                body.extend_from_slice(content);
            }
        }
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    }

    /// Decodes one frame from the front of `buf`: `Ok(None)` if more bytes
    /// are needed, else the frame and how many bytes it took.
    pub fn parse(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > max {
            return Err(FrameError::TooBig { len, max });
        }
        if len == 0 {
            return Err(FrameError::Malformed {
                kind: "empty",
                what: "a frame has at least a type byte".into(),
            });
        }
        let total = len + OVERHEAD;
        if buf.len() < total {
            return Ok(None);
        }
        let body = &buf[4..4 + len];
        let t = &buf[4 + len..total];
        let received = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        let computed = crc32fast::hash(body);
        if computed != received {
            return Err(FrameError::Checksum { computed, received });
        }
        Ok(Some((decode_body(body)?, total)))
    }
}

/// The parts of a Data frame around its WAL bytes: the header (length,
/// type, timeline, start) and the checksum trailer, so that large ranges
/// can be written from the memory map without being copied into a buffer.
pub fn data_frame_parts(tli: TimelineId, start: Lsn, bytes: &[u8]) -> ([u8; 17], [u8; 4]) {
    let len = 1 + 4 + 8 + bytes.len();
    let mut head = [0u8; 17];
    head[..4].copy_from_slice(&(len as u32).to_le_bytes());
    head[4] = 7;
    head[5..9].copy_from_slice(&tli.0.to_le_bytes());
    head[9..17].copy_from_slice(&start.0.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&head[4..]);
    h.update(bytes);
    (head, h.finalize().to_le_bytes())
}

/// Encodes a Data frame straight from a borrowed slice (a memory map).
pub fn encode_data(tli: TimelineId, start: Lsn, bytes: &[u8], out: &mut Vec<u8>) {
    let len = 1 + 4 + 8 + bytes.len();
    out.reserve(len + OVERHEAD);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    let body_at = out.len();
    out.push(7);
    out.extend_from_slice(&tli.0.to_le_bytes());
    out.extend_from_slice(&start.0.to_le_bytes());
    out.extend_from_slice(bytes);
    let crc = crc32fast::hash(&out[body_at..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

fn type_name(t: u8) -> &'static str {
    match t {
        1 => "ClientHello",
        2 => "ServerChallenge",
        3 => "ClientProof",
        4 => "Hello",
        5 => "Welcome",
        6 => "Refuse",
        7 => "Data",
        8 => "Ack",
        9 => "Heartbeat",
        10 => "History",
        _ => "unknown",
    }
}

/// A cursor over a payload that never reads past its end.
struct Rd<'a> {
    b: &'a [u8],
    kind: &'static str,
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(FrameError::Malformed {
                kind: self.kind,
                what: format!("payload too short: {} bytes left, {n} needed", self.b.len()),
            });
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    fn end(self) -> Result<(), FrameError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Malformed {
                kind: self.kind,
                what: format!("{} unexpected trailing bytes", self.b.len()),
            })
        }
    }
}

fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
    let t = body[0];
    let kind = type_name(t);
    let mut r = Rd {
        b: &body[1..],
        kind,
    };
    let f = match t {
        1 => Frame::ClientHello {
            version: r.u16()?,
            nonce: r.arr()?,
        },
        2 => Frame::ServerChallenge {
            version: r.u16()?,
            nonce: r.arr()?,
            proof: r.arr()?,
        },
        3 => Frame::ClientProof { proof: r.arr()? },
        4 => Frame::Hello(Hello {
            sysid: r.u64()?,
            tli: TimelineId(r.u32()?),
            seg_size: r.u32()?,
            pg_version: r.u32()?,
            flush: Lsn(r.u64()?),
        }),
        5 => {
            let has = r.u8()?;
            let tli = TimelineId(r.u32()?);
            let lsn = Lsn(r.u64()?);
            Frame::Welcome {
                position: match has {
                    0 => None,
                    1 => Some((tli, lsn)),
                    x => {
                        return Err(FrameError::Malformed {
                            kind,
                            what: format!("has_position is {x}"),
                        })
                    }
                },
            }
        }
        6 => {
            let c = r.u8()?;
            let code = RefuseCode::from_u8(c).ok_or_else(|| FrameError::Malformed {
                kind,
                what: format!("unknown refusal code {c}"),
            })?;
            Frame::Refuse {
                code,
                reason: String::from_utf8_lossy(r.rest()).into_owned(),
            }
        }
        7 => {
            let tli = TimelineId(r.u32()?);
            let start = Lsn(r.u64()?);
            let bytes = r.rest();
            if start.checked_add(bytes.len() as u64).is_none() {
                return Err(FrameError::Malformed {
                    kind,
                    what: "range overflows the LSN space".into(),
                });
            }
            Frame::Data {
                tli,
                start,
                bytes: bytes.to_vec(),
            }
        }
        8 => Frame::Ack {
            tli: TimelineId(r.u32()?),
            durable: Lsn(r.u64()?),
        },
        9 => Frame::Heartbeat {
            flush: Lsn(r.u64()?),
            time_us: r.u64()?,
        },
        10 => Frame::History {
            tli: TimelineId(r.u32()?),
            content: r.rest().to_vec(),
        },
        other => return Err(FrameError::UnknownType(other)),
    };
    r.end()?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_frame_parts_around_the_bytes_are_the_encoded_frame() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let (tli, start) = (TimelineId(3), Lsn(0x1234_5678));
        let mut whole = Vec::new();
        encode_data(tli, start, &bytes, &mut whole);
        let (head, crc) = data_frame_parts(tli, start, &bytes);
        let parts = [&head[..], &bytes[..], &crc[..]].concat();
        assert_eq!(parts, whole);
        let (f, n) = Frame::parse(&parts, MAX_FRAME).unwrap().unwrap();
        assert_eq!(n, parts.len());
        assert!(
            matches!(f, Frame::Data { tli: t, start: s, bytes: b } if t == tli && s == start && b == bytes)
        );
    }

    pub fn samples() -> Vec<Frame> {
        vec![
            Frame::ClientHello {
                version: 1,
                nonce: [7; 32],
            },
            Frame::ServerChallenge {
                version: 1,
                nonce: [8; 32],
                proof: [9; 32],
            },
            Frame::ClientProof { proof: [3; 32] },
            Frame::Hello(Hello {
                sysid: 7_300_000_000_000_000_001,
                tli: TimelineId(2),
                seg_size: 16 << 20,
                pg_version: 150018,
                flush: Lsn(0x1_0000_0028),
            }),
            Frame::Welcome { position: None },
            Frame::Welcome {
                position: Some((TimelineId(1), Lsn(0x300_0000))),
            },
            Frame::Refuse {
                code: RefuseCode::Fenced,
                reason: "fenced: a failover ended this spool".into(),
            },
            Frame::Data {
                tli: TimelineId(1),
                start: Lsn(0x100_0028),
                bytes: (0..3000u32).map(|i| i as u8).collect(),
            },
            Frame::Data {
                tli: TimelineId(1),
                start: Lsn(0x100_0028),
                bytes: vec![],
            },
            Frame::Ack {
                tli: TimelineId(1),
                durable: Lsn(0x100_0100),
            },
            Frame::Heartbeat {
                flush: Lsn(5),
                time_us: 1_700_000_000_000_000,
            },
            Frame::History {
                tli: TimelineId(2),
                content: b"1\t0/3000000\tno recovery target specified\n".to_vec(),
            },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in samples() {
            let mut b = Vec::new();
            f.encode(&mut b);
            let (g, n) = Frame::parse(&b, MAX_FRAME).unwrap().unwrap();
            assert_eq!(g, f);
            assert_eq!(n, b.len());
            // Every strict prefix is "need more bytes", never an error.
            for cut in 0..b.len() {
                assert_eq!(
                    Frame::parse(&b[..cut], MAX_FRAME),
                    Ok(None),
                    "{} cut {cut}",
                    f.name()
                );
            }
        }
    }

    #[test]
    fn corrupt_frames_are_rejected() {
        let f = &samples()[7];
        let mut b = Vec::new();
        f.encode(&mut b);
        let mut x = b.clone();
        x[100] ^= 1;
        assert!(matches!(
            Frame::parse(&x, MAX_FRAME),
            Err(FrameError::Checksum { .. })
        ));
        assert!(matches!(
            Frame::parse(&b, 100),
            Err(FrameError::TooBig { .. })
        ));
        // Unknown type with a valid checksum.
        let body = [200u8, 1, 2];
        let mut y = (body.len() as u32).to_le_bytes().to_vec();
        y.extend_from_slice(&body);
        y.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        assert_eq!(
            Frame::parse(&y, MAX_FRAME),
            Err(FrameError::UnknownType(200))
        );
        // A Hello with a byte missing.
        let body = [4u8, 1, 2, 3];
        let mut z = (body.len() as u32).to_le_bytes().to_vec();
        z.extend_from_slice(&body);
        z.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        assert!(matches!(
            Frame::parse(&z, MAX_FRAME),
            Err(FrameError::Malformed { .. })
        ));
    }
}
