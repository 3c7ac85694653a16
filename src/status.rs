//! `waltail status` and `waltail check`: how far the standby host is behind
//! the primary, read from the spool (position file, status.json, the
//! receiver's lock) and, optionally, from the primary and the standby server.
//!
//! Lag in bytes: the primary's flush LSN (queried with `--primary`, else the
//! last one the shipper reported in a heartbeat) minus the durable LSN in the
//! spool. Lag in seconds: 0 while the spool durably holds the primary's flush
//! position; otherwise the time since the spool last held everything the
//! primary had flushed (the receiver records that moment in status.json as
//! `caught_up_at_ms`). It is "how old is the oldest WAL the standby host may
//! be missing", up to the receiver's status cadence (a few hundred ms).
//!
//! `check` turns that into one Nagios line with perfdata and the Nagios exit
//! codes 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::spool::{now_ms, ReceiverState, Spool, RECEIVER_LOCK};
use crate::wal::{Lsn, TimelineId};

pub const NAGIOS_OK: u8 = 0;
pub const NAGIOS_WARNING: u8 = 1;
pub const NAGIOS_CRITICAL: u8 = 2;
pub const NAGIOS_UNKNOWN: u8 = 3;

/// What to look at.
#[derive(Clone, Debug)]
pub struct StatusOptions {
    pub spool: PathBuf,
    pub primary: Option<String>,
    pub standby: Option<String>,
}

/// The state of a ship/receive pair, as seen from the standby host.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub spool: PathBuf,
    /// Whether a receiver holds the spool's lock right now.
    pub receiver_running: bool,
    pub receiver_pid: Option<u32>,
    pub receiver_state: ReceiverState,
    /// "connected" while a shipper streams, else "disconnected".
    pub connection: String,
    pub peer: Option<String>,
    pub fenced: bool,
    pub timeline: Option<TimelineId>,
    pub current_segment: Option<String>,
    pub primary_flush_lsn: Option<Lsn>,
    /// "primary" (queried now) or "heartbeat" (the shipper's last report).
    pub primary_flush_source: Option<String>,
    /// What reached the standby host (written, maybe not yet fsynced): the shipped position.
    pub shipped_lsn: Option<Lsn>,
    pub durable_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    /// Primary flush minus the standby's replay position.
    pub replay_lag_bytes: Option<u64>,
    pub seconds_since_primary_heard: Option<f64>,
    pub seconds_since_durable_advance: Option<f64>,
    pub seconds_since_status_update: Option<f64>,
    pub acks: u64,
    pub bytes_written: u64,
    pub last_error: Option<String>,
    /// What could not be looked at (a server unreachable, ...).
    pub errors: Vec<String>,
}

/// Why there is no status at all.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{0}")]
    NoSpool(String),
}

fn secs_since(ms: Option<u64>, now: u64) -> Option<f64> {
    ms.filter(|&m| m > 0)
        .map(|m| now.saturating_sub(m) as f64 / 1000.0)
}

/// Whether a receiver holds the spool's lock.
fn receiver_running(spool: &Spool) -> bool {
    let Ok(f) = std::fs::File::open(spool.path(RECEIVER_LOCK)) else {
        return false;
    };
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock) {
        Ok(_) => false,
        Err((_, e)) => e == nix::errno::Errno::EWOULDBLOCK,
    }
}

async fn query_lsn(conninfo: &str, sql: &str, what: &str) -> Result<Option<Lsn>, String> {
    let q = async {
        let c = crate::pg::client::connect(conninfo).await?;
        let row = c.query_one(sql, &[]).await?;
        let v: Option<String> = row.get(0);
        anyhow::Ok(v)
    };
    match tokio::time::timeout(Duration::from_secs(5), q).await {
        Err(_) => Err(format!("{what}: no answer within 5 s")),
        Ok(Err(e)) => Err(format!("{what}: {e:#}")),
        Ok(Ok(None)) => Ok(None),
        Ok(Ok(Some(s))) => s.parse().map(Some).map_err(|e| format!("{what}: {e}")),
    }
}

