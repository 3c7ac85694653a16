//! `waltail receive --serve ADDR`: a walsender for the spool. Stock
//! PostgreSQL standbys (13 to 18) whose `primary_conninfo` points here
//! stream WAL from the spool as they would from a primary, and see commits
//! as soon as the receiver has made them durable, without restore_command
//! copying the growing segment again and again.
//!
//! It runs inside the receiver process: the receiver publishes its durable
//! position on a `tokio::sync::watch` channel each time it has fdatasynced
//! and acked, and every streaming connection wakes on that (no polling).
//!
//! Protocol flow, as libpq and walreceiver drive it:
//!
//! ```text
//! C: GSSENCRequest          S: 'N'            (no GSS encryption)
//! C: SSLRequest             S: 'S' + TLS with --tls-cert/--tls-key, else 'N'
//! C: StartupMessage (user, replication=true, application_name, ...)
//! S: AuthenticationSASL ... AuthenticationOk  (SCRAM-SHA-256, see auth.rs)
//! S: ParameterStatus (server_version, ...), BackendKeyData, ReadyForQuery
//! C: IDENTIFY_SYSTEM        S: systemid, timeline, xlogpos, dbname
//! C: TIMELINE_HISTORY n     S: filename, content        (for each newer timeline)
//! C: START_REPLICATION [SLOT s] [PHYSICAL] X/X TIMELINE n
//! S: CopyBothResponse, then XLogData 'w' and keepalives 'k'
//! C: standby status 'r', hot standby feedback 'h' (status asking for a reply gets a keepalive)
//! S: at the end of an older timeline: CopyDone;  C: CopyDone
//! S: next_tli, next_tli_startpos; CommandComplete; ReadyForQuery
//! ```
//!
//! Invariants: nothing past the durable position (or past the end of an
//! older timeline) is ever sent; WAL is read from the spool's files with a
//! fixed buffer; without a verifier the server refuses to start unless it
//! listens on loopback only; the slot named in START_REPLICATION is
//! accepted and ignored (the spool keeps WAL until `cleanup`, and a
//! standby's own restore_command fetches what was cleaned).
//!
//! Why these crates: the startup packet, SCRAM and the replication loop are
//! written here on `tokio`, `hmac`/`sha2`/`base64`, with postgres-protocol
//! making verifiers (`waltail scram-verifier`) and acting as the client in
//! the unit tests. pgwire's server-side SCRAM needs the salted password,
//! not the `SCRAM-SHA-256$...` verifier a DBA hands out, and its handler
//! model owns the socket through query processing; the replication loop
//! needs the socket itself. The message codec this needs is a dozen message
//! types (codec.rs), smaller than adapting pgwire's.

pub mod auth;
pub mod codec;
pub mod command;
pub mod stream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::proto::BoxIo;
use crate::spool::{Spool, SpoolMeta};
use crate::wal::{Lsn, SegmentSize, TimelineId};
use auth::{AuthError, ScramServer, Verifier};
use codec::{cstr, read_startup, MsgReader, Out, Startup, PROTOCOL_3_0};
use command::Command;
use stream::{check_start, extent, Durable, Ended, Extent, Refusal};

/// Each step of the startup and authentication must arrive within this.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct ServeConfig {
    pub listen: String,
    /// None: trust, allowed on loopback only.
    pub verifier: Option<Verifier>,
    /// The user name the standby connects as.
    pub user: String,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub max_connections: usize,
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("listen", &self.listen)
            .field("verifier", &self.verifier)
            .field("user", &self.user)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A bound server, ready to run.
pub struct Server {
    listener: TcpListener,
    cfg: Arc<ServeConfig>,
    spool: Spool,
    durable: Durable,
}

