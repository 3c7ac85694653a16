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
