//! PostgreSQL wire messages, the server's side: reading what a client
//! (libpq, walreceiver) sends and encoding what a server answers.
//!
//! ```text
//! startup:  i32 length (itself included) | i32 code | body
//!           code 196608 (3.0): "key\0value\0"... "\0"
//!           code 80877103 SSLRequest, 80877104 GSSENCRequest, 80877102 CancelRequest
//! then:     u8 type | i32 length (itself included, not the type) | body
//! ```
//!
//! Only the messages walreceiver uses are decoded; any other type is passed
//! up as it is and refused there. Lengths are checked before anything is
//! sliced: a message over [`MAX_MESSAGE`] or with a length under 4 is an
//! error naming both, never a panic or an allocation of what the peer claims.

use std::collections::HashMap;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wal::Lsn;

/// The largest message a client may send (walreceiver's are tens of bytes;
/// a SCRAM exchange is under 1 kB).
pub const MAX_MESSAGE: usize = 64 << 10;

pub const PROTOCOL_3_0: i32 = 196608;
pub const SSL_REQUEST: i32 = 80877103;
pub const GSSENC_REQUEST: i32 = 80877104;
pub const CANCEL_REQUEST: i32 = 80877102;

/// Type OIDs used in row descriptions.
pub const INT4OID: i32 = 23;
pub const INT8OID: i32 = 20;
pub const TEXTOID: i32 = 25;
pub const BYTEAOID: i32 = 17;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("message {kind} claims {len} bytes (the limit is {MAX_MESSAGE}, the least 4)")]
    BadLength { kind: String, len: i64 },
    #[error("malformed {what}")]
    Malformed { what: &'static str },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What opens a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel,
    /// A startup message: protocol version and parameters.
    Start {
        version: i32,
        params: HashMap<String, String>,
    },
}

/// Reads a message's body length and checks it.
fn body_len(kind: &str, len: i32) -> Result<usize, CodecError> {
    let l = i64::from(len);
    if !(4..=(MAX_MESSAGE as i64 + 4)).contains(&l) {
        return Err(CodecError::BadLength {
            kind: kind.to_string(),
            len: l,
        });
    }
    Ok((l - 4) as usize)
}

/// Reads the first packet of a connection (or the one after an SSL or
/// GSSENC answer); `Ok(None)` on a clean close before it.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Startup>, CodecError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = body_len("startup", i32::from_be_bytes(len))?;
    if n < 4 {
        return Err(CodecError::Malformed {
            what: "startup packet (no protocol code)",
        });
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)
        .await
        .map_err(|_| CodecError::Truncated)?;
    parse_startup(&body).map(Some)
}

/// Parses a startup packet's body (after the length).
pub fn parse_startup(body: &[u8]) -> Result<Startup, CodecError> {
    let code = body
        .get(..4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(CodecError::Malformed {
            what: "startup packet (no protocol code)",
        })?;
    match code {
        SSL_REQUEST => return Ok(Startup::Ssl),
        GSSENC_REQUEST => return Ok(Startup::GssEnc),
        CANCEL_REQUEST => return Ok(Startup::Cancel),
        _ => {}
    }
    let mut params = HashMap::new();
    let mut rest = &body[4..];
    loop {
        let (key, r) = cstr(rest, "startup parameter name")?;
        if key.is_empty() {
            break;
        }
        let (val, r) = cstr(r, "startup parameter value")?;
        params.insert(key, val);
        rest = r;
    }
    Ok(Startup::Start {
        version: code,
        params,
    })
}

/// A NUL-terminated string at the start of `b`, and what follows it.
pub fn cstr<'a>(b: &'a [u8], what: &'static str) -> Result<(String, &'a [u8]), CodecError> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(CodecError::Malformed { what })?;
    let s = std::str::from_utf8(&b[..end]).map_err(|_| CodecError::Malformed { what })?;
    Ok((s.to_string(), &b[end + 1..]))
}

