//! The standby's side of the spool: `waltail restore %f %p` (restore_command)
//! and `waltail cleanup %r` (archive_cleanup_command).
//!
//! Two styles, matching the two ways PostgreSQL 12+ runs recovery:
//!
//! * **standby.signal** (default): restore answers at once. A complete
//!   segment is served as is; the segment still being received is served from
//!   its `.partial`, full size and zero-padded past what has arrived. Recovery
//!   replays up to the last complete record, finds zeros, and asks again after
//!   `wal_retrieve_retry_interval`, so hot-standby queries see commits within
//!   about that interval instead of after a whole segment.
//! * **recovery.signal** (`--wait`, pg_standby's semantics): restore waits
//!   until the requested segment is complete in the spool. A failover ends the
//!   wait: then every complete segment (the finalized last one included) is
//!   served and anything else is "not found", so recovery ends exactly at the
//!   last valid record and the server promotes itself.
//!
//! `.history` and `.backup` requests never wait. `%f` must be a WAL file name
//! (segment, `.partial`, `.history`, `.backup`): no `/`, no `..`, nothing
//! absolute.
//!
//! **"Not found" only when sure.** In the recovery.signal style a "not
//! found" ends recovery and promotes the server, so restore answers it only
//! when the spool is readable and healthy (directory, `spool.json`,
//! `position`, `failover.json` all read and parse) and a failover has
//! finished. Any error (the spool missing, unreadable for the server's user,
//! damaged; a segment that cannot be read) is not an answer: restore keeps
//! waiting, says why on stderr (which PostgreSQL puts in its log) once every
//! few seconds, and goes on by itself once the spool is fixed. In the
//! standby.signal style a failed restore_command never ends recovery
//! (PostgreSQL asks again), so after a few seconds of errors restore exits 1
//! with the reason, instead of holding up the startup process.
//!
//! Exit codes: 0 restored; 1 not found (or, standby.signal style, the spool
//! is broken right now: asked again later); 2 bad arguments (standby.signal
//! style); 126 bad arguments with `--wait`: waiting cannot cure them, and
//! PostgreSQL takes 126 as fatal, so recovery stops without promoting
//! (exit 2 would be "not found" there). Never 127 or a signal.
//!
//! Files reach `%p` through a temporary file in the same directory and a rename.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::spool::{Spool, FAILOVER};
use crate::wal::{SegmentName, SegmentSize, WalFileName};

pub const EXIT_RESTORED: u8 = 0;
pub const EXIT_NOT_FOUND: u8 = 1;
pub const EXIT_BAD_ARGS: u8 = 2;
/// Bad arguments with `--wait`: PostgreSQL stops recovery (FATAL) rather
/// than taking a "not found" and promoting.
pub const EXIT_FATAL: u8 = 126;

/// How long the standby.signal style keeps trying a spool it cannot read
/// before it exits 1 (PostgreSQL asks again after wal_retrieve_retry_interval).
const STANDBY_STYLE_PATIENCE: Duration = Duration::from_secs(5);
/// How often the reason for waiting is repeated on stderr.
const COMPLAIN_EVERY: Duration = Duration::from_secs(5);

/// Longest file name PostgreSQL asks for (`<segment>.XXXXXXXX.backup`).
const MAX_NAME: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0}")]
    BadArgs(String),
    #[error("{0}")]
    Io(String),
}

/// Checks `%f`: a bare WAL file name, nothing that could point elsewhere.
pub fn validate_name(f: &str, seg_size: SegmentSize) -> Result<WalFileName, RestoreError> {
    if f.is_empty()
        || f.len() > MAX_NAME
        || f.contains('/')
        || f.contains('\0')
        || f.contains("..")
        || f.starts_with('.')
    {
        return Err(RestoreError::BadArgs(format!(
            "refusing file name {:?}: restore takes a bare WAL file name (segment, .partial, .history or .backup)",
            f.chars().take(80).collect::<String>()
        )));
    }
    WalFileName::parse(f, seg_size).map_err(|e| RestoreError::BadArgs(e.to_string()))
}

/// What to do for one request.
#[derive(Clone, Debug)]
pub struct RestoreRequest {
    pub file: String,
    pub dest: PathBuf,
    pub spool: PathBuf,
    /// recovery.signal style: wait for complete segments until a failover.
    pub wait: bool,
    /// stream style: serve complete segments only (the stream serves the
    /// growing one), never the zero-padded `.partial`.
    pub no_partial: bool,
    pub poll: Duration,
    /// Give up waiting after this long (None: until a failover).
    pub max_wait: Option<Duration>,
}

