//! `waltail spool reset`: after a failover, make the spool ready for the
//! next primary (the promoted standby, when the roles swap back) without
//! losing what it held.
//!
//! A fenced spool takes no more WAL, ever. Reset moves every file of it
//! (segments, partials, history files, `spool.json`, `position`, `FENCED`,
//! `failover.json`, `status.json`) into `archived/<UTC time>/` inside the
//! spool directory (the same file system, so each move is a rename), fsyncs
//! both directories, and leaves the spool empty, with its owner and mode: the
//! next receiver starts it afresh for whichever cluster ships to it. The
//! archived WAL stays there for `pg_rewind` or an investigation, and no
//! command deletes it. Only a fenced spool with no receiver running is
//! reset; anything else is refused with nothing moved.

use std::fs;
use std::path::PathBuf;

use serde::Serialize;

use super::{Result, Spool, SpoolError, RECEIVER_LOCK, WRITE_LOCK};
use crate::fsio::fsync_dir;

/// The directory, inside the spool, that resets archive into.
pub const ARCHIVED: &str = "archived";

/// What a reset did.
#[derive(Clone, Debug, Serialize)]
pub struct ResetReport {
    pub spool: PathBuf,
    /// Where the old spool's files are now.
    pub archived_to: PathBuf,
    pub files_moved: usize,
}

impl Spool {
    /// Resets a fenced spool (see the module header).
    pub fn reset(&self) -> Result<ResetReport> {
        let refuse = |what: String| SpoolError::Corrupt {
            dir: self.dir.clone(),
            what,
        };
        if !self.is_fenced() {
            return Err(refuse(
                "not fenced: only a spool a failover finalized is reset (this one may hold a live primary's WAL); nothing was moved".into(),
            ));
        }
        // No receiver may run on it meanwhile: take its lock ourselves.
        let lock_file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path(RECEIVER_LOCK))
            .map_err(|e| self.io_at(&self.path(RECEIVER_LOCK), e))?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| {
                refuse(format!(
                    "a receiver is running on it{}: stop it first; nothing was moved",
                    self.status()
                        .map(|s| format!(" (pid {})", s.pid))
                        .unwrap_or_default()
                ))
            })?;
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let archived = self.path(ARCHIVED).join(&stamp);
        fs::DirBuilder::new()
            .recursive(true)
            .create(&archived)
            .map_err(|e| self.io_at(&archived, e))?;
        for d in [self.path(ARCHIVED), archived.clone()] {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700))
                .map_err(|e| self.io_at(&d, e))?;
            self.own(&d)?;
        }
        let mut moved = 0;
        let mut names: Vec<String> = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(|e| self.io(e))? {
            let e = e.map_err(|e| self.io(e))?;
            let name = e.file_name().to_string_lossy().to_string();
            if name == ARCHIVED || name == RECEIVER_LOCK || name == WRITE_LOCK {
                continue;
            }
            names.push(name);
        }
        // FENCED goes last: until the spool is empty it stays refused.
        names.sort_by_key(|n| n == super::FENCED);
        for name in names {
            fs::rename(self.path(&name), archived.join(&name))
                .map_err(|e| self.io_at(&self.path(&name), e))?;
            moved += 1;
        }
        fsync_dir(&archived).map_err(|e| self.io(e))?;
        fsync_dir(&self.dir).map_err(|e| self.io(e))?;
        Ok(ResetReport {
            spool: self.dir.clone(),
            archived_to: archived,
            files_moved: moved,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_fenced_spool_is_reset_and_nothing_is_lost() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::create(&d.path().join("s")).unwrap();
        fs::write(sp.path("000000010000000000000001"), b"wal").unwrap();
        fs::write(sp.path("spool.json"), b"{}").unwrap();
        let e = sp.reset().unwrap_err().to_string();
        assert!(e.contains("not fenced"), "{e}");
        assert!(sp.path("000000010000000000000001").exists());
        fs::write(sp.path(super::super::FENCED), b"x").unwrap();
        let r = sp.reset().unwrap();
        assert_eq!(r.files_moved, 3);
        assert!(!sp.is_fenced());
        assert_eq!(
            fs::read(r.archived_to.join("000000010000000000000001")).unwrap(),
            b"wal"
        );
        assert!(sp.meta().unwrap().is_none() && sp.position().unwrap().is_none());
    }
}
