//! Prometheus metrics of `ship` and `receive`, and the small HTTP endpoint
//! (`--metrics-addr`, GET /metrics; anything else is 404) that serves them.
//!
//! The metrics are process-wide atomics ([`ship`] and [`receive`]), always
//! there and cheap to bump whether or not an endpoint is served; [`serve`]
//! exposes one role's set in the text exposition format (prometheus-client).
//! Lag is measured the same way on both sides ([`LagClock`]): bytes from the
//! durable position on the standby host to the primary's flush position, and
//! seconds since the standby host last held everything the primary had
//! flushed (0 while it does).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::wal::Lsn;

/// Lag as bytes and seconds from (primary flush, durable) observations.
#[derive(Debug, Default)]
pub struct LagClock {
    caught_up: Option<Instant>,
    started: Option<Instant>,
}

impl LagClock {
    /// Records an observation; returns (lag bytes, lag seconds).
    pub fn observe(&mut self, flush: Lsn, durable: Option<Lsn>) -> (u64, f64) {
        let now = Instant::now();
        let started = *self.started.get_or_insert(now);
        let durable = durable.unwrap_or(Lsn(0));
        let bytes = flush.bytes_since(durable).unwrap_or(0);
        if bytes == 0 {
            self.caught_up = Some(now);
            return (0, 0.0);
        }
        let since = self.caught_up.unwrap_or(started);
        (bytes, now.duration_since(since).as_secs_f64())
    }
}

/// A gauge holding an LSN (as a number; PostgreSQL's `pg_lsn - '0/0'`).
fn set_lsn(g: &Gauge, l: Lsn) {
    g.set(l.0.min(i64::MAX as u64) as i64);
}

/// The shipper's metrics.
#[derive(Default)]
pub struct ShipMetrics {
    pub bytes_shipped: Counter,
    pub acks: Counter,
    pub reconnects: Counter,
    pub auth_failures: Counter,
    pub wakeups: Counter,
    pub polls: Counter,
    pub primary_flush_lsn: Gauge,
    pub shipped_lsn: Gauge,
    pub durable_lsn: Gauge,
    pub connected: Gauge,
    pub sync_connected: Gauge,
    pub lag_bytes: Gauge,
    pub lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub interval_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    lag: Mutex<LagClock>,
}

impl ShipMetrics {
    /// After a poll: the primary's flush, what was sent, what the receiver acked.
    pub fn observe(&self, flush: Lsn, shipped: Lsn, durable: Option<Lsn>) {
        set_lsn(&self.primary_flush_lsn, flush);
        set_lsn(&self.shipped_lsn, shipped);
        // Before the receiver has acked anything there is no lag to speak of.
        let Some(d) = durable else { return };
        set_lsn(&self.durable_lsn, d);
        let (b, s) = self
            .lag
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(flush, Some(d));
        self.lag_bytes.set(b.min(i64::MAX as u64) as i64);
        self.lag_seconds.set(s);
    }

    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("waltail_ship");
        r.register(
            "bytes_shipped",
            "WAL bytes sent to the receiver",
            self.bytes_shipped.clone(),
        );
        r.register(
            "acks",
            "durability acks received from the receiver",
            self.acks.clone(),
        );
        r.register(
            "reconnects",
            "times the receiver connection was lost and retried",
            self.reconnects.clone(),
        );
        r.register(
            "wakeups",
            "wake-ups of the shipper: writes into pg_wal's segments (inotify), or flushed WAL from the walsender (--wake walsender, --synchronous)",
            self.wakeups.clone(),
        );
        r.register(
            "polls",
            "flush positions asked of the primary",
            self.polls.clone(),
        );
        r.register(
            "auth_failures",
            "handshakes the receiver refused (authentication or refusal)",
            self.auth_failures.clone(),
        );
        r.register(
            "primary_flush_lsn",
            "the primary's flush LSN at the last poll (bytes since 0/0)",
            self.primary_flush_lsn.clone(),
        );
        r.register(
            "shipped_lsn",
            "end of what was sent (bytes since 0/0)",
            self.shipped_lsn.clone(),
        );
        r.register(
            "durable_lsn",
            "what the receiver acked as durable (bytes since 0/0)",
            self.durable_lsn.clone(),
        );
        r.register(
            "connected",
            "1 while streaming to the receiver",
            self.connected.clone(),
        );
        r.register(
            "sync_connected",
            "1 while synchronous mode's replication connection reports to the primary",
            self.sync_connected.clone(),
        );
        r.register(
            "lag_bytes",
            "bytes the primary flushed that are not durable on the standby host",
            self.lag_bytes.clone(),
        );
        r.register(
            "lag_seconds",
            "seconds since the standby host last held all the primary had flushed (0 when caught up)",
            self.lag_seconds.clone(),
        );
        r.register(
            "interval_seconds",
            "the poll interval in force",
            self.interval_seconds.clone(),
        );
    }
}

/// The receiver's metrics.
pub struct ReceiveMetrics {
    pub bytes_written: Counter,
    pub acks: Counter,
    pub connections: Counter,
    pub frames_rejected: Counter,
    pub auth_failures: Counter,
    pub fsync_seconds: Histogram,
    pub durable_lsn: Gauge,
    pub primary_flush_lsn: Gauge,
    pub connected: Gauge,
    pub lag_bytes: Gauge,
    pub lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    lag: Mutex<LagClock>,
    last_flush: Mutex<Option<Lsn>>,
}