impl Server {
    pub async fn bind(cfg: ServeConfig, spool: Spool, durable: Durable) -> anyhow::Result<Server> {
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("--serve: cannot listen on {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        if cfg.verifier.is_none() {
            if !addr.ip().is_loopback() {
                bail!("--serve {}: refusing to serve replication without authentication on a non-loopback address; give --serve-verifier-file (make one with `waltail scram-verifier`)", cfg.listen);
            }
            warn!(%addr, "serving replication WITHOUT authentication (loopback only)");
        }
        Ok(Server {
            listener,
            cfg: Arc::new(cfg),
            spool,
            durable,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves standbys until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        info!(listen = %self.local_addr(), "serving WAL to standbys (replication protocol)");
        let slots = Arc::new(Semaphore::new(self.cfg.max_connections.max(1)));
        loop {
            let (sock, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => { warn!("serve: accept failed: {e}"); tokio::time::sleep(Duration::from_millis(50)).await; continue; }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                warn!(%peer, "serve: refused: {} connections already open", self.cfg.max_connections);
                continue;
            };
            let s = Session {
                cfg: self.cfg.clone(),
                spool: self.spool.clone(),
                durable: self.durable.clone(),
                cancel: shutdown.clone(),
            };
            tokio::spawn(
                async move {
                    let _permit = permit;
                    match s.run(sock).await {
                        Ok(()) => info!("standby disconnected"),
                        Err(e) => warn!("standby connection closed: {e:#}"),
                    }
                }
                .instrument(info_span!("standby", %peer)),
            );
        }
    }
}

struct Session {
    cfg: Arc<ServeConfig>,
    spool: Spool,
    durable: Durable,
    cancel: CancellationToken,
}

async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(STARTUP_TIMEOUT, f)
        .await
        .map_err(|_| anyhow::anyhow!("no {what} within {STARTUP_TIMEOUT:?}"))
}

async fn fatal<W: AsyncWrite + Unpin>(w: &mut W, code: &str, msg: &str) -> anyhow::Error {
    let mut o = Out::default();
    o.error("FATAL", code, msg, None);
    let _ = o.flush(w).await;
    anyhow::anyhow!("refused: {msg}")
}

impl Session {
    /// SSL and GSS requests, then the startup message.
    async fn negotiate(
        &self,
        mut sock: TcpStream,
    ) -> anyhow::Result<Option<(BoxIo, HashMap<String, String>, i32)>> {
        for _ in 0..3 {
            match timed("startup packet", read_startup(&mut sock)).await?? {
                None | Some(Startup::Cancel) => return Ok(None),
                Some(Startup::GssEnc) => sock.write_all(b"N").await?,
                Some(Startup::Ssl) => match &self.cfg.tls {
                    None => sock.write_all(b"N").await?,
                    Some(acc) => {
                        sock.write_all(b"S").await?;
                        let tls = timed("TLS handshake", acc.accept(sock))
                            .await?
                            .context("TLS handshake")?;
                        let mut io: BoxIo = Box::new(tls);
                        return match timed("startup packet", read_startup(&mut io)).await?? {
                            Some(Startup::Start { version, params }) => {
                                Ok(Some((io, params, version)))
                            }
                            None => Ok(None),
                            Some(other) => bail!("{other:?} inside TLS"),
                        };
                    }
                },
                Some(Startup::Start { version, params }) => {
                    if self.cfg.tls.is_some() {
                        return Err(fatal(&mut sock, "28000", "waltail serves replication over TLS only (sslmode=require or stronger)").await);
                    }
                    return Ok(Some((Box::new(sock), params, version)));
                }
            }
        }
        bail!("too many encryption requests")
    }