/// Reads typed messages with a buffer of its own, so that
/// [`MsgReader::next`] can be dropped at any await (cancellation safe): what
/// was read stays in the buffer for the next call.
pub struct MsgReader<R> {
    r: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> MsgReader<R> {
    pub fn new(r: R) -> Self {
        MsgReader {
            r,
            buf: Vec::with_capacity(1024),
        }
    }

    /// The next message (type, body); `Ok(None)` on a clean close between messages.
    pub async fn next(&mut self) -> Result<Option<(u8, Vec<u8>)>, CodecError> {
        loop {
            if self.buf.len() >= 5 {
                let kind = self.buf[0];
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                let n = body_len(&kind_name(kind), len)?;
                if self.buf.len() >= 5 + n {
                    let body = self.buf[5..5 + n].to_vec();
                    self.buf.drain(..5 + n);
                    return Ok(Some((kind, body)));
                }
            }
            let mut chunk = [0u8; 4096];
            let got = self.r.read(&mut chunk).await?;
            if got == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(CodecError::Truncated)
                };
            }
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }
}

fn kind_name(k: u8) -> String {
    if k.is_ascii_graphic() {
        format!("'{}'", k as char)
    } else {
        format!("0x{k:02x}")
    }
}

/// Builds backend messages into one buffer, written with [`Out::flush`].
#[derive(Default)]
pub struct Out {
    pub buf: Vec<u8>,
}

impl Out {
    /// Starts a message of type `kind`; returns where its length goes.
    fn begin(&mut self, kind: u8) -> usize {
        self.buf.push(kind);
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        at
    }

    fn end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u32;
        self.buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    fn message(&mut self, kind: u8, body: impl FnOnce(&mut Vec<u8>)) -> &mut Self {
        let at = self.begin(kind);
        body(&mut self.buf);
        self.end(at);
        self
    }

    /// One byte with no framing (the answer to SSLRequest/GSSENCRequest).
    pub fn byte(&mut self, b: u8) -> &mut Self {
        self.buf.push(b);
        self
    }

    /// Authentication request `code` (0 ok, 10 SASL, 11 continue, 12 final) with `data`.
    pub fn auth(&mut self, code: i32, data: &[u8]) -> &mut Self {
        self.message(b'R', |b| {
            b.extend_from_slice(&code.to_be_bytes());
            b.extend_from_slice(data);
        })
    }

    pub fn parameter_status(&mut self, name: &str, value: &str) -> &mut Self {
        self.message(b'S', |b| {
            put_cstr(b, name);
            put_cstr(b, value);
        })
    }

    pub fn backend_key(&mut self, pid: i32, key: i32) -> &mut Self {
        self.message(b'K', |b| {
            b.extend_from_slice(&pid.to_be_bytes());
            b.extend_from_slice(&key.to_be_bytes());
        })
    }

    pub fn ready(&mut self) -> &mut Self {
        self.message(b'Z', |b| b.push(b'I'))
    }

    /// NegotiateProtocolVersion: we speak 3.0; `unknown` are the `_pq_.` options we ignore.
    pub fn negotiate(&mut self, minor: i32, unknown: &[String]) -> &mut Self {
        self.message(b'v', |b| {
            b.extend_from_slice(&minor.to_be_bytes());
            b.extend_from_slice(&(unknown.len() as i32).to_be_bytes());
            for u in unknown {
                put_cstr(b, u);
            }
        })
    }

    /// ErrorResponse: severity ("ERROR", "FATAL"), SQLSTATE, message, optional detail.
    pub fn error(
        &mut self,
        severity: &str,
        code: &str,
        message: &str,
        detail: Option<&str>,
    ) -> &mut Self {
        self.message(b'E', |b| {
            for (t, v) in [
                (b'S', severity),
                (b'V', severity),
                (b'C', code),
                (b'M', message),
            ] {
                b.push(t);
                put_cstr(b, v);
            }
            if let Some(d) = detail {
                b.push(b'D');
                put_cstr(b, d);
            }
            b.push(0);
        })
    }