impl Default for ReceiveMetrics {
    fn default() -> Self {
        ReceiveMetrics {
            bytes_written: Counter::default(),
            acks: Counter::default(),
            connections: Counter::default(),
            frames_rejected: Counter::default(),
            auth_failures: Counter::default(),
            fsync_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 9)),
            durable_lsn: Gauge::default(),
            primary_flush_lsn: Gauge::default(),
            connected: Gauge::default(),
            lag_bytes: Gauge::default(),
            lag_seconds: Gauge::default(),
            lag: Mutex::new(LagClock::default()),
            last_flush: Mutex::new(None),
        }
    }
}

impl ReceiveMetrics {
    /// A primary flush position heard from the shipper, or a new durable
    /// position; updates the lag.
    pub fn observe(&self, flush: Option<Lsn>, durable: Option<Lsn>) {
        let flush = {
            let mut f = self.last_flush.lock().unwrap_or_else(|p| p.into_inner());
            if flush.is_some() {
                *f = flush;
            }
            *f
        };
        if let Some(d) = durable {
            set_lsn(&self.durable_lsn, d);
        }
        let Some(flush) = flush else { return };
        set_lsn(&self.primary_flush_lsn, flush);
        let durable = durable.or_else(|| {
            let d = self.durable_lsn.get();
            (d > 0).then_some(Lsn(d as u64))
        });
        if durable.is_none() {
            return;
        }
        let (b, s) = self
            .lag
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(flush, durable);
        self.lag_bytes.set(b.min(i64::MAX as u64) as i64);
        self.lag_seconds.set(s);
    }

    /// Times one fsync of received WAL.
    pub fn time_fsync<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.fsync_seconds.observe(t.elapsed().as_secs_f64());
        r
    }

    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("waltail_receive");
        r.register(
            "bytes_written",
            "WAL bytes written into the spool",
            self.bytes_written.clone(),
        );
        r.register(
            "acks",
            "durability acks sent to the shipper",
            self.acks.clone(),
        );
        r.register(
            "connections",
            "connections accepted",
            self.connections.clone(),
        );
        r.register(
            "frames_rejected",
            "frames rejected as malformed or corrupt (nothing of them written)",
            self.frames_rejected.clone(),
        );
        r.register(
            "auth_failures",
            "peers that failed authentication",
            self.auth_failures.clone(),
        );
        r.register(
            "fsync_seconds",
            "time to make a batch of received WAL durable",
            self.fsync_seconds.clone(),
        );
        r.register(
            "durable_lsn",
            "durable position in the spool (bytes since 0/0)",
            self.durable_lsn.clone(),
        );
        r.register(
            "primary_flush_lsn",
            "the primary's flush LSN from the last heartbeat (bytes since 0/0)",
            self.primary_flush_lsn.clone(),
        );
        r.register(
            "connected",
            "1 while a shipper streams",
            self.connected.clone(),
        );
        r.register(
            "lag_bytes",
            "bytes the primary flushed that are not durable in the spool",
            self.lag_bytes.clone(),
        );
        r.register(
            "lag_seconds",
            "seconds since the spool last held all the primary had flushed (0 when caught up)",
            self.lag_seconds.clone(),
        );
    }
}

/// The shipper's metrics of this process.
pub fn ship() -> &'static ShipMetrics {
    static M: OnceLock<ShipMetrics> = OnceLock::new();
    M.get_or_init(ShipMetrics::default)
}

/// The receiver's metrics of this process.
pub fn receive() -> &'static ReceiveMetrics {
    static M: OnceLock<ReceiveMetrics> = OnceLock::new();
    M.get_or_init(ReceiveMetrics::default)
}

/// Which role's metrics an endpoint serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Ship,
    Receive,
}

/// The text exposition of one role's metrics.
pub fn render(role: Role) -> String {
    let mut r = Registry::default();
    match role {
        Role::Ship => ship().register(&mut r),
        Role::Receive => receive().register(&mut r),
    }
    let mut out = String::new();
    if encode(&mut out, &r).is_err() {
        out.clear();
    }
    out
}

/// Parses a `--metrics-addr` value.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("--metrics-addr {s:?} is not an address like 127.0.0.1:9187"))
}

/// Binds the endpoint and serves it in the background until the runtime stops.
pub async fn serve(addr: SocketAddr, role: Role) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    info!(addr = %local, "metrics on http://{local}/metrics");
    let role = Arc::new(role);
    tokio::spawn(async move {
        loop {
            let (sock, _) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let role = role.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let role = *role;
                    async move { Ok::<_, Infallible>(respond(&req, role)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc);
                let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            });
        }
    });
    Ok(local)
}

fn respond(req: &Request<Incoming>, role: Role) -> Response<Full<Bytes>> {
    let (status, ctype, body) =
        if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                render(role),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "not found: GET /metrics\n".to_string(),
            )
        };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_clock_is_zero_when_caught_up_and_grows_after() {
        let mut c = LagClock::default();
        assert_eq!(c.observe(Lsn(100), Some(Lsn(100))), (0, 0.0));
        std::thread::sleep(Duration::from_millis(20));
        let (b, s) = c.observe(Lsn(200), Some(Lsn(100)));
        assert_eq!(b, 100);
        assert!(s >= 0.019, "{s}");
    }

    #[test]
    fn rendering_names_the_metrics() {
        receive().bytes_written.inc_by(5);
        let t = render(Role::Receive);
        assert!(t.contains("waltail_receive_bytes_written_total"), "{t}");
        assert!(t.contains("waltail_receive_fsync_seconds_bucket"), "{t}");
        let t = render(Role::Ship);
        assert!(t.contains("waltail_ship_lag_seconds"), "{t}");
    }
}