    async fn run(self, sock: TcpStream) -> anyhow::Result<()> {
        let _ = sock.set_nodelay(true);
        let Some((io, params, version)) = self.negotiate(sock).await? else {
            return Ok(());
        };
        let (r, mut w) = tokio::io::split(io);
        let mut r = MsgReader::new(r);
        if version >> 16 != 3 {
            return Err(fatal(
                &mut w,
                "0A000",
                &format!(
                    "unsupported frontend protocol {}.{}: waltail speaks 3.0",
                    version >> 16,
                    version & 0xffff
                ),
            )
            .await);
        }
        let unknown: Vec<String> = params
            .keys()
            .filter(|k| k.starts_with("_pq_."))
            .cloned()
            .collect();
        if version != PROTOCOL_3_0 || !unknown.is_empty() {
            let mut o = Out::default();
            o.negotiate(0, &unknown);
            o.flush(&mut w).await?;
        }
        let user = params.get("user").cloned().unwrap_or_default();
        let app = params.get("application_name").cloned().unwrap_or_default();
        match params.get("replication").map(|s| s.to_ascii_lowercase()).as_deref() {
            Some("true" | "on" | "yes" | "1") => {}
            Some("database") => return Err(fatal(&mut w, "0A000", "waltail serves physical replication only (replication=database asks for logical)").await),
            _ => return Err(fatal(&mut w, "28000", "waltail serves replication connections only: connect with replication=true, as a standby's walreceiver does").await),
        }
        self.authenticate(&mut r, &mut w, &user).await?;
        let meta = match self.spool.meta()? {
            Some(m) if self.durable.borrow().is_some() => m,
            _ => {
                return Err(fatal(
                    &mut w,
                    "57P03",
                    "the spool holds no WAL yet: no shipper has sent any to this receiver",
                )
                .await)
            }
        };
        let seg_size = meta
            .seg_size()
            .with_context(|| format!("spool.json: bad segment size {}", meta.segment_size))?;
        let mut o = Out::default();
        o.auth(0, &[]);
        for (k, v) in [
            ("server_version", server_version(meta.pg_version)),
            ("server_encoding", "UTF8".into()),
            ("client_encoding", "UTF8".into()),
            ("DateStyle", "ISO, MDY".into()),
            ("integer_datetimes", "on".into()),
            ("standard_conforming_strings", "on".into()),
            ("application_name", app.clone()),
        ] {
            o.parameter_status(k, &v);
        }
        o.backend_key(std::process::id() as i32, 0).ready();
        o.flush(&mut w).await?;
        info!(%user, application_name = %app, "standby connected");
        self.commands(&mut r, &mut w, &meta, seg_size).await
    }

    async fn authenticate<R, W>(
        &self,
        r: &mut MsgReader<R>,
        w: &mut W,
        user: &str,
    ) -> anyhow::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let Some(v) = &self.cfg.verifier else {
            return Ok(());
        };
        let failed = format!("password authentication failed for user \"{user}\"");
        let mut o = Out::default();
        o.auth(10, b"SCRAM-SHA-256\0\0");
        o.flush(w).await?;
        let (k, body) = timed("SASLInitialResponse", r.next())
            .await??
            .context("closed during authentication")?;
        if k != b'p' {
            return Err(fatal(w, "28000", "expected a SASL response").await);
        }
        let (mech, rest) = cstr(&body, "SASLInitialResponse mechanism")?;
        if mech != "SCRAM-SHA-256" {
            return Err(fatal(
                w,
                "28000",
                &format!("SASL mechanism {mech:?} is not offered; use SCRAM-SHA-256"),
            )
            .await);
        }
        let data = rest.get(4..).unwrap_or_default();
        let (scram, first) = match ScramServer::start(v, data) {
            Ok(x) => x,
            Err(e) => return Err(fatal(w, "08P01", &e.to_string()).await),
        };
        o.auth(11, first.as_bytes());
        o.flush(w).await?;
        let (k, body) = timed("SASLResponse", r.next())
            .await??
            .context("closed during authentication")?;
        if k != b'p' {
            return Err(fatal(w, "28000", "expected a SASL response").await);
        }
        match scram.finish(&body) {
            Ok(fin) if user == self.cfg.user => {
                o.auth(12, fin.as_bytes());
                o.flush(w).await?;
                Ok(())
            }
            Ok(_) | Err(AuthError::WrongPassword) => Err(fatal(w, "28P01", &failed).await),
            Err(e) => Err(fatal(w, "08P01", &e.to_string()).await),
        }
    }

