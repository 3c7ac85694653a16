//! The spool: the standby host's directory of shipped WAL, shared by
//! `receive` (writes it), `restore` and `cleanup` (read and prune it) and
//! `failover` (finalizes it).
//!
//! ```text
//! <spool>/spool.json        the cluster this spool belongs to (system identifier,
//!                           segment size, server version); written once, atomically
//! <spool>/position          durable position: 24 bytes, "WTPS" | tli u32 | lsn u64 |
//!                           reserved u32 | crc32 u32 (of the first 20), rewritten in place
//! <spool>/<SEGMENT>.partial the segment being received: full size from creation
//!                           (allocated and zero-filled), bytes written in place
//! <spool>/<SEGMENT>         a complete segment: renamed from .partial once its
//!                           last byte is durable; never half-written
//! <spool>/<TLI>.history     timeline history files, written atomically
//! <spool>/status.json       what the receiver is doing (for status, check, failover)
//! <spool>/FENCED            present after a failover began: no more data is taken
//! <spool>/failover.json     the failover's progress and report
//! <spool>/receiver.lock     flock held by the one receiver of this spool
//! <spool>/write.lock        flock: shared while a batch is written, exclusive to fence
//! <spool>/archived/<time>/  what `waltail spool reset` moved out of a fenced spool
//! ```
//!
//! Invariants:
//! - **Nothing is acked past the recorded position.** The receiver fsyncs the
//!   data, then writes and fsyncs `position`, and only then acks; so after a
//!   power loss the position file names at least every LSN ever acked, and
//!   the shipper (which advances the primary's slot to its acks) finds
//!   everything it may have let the primary recycle.
//! - Everything below the recorded position is in the spool and fsynced (the
//!   data is synced before the position that covers it).
//! - A file under a final segment name is complete.
//! - Files are created 0600 and the directory 0700.

pub mod reset;
pub mod writer;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsio::write_atomic;
use crate::wal::{Lsn, SegmentName, SegmentSize, TimelineId, WalFileName};

pub const META: &str = "spool.json";
pub const POSITION: &str = "position";
pub const STATUS: &str = "status.json";
pub const FENCED: &str = "FENCED";
pub const FAILOVER: &str = "failover.json";
pub const RECEIVER_LOCK: &str = "receiver.lock";
pub const WRITE_LOCK: &str = "write.lock";

/// The cluster a spool belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolMeta {
    /// As a string: JSON readers lose precision on 64-bit integers.
    pub system_identifier: String,
    pub segment_size: u64,
    pub pg_version: u32,
}