/// Serves one restore request; returns the exit code. An `Err(Io)` comes
/// back only in the standby.signal style, after [`STANDBY_STYLE_PATIENCE`]
/// of errors: with `--wait` errors are waited out (see the module header).
pub fn restore(req: &RestoreRequest) -> Result<u8, RestoreError> {
    if req.dest.as_os_str().is_empty() {
        return Err(RestoreError::BadArgs(
            "the destination (%p) is empty".into(),
        ));
    }
    let started = Instant::now();
    let deadline = req.max_wait.map(|d| started + d);
    let mut said: Option<(Instant, String)> = None;
    loop {
        match attempt(req, deadline) {
            Err(RestoreError::Io(why)) => {
                if !req.wait && started.elapsed() >= STANDBY_STYLE_PATIENCE {
                    return Err(RestoreError::Io(why));
                }
                let repeat = said
                    .as_ref()
                    .is_none_or(|(at, w)| *w != why || at.elapsed() >= COMPLAIN_EVERY);
                if repeat {
                    eprintln!(
                        "waltail restore {}: {why}; waiting until that is fixed (recovery goes on, nothing is promoted)",
                        req.file
                    );
                    said = Some((Instant::now(), why));
                }
                std::thread::sleep(
                    req.poll
                        .clamp(Duration::from_millis(10), Duration::from_secs(1)),
                );
            }
            other => return other,
        }
    }
}

/// The spool's segment size, once the spool is known to be readable and
/// whole: its directory lists, and `spool.json` and `position` parse.
fn healthy(spool_dir: &Path) -> Result<(Spool, SegmentSize), RestoreError> {
    let io = |e: crate::spool::SpoolError| RestoreError::Io(e.to_string());
    let spool = Spool::open(spool_dir).map_err(io)?;
    let seg_size = match spool.meta().map_err(io)? {
        Some(m) => m.seg_size().ok_or_else(|| {
            RestoreError::Io(format!(
                "spool {}: {} has an invalid segment size {}",
                spool.dir.display(),
                crate::spool::META,
                m.segment_size
            ))
        })?,
        // Nothing received yet: every segment is simply not there yet.
        None => SegmentSize::DEFAULT,
    };
    spool.position().map_err(io)?;
    Ok((spool, seg_size))
}

