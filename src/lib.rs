//! waltail: stream a PostgreSQL primary's live WAL to a standby in byte ranges.
//!
//! Modules, one concern each:
//! * [`wal`]: the WAL format (LSNs, names, pages, records, the scanner);
//! * [`inspect`]: `waltail inspect`, a report on one segment file;
//! * [`pg`]: running and talking to PostgreSQL servers;
//! * [`cli`]: command-line parsing and exit codes;
//! * [`config`]: the roles' TOML config files;
//! * [`status`]: `waltail status` and `waltail check`;
//! * [`metrics`]: the Prometheus metrics and their endpoint;
//! * [`access`]: ownership and permission checks that name the fix.
//! * [`serve`]: a walsender for the spool (`receive --serve`);
//! * [`failover`], [`switchover`], [`rejoin`], [`fence`]: the HA lifecycle.

pub mod access;
pub mod bench;
pub mod cli;
pub mod config;
pub mod demo;
pub mod failover;
pub mod fence;
pub mod fsio;
pub mod inspect;
pub mod load;
pub mod metrics;
pub mod pg;
pub mod proto;
pub mod receive;
pub mod rejoin;
pub mod restore;
pub mod serve;
pub mod ship;
pub mod spool;
pub mod standby;
pub mod status;
pub mod switchover;
pub mod wal;
