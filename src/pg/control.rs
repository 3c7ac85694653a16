//! What a data directory says about its server without asking it: the
//! control file (`global/pg_control`) and the postmaster's lock file
//! (`postmaster.pid`).
//!
//! The shipper reads them once its connection to the primary broke, to tell
//! a clean shutdown (whose last record, the shutdown checkpoint, is flushed
//! and can be shipped) from a crash or a passing network fault; rejoin reads
//! them to tell whether an old primary stopped cleanly before the standby's
//! promotion, which makes a rewind unnecessary. Neither needs pg_controldata
//! of the server's major.
//!
//! Layout (`ControlFileData` in `pg_control.h`, the same from PostgreSQL 13
//! to 18 for the fields read here): system identifier at 0, version at 8,
//! state at 16, the latest checkpoint's location at 32, its redo at 40 and
//! timeline at 48. The CRC-32C that ends the struct sits at an offset that
//! changes between majors; the reader accepts the file only when the CRC of
//! some prefix matches the four bytes after it, so a torn or foreign file is
//! an error, never a guess.

use std::path::Path;

use crate::wal::{Lsn, TimelineId};

/// `DBState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbState {
    Startup,
    /// Stopped cleanly: the latest checkpoint is a shutdown checkpoint and
    /// nothing follows it.
    ShutDown,
    ShutDownInRecovery,
    /// Writing the shutdown checkpoint.
    ShuttingDown,
    InCrashRecovery,
    InArchiveRecovery,
    InProduction,
    Unknown(u32),
}

impl DbState {
    fn from_raw(v: u32) -> DbState {
        match v {
            0 => DbState::Startup,
            1 => DbState::ShutDown,
            2 => DbState::ShutDownInRecovery,
            3 => DbState::ShuttingDown,
            4 => DbState::InCrashRecovery,
            5 => DbState::InArchiveRecovery,
            6 => DbState::InProduction,
            n => DbState::Unknown(n),
        }
    }
}

/// The fields of the control file waltail uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlFile {
    pub sysid: u64,
    pub version: u32,
    pub state: DbState,
    /// Where the latest checkpoint record starts.
    pub checkpoint: Lsn,
    pub redo: Lsn,
    /// The latest checkpoint's timeline.
    pub tli: TimelineId,
}

const MIN_LEN: usize = 56;

/// Parses the control file's bytes.
pub fn parse(b: &[u8]) -> Result<ControlFile, String> {
    if b.len() < MIN_LEN {
        return Err(format!("{} bytes, too short for a control file", b.len()));
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    if !(1300..=2000).contains(&version) {
        return Err(format!(
            "pg_control_version {version} is not one of PostgreSQL 13 to 18"
        ));
    }
    let limit = b.len().min(1024);
    let crc_ok = (MIN_LEN..limit.saturating_sub(3))
        .step_by(4)
        .any(|o| crc32c::crc32c(&b[..o]) == u32_at(o));
    if !crc_ok {
        return Err("its CRC does not match (torn or not a control file)".into());
    }
    Ok(ControlFile {
        sysid: u64_at(0),
        version,
        state: DbState::from_raw(u32_at(16)),
        checkpoint: Lsn(u64_at(32)),
        redo: Lsn(u64_at(40)),
        tli: TimelineId(u32_at(48)),
    })
}

/// Reads `<pgdata>/global/pg_control`.
pub fn read(pgdata: &Path) -> Result<ControlFile, String> {
    let p = pgdata.join("global").join("pg_control");
    let b = std::fs::read(&p).map_err(|e| format!("reading {}: {e}", p.display()))?;
    parse(&b).map_err(|e| format!("{}: {e}", p.display()))
}

/// What `postmaster.pid` says of the running server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostmasterStatus {
    /// No lock file: no server runs here.
    Gone,
    Starting,
    /// Shutdown was requested: the shutdown checkpoint is still to come.
    Stopping,
    Ready,
    Standby,
    /// A lock file without a status line (yet), or one not known.
    Other,
}

/// Reads line 8 of `<pgdata>/postmaster.pid`.
pub fn postmaster_status(pgdata: &Path) -> PostmasterStatus {
    let Ok(text) = std::fs::read_to_string(pgdata.join("postmaster.pid")) else {
        return PostmasterStatus::Gone;
    };
    match text.lines().nth(7).map(str::trim) {
        Some("starting") => PostmasterStatus::Starting,
        Some("stopping") => PostmasterStatus::Stopping,
        Some("ready") => PostmasterStatus::Ready,
        Some("standby") => PostmasterStatus::Standby,
        _ => PostmasterStatus::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(state: u32, crc_at: usize) -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        b[0..8].copy_from_slice(&7_000_000_000_000_000_001u64.to_le_bytes());
        b[8..12].copy_from_slice(&1300u32.to_le_bytes());
        b[16..20].copy_from_slice(&state.to_le_bytes());
        b[32..40].copy_from_slice(&0x1_6D8A8u64.to_le_bytes());
        b[40..48].copy_from_slice(&0x1_6D8A8u64.to_le_bytes());
        b[48..52].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..crc_at]);
        b[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn a_control_file_of_any_layout_parses_when_its_crc_matches() {
        for at in [248, 264, 296] {
            let c = parse(&file(1, at)).unwrap();
            assert_eq!(c.state, DbState::ShutDown);
            assert_eq!(c.checkpoint, Lsn(0x1_6D8A8));
            assert_eq!(c.tli, TimelineId(3));
            assert_eq!(c.sysid, 7_000_000_000_000_000_001);
        }
        assert_eq!(parse(&file(6, 264)).unwrap().state, DbState::InProduction);
    }

    #[test]
    fn a_torn_or_foreign_control_file_is_an_error_not_a_guess() {
        let mut b = file(1, 264);
        b[33] ^= 1;
        assert!(parse(&b).unwrap_err().contains("CRC"));
        assert!(parse(&b[..20]).unwrap_err().contains("too short"));
        let mut v = file(1, 264);
        v[8..12].copy_from_slice(&942u32.to_le_bytes());
        assert!(parse(&v).unwrap_err().contains("version"));
    }
}
