//! The waltail wire protocol between `ship` and `receive`.
//!
//! A TCP connection (optionally TLS) carries checksummed frames
//! ([`frame`] documents the layout of each). A session goes:
//!
//! 1. **Authentication** ([`auth`]): ClientHello → ServerChallenge →
//!    ClientProof, an HMAC-SHA256 challenge-response over a shared secret.
//! 2. **Hello**: the shipper names the cluster (system identifier, timeline,
//!    segment size, server version, flush LSN). The receiver checks it against
//!    the spool and answers Welcome with the position it holds durably (or
//!    Refuse with a [`RefuseCode`] and a reason: another cluster, fenced by a
//!    failover, busy). Peers act on the code, never on the reason's words.
//! 3. **Streaming**: the shipper sends History (a new timeline's history file,
//!    before any data of that timeline), Data (timeline, start LSN, bytes; each
//!    starts exactly where the previous ended) and Heartbeat (the primary's
//!    flush LSN and the time); the receiver answers Ack with what is durable.
//!
//! Any frame that is too big, fails its checksum, has an unknown type or a
//! malformed payload closes the connection with a logged reason; nothing of
//! it is written. The shipper then reconnects and resumes at the durable
//! position.

pub mod auth;
pub mod conn;
pub mod frame;
pub mod tls;

pub use auth::Secret;
pub use conn::{BoxIo, FrameReader, FrameWriter, ProtoError};
pub use frame::{Frame, Hello, RefuseCode, MAX_DATA, MAX_FRAME};

/// The host of a `HOST:PORT` address (`[v6]:PORT` for IPv6), or why the
/// address given to `flag` cannot work.
pub fn host_of<'a>(addr: &'a str, flag: &str) -> Result<&'a str, String> {
    let bad = |why: &str| format!("{flag} {addr:?}: {why} (expected HOST:PORT, or [IPv6]:PORT)");
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']').ok_or_else(|| bad("unclosed ["))?,
        None if host.contains(':') => return Err(bad("an IPv6 address needs brackets")),
        None => host,
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    match port.parse::<u16>() {
        Ok(_) => Ok(host),
        Err(_) => Err(bad(&format!("{port:?} is not a port"))),
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn addresses_need_a_host_and_a_port() {
        assert_eq!(host_of("standby:5433", "--receiver"), Ok("standby"));
        assert_eq!(host_of("[::1]:5433", "--receiver"), Ok("::1"));
        assert_eq!(host_of("0.0.0.0:0", "--listen"), Ok("0.0.0.0"));
        for bad in [
            "standby",
            "::1:5433",
            ":5433",
            "standby:",
            "standby:65536",
            "[::1:5433",
        ] {
            let e = host_of(bad, "--receiver").unwrap_err();
            assert!(
                e.starts_with("--receiver") && e.contains("HOST:PORT"),
                "{bad}: {e}"
            );
        }
    }
}