/// Gathers the status. Fails only when the spool itself is missing or not a spool.
pub async fn gather(o: &StatusOptions) -> Result<Status, StatusError> {
    let spool = Spool::open(&o.spool).map_err(|e| StatusError::NoSpool(e.to_string()))?;
    let mut errors = Vec::new();
    let rs = match spool.read_status() {
        Ok(rs) => rs,
        // Advisory and rewritten every 200 ms: say so, go on without it.
        Err(e @ crate::spool::SpoolError::Corrupt { .. }) => {
            errors.push(e.to_string());
            None
        }
        Err(e) => return Err(StatusError::NoSpool(e.to_string())),
    };
    let position = spool
        .position()
        .map_err(|e| StatusError::NoSpool(e.to_string()))?;
    if rs.is_none() && position.is_none() {
        return Err(StatusError::NoSpool(format!(
            "{} is not a waltail spool (no status.json, no position): has a receiver ever run on it?",
            o.spool.display()
        )));
    }
    let rs = rs.unwrap_or_default();
    let now = now_ms();
    let running = receiver_running(&spool);
    let fenced = spool.is_fenced();
    let (primary_flush, source) = match &o.primary {
        Some(ci) => match query_lsn(ci, "SELECT pg_current_wal_flush_lsn()::text", "primary").await
        {
            Ok(l) => (l, Some("primary".to_string())),
            Err(e) => {
                errors.push(e);
                (rs.primary_flush_lsn, Some("heartbeat".to_string()))
            }
        },
        None => (
            rs.primary_flush_lsn,
            rs.primary_flush_lsn.map(|_| "heartbeat".to_string()),
        ),
    };
    let replay = match &o.standby {
        Some(ci) => match query_lsn(ci, "SELECT pg_last_wal_replay_lsn()::text", "standby").await {
            Ok(l) => l,
            Err(e) => {
                errors.push(e);
                None
            }
        },
        None => None,
    };
    let durable = position.map(|p| p.1).or(rs.durable_lsn);
    let lag_bytes = primary_flush.map(|f| f.bytes_since(durable.unwrap_or(Lsn(0))).unwrap_or(0));
    let lag_seconds = match lag_bytes {
        Some(0) => Some(0.0),
        Some(_) => secs_since(rs.caught_up_at_ms.or(Some(rs.started_at_ms)), now),
        None => None,
    };
    let state = if !running {
        if fenced {
            ReceiverState::Fenced
        } else {
            ReceiverState::NotRunning
        }
    } else {
        rs.state
    };
    let streaming = running && rs.state == ReceiverState::Streaming;
    Ok(Status {
        spool: o.spool.clone(),
        receiver_running: running,
        receiver_pid: running.then_some(rs.pid),
        receiver_state: state,
        connection: if streaming {
            "connected"
        } else {
            "disconnected"
        }
        .into(),
        peer: if streaming { rs.peer.clone() } else { None },
        fenced,
        timeline: position.map(|p| p.0).or(rs.timeline),
        // The segment the durable position is in (the receiver's own word
        // for it is up to its status cadence old).
        current_segment: match (position, spool.seg_size()) {
            (Some((tli, lsn)), Ok(size)) => {
                Some(crate::wal::SegmentName::of_lsn(tli, lsn, size).file_name(size))
            }
            _ => rs.current_segment.clone(),
        },
        primary_flush_lsn: primary_flush,
        primary_flush_source: source,
        shipped_lsn: rs.written_lsn.max(durable),
        durable_lsn: durable,
        replay_lsn: replay,
        lag_bytes,
        lag_seconds,
        replay_lag_bytes: match (primary_flush, replay) {
            (Some(f), Some(r)) => Some(f.bytes_since(r).unwrap_or(0)),
            _ => None,
        },
        seconds_since_primary_heard: secs_since(rs.primary_seen_at_ms, now),
        seconds_since_durable_advance: secs_since(rs.durable_at_ms, now),
        seconds_since_status_update: secs_since(Some(rs.updated_at_ms), now),
        acks: rs.acks,
        bytes_written: rs.bytes_written,
        last_error: rs.last_error.clone(),
        errors,
    })
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".to_string(), |v| v.to_string())
}

impl Status {
    /// The human report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<22}{v}\n"));
        line("spool", self.spool.display().to_string());
        line(
            "receiver",
            match (self.receiver_running, &self.receiver_pid) {
                (true, Some(pid)) => format!("running (pid {pid}), {}", self.receiver_state),
                _ => self.receiver_state.to_string(),
            },
        );
        line(
            "connection",
            match &self.peer {
                Some(p) => format!("{} ({p})", self.connection),
                None => self.connection.clone(),
            },
        );
        line("timeline", opt(&self.timeline));
        line("current segment", opt(&self.current_segment));
        line(
            "primary flush LSN",
            match (&self.primary_flush_lsn, &self.primary_flush_source) {
                (Some(l), Some(src)) => format!("{l} (from the {src})"),
                _ => "-".into(),
            },
        );
        line("shipped LSN", opt(&self.shipped_lsn));
        line("durable LSN", opt(&self.durable_lsn));
        line("replay LSN", opt(&self.replay_lsn));
        line(
            "lag",
            format!(
                "{} bytes, {} s",
                opt(&self.lag_bytes),
                self.lag_seconds
                    .map_or("-".to_string(), |s| format!("{s:.3}"))
            ),
        );
        if let Some(r) = self.replay_lag_bytes {
            line("replay lag", format!("{r} bytes"));
        }
        line(
            "primary last heard",
            self.seconds_since_primary_heard
                .map_or("-".to_string(), |s| format!("{s:.1} s ago")),
        );
        line(
            "last durable advance",
            self.seconds_since_durable_advance
                .map_or("-".to_string(), |s| format!("{s:.1} s ago")),
        );
        line(
            "fenced",
            if self.fenced {
                "yes: a failover finalized this spool; it takes no more WAL".into()
            } else {
                "no".to_string()
            },
        );
        line("last error", opt(&self.last_error));
        for e in &self.errors {
            line("error", e.clone());
        }
        s
    }
}

