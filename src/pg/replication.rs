//! A physical replication connection to a server, the client's side: what
//! pg_receivewal does before it streams. tokio-postgres has no replication
//! mode, so the messages come from postgres-protocol (startup, password,
//! MD5 and SCRAM-SHA-256 authentication, simple queries, CopyData) and this
//! module only sequences them:
//!
//! ```text
//! startup (replication=true, application_name) -> authentication -> ReadyForQuery
//! IDENTIFY_SYSTEM                                -> systemid, timeline, xlogpos
//! START_REPLICATION [SLOT s] PHYSICAL X/X       -> CopyBothResponse ('W')
//! then CopyData both ways: 'w' XLogData, 'k' keepalive from the server;
//!                          'r' standby status update from us
//! ```
//!
//! The connection goes over TCP or the server's Unix socket, without TLS:
//! it is meant for the primary's own host (the shipper runs beside it).
//! Messages are length-checked before anything is allocated; a server that
//! sends what this module does not expect gets an error, never a panic.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;
use tokio_postgres::Config;

use crate::wal::{Lsn, TimelineId};

/// XLogData messages carry at most 128 kB of WAL (walsender's
/// MAX_SEND_SIZE); anything much larger is not a walsender talking.
const MAX_MESSAGE: usize = 4 << 20;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A replication connection, before or after START_REPLICATION.
pub struct ReplicationConn {
    io: Box<dyn Io>,
    buf: BytesMut,
    out: BytesMut,
}

/// What IDENTIFY_SYSTEM answers.
#[derive(Debug, Clone)]
pub struct Identity {
    pub sysid: u64,
    pub timeline: TimelineId,
    pub xlogpos: Lsn,
}

/// What the server sends inside CopyData while streaming.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerMessage {
    /// 'w': WAL from `start`, `len` bytes; the server's WAL end.
    XLogData {
        start: Lsn,
        len: usize,
        wal_end: Lsn,
    },
    /// 'k': the server's WAL end; whether it wants a status update now.
    Keepalive { wal_end: Lsn, reply: bool },
    /// The server ended the stream (CopyDone, or the end of a timeline).
    Done,
}