/// Whether a failover has finished publishing (its report reads).
fn failover_published(spool: &Spool) -> Result<bool, RestoreError> {
    match fs::read(spool.path(FAILOVER)) {
        Ok(b) => serde_json::from_slice::<crate::failover::FailoverReport>(&b)
            .map(|_| true)
            .map_err(|e| {
                RestoreError::Io(format!(
                    "spool {}: {FAILOVER} is damaged ({e})",
                    spool.dir.display()
                ))
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(RestoreError::Io(format!(
            "cannot read {}: {e}",
            spool.path(FAILOVER).display()
        ))),
    }
}

/// One try at serving the request.
fn attempt(req: &RestoreRequest, deadline: Option<Instant>) -> Result<u8, RestoreError> {
    let (spool, seg_size) = healthy(&req.spool)?;
    let name = validate_name(&req.file, seg_size)?;
    let src = spool.path(&req.file);
    match name {
        WalFileName::History(_) | WalFileName::Backup { .. } | WalFileName::Partial(_) => {
            if src.is_file() {
                copy_atomic(&src, &req.dest, None)?;
                return Ok(EXIT_RESTORED);
            }
            Ok(EXIT_NOT_FOUND)
        }
        WalFileName::Segment(seg) => loop {
            if src.is_file() {
                copy_atomic(&src, &req.dest, None)?;
                return Ok(EXIT_RESTORED);
            }
            if !req.wait && req.no_partial {
                return Ok(EXIT_NOT_FOUND);
            }
            if !req.wait {
                return serve_partial(&spool, seg, seg_size, &req.dest);
            }
            if failover_published(&spool)? {
                // The failover published the last segment; a file that is
                // not there now never will be: recovery ends here.
                return Ok(if src.is_file() {
                    copy_atomic(&src, &req.dest, None)?;
                    EXIT_RESTORED
                } else {
                    EXIT_NOT_FOUND
                });
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                return Ok(EXIT_NOT_FOUND);
            }
            std::thread::sleep(req.poll);
            // Whatever broke since the last look is an error, not an answer.
            healthy(&req.spool)?;
        },
    }
}

/// standby.signal style: the segment being received, zero-padded to full size.
fn serve_partial(
    spool: &Spool,
    seg: SegmentName,
    seg_size: SegmentSize,
    dest: &Path,
) -> Result<u8, RestoreError> {
    if spool.is_fenced() && !spool.path(FAILOVER).exists() {
        // A failover is cutting the last segment: serve nothing half-decided.
        return Ok(EXIT_NOT_FOUND);
    }
    let p = spool.partial_path(seg, seg_size);
    if !p.is_file() {
        return Ok(EXIT_NOT_FOUND);
    }
    // Only the bytes that have arrived need copying: the rest is zeros.
    let limit = match spool.position() {
        Ok(Some((tli, lsn))) if tli == seg.tli && lsn.segment_number(seg_size) == seg.segno => {
            Some(lsn.segment_offset(seg_size))
        }
        _ => None,
    };
    copy_atomic(&p, dest, limit.map(|l| (l, seg_size.bytes())))?;
    Ok(EXIT_RESTORED)
}

/// Copies `src` to `dest` through a temporary file and a rename. With
/// `prefix = Some((n, size))` only the first `n` bytes are copied and the
/// file is extended with zeros to `size`.
fn copy_atomic(src: &Path, dest: &Path, prefix: Option<(u64, u64)>) -> Result<(), RestoreError> {
    let io = |what: &str, p: &Path, e: io::Error| {
        let e = crate::access::explain(p, e);
        RestoreError::Io(format!("{what} {}: {e}", p.display()))
    };
    let dir = dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.waltail-tmp",
        dest.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    ));
    let r = (|| {
        let mut from = File::open(src).map_err(|e| io("cannot open", src, e))?;
        let mut to = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io("cannot create", &tmp, e))?;
        match prefix {
            None => {
                io::copy(&mut from, &mut to).map_err(|e| io("cannot copy to", &tmp, e))?;
            }
            Some((n, size)) => {
                // Constant memory at any segment size (copy_file_range
                // where the kernel has it).
                let copied = io::copy(&mut (&mut from).take(n), &mut to)
                    .map_err(|e| io("cannot copy to", &tmp, e))?;
                if copied != n {
                    return Err(io(
                        "cannot read",
                        src,
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{copied} of {n} bytes"),
                        ),
                    ));
                }
                to.set_len(size).map_err(|e| io("cannot size", &tmp, e))?;
                // Make sure the length is real on file systems that care.
                if size > n {
                    to.write_all_at(&[0], size - 1)
                        .map_err(|e| io("cannot write", &tmp, e))?;
                }
            }
        }
        fs::rename(&tmp, dest).map_err(|e| io("cannot rename into", dest, e))
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// `waltail cleanup %r`: removes spooled segments older than `%r` (on every
/// timeline, as pg_archivecleanup does), never history files, and never the
/// segment the receiver is writing. Returns the names removed.
pub fn cleanup(
    spool_dir: &Path,
    oldest_kept: &str,
    dry_run: bool,
) -> Result<Vec<String>, RestoreError> {
    let spool = Spool::open(spool_dir).map_err(|e| RestoreError::Io(e.to_string()))?;
    let seg_size = spool
        .meta()
        .map_err(|e| RestoreError::Io(e.to_string()))?
        .and_then(|m| m.seg_size())
        .unwrap_or(SegmentSize::DEFAULT);
    let keep = match validate_name(oldest_kept, seg_size)? {
        WalFileName::Segment(s) | WalFileName::Partial(s) => s,
        WalFileName::Backup { segment, .. } => segment,
        WalFileName::History(_) => {
            return Err(RestoreError::BadArgs(format!(
                "{oldest_kept:?} is a history file, not a segment"
            )))
        }
    };
    let receiving = spool
        .position()
        .ok()
        .flatten()
        .map(|(tli, lsn)| SegmentName::of_lsn(tli, lsn, seg_size));
    let mut removed = Vec::new();
    for (name, w) in spool
        .wal_files(seg_size)
        .map_err(|e| RestoreError::Io(e.to_string()))?
    {
        let seg = match w {
            WalFileName::Segment(s) | WalFileName::Partial(s) => s,
            WalFileName::Backup { segment, .. } => segment,
            WalFileName::History(_) => continue,
        };
        if seg.segno >= keep.segno || Some(seg) == receiving {
            continue;
        }
        if !dry_run {
            fs::remove_file(spool.path(&name))
                .map_err(|e| RestoreError::Io(format!("cannot remove {name}: {e}")))?;
        }
        removed.push(name);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused() {
        let s = SegmentSize::DEFAULT;
        for bad in [
            "../../etc/passwd",
            "/etc/passwd",
            "000000010000000000000001/../x",
            "..",
            ".000000010000000000000001",
            "00000001000000000000000100000001000000000000000100000001",
            "RECOVERYHISTORY",
            "",
            "000000010000000000000001\0",
        ] {
            assert!(
                matches!(validate_name(bad, s), Err(RestoreError::BadArgs(_))),
                "{bad:?}"
            );
        }
        for good in [
            "000000010000000000000001",
            "00000002.history",
            "000000010000000000000001.partial",
            "000000010000000000000001.00000028.backup",
        ] {
            assert!(validate_name(good, s).is_ok(), "{good}");
        }
    }
}