    async fn commands<R, W>(
        &self,
        r: &mut MsgReader<R>,
        w: &mut W,
        meta: &SpoolMeta,
        seg_size: SegmentSize,
    ) -> anyhow::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let m = tokio::select! {
                _ = self.cancel.cancelled() => {
                    return Err(fatal(w, "57P01", "terminating connection: waltail receive is shutting down").await);
                }
                m = r.next() => m?,
            };
            let (k, body) = match m {
                None | Some((b'X', _)) => return Ok(()),
                Some(x) => x,
            };
            let mut o = Out::default();
            if k != b'Q' {
                o.error(
                    "ERROR",
                    "08P01",
                    &format!(
                        "unexpected message type {:?} on a replication connection",
                        k as char
                    ),
                    None,
                )
                .ready();
                o.flush(w).await?;
                continue;
            }
            let (q, _) = cstr(&body, "query")?;
            let cmd = match command::parse(&q) {
                Ok(c) => c,
                Err(e) => {
                    o.error("ERROR", "42601", &e, None).ready();
                    o.flush(w).await?;
                    continue;
                }
            };
            match self.command(cmd, r, w, meta, seg_size).await {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => match e.downcast::<Refusal>() {
                    Ok(f) => {
                        warn!("refused: {}", f.message);
                        o.error("ERROR", f.code, &f.message, f.detail.as_deref())
                            .ready();
                        o.flush(w).await?;
                    }
                    Err(e) => {
                        let _ = fatal(w, "XX000", &format!("{e:#}")).await;
                        return Err(e);
                    }
                },
            }
        }
    }

    /// Runs one command; false when the connection closed during it.
    async fn command<R, W>(
        &self,
        cmd: Command,
        r: &mut MsgReader<R>,
        w: &mut W,
        meta: &SpoolMeta,
        seg_size: SegmentSize,
    ) -> anyhow::Result<bool>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        use codec::{BYTEAOID, INT4OID, INT8OID, TEXTOID};
        let current = (*self.durable.borrow()).context("the spool has no position")?;
        let mut o = Out::default();
        match cmd {
            Command::IdentifySystem => {
                o.row_description(&[
                    ("systemid", TEXTOID),
                    ("timeline", INT4OID),
                    ("xlogpos", TEXTOID),
                    ("dbname", TEXTOID),
                ])
                .data_row(&[
                    Some(meta.system_identifier.as_bytes()),
                    Some(current.0 .0.to_string().as_bytes()),
                    Some(current.1.to_string().as_bytes()),
                    None,
                ])
                .command_complete("IDENTIFY_SYSTEM");
            }
            Command::TimelineHistory(tli) => {
                let name = crate::wal::segment::history_file_name(tli);
                let Some(content) = self.spool.history(tli)? else {
                    return Err(anyhow::Error::new(Refusal {
                        code: "58P01",
                        message: format!(
                            "could not open file \"pg_wal/{name}\": No such file or directory"
                        ),
                        detail: None,
                    }));
                };
                o.row_description(&[("filename", TEXTOID), ("content", BYTEAOID)])
                    .data_row(&[Some(name.as_bytes()), Some(&content)])
                    .command_complete("TIMELINE_HISTORY");
            }
            Command::StartReplication {
                slot,
                start,
                timeline,
            } => {
                let tli = timeline.unwrap_or(current.0);
                let ext = extent(&self.spool, tli, current)?;
                check_start(ext, tli, start)?;
                let ended = match ext {
                    Extent::Ended { end, next } if start == end => {
                        Ended::Timeline { next, start: end }
                    }
                    _ => {
                        info!(%tli, %start, slot = slot.as_deref().unwrap_or("-"), "streaming to the standby");
                        o.copy_both().flush(w).await?;
                        stream::stream(
                            &self.spool,
                            seg_size,
                            self.durable.clone(),
                            r,
                            w,
                            tli,
                            start,
                            &self.cancel,
                        )
                        .await?
                    }
                };
                match ended {
                    Ended::Closed => return Ok(false),
                    Ended::ByStandby => {}
                    Ended::Timeline { next, start } => {
                        o.row_description(&[("next_tli", INT8OID), ("next_tli_startpos", TEXTOID)])
                            .data_row(&[
                                Some(next.0.to_string().as_bytes()),
                                Some(start.to_string().as_bytes()),
                            ]);
                    }
                }
                o.command_complete("START_STREAMING");
            }
        }
        o.ready();
        o.flush(w).await?;
        Ok(true)
    }
}

/// `server_version` from PG_VERSION_NUM (150004 -> "15.4").
pub fn server_version(num: u32) -> String {
    if num >= 100_000 {
        format!("{}.{}", num / 10_000, num % 10_000)
    } else {
        format!("{}.{}.{}", num / 10_000, num / 100 % 100, num % 100)
    }
}

/// The durable position a server starts with: the spool's.
pub fn initial_position(spool: &Spool) -> Option<(TimelineId, Lsn)> {
    spool.position().ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_version_is_what_libpq_parses() {
        assert_eq!(server_version(150004), "15.4");
        assert_eq!(server_version(180001), "18.1");
        assert_eq!(server_version(90624), "9.6.24");
    }
}
