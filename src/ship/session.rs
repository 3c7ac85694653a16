//! The shipper's connection to the receiver: connecting (TCP, TLS), the
//! handshake (authentication, Hello, Welcome: where the spool resumes), and
//! the task that reads the receiver's acks and refusals while WAL is sent.
//! Refusals are typed ([`RefuseCode`]): those retrying cannot fix end the
//! shipper ([`Refused`], [`Misconfigured`]).

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::info;

use super::send::read_history;
use super::{Fault, Primary, ShipConfig};
use crate::pg::client::FlushPoint;
use crate::proto::conn::{client_auth, HANDSHAKE_TIMEOUT};
use crate::proto::{BoxIo, Frame, FrameReader, FrameWriter, Hello, ProtoError, RefuseCode};
use crate::wal::history::parse_history;
use crate::wal::segment::history_file_name;
use crate::wal::{Lsn, SegmentName, TimelineId};

pub(super) struct Session {
    pub(super) w: FrameWriter<tokio::io::WriteHalf<BoxIo>>,
    pub(super) acks: watch::Receiver<AckState>,
    pub(super) reader: tokio::task::JoinHandle<()>,
    /// Next byte to send.
    pub(super) next: (TimelineId, Lsn),
    pub(super) last_heartbeat: Instant,
    /// The last durable position acked, and since when it has not moved.
    pub(super) last_ack: (Option<(TimelineId, Lsn)>, Instant),
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[derive(Clone, Debug, Default)]
pub(super) struct AckState {
    pub(super) durable: Option<(TimelineId, Lsn)>,
    /// Why the receiver's side of the connection ended.
    pub(super) closed: Option<String>,
    /// The receiver's refusal, when it ended with one.
    pub(super) refused: Option<(RefuseCode, String)>,
}

/// The receiver refuses this shipper for good (a fenced spool, another
/// cluster, a failed authentication): retrying cannot help, an operator
/// must act. The command exits with its own status for it, which the
/// systemd unit does not restart on.
#[derive(Debug, thiserror::Error)]
#[error("receiver {receiver} refused this shipper: {reason}")]
pub struct Refused {
    pub receiver: String,
    pub code: RefuseCode,
    pub reason: String,
}

impl Refused {
    pub(super) fn new(cfg: &ShipConfig, code: RefuseCode, mut reason: String) -> Refused {
        if code == RefuseCode::Fenced {
            reason.push_str(". Its standby was promoted (failover or switchover), so this server must not be written to as the primary any more: stop it, make it a standby of the new primary with `waltail rejoin --pgdata <this data directory> --primary <new primary> --spool <its spool>`, and on the standby's host run `waltail spool reset` before shipping to it again");
        }
        Refused {
            receiver: cfg.receiver.clone(),
            code,
            reason,
        }
    }
}

/// The two sides' settings cannot work together (TLS on one side only, a
/// certificate that cannot match): exit 2, as for a bad argument.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Misconfigured(pub String);

/// What a refusal means for the shipper: stop for good, or try again.
pub(super) fn refused(cfg: &ShipConfig, code: RefuseCode, reason: String) -> Fault {
    if code == RefuseCode::Config {
        Fault::Fatal(Misconfigured(format!("receiver {}: {reason}", cfg.receiver)).into())
    } else if code.is_permanent() {
        Fault::Fatal(Refused::new(cfg, code, reason).into())
    } else {
        Fault::Receiver(anyhow!("receiver refused: {reason}"))
    }
}

async fn connect_receiver(cfg: &ShipConfig) -> Result<BoxIo, Fault> {
    let sock = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(&cfg.receiver))
        .await
        .map_err(|_| Fault::Receiver(anyhow!("connecting to {} timed out", cfg.receiver)))?
        .with_context(|| format!("cannot connect to receiver {}", cfg.receiver))
        .map_err(Fault::Receiver)?;
    let _ = sock.set_nodelay(true);
    let misconfigured = |e: String| Fault::Fatal(Misconfigured(e).into());
    let host = crate::proto::host_of(&cfg.receiver, "--receiver").map_err(misconfigured)?;
    match cfg.tls.connector(host).map_err(misconfigured)? {
        Some((c, name)) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, c.connect(name, sock)).await {
                Err(_) => Err(Fault::Receiver(anyhow!("TLS handshake timed out"))),
                Ok(Ok(s)) => Ok(Box::new(s)),
                Ok(Err(e)) => {
                    use tokio_rustls::rustls::Error as TlsError;
                    Err(match e.get_ref().and_then(|i| i.downcast_ref::<TlsError>()) {
                    // What came back is not TLS: the receiver speaks plain frames.
                    Some(TlsError::InvalidMessage(_)) => misconfigured(format!(
                        "the receiver {} does not speak TLS, and this shipper has --tls-ca: give the receiver --tls-cert and --tls-key, or drop --tls-ca here",
                        cfg.receiver
                    )),
                    Some(TlsError::InvalidCertificate(why)) => misconfigured(format!(
                        "the receiver {}'s certificate is not accepted ({why:?}): it must be signed by --tls-ca and name {host}",
                        cfg.receiver
                    )),
                    _ => Fault::Receiver(anyhow::Error::new(e).context("TLS handshake with the receiver")),
                })
                }
            }
        }
        None => Ok(Box::new(sock)),
    }
}