    /// RowDescription of text-format columns (name, type OID).
    pub fn row_description(&mut self, cols: &[(&str, i32)]) -> &mut Self {
        self.message(b'T', |b| {
            b.extend_from_slice(&(cols.len() as i16).to_be_bytes());
            for (name, oid) in cols {
                put_cstr(b, name);
                b.extend_from_slice(&0i32.to_be_bytes()); // table
                b.extend_from_slice(&0i16.to_be_bytes()); // column
                b.extend_from_slice(&oid.to_be_bytes());
                let typlen: i16 = match *oid {
                    INT4OID => 4,
                    INT8OID => 8,
                    _ => -1,
                };
                b.extend_from_slice(&typlen.to_be_bytes());
                b.extend_from_slice(&(-1i32).to_be_bytes()); // typmod
                b.extend_from_slice(&0i16.to_be_bytes()); // text format
            }
        })
    }

    /// DataRow; `None` is NULL.
    pub fn data_row(&mut self, vals: &[Option<&[u8]>]) -> &mut Self {
        self.message(b'D', |b| {
            b.extend_from_slice(&(vals.len() as i16).to_be_bytes());
            for v in vals {
                match v {
                    Some(v) => {
                        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        b.extend_from_slice(v);
                    }
                    None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
        })
    }

    pub fn command_complete(&mut self, tag: &str) -> &mut Self {
        self.message(b'C', |b| put_cstr(b, tag))
    }

    /// CopyBothResponse (text format, no columns): streaming starts.
    pub fn copy_both(&mut self) -> &mut Self {
        self.message(b'W', |b| {
            b.push(0);
            b.extend_from_slice(&0i16.to_be_bytes());
        })
    }

    pub fn copy_done(&mut self) -> &mut Self {
        self.message(b'c', |_| {})
    }

    /// CopyData holding XLogData: `w` | start | end of WAL | send time | WAL bytes.
    pub fn xlog_data(&mut self, start: Lsn, wal_end: Lsn, now: i64, wal: &[u8]) -> &mut Self {
        self.message(b'd', |b| {
            b.push(b'w');
            b.extend_from_slice(&start.0.to_be_bytes());
            b.extend_from_slice(&wal_end.0.to_be_bytes());
            b.extend_from_slice(&now.to_be_bytes());
            b.extend_from_slice(wal);
        })
    }

    /// CopyData holding a keepalive: `k` | end of WAL | send time | reply requested.
    pub fn keepalive(&mut self, wal_end: Lsn, now: i64, reply: bool) -> &mut Self {
        self.message(b'd', |b| {
            b.push(b'k');
            b.extend_from_slice(&wal_end.0.to_be_bytes());
            b.extend_from_slice(&now.to_be_bytes());
            b.push(u8::from(reply));
        })
    }

    pub async fn flush<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            w.write_all(&self.buf).await?;
            self.buf.clear();
        }
        w.flush().await
    }
}

fn put_cstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

/// Microseconds since 2000-01-01 (PostgreSQL's `TimestampTz` on the wire).
pub fn pg_now() -> i64 {
    const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;
    crate::spool::now_us() as i64 - PG_EPOCH_UNIX_US
}

/// What a standby sends inside CopyData while streaming.
#[derive(Debug, PartialEq, Eq)]
pub enum StandbyMessage {
    /// `r`: written, flushed and applied positions; whether it wants a reply now.
    Status {
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply: bool,
    },
    /// `h`: hot standby feedback (xmin and friends), which a spool has no use for.
    HotStandbyFeedback,
}