/// Lag thresholds: bytes and/or seconds; reached means alert.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Threshold {
    pub bytes: Option<u64>,
    pub seconds: Option<f64>,
}

impl std::str::FromStr for Threshold {
    type Err = String;
    /// "16MB,30s", "1048576", "2m", "0" (bytes: a number with an optional
    /// B, kB, MB, GB suffix; seconds: a duration like 30s or 2m).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut t = Threshold::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let lower = part.to_ascii_lowercase();
            if lower.ends_with('b') || lower.bytes().all(|b| b.is_ascii_digit()) {
                let bytes = crate::pg::client::parse_size(part)
                    .or_else(|| {
                        let (n, mult) = match lower.trim_end_matches('b') {
                            x if x.ends_with('k') => (&x[..x.len() - 1], 1u64 << 10),
                            x if x.ends_with('m') => (&x[..x.len() - 1], 1 << 20),
                            x if x.ends_with('g') => (&x[..x.len() - 1], 1 << 30),
                            x => (x, 1),
                        };
                        n.trim()
                            .parse::<u64>()
                            .ok()
                            .and_then(|n| n.checked_mul(mult))
                    })
                    .ok_or_else(|| format!("{part:?} is not a size like 16MB"))?;
                t.bytes = Some(bytes);
            } else {
                let d = crate::cli::parse_duration(part)?;
                t.seconds = Some(d.as_secs_f64());
            }
        }
        if t.bytes.is_none() && t.seconds.is_none() {
            return Err(format!(
                "{s:?} names no threshold: give bytes, seconds or both, like 16MB,30s"
            ));
        }
        Ok(t)
    }
}

impl Threshold {
    fn reached(&self, bytes: Option<u64>, secs: Option<f64>) -> Option<String> {
        if let (Some(t), Some(b)) = (self.bytes, bytes) {
            if b >= t {
                return Some(format!("lag {b} bytes >= {t}"));
            }
        }
        if let (Some(t), Some(s)) = (self.seconds, secs) {
            if s >= t {
                return Some(format!("lag {s:.1} s >= {t} s"));
            }
        }
        None
    }
}

/// `check`'s settings.
#[derive(Clone, Copy, Debug)]
pub struct CheckOptions {
    pub warning: Threshold,
    pub critical: Threshold,
    /// No word from the primary (heartbeat) for this long is a WARNING.
    pub stale_after: Duration,
}

fn severity_rank(code: u8) -> u8 {
    match code {
        NAGIOS_OK => 0,
        NAGIOS_UNKNOWN => 1,
        NAGIOS_WARNING => 2,
        _ => 3,
    }
}