impl SpoolMeta {
    pub fn sysid(&self) -> Option<u64> {
        self.system_identifier.parse().ok()
    }
    pub fn seg_size(&self) -> Option<SegmentSize> {
        SegmentSize::new(self.segment_size)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {dir}: {what}")]
    Corrupt { dir: PathBuf, what: String },
    #[error("spool {dir}: {err}")]
    Io { dir: PathBuf, err: io::Error },
}

pub type Result<T> = std::result::Result<T, SpoolError>;

/// A spool directory.
#[derive(Clone, Debug)]
pub struct Spool {
    pub dir: PathBuf,
}

impl Spool {
    /// Opens (and creates, mode 0700) a spool directory.
    pub fn create(dir: &Path) -> Result<Spool> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|err| SpoolError::Io {
                dir: dir.to_path_buf(),
                err,
            })?;
        Ok(Spool {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens an existing spool directory.
    /// Opens an existing spool directory: it must exist, be a directory,
    /// and be readable by this user (the error says which of these failed,
    /// and for a permission, whose directory it is).
    pub fn open(dir: &Path) -> Result<Spool> {
        let fail = |err: io::Error| SpoolError::Io {
            dir: dir.to_path_buf(),
            err,
        };
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(fail(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a directory",
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(fail(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no such spool directory",
                )))
            }
            Err(e) => {
                return Err(fail(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot look at it ({e}): {} may not enter a directory above it",
                        crate::access::me()
                    ),
                )))
            }
        }
        if let Err(e) = fs::read_dir(dir) {
            return Err(fail(crate::access::explain(dir, e)));
        }
        Ok(Spool {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn io(&self, err: io::Error) -> SpoolError {
        SpoolError::Io {
            dir: self.dir.clone(),
            err,
        }
    }

    fn corrupt(&self, what: String) -> SpoolError {
        SpoolError::Corrupt {
            dir: self.dir.clone(),
            what,
        }
    }

    pub fn meta(&self) -> Result<Option<SpoolMeta>> {
        match fs::read(self.path(META)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| self.corrupt(format!("{META} is damaged: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_at(&self.path(META), e)),
        }
    }

    /// An I/O error on `path` in the spool, permission errors explained.
    pub fn io_at(&self, path: &Path, err: io::Error) -> SpoolError {
        self.io(crate::access::explain(path, err))
    }

    pub fn write_meta(&self, m: &SpoolMeta) -> Result<()> {
        let b = serde_json::to_vec_pretty(m).expect("meta serializes");
        write_atomic(&self.path(META), &b).map_err(|e| self.io(e))
    }

    /// The spool's segment size, from its metadata.
    pub fn seg_size(&self) -> Result<SegmentSize> {
        let m = self
            .meta()?
            .ok_or_else(|| self.corrupt(format!("no {META}: no WAL was ever received here")))?;
        m.seg_size()
            .ok_or_else(|| self.corrupt(format!("{META}: invalid segment size {}", m.segment_size)))
    }

    /// The durable position, if any WAL was received.
    pub fn position(&self) -> Result<Option<(TimelineId, Lsn)>> {
        let mut b = [0u8; 24];
        match File::open(self.path(POSITION)) {
            Ok(mut f) => match f.read_exact(&mut b) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(self.io_at(&self.path(POSITION), e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_at(&self.path(POSITION), e)),
        }
        let crc = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
        if &b[0..4] != b"WTPS" || crc32fast::hash(&b[..20]) != crc {
            return Err(self.corrupt(format!("{POSITION} is damaged (bad magic or checksum)")));
        }
        let tli = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let mut l = [0u8; 8];
        l.copy_from_slice(&b[8..16]);
        Ok(Some((TimelineId(tli), Lsn(u64::from_le_bytes(l)))))
    }

    /// Opens the position file for in-place updates.
    pub fn position_file(&self) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.path(POSITION))
            .map_err(|e| self.io(e))
    }

    /// Records the durable position (one 24-byte write at offset 0), and
    /// fdatasyncs it when `sync`: a position that is about to be acked must
    /// be synced, or a power loss can take it back below the ack.
    pub fn set_position(f: &File, tli: TimelineId, lsn: Lsn, sync: bool) -> io::Result<()> {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(b"WTPS");
        b[4..8].copy_from_slice(&tli.0.to_le_bytes());
        b[8..16].copy_from_slice(&lsn.0.to_le_bytes());
        let crc = crc32fast::hash(&b[..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        // Injected: a power loss drops this write unless it is synced (the
        // page cache never reaches the disk).
        fail::fail_point!("spool-position-unsynced-lost", !sync, |_| Ok(()));
        f.write_all_at(&b, 0)?;
        if sync {
            f.sync_data()?;
        }
        Ok(())
    }

    pub fn is_fenced(&self) -> bool {
        self.path(FENCED).exists()
    }

    pub fn segment_path(&self, seg: SegmentName, size: SegmentSize) -> PathBuf {
        self.path(&seg.file_name(size))
    }

    pub fn partial_path(&self, seg: SegmentName, size: SegmentSize) -> PathBuf {
        self.path(&format!("{}.partial", seg.file_name(size)))
    }

    /// Every WAL file in the spool whose name parses, with its name.
    pub fn wal_files(&self, size: SegmentSize) -> Result<Vec<(String, WalFileName)>> {
        let mut v = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(|e| self.io(e))? {
            let e = e.map_err(|e| self.io(e))?;
            let name = e.file_name().to_string_lossy().to_string();
            if let Ok(w) = WalFileName::parse(&name, size) {
                v.push((name, w));
            }
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    /// Reads a history file from the spool.
    pub fn history(&self, tli: TimelineId) -> Result<Option<Vec<u8>>> {
        match fs::read(self.path(&crate::wal::segment::history_file_name(tli))) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }

    pub fn write_history(&self, tli: TimelineId, content: &[u8]) -> Result<()> {
        write_atomic(
            &self.path(&crate::wal::segment::history_file_name(tli)),
            content,
        )
        .map_err(|e| self.io(e))
    }

    /// Gives a file the spool directory's owner when we run as root (a
    /// failover hook run as root must not leave files the server's
    /// restore_command cannot read).
    pub fn own(&self, path: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return Ok(());
        }
        let m = fs::metadata(&self.dir).map_err(|e| self.io(e))?;
        std::os::unix::fs::chown(path, Some(m.uid()), Some(m.gid())).map_err(|e| self.io(e))
    }

    /// Reads status.json (None if the receiver never wrote one, or it
    /// cannot be read: see [`Spool::read_status`] for why).
    pub fn status(&self) -> Option<ReceiverStatus> {
        self.read_status().ok().flatten()
    }

    /// Reads status.json: None if the receiver never wrote one; an error
    /// naming the file when it cannot be read or parsed.
    pub fn read_status(&self) -> Result<Option<ReceiverStatus>> {
        match fs::read(self.path(STATUS)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| self.corrupt(format!("{STATUS} is damaged: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_at(&self.path(STATUS), e)),
        }
    }

    /// Writes status.json atomically, without fsync (it is advisory).
    pub fn write_status(&self, s: &ReceiverStatus) -> io::Result<()> {
        let b = serde_json::to_vec_pretty(s).expect("status serializes");
        crate::fsio::replace_file(&self.path(STATUS), &b, false)
    }

    /// Takes the spool's write lock: shared for a batch of writes, exclusive to fence.
    pub fn write_lock(&self, exclusive: bool) -> Result<nix::fcntl::Flock<File>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.path(WRITE_LOCK))
            .map_err(|e| self.io(e))?;
        let arg = if exclusive {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockShared
        };
        self.own(&self.path(WRITE_LOCK))?;
        nix::fcntl::Flock::lock(f, arg).map_err(|(_, e)| self.io(io::Error::from(e)))
    }
}

/// What the receiver is doing, as status.json and `status` say it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiverState {
    /// Listening, no shipper connected.
    #[default]
    Waiting,
    /// A shipper is streaming into the spool.
    Streaming,
    /// A failover finalized the spool; it takes no more WAL.
    Fenced,
    /// The receiver shut down cleanly.
    Stopped,
    /// No receiver holds the spool's lock (only `status` says this).
    #[serde(rename = "not running")]
    NotRunning,
}

impl std::fmt::Display for ReceiverState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReceiverState::Waiting => "waiting",
            ReceiverState::Streaming => "streaming",
            ReceiverState::Fenced => "fenced",
            ReceiverState::Stopped => "stopped",
            ReceiverState::NotRunning => "not running",
        })
    }
}

/// What the receiver last said about itself (status.json).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ReceiverStatus {
    pub pid: u32,
    pub listen: String,
    pub state: ReceiverState,
    pub peer: Option<String>,
    pub timeline: Option<TimelineId>,
    pub durable_lsn: Option<Lsn>,
    pub written_lsn: Option<Lsn>,
    pub primary_flush_lsn: Option<Lsn>,
    /// Unix ms of the last heartbeat or data from a live primary.
    pub primary_seen_at_ms: Option<u64>,
    pub current_segment: Option<String>,
    pub last_error: Option<String>,
    pub bytes_written: u64,
    pub updated_at_ms: u64,
    /// Unix ms the receiver started.
    pub started_at_ms: u64,
    /// Unix ms the durable position last advanced.
    pub durable_at_ms: Option<u64>,
    /// Unix ms the spool last held, durably, everything the primary had
    /// flushed (as its shipper last reported): the base of lag in seconds.
    pub caught_up_at_ms: Option<u64>,
    /// Durability acks sent, and connections accepted, since the start.
    pub acks: u64,
    pub connections: u64,
}

