//! A framed connection: reading and writing [`Frame`]s over any byte stream
//! (plain TCP or TLS), and the authentication handshake on top of it.
//!
//! Reading follows mini-redis: bytes accumulate in a buffer; a clean EOF
//! between frames is `Ok(None)`, an EOF inside a frame is an error. Every
//! read of a handshake step has a deadline, so an idle or slow peer cannot
//! hold a connection slot.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::auth::{nonce, Secret};
use super::frame::{
    data_frame_parts, encode_data, Frame, FrameError, RefuseCode, MAX_FRAME,
    OVERHEAD as FRAME_OVERHEAD, PROTOCOL_VERSION,
};

/// Data frames at least this large are written without copying the WAL.
const ZERO_COPY_MIN: usize = 64 << 10;

/// How much one read asks the stream for.
const READ_CHUNK: usize = 256 << 10;
use crate::wal::{Lsn, TimelineId};

/// A byte stream waltail can speak over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}
pub type BoxIo = Box<dyn Io>;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("connection closed in the middle of a frame")]
    TruncatedFrame,
    #[error("connection closed")]
    Closed,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("refused by peer: {reason}")]
    Refused { code: RefuseCode, reason: String },
    #[error("protocol violation: expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

pub struct FrameReader<R> {
    r: R,
    buf: Vec<u8>,
    start: usize,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R) -> Self {
        FrameReader {
            r,
            buf: Vec::with_capacity(64 << 10),
            start: 0,
            max: MAX_FRAME,
        }
    }

    /// The next frame; `Ok(None)` on a clean EOF between frames.
    ///
    /// Cancel-safe: bytes read before a cancellation stay in the buffer.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        loop {
            if let Some((f, n)) = Frame::parse(&self.buf[self.start..], self.max)? {
                self.start += n;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(Some(f));
            }
            if self.read_more().await? == 0 {
                return if self.buffered() == 0 {
                    Ok(None)
                } else {
                    Err(ProtoError::TruncatedFrame)
                };
            }
        }
    }

    /// One read from the stream straight into the buffer; 0 at EOF.
    async fn read_more(&mut self) -> Result<usize, ProtoError> {
        if self.start > 0
            && (self.start >= self.buf.len() / 2
                || self.buf.capacity() - self.buf.len() < READ_CHUNK)
        {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(READ_CHUNK);
        Ok(self.r.read_buf(&mut self.buf).await?)
    }

    /// Reads whatever the stream has ready now, without waiting. False at
    /// EOF or when nothing was ready.
    pub async fn read_ready(&mut self) -> Result<bool, ProtoError> {
        // Polled once, not under `timeout(ZERO)`: tokio rounds a timer's
        // deadline up to its next millisecond tick, which held a lone
        // commit's fdatasync back by up to 1 ms.
        use futures_util::FutureExt;
        match self.read_more().now_or_never() {
            Some(Ok(n)) => Ok(n > 0),
            Some(Err(e)) => Err(e),
            None => Ok(false),
        }
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// True if a whole frame is already buffered (the next read will not
    /// wait). Looks at the length prefix only.
    pub fn has_frame(&self) -> bool {
        let b = &self.buf[self.start..];
        b.len() >= 4
            && b.len() >= u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize + FRAME_OVERHEAD
    }

    /// The next frame within `d`, failing on EOF.
    pub async fn expect(&mut self, d: Duration, what: &'static str) -> Result<Frame, ProtoError> {
        match tokio::time::timeout(d, self.read_frame()).await {
            Err(_) => Err(ProtoError::Timeout(what)),
            Ok(Ok(Some(Frame::Refuse { code, reason }))) => {
                Err(ProtoError::Refused { code, reason })
            }
            Ok(Ok(Some(f))) => Ok(f),
            Ok(Ok(None)) => Err(ProtoError::Closed),
            Ok(Err(e)) => Err(e),
        }
    }
}

pub struct FrameWriter<W> {
    w: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        FrameWriter {
            w,
            buf: Vec::with_capacity(64 << 10),
        }
    }

    pub async fn send(&mut self, f: &Frame) -> Result<(), ProtoError> {
        self.buf.clear();
        f.encode(&mut self.buf);
        self.w.write_all(&self.buf).await?;
        self.w.flush().await?;
        Ok(())
    }

    /// Sends WAL bytes without copying them into a `Frame` first.
    pub async fn send_data(
        &mut self,
        tli: TimelineId,
        start: Lsn,
        bytes: &[u8],
    ) -> Result<(), ProtoError> {
        // Small ranges go out in one write; large ones straight from the
        // caller's slice, without a copy.
        if bytes.len() < ZERO_COPY_MIN {
            self.buf.clear();
            encode_data(tli, start, bytes, &mut self.buf);
            self.w.write_all(&self.buf).await?;
        } else {
            let (head, crc) = data_frame_parts(tli, start, bytes);
            self.w.write_all(&head).await?;
            self.w.write_all(bytes).await?;
            self.w.write_all(&crc).await?;
        }
        Ok(())
    }

    /// Writes bytes as they are (tests use it to send damaged frames).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ProtoError> {
        self.w.write_all(bytes).await?;
        self.w.flush().await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), ProtoError> {
        self.w.flush().await?;
        Ok(())
    }

    pub async fn shutdown(&mut self) {
        let _ = self.w.shutdown().await;
    }
}