impl ReplicationConn {
    /// Connects with libpq conninfo `conninfo` (host, port, user, password,
    /// connect_timeout; dbname and the rest are not used by physical
    /// replication) and authenticates.
    pub async fn connect(conninfo: &str, application_name: &str) -> Result<Self> {
        let cfg: Config = crate::pg::client::conninfo_with_env(conninfo)
            .parse()
            .context("parsing the primary's conninfo")?;
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let timeout = cfg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10));
        let host = cfg
            .get_hosts()
            .first()
            .cloned()
            .unwrap_or_else(|| Host::Unix(PathBuf::from("/var/run/postgresql")));
        let io: Box<dyn Io> = match &host {
            Host::Tcp(h) => {
                let s = tokio::time::timeout(
                    timeout,
                    tokio::net::TcpStream::connect((h.as_str(), port)),
                )
                .await
                .map_err(|_| anyhow!("connecting to {h}:{port} timed out"))?
                .with_context(|| format!("connecting to {h}:{port}"))?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(&path))
                    .await
                    .map_err(|_| anyhow!("connecting to {} timed out", path.display()))?
                    .with_context(|| format!("connecting to {}", path.display()))?;
                Box::new(s)
            }
        };
        let user = match cfg.get_user() {
            Some(u) => u.to_string(),
            None => std::env::var("USER").unwrap_or_else(|_| "postgres".into()),
        };
        let mut c = ReplicationConn {
            io,
            buf: BytesMut::with_capacity(64 << 10),
            out: BytesMut::new(),
        };
        tokio::time::timeout(
            timeout,
            c.startup(&user, cfg.get_password(), application_name),
        )
        .await
        .map_err(|_| anyhow!("the server did not finish authentication within {timeout:?}"))??;
        Ok(c)
    }

    async fn startup(&mut self, user: &str, password: Option<&[u8]>, app: &str) -> Result<()> {
        frontend::startup_message(
            [
                ("user", user),
                ("database", "replication"),
                ("replication", "true"),
                ("application_name", app),
            ],
            &mut self.out,
        )?;
        self.send().await?;
        let need_password = || {
            password.ok_or_else(|| {
                anyhow!("the server asks for a password and the conninfo (or PGPASSWORD) has none")
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.next().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(need_password()?, &mut self.out)?;
                    self.send().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        need_password()?,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.out)?;
                    self.send().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut ok = false;
                    while let Some(m) = fallible_next(&mut mechs)? {
                        ok |= m == sasl::SCRAM_SHA_256;
                    }
                    if !ok {
                        bail!("the server offers no SASL mechanism waltail speaks (SCRAM-SHA-256)");
                    }
                    let s = ScramSha256::new(need_password()?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        s.message(),
                        &mut self.out,
                    )?;
                    self.send().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| anyhow!("SASL continue before SASL start"))?;
                    s.update(body.data()).context("SCRAM exchange")?;
                    frontend::sasl_response(s.message(), &mut self.out)?;
                    self.send().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| anyhow!("SASL final before SASL start"))?;
                    s.finish(body.data())
                        .context("the server's SCRAM signature does not verify")?;
                }
                Message::ParameterStatus(_)
                | Message::BackendKeyData(_)
                | Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => bail!("{}", error_text(&body)),
                _ => bail!("unexpected message during authentication"),
            }
        }
    }

    /// IDENTIFY_SYSTEM.
    pub async fn identify_system(&mut self) -> Result<Identity> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .filter(|r| r.len() >= 3)
            .ok_or_else(|| anyhow!("IDENTIFY_SYSTEM answered no row"))?;
        let field = |i: usize, what: &str| -> Result<&str> {
            row[i]
                .as_deref()
                .ok_or_else(|| anyhow!("IDENTIFY_SYSTEM: {what} is NULL"))
        };
        Ok(Identity {
            sysid: field(0, "systemid")?
                .parse()
                .context("IDENTIFY_SYSTEM systemid")?,
            timeline: TimelineId(
                field(1, "timeline")?
                    .parse()
                    .context("IDENTIFY_SYSTEM timeline")?,
            ),
            xlogpos: field(2, "xlogpos")?
                .parse()
                .map_err(|e| anyhow!("IDENTIFY_SYSTEM xlogpos: {e}"))?,
        })
    }

    /// START_REPLICATION [SLOT slot] PHYSICAL start: on success the
    /// connection is streaming.
    pub async fn start_replication(&mut self, slot: Option<&str>, start: Lsn) -> Result<()> {
        let slot = match slot {
            Some(s) => format!("SLOT \"{}\" ", s.replace('"', "\"\"")),
            None => String::new(),
        };
        frontend::query(
            &format!("START_REPLICATION {slot}PHYSICAL {start}"),
            &mut self.out,
        )?;
        self.send().await?;
        loop {
            let (tag, body) = self.frame().await?;
            match tag {
                b'W' => return Ok(()),
                b'N' | b'S' => {}
                b'E' => match parse(tag, body)? {
                    Message::ErrorResponse(e) => bail!("{}", error_text(&e)),
                    _ => bail!("malformed ErrorResponse"),
                },
                t => bail!("unexpected message {:?} after START_REPLICATION", t as char),
            }
        }
    }

    /// The next message while streaming.
    pub async fn recv(&mut self) -> Result<ServerMessage> {
        loop {
            let (tag, mut body) = self.frame().await?;
            match tag {
                b'd' => {
                    let kind = body.first().copied();
                    let need = |n: usize| -> Result<()> {
                        if body.len() < n {
                            bail!("a CopyData message of {} bytes is too short", body.len());
                        }
                        Ok(())
                    };
                    match kind {
                        Some(b'w') => {
                            need(25)?;
                            body.advance(1);
                            let start = Lsn(body.get_u64());
                            let wal_end = Lsn(body.get_u64());
                            let _sent_at = body.get_i64();
                            return Ok(ServerMessage::XLogData {
                                start,
                                len: body.len(),
                                wal_end,
                            });
                        }
                        Some(b'k') => {
                            need(18)?;
                            body.advance(1);
                            let wal_end = Lsn(body.get_u64());
                            let _sent_at = body.get_i64();
                            let reply = body.get_u8() != 0;
                            return Ok(ServerMessage::Keepalive { wal_end, reply });
                        }
                        _ => bail!("unexpected CopyData from the server (neither 'w' nor 'k')"),
                    }
                }
                b'c' | b'C' | b'T' | b'D' | b'Z' => return Ok(ServerMessage::Done),
                b'N' | b'S' => {}
                b'E' => match parse(tag, body)? {
                    Message::ErrorResponse(e) => bail!("{}", error_text(&e)),
                    _ => bail!("malformed ErrorResponse"),
                },
                t => bail!("unexpected message {:?} while streaming", t as char),
            }
        }
    }

    /// Sends a standby status update: `written` and `flushed` as the
    /// positions, no apply position (nothing replays here).
    pub async fn send_status(&mut self, written: Lsn, flushed: Lsn, reply: bool) -> Result<()> {
        let mut m = Vec::with_capacity(34);
        m.push(b'r');
        m.extend_from_slice(&written.0.to_be_bytes());
        m.extend_from_slice(&flushed.0.to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&crate::serve::codec::pg_now().to_be_bytes());
        m.push(reply as u8);
        frontend::CopyData::new(&m[..])?.write(&mut self.out);
        self.send().await
    }

    /// Ends the stream politely (CopyDone, Terminate).
    pub async fn close(mut self) {
        frontend::copy_done(&mut self.out);
        frontend::terminate(&mut self.out);
        let _ = self.send().await;
        let _ = self.io.shutdown().await;
    }

    async fn send(&mut self) -> Result<()> {
        self.io.write_all(&self.out).await?;
        self.io.flush().await?;
        self.out.clear();
        Ok(())
    }

    /// A simple query's rows, as text.
    async fn simple_query(&mut self, q: &str) -> Result<Vec<Vec<Option<String>>>> {
        frontend::query(q, &mut self.out)?;
        self.send().await?;
        let mut rows = vec![];
        let mut err = None;
        loop {
            match self.next().await? {
                Message::RowDescription(_) => {}
                Message::DataRow(d) => {
                    let buf = d.buffer();
                    let mut row = vec![];
                    let mut ranges = d.ranges();
                    while let Some(r) = fallible_next(&mut ranges)? {
                        row.push(match r {
                            Some(r) => Some(
                                std::str::from_utf8(
                                    buf.get(r).ok_or_else(|| anyhow!("malformed DataRow"))?,
                                )
                                .context("a DataRow field is not UTF-8")?
                                .to_string(),
                            ),
                            None => None,
                        });
                    }
                    rows.push(row);
                }
                Message::CommandComplete(_)
                | Message::NoticeResponse(_)
                | Message::ParameterStatus(_) => {}
                Message::ErrorResponse(e) => err = Some(error_text(&e)),
                Message::ReadyForQuery(_) => {
                    return match err {
                        Some(e) => Err(anyhow!("{q}: {e}")),
                        None => Ok(rows),
                    }
                }
                _ => bail!("unexpected message answering {q}"),
            }
        }
    }

    /// The next message, parsed by postgres-protocol.
    async fn next(&mut self) -> Result<Message> {
        let (tag, body) = self.frame().await?;
        parse(tag, body)
    }

    /// The next message's type and body.
    async fn frame(&mut self) -> Result<(u8, BytesMut)> {
        while self.buf.len() < 5 {
            self.fill().await?;
        }
        let tag = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if !(4..=MAX_MESSAGE).contains(&len) {
            bail!(
                "message {:?} claims {len} bytes (at most {MAX_MESSAGE}, at least 4)",
                tag as char
            );
        }
        while self.buf.len() < 1 + len {
            self.fill().await?;
        }
        let mut frame = self.buf.split_to(1 + len);
        frame.advance(5);
        Ok((tag, frame))
    }

    async fn fill(&mut self) -> Result<()> {
        self.buf.reserve(64 << 10);
        if self.io.read_buf(&mut self.buf).await? == 0 {
            bail!("the server closed the connection");
        }
        Ok(())
    }
}

/// Re-frames a message for postgres-protocol's parser.
fn parse(tag: u8, body: BytesMut) -> Result<Message> {
    let mut b = BytesMut::with_capacity(body.len() + 5);
    b.extend_from_slice(&[tag]);
    b.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    b.extend_from_slice(&body);
    Message::parse(&mut b)?.ok_or_else(|| anyhow!("truncated message {:?}", tag as char))
}

fn fallible_next<I: FallibleIterator<Error = std::io::Error>>(
    it: &mut I,
) -> Result<Option<I::Item>> {
    Ok(it.next()?)
}

/// "FATAL 28P01: password authentication failed for user ..."
fn error_text(e: &postgres_protocol::message::backend::ErrorResponseBody) -> String {
    let (mut sev, mut code, mut msg) = (String::new(), String::new(), String::new());
    let mut f = e.fields();
    while let Ok(Some(x)) = f.next() {
        let v = String::from_utf8_lossy(x.value_bytes()).into_owned();
        match x.type_() {
            b'S' => sev = v,
            b'C' => code = v,
            b'M' => msg = v,
            _ => {}
        }
    }
    format!("{sev} {code}: {msg}")
}