impl ReceiverStatus {
    /// Notes a durable position and the primary flush it is measured
    /// against, at `now` (unix ms).
    pub fn note_durable(&mut self, durable: Option<Lsn>, now: u64) {
        if durable.is_some() && durable != self.durable_lsn {
            self.durable_lsn = durable;
            self.durable_at_ms = Some(now);
        }
        if let (Some(d), Some(f)) = (self.durable_lsn, self.primary_flush_lsn) {
            if d >= f {
                self.caught_up_at_ms = Some(now);
            }
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_states_keep_their_json_names() {
        for (state, json) in [
            (ReceiverState::Waiting, "\"waiting\""),
            (ReceiverState::Streaming, "\"streaming\""),
            (ReceiverState::Fenced, "\"fenced\""),
            (ReceiverState::Stopped, "\"stopped\""),
            (ReceiverState::NotRunning, "\"not running\""),
        ] {
            assert_eq!(serde_json::to_string(&state).unwrap(), json);
            assert_eq!(format!("\"{state}\""), json);
            assert_eq!(serde_json::from_str::<ReceiverState>(json).unwrap(), state);
        }
        // A misspelt state is an unreadable status.json, never another state.
        let s: ReceiverStatus =
            serde_json::from_str(r#"{"pid": 7, "state": "streaming"}"#).unwrap();
        assert_eq!(s.state, ReceiverState::Streaming);
        assert!(serde_json::from_str::<ReceiverStatus>(r#"{"state": "streamin"}"#).is_err());
    }
}