/// The Nagios verdict on a status: (exit code, one line with perfdata).
pub fn check(st: &Status, o: &CheckOptions) -> (u8, String) {
    let mut code = NAGIOS_OK;
    let mut why: Vec<String> = Vec::new();
    let mut raise = |c: u8, w: String, code: &mut u8| {
        if severity_rank(c) > severity_rank(*code) {
            *code = c;
        }
        why.push(w);
    };
    if st.fenced {
        raise(
            NAGIOS_CRITICAL,
            "spool fenced: a failover ran".into(),
            &mut code,
        );
    } else if !st.receiver_running {
        raise(NAGIOS_CRITICAL, "receiver not running".into(), &mut code);
    } else if st.connection != "connected" {
        let why = match &st.last_error {
            Some(e) => format!("no shipper connected (last error: {e})"),
            None => "no shipper connected".into(),
        };
        raise(NAGIOS_WARNING, why, &mut code);
    } else if let Some(s) = st.seconds_since_primary_heard {
        if s >= o.stale_after.as_secs_f64() {
            raise(
                NAGIOS_WARNING,
                format!("no heartbeat from the shipper for {s:.1} s"),
                &mut code,
            );
        }
    }
    if let Some(w) = o.critical.reached(st.lag_bytes, st.lag_seconds) {
        raise(NAGIOS_CRITICAL, w, &mut code);
    } else if let Some(w) = o.warning.reached(st.lag_bytes, st.lag_seconds) {
        raise(NAGIOS_WARNING, w, &mut code);
    }
    if st.lag_bytes.is_none() {
        raise(
            NAGIOS_UNKNOWN,
            "primary flush position unknown".into(),
            &mut code,
        );
    }
    for e in &st.errors {
        raise(NAGIOS_UNKNOWN, e.clone(), &mut code);
    }
    let label = match code {
        NAGIOS_OK => "OK",
        NAGIOS_WARNING => "WARNING",
        NAGIOS_CRITICAL => "CRITICAL",
        _ => "UNKNOWN",
    };
    let summary = format!(
        "durable {}, lag {} bytes / {} s",
        opt(&st.durable_lsn),
        opt(&st.lag_bytes),
        st.lag_seconds
            .map_or("-".to_string(), |s| format!("{s:.1}")),
    );
    let t = |v: Option<u64>| v.map_or(String::new(), |v| v.to_string());
    let ts = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
    let mut perf = format!(
        "lag_bytes={};{};{};0; lag_seconds={};{};{};0;",
        st.lag_bytes.map_or("U".to_string(), |b| format!("{b}B")),
        t(o.warning.bytes),
        t(o.critical.bytes),
        st.lag_seconds
            .map_or("U".to_string(), |s| format!("{s:.3}s")),
        ts(o.warning.seconds),
        ts(o.critical.seconds),
    );
    if let Some(r) = st.replay_lag_bytes {
        perf.push_str(&format!(" replay_lag_bytes={r}B;;;0;"));
    }
    let head = if why.is_empty() {
        format!("receiver {}", st.receiver_state)
    } else {
        why.join("; ")
    };
    let line = format!("WALTAIL {label} - {head}; {summary} | {perf}").replace('\n', " ");
    (code, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streaming() -> Status {
        Status {
            spool: "/s".into(),
            receiver_running: true,
            receiver_pid: Some(1),
            receiver_state: ReceiverState::Streaming,
            connection: "connected".into(),
            peer: None,
            fenced: false,
            timeline: Some(TimelineId(1)),
            current_segment: None,
            primary_flush_lsn: Some(Lsn(100)),
            primary_flush_source: Some("primary".into()),
            shipped_lsn: Some(Lsn(100)),
            durable_lsn: Some(Lsn(100)),
            replay_lsn: None,
            lag_bytes: Some(0),
            lag_seconds: Some(0.0),
            replay_lag_bytes: None,
            seconds_since_primary_heard: Some(0.1),
            seconds_since_durable_advance: Some(0.1),
            seconds_since_status_update: Some(0.1),
            acks: 1,
            bytes_written: 1,
            last_error: None,
            errors: vec![],
        }
    }

    #[test]
    fn check_verdicts() {
        let o = CheckOptions {
            warning: "16MB,10s".parse().unwrap(),
            critical: "256MB,60s".parse().unwrap(),
            stale_after: Duration::from_secs(10),
        };
        let (code, line) = check(&streaming(), &o);
        assert_eq!(code, NAGIOS_OK, "{line}");
        assert!(
            line.starts_with("WALTAIL OK - receiver streaming;"),
            "{line}"
        );
        assert!(
            line.contains("| lag_bytes=0B;16777216;268435456;0; lag_seconds=0.000s;10;60;0;"),
            "{line}"
        );
        let mut s = streaming();
        s.lag_seconds = Some(11.0);
        s.lag_bytes = Some(5);
        assert_eq!(check(&s, &o).0, NAGIOS_WARNING);
        s.lag_bytes = Some(300 << 20);
        assert_eq!(check(&s, &o).0, NAGIOS_CRITICAL);
        let mut s = streaming();
        s.seconds_since_primary_heard = Some(30.0);
        assert_eq!(check(&s, &o).0, NAGIOS_WARNING);
        let mut s = streaming();
        s.connection = "disconnected".into();
        assert_eq!(check(&s, &o).0, NAGIOS_WARNING);
        let mut s = streaming();
        s.fenced = true;
        assert_eq!(check(&s, &o).0, NAGIOS_CRITICAL);
        let mut s = streaming();
        s.lag_bytes = None;
        s.lag_seconds = None;
        let (code, line) = check(&s, &o);
        assert_eq!(code, NAGIOS_UNKNOWN, "{line}");
        assert!(line.contains("lag_bytes=U;"), "{line}");
    }

    #[test]
    fn thresholds_parse() {
        let t: Threshold = "16MB,30s".parse().unwrap();
        assert_eq!(t.bytes, Some(16 << 20));
        assert_eq!(t.seconds, Some(30.0));
        let t: Threshold = "0".parse().unwrap();
        assert_eq!(t.bytes, Some(0));
        assert!("soon".parse::<Threshold>().is_err());
        assert!("".parse::<Threshold>().is_err());
    }
}
