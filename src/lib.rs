//! waltail: stream a PostgreSQL primary's live WAL to a standby in byte ranges.
//!
//! Modules, one concern each:
//! * [`wal`]: the WAL format (LSNs, names, pages, records, the scanner);
//! * [`inspect`]: `waltail inspect`, a report on one segment file;
//! * [`pg`]: running and talking to PostgreSQL servers;
//! * [`cli`]: command-line parsing and exit codes.

pub mod bench;
pub mod cli;
pub mod demo;
pub mod failover;
pub mod fsio;
pub mod inspect;
pub mod load;
pub mod pg;
pub mod proto;
pub mod receive;
pub mod restore;
pub mod ship;
pub mod spool;
pub mod standby;
pub mod wal;