/// How long each handshake step may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The shipper's side of authentication.
pub async fn client_auth<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    secret: &Secret,
) -> Result<(), ProtoError> {
    let nc = nonce();
    w.send(&Frame::ClientHello {
        version: PROTOCOL_VERSION,
        nonce: nc,
    })
    .await?;
    match r
        .expect(HANDSHAKE_TIMEOUT, "the receiver's challenge")
        .await?
    {
        Frame::ServerChallenge {
            version,
            nonce: ns,
            proof,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(ProtoError::Auth(format!(
                    "receiver speaks protocol {version}, this shipper {PROTOCOL_VERSION}"
                )));
            }
            if !secret.verify_receiver(&nc, &ns, &proof) {
                let why = "the receiver does not know the shared secret (wrong secret file, or one side runs with --insecure-no-auth)";
                let _ = w
                    .send(&Frame::Refuse {
                        code: RefuseCode::Auth,
                        reason: format!("authentication failed: {why}"),
                    })
                    .await;
                return Err(ProtoError::Auth(why.into()));
            }
            w.send(&Frame::ClientProof {
                proof: secret.shipper_proof(&nc, &ns),
            })
            .await
        }
        other => Err(ProtoError::Unexpected {
            expected: "ServerChallenge",
            got: other.name(),
        }),
    }
}

/// The receiver's side of authentication. On failure the peer is told why
/// (without anything that would help guess the secret) and the error returned.
pub async fn server_auth<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    secret: &Secret,
) -> Result<(), ProtoError> {
    let nc = match r.expect(HANDSHAKE_TIMEOUT, "ClientHello").await? {
        Frame::ClientHello { version, nonce } => {
            if version != PROTOCOL_VERSION {
                let reason = format!("protocol version {version} is not supported (this receiver speaks {PROTOCOL_VERSION})");
                let _ = w
                    .send(&Frame::Refuse {
                        code: RefuseCode::Auth,
                        reason: reason.clone(),
                    })
                    .await;
                return Err(ProtoError::Auth(reason));
            }
            nonce
        }
        other => {
            return Err(ProtoError::Unexpected {
                expected: "ClientHello",
                got: other.name(),
            })
        }
    };
    let ns = nonce();
    w.send(&Frame::ServerChallenge {
        version: PROTOCOL_VERSION,
        nonce: ns,
        proof: secret.receiver_proof(&nc, &ns),
    })
    .await?;
    match r.expect(HANDSHAKE_TIMEOUT, "ClientProof").await? {
        Frame::ClientProof { proof } if secret.verify_shipper(&nc, &ns, &proof) => Ok(()),
        Frame::ClientProof { .. } => {
            let _ = w
                .send(&Frame::Refuse {
                    code: RefuseCode::Auth,
                    reason: "authentication failed".into(),
                })
                .await;
            Err(ProtoError::Auth(
                "the shipper's proof does not match the shared secret".into(),
            ))
        }
        other => Err(ProtoError::Unexpected {
            expected: "ClientProof",
            got: other.name(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(a: Secret, b: Secret) -> (Result<(), ProtoError>, Result<(), ProtoError>) {
        let (c, s) = tokio::io::duplex(1 << 16);
        let (cr, cw) = tokio::io::split(c);
        let (sr, sw) = tokio::io::split(s);
        let client = async move {
            let (mut r, mut w) = (FrameReader::new(cr), FrameWriter::new(cw));
            client_auth(&mut r, &mut w, &a).await
        };
        let server = async move {
            let (mut r, mut w) = (FrameReader::new(sr), FrameWriter::new(sw));
            server_auth(&mut r, &mut w, &b).await
        };
        tokio::join!(client, server)
    }

    #[tokio::test]
    async fn same_secret_authenticates_both_ways() {
        let s = Secret::from_bytes(b"a-shared-secret-of-some-length");
        let (c, v) = pair(s.clone(), s).await;
        c.unwrap();
        v.unwrap();
    }

    #[tokio::test]
    async fn wrong_secret_or_no_secret_is_refused() {
        let (c, v) = pair(
            Secret::from_bytes(b"a-shared-secret-of-some-length"),
            Secret::from_bytes(b"another-secret-of-some-length!"),
        )
        .await;
        assert!(matches!(c, Err(ProtoError::Auth(_))));
        assert!(v.is_err());
        let (c, v) = pair(
            Secret::insecure_none(),
            Secret::from_bytes(b"a-shared-secret-of-some-length"),
        )
        .await;
        assert!(c.is_err() && v.is_err());
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_an_error_and_between_frames_is_not() {
        let mut b = Vec::new();
        Frame::Ack {
            tli: TimelineId(1),
            durable: Lsn(9),
        }
        .encode(&mut b);
        let mut r = FrameReader::new(&b[..]);
        assert!(r.read_frame().await.unwrap().is_some());
        assert!(r.read_frame().await.unwrap().is_none());
        let mut r = FrameReader::new(&b[..b.len() - 1]);
        assert!(matches!(
            r.read_frame().await,
            Err(ProtoError::TruncatedFrame)
        ));
    }
}
