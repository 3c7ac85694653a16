//! Running and talking to PostgreSQL servers.
//!
//! * [`bin`]: finding the server binaries of an installed PostgreSQL;
//! * [`cluster`]: throwaway clusters (initdb, start, stop, kill, base backups)
//!   on free loopback ports, used by `waltail demo`, `waltail bench` and the tests;
//! * [`backup`]: base backups by copying the data directory (same host);
//! * [`control`]: the control file and `postmaster.pid`, read without the server;
//! * [`replication`]: a physical replication connection, the client's side.

pub mod backup;
pub mod bin;
pub mod client;
pub mod cluster;
pub mod control;
pub mod process;
pub mod replication;

pub use bin::PgBin;
pub use cluster::{Cluster, ClusterOptions};