/// Parses a CopyData body from a standby.
pub fn parse_standby_message(b: &[u8]) -> Result<StandbyMessage, CodecError> {
    let u64_at = |o: usize| -> Option<u64> {
        b.get(o..o + 8).map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_be_bytes(a)
        })
    };
    match b.first() {
        Some(b'r') => {
            let bad = CodecError::Malformed {
                what: "standby status update ('r', 34 bytes expected)",
            };
            let (Some(write), Some(flush), Some(apply), Some(&reply)) =
                (u64_at(1), u64_at(9), u64_at(17), b.get(33))
            else {
                return Err(bad);
            };
            Ok(StandbyMessage::Status {
                write: Lsn(write),
                flush: Lsn(flush),
                apply: Lsn(apply),
                reply: reply != 0,
            })
        }
        Some(b'h') => Ok(StandbyMessage::HotStandbyFeedback),
        _ => Err(CodecError::Malformed {
            what: "CopyData from the standby (neither 'r' nor 'h')",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;

    #[test]
    fn startup_packets_from_libpq_parse() {
        let mut b = bytes::BytesMut::new();
        frontend::startup_message(
            [
                ("user", "rep"),
                ("database", "replication"),
                ("replication", "true"),
            ],
            &mut b,
        )
        .unwrap();
        match parse_startup(&b[4..]).unwrap() {
            Startup::Start { version, params } => {
                assert_eq!(version, PROTOCOL_3_0);
                assert_eq!(params["user"], "rep");
                assert_eq!(params["replication"], "true");
            }
            other => panic!("{other:?}"),
        }
        let mut s = bytes::BytesMut::new();
        frontend::ssl_request(&mut s);
        assert_eq!(parse_startup(&s[4..]).unwrap(), Startup::Ssl);
        assert!(parse_startup(&[0, 3, 0, 0, b'u', b's']).is_err());
        assert!(parse_startup(&[1]).is_err());
    }

    #[tokio::test]
    async fn messages_are_read_whole_and_bad_lengths_refused() {
        let mut b = bytes::BytesMut::new();
        frontend::query("IDENTIFY_SYSTEM", &mut b).unwrap();
        frontend::copy_done(&mut b);
        let mut r = MsgReader::new(&b[..]);
        let (k, body) = r.next().await.unwrap().unwrap();
        assert_eq!((k, &body[..]), (b'Q', &b"IDENTIFY_SYSTEM\0"[..]));
        assert_eq!(r.next().await.unwrap().unwrap().0, b'c');
        assert!(r.next().await.unwrap().is_none());
        let huge = [b'Q', 0x7f, 0, 0, 0];
        let e = MsgReader::new(&huge[..]).next().await.unwrap_err();
        assert!(e.to_string().contains("'Q' claims"), "{e}");
        let cut = [b'Q', 0, 0, 0, 9, b'I'];
        assert!(matches!(
            MsgReader::new(&cut[..]).next().await,
            Err(CodecError::Truncated)
        ));
    }

    #[test]
    fn standby_status_updates_parse_and_short_ones_are_refused() {
        let mut m = vec![b'r'];
        for v in [0x300_0000u64, 0x2ff_0000, 0x2fe_0000, 77] {
            m.extend_from_slice(&v.to_be_bytes());
        }
        m.push(1);
        assert_eq!(
            parse_standby_message(&m).unwrap(),
            StandbyMessage::Status {
                write: Lsn(0x300_0000),
                flush: Lsn(0x2ff_0000),
                apply: Lsn(0x2fe_0000),
                reply: true
            }
        );
        assert!(parse_standby_message(&m[..20]).is_err());
        assert!(parse_standby_message(b"").is_err());
        assert!(parse_standby_message(b"x").is_err());
    }

    #[test]
    fn xlog_data_is_framed_as_walreceiver_reads_it() {
        let mut o = Out::default();
        o.xlog_data(Lsn(0x10), Lsn(0x20), 5, b"abc");
        assert_eq!(o.buf[0], b'd');
        assert_eq!(
            u32::from_be_bytes(o.buf[1..5].try_into().unwrap()),
            4 + 25 + 3
        );
        assert_eq!(o.buf[5], b'w');
        assert_eq!(&o.buf[o.buf.len() - 3..], b"abc");
    }
}
