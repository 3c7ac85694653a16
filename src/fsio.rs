//! File I/O that must be right: memory maps and crash-safe writes.
//!
//! * [`map_readonly`] and [`release_pages`] hold the crate's only `unsafe`:
//!   a read-only memory map and dropping its pages.
//! * [`write_atomic`] and [`fsync_dir`] are the one durable-write path: data
//!   goes to a temporary name in the target directory, is fsynced, renamed
//!   over the final name, and the directory is fsynced, so a reader sees the
//!   old file or the whole new one, never a half-written one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use memmap2::Mmap;

/// Maps `file` read-only.
///
/// # Safety (contained)
/// A map is undefined behaviour if the file is truncated while mapped. WAL
/// segment files are never truncated by PostgreSQL (they are pre-allocated,
/// overwritten in place, renamed when recycled and unlinked when removed, none
/// of which changes what an existing map sees), and spool files are only
/// written by waltail at full size. Callers read the map as plain bytes and
/// validate everything in it.
pub fn map_readonly(file: &File) -> io::Result<Mmap> {
    // SAFETY: see the function's doc comment: the files mapped here are not
    // truncated while mapped, and every byte read from the map is validated.
    unsafe { Mmap::map(file) }
}

/// Tells the kernel this process no longer needs the mapped pages of
/// `[offset, offset + len)` (rounded inward to whole pages), so a long-lived
/// map of a large segment does not grow the resident set. The file's data is
/// untouched: later reads fault the pages in again from the page cache.
///
/// Returns where the released pages end (`offset` itself when none was).
pub fn release_pages(map: &Mmap, offset: usize, len: usize) -> usize {
    const PAGE: usize = 4096;
    let start = offset.div_ceil(PAGE) * PAGE;
    let end = ((offset + len).min(map.len()) / PAGE) * PAGE;
    if end <= start {
        return offset;
    }
    // SAFETY: MADV_DONTNEED on a read-only, shared, file-backed mapping
    // only drops this process's page table entries; the contents stay in
    // the file and page cache and are read back on the next access. No
    // reference into this range is held across this call by our callers.
    let _ = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
    };
    end
}

/// Fsyncs a directory, making renames and creations in it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `data` to `path` crash-safely (temp file, fsync, rename, fsync dir),
/// with mode 0600.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    replace_file(path, data, true)
}

/// Replaces `path` with `data` through a temp file and a rename, mode 0600:
/// readers see the old or the new file whole. With `durable`, the file and
/// the directory are fsynced too; without, it is advisory state that may
/// be lost in a crash.
pub fn replace_file(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        fs::rename(&tmp, path)?;
        if durable {
            fsync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_whole_file_with_mode_0600() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temp file left"
        );
        let m = map_readonly(&File::open(&p).unwrap()).unwrap();
        assert_eq!(&m[..], b"two two");
    }
}