pub(super) async fn open_session(
    cfg: &ShipConfig,
    p: &mut Primary,
    fp: &FlushPoint,
    server_tli: TimelineId,
    durable_tx: &watch::Sender<Option<Lsn>>,
) -> Result<Session, Fault> {
    let io = connect_receiver(cfg).await?;
    let (r, w) = tokio::io::split(io);
    let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
    client_auth(&mut r, &mut w, &cfg.secret)
        .await
        .map_err(|e| match e {
            e @ ProtoError::Auth(_) => {
                crate::metrics::ship().auth_failures.inc();
                Fault::Fatal(Refused::new(cfg, RefuseCode::Auth, e.to_string()).into())
            }
            ProtoError::Refused {
                code: RefuseCode::Config,
                reason,
            } => Fault::Fatal(Misconfigured(format!("receiver {}: {reason}", cfg.receiver)).into()),
            ProtoError::Refused { code, reason } => {
                crate::metrics::ship().auth_failures.inc();
                Fault::Fatal(Refused::new(cfg, code, reason).into())
            }
            e => Fault::Receiver(e.into()),
        })?;
    let hello = Hello {
        sysid: p.info.sysid,
        tli: server_tli,
        seg_size: p.info.seg_size.bytes() as u32,
        pg_version: p.info.version_num,
        flush: fp.lsn,
    };
    w.send(&Frame::Hello(hello))
        .await
        .map_err(|e| Fault::Receiver(e.into()))?;
    let position = match r.expect(HANDSHAKE_TIMEOUT, "Welcome").await {
        Ok(Frame::Welcome { position }) => position,
        Ok(other) => {
            return Err(Fault::Receiver(anyhow!(
                "expected Welcome, got {}",
                other.name()
            )))
        }
        Err(ProtoError::Refused { code, reason }) => return Err(refused(cfg, code, reason)),
        Err(e) => return Err(Fault::Receiver(e.into())),
    };
    let next = match position {
        Some(pos) => pos,
        None => {
            let start = match cfg.start_lsn {
                Some(l) => l,
                None => match &cfg.slot {
                    Some(slot) => {
                        let row = p
                            .client
                            .query_one("SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[slot])
                            .await
                            .map_err(|e| Fault::Pg(e.into()))?;
                        let l: Option<String> = row.get(0);
                        l.and_then(|l| l.parse().ok()).unwrap_or(fp.lsn)
                    }
                    None => fp.lsn,
                },
            };
            // A spool that starts on a later timeline starts no earlier
            // than that timeline does: the segments before belong to the
            // older timelines, under their names.
            let (start, history) = match timeline_start(p, server_tli)? {
                Some((begins, files)) => (start.max(begins), files),
                None => (start, vec![]),
            };
            for (tli, content) in history {
                w.send(&Frame::History { tli, content })
                    .await
                    .map_err(|e| Fault::Receiver(e.into()))?;
            }
            let start = start.segment_lsn(p.info.seg_size);
            info!(%start, "new spool: starting at the beginning of segment {}", SegmentName::of_lsn(server_tli, start, p.info.seg_size).file_name(p.info.seg_size));
            (server_tli, start)
        }
    };
    let (tx, acks) = watch::channel(AckState {
        durable: position,
        ..Default::default()
    });
    if let Some((_, d)) = position {
        durable_tx.send_replace(Some(d));
    }
    let durable_tx = durable_tx.clone();
    let reader = tokio::spawn(async move {
        loop {
            match r.read_frame().await {
                Ok(Some(Frame::Ack { tli, durable })) => {
                    crate::metrics::ship().acks.inc();
                    durable_tx.send_replace(Some(durable));
                    tx.send_modify(|a| a.durable = Some((tli, durable)))
                }
                Ok(Some(Frame::Refuse { code, reason })) => {
                    tx.send_modify(|a| {
                        a.closed = Some(format!("receiver refused: {reason}"));
                        a.refused = Some((code, reason));
                    });
                    return;
                }
                Ok(Some(other)) => {
                    tx.send_modify(|a| {
                        a.closed = Some(format!(
                            "unexpected {} frame from the receiver",
                            other.name()
                        ))
                    });
                    return;
                }
                Ok(None) => {
                    tx.send_modify(|a| a.closed = Some("receiver closed the connection".into()));
                    return;
                }
                Err(e) => {
                    tx.send_modify(|a| a.closed = Some(e.to_string()));
                    return;
                }
            }
        }
    });
    Ok(Session {
        w,
        acks,
        reader,
        next,
        last_heartbeat: Instant::now() - Duration::from_secs(1),
        last_ack: (None, Instant::now()),
    })
}

/// A timeline history file: its timeline and contents.
type HistoryFile = (TimelineId, Vec<u8>);

/// Where the server's timeline `tli` begins (its switch point from the
/// parent), with the history files a standby on it needs: `tli`'s own, and
/// its ancestors' that pg_wal still has. None on timeline 1.
fn timeline_start(p: &Primary, tli: TimelineId) -> Result<Option<(Lsn, Vec<HistoryFile>)>, Fault> {
    if tli.0 <= 1 {
        return Ok(None);
    }
    let own = read_history(&p.pg_wal, tli)?;
    let entries = parse_history(&String::from_utf8_lossy(&own))
        .map_err(|e| Fault::Fatal(anyhow!("{}: {e}", history_file_name(tli))))?;
    let begins = entries
        .iter()
        .map(|e| e.switchpoint)
        .max()
        .unwrap_or(Lsn(0));
    let mut files: Vec<HistoryFile> = entries
        .iter()
        .filter(|e| e.tli.0 > 1)
        .filter_map(|e| {
            std::fs::read(p.pg_wal.join(history_file_name(e.tli)))
                .ok()
                .map(|c| (e.tli, c))
        })
        .collect();
    files.push((tli, own));
    Ok(Some((begins, files)))
}
