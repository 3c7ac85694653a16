//! Writing received WAL into the spool, durably and in order.
//!
//! [`SpoolWriter`] takes byte ranges that must start exactly where the last
//! one ended, writes them in place into `<segment>.partial` (created full
//! size: allocated, zero-filled, fsynced, renamed into place), and on
//! [`SpoolWriter::sync`] fdatasyncs and records the durable position. A
//! segment whose last byte arrives is fsynced, renamed to its final name and
//! the directory fsynced, so a final name always holds a complete segment.
//!
//! After any I/O error the writer forgets what it had not made durable
//! (what a failed fsync leaves in the page cache cannot be trusted) and the
//! next range must start at the durable position again.
//!
//! Two moments per sync: the bytes are on disk (the fdatasync of the
//! segment returned), then the position file says so (its own fdatasync).
//! Only the second may be acked to the shipper, whose slot then lets the
//! primary recycle the WAL. The first is reported to [`SpoolWriter::on_synced`]'s
//! hook, so that `receive --serve` streams bytes to a standby as soon as
//! they are on disk, one fdatasync earlier: bytes the spool holds durably,
//! which a restart after a power loss re-receives identical from the
//! primary (the slot was not moved past them).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use super::{Result, Spool, SpoolError};
use crate::fsio::fsync_dir;
use crate::wal::{Lsn, SegmentName, SegmentSize, TimelineId};

struct Open {
    seg: SegmentName,
    file: File,
    dirty: bool,
}

/// A sync under way (see [`SpoolWriter::begin_sync`]).
pub struct PendingSync {
    pub tli: TimelineId,
    /// The written position when the sync began: durable once it returns.
    pub covers: Lsn,
    /// What to fdatasync; None: the bytes up to `covers` are already synced.
    pub file: Option<File>,
}

impl PendingSync {
    /// The fdatasync itself (blocking: run it on a blocking thread).
    pub fn run(&self) -> std::io::Result<()> {
        match &self.file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }
}

/// Told each position whose bytes are on disk, before the position file says so.
pub type SyncedHook = Box<dyn Fn(TimelineId, Lsn) + Send + Sync>;

pub struct SpoolWriter {
    spool: Spool,
    synced_hook: Option<SyncedHook>,
    seg_size: SegmentSize,
    pos_file: File,
    tli: Option<TimelineId>,
    written: Lsn,
    durable: Lsn,
    cur: Option<Open>,
}

impl SpoolWriter {
    /// Opens the spool's writer at its recorded durable position.
    pub fn open(spool: Spool, seg_size: SegmentSize) -> Result<SpoolWriter> {
        let pos = spool.position()?;
        let pos_file = spool.position_file()?;
        let mut w = SpoolWriter {
            spool,
            synced_hook: None,
            seg_size,
            pos_file,
            tli: pos.map(|p| p.0),
            written: pos.map(|p| p.1).unwrap_or_default(),
            durable: pos.map(|p| p.1).unwrap_or_default(),
            cur: None,
        };
        // A crash between completing a segment and recording the position
        // leaves the position inside a segment that is already complete.
        if let Some(tli) = w.tli {
            if w.written.segment_offset(seg_size) != 0 {
                let seg = SegmentName::of_lsn(tli, w.written, seg_size);
                if w.spool.segment_path(seg, seg_size).exists() {
                    w.written = seg.end_lsn(seg_size);
                    w.durable = w.written;
                    w.record_position()?;
                }
            }
        }
        Ok(w)
    }

    /// Calls `hook` with each position whose bytes are synced, just before
    /// the position file records it (see the module header).
    pub fn on_synced(&mut self, hook: SyncedHook) {
        self.synced_hook = Some(hook);
    }

    /// The durable position, if any WAL was ever received.
    pub fn durable(&self) -> Option<(TimelineId, Lsn)> {
        self.tli.map(|t| (t, self.durable))
    }

    /// Where the next byte goes.
    pub fn written(&self) -> Option<(TimelineId, Lsn)> {
        self.tli.map(|t| (t, self.written))
    }

    pub fn current_segment(&self) -> Option<String> {
        self.cur.as_ref().map(|o| o.seg.file_name(self.seg_size))
    }

    fn err(&self, what: String) -> SpoolError {
        SpoolError::Corrupt {
            dir: self.spool.dir.clone(),
            what,
        }
    }

    /// Starts an empty spool at `lsn`, which must begin a segment.
    pub fn start_at(&mut self, tli: TimelineId, lsn: Lsn) -> Result<()> {
        if self.tli.is_some() {
            return Err(self.err("the spool already has a position".into()));
        }
        if lsn.segment_offset(self.seg_size) != 0 {
            return Err(self.err(format!(
                "a new spool must start at a segment boundary, not {lsn}"
            )));
        }
        self.tli = Some(tli);
        self.written = lsn;
        self.durable = lsn;
        self.record_position()
    }

    fn record_position(&mut self) -> Result<()> {
        let tli = self.tli.unwrap_or(TimelineId(1));
        Spool::set_position(&self.pos_file, tli, self.durable, true).map_err(|e| self.spool.io(e))
    }

    /// Moves the durable position to `to` (whose bytes are synced) once the
    /// position file says so on disk: until then nothing past the old
    /// position is durable, offered or acked.
    fn advance_durable(&mut self, to: Lsn) -> Result<()> {
        let tli = self.tli.unwrap_or(TimelineId(1));
        Spool::set_position(&self.pos_file, tli, to, true).map_err(|e| self.spool.io(e))?;
        self.durable = to;
        Ok(())
    }

    /// Tells the [`SpoolWriter::on_synced`] hook that the bytes up to `to`
    /// are on disk; each path that syncs calls it once, before it records
    /// the position.
    fn tell_synced(&self, to: Lsn) {
        if let (Some(h), Some(tli)) = (&self.synced_hook, self.tli) {
            h(tli, to);
        }
    }

    /// Forgets everything not yet durable (after an I/O error).
    pub fn reset_to_durable(&mut self) {
        self.cur = None;
        self.written = self.durable;
    }

    /// Writes `bytes` of timeline `tli` at `start` (which must be the
    /// current write position, or the start of a new timeline's data).
    pub fn write(&mut self, tli: TimelineId, start: Lsn, bytes: &[u8]) -> Result<()> {
        let r = self.write_inner(tli, start, bytes);
        if r.is_err() {
            self.reset_to_durable();
        }
        r
    }

    fn write_inner(&mut self, tli: TimelineId, start: Lsn, bytes: &[u8]) -> Result<()> {
        let Some(cur_tli) = self.tli else {
            return Err(self.err("data before the spool has a position".into()));
        };
        if tli != cur_tli {
            self.switch_timeline(cur_tli, tli, start)?;
        }
        if start != self.written {
            return Err(self.err(format!(
                "data at {start} does not continue the spool, which ends at {}",
                self.written
            )));
        }
        let mut at = start;
        let mut rest = bytes;
        while !rest.is_empty() {
            let seg = SegmentName::of_lsn(tli, at, self.seg_size);
            let seg_end = seg.end_lsn(self.seg_size);
            let n = rest.len().min((seg_end.0 - at.0) as usize);
            let off = at.segment_offset(self.seg_size);
            // Injected: the disk is full.
            fail::fail_point!("spool-write", |_| Err(self
                .spool
                .io(std::io::Error::from_raw_os_error(libc::ENOSPC))));
            let file = self.partial(seg)?;
            file.write_all_at(&rest[..n], off)
                .map_err(|e| self.spool.io(e))?;
            if let Some(o) = &mut self.cur {
                o.dirty = true;
            }
            at = Lsn(at.0 + n as u64);
            rest = &rest[n..];
            self.written = at;
            if at == seg_end {
                self.complete_current()?;
            }
        }
        Ok(())
    }

    /// The open partial file for `seg`, creating it if needed.
    fn partial(&mut self, seg: SegmentName) -> Result<&File> {
        if self.cur.as_ref().is_some_and(|o| o.seg != seg) {
            // Data moved on without completing the old segment: only a
            // timeline switch does that, and it closes the old file first.
            return Err(
                self.err("internal: a new segment began before the old one completed".into())
            );
        }
        if self.cur.is_none() {
            let file = self.open_or_create_partial(seg, None)?;
            self.cur = Some(Open {
                seg,
                file,
                dirty: false,
            });
        }
        Ok(&self.cur.as_ref().expect("set above").file)
    }

    /// Opens `<seg>.partial`, creating it full size (with `prefix` copied in
    /// at its start, for a new timeline) when it does not exist.
    fn open_or_create_partial(&self, seg: SegmentName, prefix: Option<&[u8]>) -> Result<File> {
        let path = self.spool.partial_path(seg, self.seg_size);
        if path.exists() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| self.spool.io_at(&path, e))?;
            let len = f.metadata().map_err(|e| self.spool.io(e))?.len();
            if len != self.seg_size.bytes() {
                return Err(self.err(format!(
                    "{} has {len} bytes, not {}: damaged, move it away",
                    path.display(),
                    self.seg_size.bytes()
                )));
            }
            return Ok(f);
        }
        let tmp = self
            .spool
            .path(&format!(".{}.partial.tmp", seg.file_name(self.seg_size)));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| self.spool.io(e))?;
        let setup = (|| -> std::io::Result<()> {
            nix::fcntl::posix_fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
                self.seg_size.bytes() as i64,
            )
            .map_err(std::io::Error::from)?;
            if let Some(p) = prefix {
                f.write_all_at(p, 0)?;
            }
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fsync_dir(&self.spool.dir)
        })();
        if let Err(e) = setup {
            let _ = fs::remove_file(&tmp);
            return Err(self.spool.io(e));
        }
        Ok(f)
    }

    /// The current segment is full: make it durable under its final name.
    fn complete_current(&mut self) -> Result<()> {
        let Some(o) = self.cur.take() else {
            return Ok(());
        };
        o.file.sync_data().map_err(|e| self.spool.io(e))?;
        let from = self.spool.partial_path(o.seg, self.seg_size);
        let to = self.spool.segment_path(o.seg, self.seg_size);
        fs::rename(&from, &to).map_err(|e| self.spool.io(e))?;
        fsync_dir(&self.spool.dir).map_err(|e| self.spool.io(e))?;
        self.tell_synced(self.written);
        self.advance_durable(self.written)
    }

    /// Makes everything written durable and records the position durably;
    /// returns it. Only what this returns may be acked.
    pub fn sync(&mut self) -> Result<Lsn> {
        self.sync_data()?;
        if self.durable != self.written {
            if let Err(e) = self.advance_durable(self.written) {
                self.reset_to_durable();
                return Err(e);
            }
        }
        Ok(self.durable)
    }

    /// The first half of [`SpoolWriter::sync`]: fdatasyncs what is written
    /// and tells the [`SpoolWriter::on_synced`] hook, without recording the
    /// position (nothing may be acked for it yet).
    pub fn sync_data(&mut self) -> Result<()> {
        // Injected: fsync fails and, as Linux may do, the unsynced pages are
        // lost with it.
        fail::fail_point!("spool-sync", |_| {
            self.lose_unsynced();
            let e = self.spool.io(std::io::Error::from_raw_os_error(libc::EIO));
            self.reset_to_durable();
            Err(e)
        });
        if let Some(o) = &mut self.cur {
            if o.dirty {
                if let Err(e) = o.file.sync_data() {
                    let e = self.spool.io(e);
                    self.reset_to_durable();
                    return Err(e);
                }
                o.dirty = false;
            }
        }
        if self.durable != self.written {
            self.tell_synced(self.written);
        }
        Ok(())
    }

    /// Starts a sync that runs beside the writer (the receiver reads and
    /// writes the next burst meanwhile): the position it will cover, and a
    /// duplicate of the open partial's descriptor to fdatasync (None when
    /// nothing written since is only in the page cache). None when all that
    /// is written is durable. Hand the result to [`SpoolWriter::synced`].
    pub fn begin_sync(&mut self) -> Result<Option<PendingSync>> {
        let Some(tli) = self.tli else {
            return Ok(None);
        };
        if self.written == self.durable {
            return Ok(None);
        }
        // `dirty` stays set until the sync has returned (see `synced`), so
        // a plain `sync` meanwhile still syncs.
        let mut file = None;
        if let Some(o) = &self.cur {
            if o.dirty {
                file = Some(o.file.try_clone().map_err(|e| self.spool.io(e))?);
            }
        }
        Ok(Some(PendingSync {
            tli,
            covers: self.written,
            file,
        }))
    }

    /// A sync from [`SpoolWriter::begin_sync`] returned `r`: on success the
    /// durable position moves up to what it covered (never back, and not at
    /// all if the timeline changed meanwhile) and is recorded; on failure
    /// everything not durable is forgotten, as after any I/O error.
    pub fn synced(&mut self, done: PendingSync, r: std::io::Result<()>) -> Result<Lsn> {
        fail::fail_point!("spool-sync", |_| {
            self.lose_unsynced();
            let e = self.spool.io(std::io::Error::from_raw_os_error(libc::EIO));
            self.reset_to_durable();
            Err(e)
        });
        if let Err(e) = r {
            let e = self.spool.io(e);
            self.reset_to_durable();
            return Err(e);
        }
        if self.tli == Some(done.tli) && done.covers > self.durable && done.covers <= self.written {
            // The position is fsynced before anything may ack it.
            self.tell_synced(done.covers);
            if let Err(e) = self.advance_durable(done.covers) {
                self.reset_to_durable();
                return Err(e);
            }
            if self.durable == self.written {
                if let Some(o) = &mut self.cur {
                    o.dirty = false;
                }
            }
        }
        Ok(self.durable)
    }

    /// Zeroes what was written after the durable position in the open
    /// partial: what a failed fsync may leave of it (fault injection only).
    #[cfg(feature = "failpoints")]
    fn lose_unsynced(&mut self) {
        if let Some(o) = &self.cur {
            let seg_start = o.seg.start_lsn(self.seg_size);
            let from = self.durable.max(seg_start);
            if let Some(n) = self.written.bytes_since(from) {
                let zeros = vec![0u8; n as usize];
                let _ = o
                    .file
                    .write_all_at(&zeros, from.segment_offset(self.seg_size));
            }
        }
    }

    /// Moves to timeline `new`, whose data starts at `start` (at or before
    /// what the spool holds of the old timeline). The new timeline's segment
    /// gets the old one's bytes before `start`, as PostgreSQL's own copy does.
    fn switch_timeline(&mut self, old: TimelineId, new: TimelineId, start: Lsn) -> Result<()> {
        if new < old {
            return Err(self.err(format!(
                "data of timeline {new} after timeline {old}: timelines never go back"
            )));
        }
        if self.spool.history(new)?.is_none() {
            return Err(self.err(format!(
                "data of timeline {new} arrived before its history file"
            )));
        }
        if start > self.written {
            return Err(self.err(format!(
                "timeline {new} starts at {start}, past the end of timeline {old} data at {}",
                self.written
            )));
        }
        self.sync()?;
        self.cur = None;
        let off = start.segment_offset(self.seg_size) as usize;
        if off > 0 {
            let old_seg = SegmentName::of_lsn(old, start, self.seg_size);
            let src = [
                self.spool.segment_path(old_seg, self.seg_size),
                self.spool.partial_path(old_seg, self.seg_size),
            ]
            .into_iter()
            .find(|p| p.exists())
            .ok_or_else(|| {
                self.err(format!(
                    "no segment of timeline {old} to copy the start of timeline {new} from"
                ))
            })?;
            let mut prefix = vec![0u8; off];
            File::open(&src)
                .and_then(|f| f.read_exact_at(&mut prefix, 0))
                .map_err(|e| self.spool.io(e))?;
            let seg = SegmentName::of_lsn(new, start, self.seg_size);
            let f = self.open_or_create_partial(seg, Some(&prefix))?;
            self.cur = Some(Open {
                seg,
                file: f,
                dirty: false,
            });
        }
        self.tli = Some(new);
        self.written = start;
        self.durable = start;
        self.record_position()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s1() -> SegmentSize {
        SegmentSize::new(1 << 20).unwrap()
    }

    #[test]
    fn ranges_fill_partials_and_complete_segments_by_rename() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::create(d.path()).unwrap();
        let mut w = SpoolWriter::open(sp.clone(), s1()).unwrap();
        w.start_at(TimelineId(1), Lsn(1 << 20)).unwrap();
        let data: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8 + 1).collect();
        w.write(TimelineId(1), Lsn(1 << 20), &data[..1000]).unwrap();
        assert!(sp.path("000000010000000000000001.partial").exists());
        assert_eq!(w.sync().unwrap(), Lsn((1 << 20) + 1000));
        assert_eq!(
            sp.position().unwrap(),
            Some((TimelineId(1), Lsn((1 << 20) + 1000)))
        );
        // A gap is refused and nothing is written.
        assert!(w
            .write(TimelineId(1), Lsn((1 << 20) + 2000), &data[..10])
            .is_err());
        w.write(TimelineId(1), Lsn((1 << 20) + 1000), &data[1000..])
            .unwrap();
        w.sync().unwrap();
        let full = fs::read(sp.path("000000010000000000000001")).unwrap();
        assert_eq!(full, &data[..1 << 20]);
        assert!(!sp.path("000000010000000000000001.partial").exists());
        let part = fs::read(sp.path("000000010000000000000002.partial")).unwrap();
        assert_eq!(part.len(), 1 << 20);
        assert_eq!(&part[..data.len() - (1 << 20)], &data[1 << 20..]);
        assert!(part[data.len() - (1 << 20)..].iter().all(|&b| b == 0));
        // Reopened, it resumes exactly where it was durable.
        drop(w);
        let w = SpoolWriter::open(sp, s1()).unwrap();
        assert_eq!(
            w.durable(),
            Some((TimelineId(1), Lsn((1 << 20) + data.len() as u64)))
        );
    }

    #[test]
    fn a_new_timeline_copies_the_old_segment_prefix() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::create(d.path()).unwrap();
        let mut w = SpoolWriter::open(sp.clone(), s1()).unwrap();
        w.start_at(TimelineId(1), Lsn(0)).unwrap();
        w.write(TimelineId(1), Lsn(0), &[7u8; 5000]).unwrap();
        assert!(
            w.write(TimelineId(2), Lsn(4000), &[9u8; 100]).is_err(),
            "no history yet"
        );
        w.write(TimelineId(1), Lsn(0), &[7u8; 5000]).unwrap();
        sp.write_history(TimelineId(2), b"1\t0/FA0\tno recovery target specified\n")
            .unwrap();
        w.write(TimelineId(2), Lsn(4000), &[9u8; 100]).unwrap();
        w.sync().unwrap();
        let new = fs::read(sp.path("000000020000000000000000.partial")).unwrap();
        assert_eq!(&new[..4000], &[7u8; 4000][..]);
        assert_eq!(&new[4000..4100], &[9u8; 100][..]);
        let old = fs::read(sp.path("000000010000000000000000.partial")).unwrap();
        assert_eq!(&old[..5000], &[7u8; 5000][..]);
        assert_eq!(sp.position().unwrap(), Some((TimelineId(2), Lsn(4100))));
    }

    #[test]
    fn a_sync_beside_the_writer_makes_durable_only_what_was_written_when_it_began() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::create(d.path()).unwrap();
        let mut w = SpoolWriter::open(sp.clone(), s1()).unwrap();
        w.start_at(TimelineId(1), Lsn(0)).unwrap();
        w.write(TimelineId(1), Lsn(0), &[1u8; 3000]).unwrap();
        let p = w.begin_sync().unwrap().expect("bytes to sync");
        assert_eq!(p.covers, Lsn(3000));
        // More arrives while the sync runs.
        w.write(TimelineId(1), Lsn(3000), &[2u8; 500]).unwrap();
        let r = p.run();
        assert_eq!(w.synced(p, r).unwrap(), Lsn(3000));
        assert_eq!(sp.position().unwrap(), Some((TimelineId(1), Lsn(3000))));
        assert_eq!(w.written(), Some((TimelineId(1), Lsn(3500))));
        // A failed sync forgets what was not durable.
        let p = w.begin_sync().unwrap().expect("bytes to sync");
        let e = std::io::Error::from_raw_os_error(libc::EIO);
        assert!(w.synced(p, Err(e)).is_err());
        assert_eq!(w.written(), Some((TimelineId(1), Lsn(3000))));
        assert_eq!(w.durable(), Some((TimelineId(1), Lsn(3000))));
        assert!(w.begin_sync().unwrap().is_none(), "nothing left to sync");
    }

    #[test]
    fn the_synced_hook_hears_of_bytes_on_disk_before_the_position_records_them() {
        let d = tempfile::tempdir().unwrap();
        let sp = Spool::create(d.path()).unwrap();
        let mut w = SpoolWriter::open(sp.clone(), s1()).unwrap();
        w.start_at(TimelineId(1), Lsn(0)).unwrap();
        // What the hook was told, and what the position file said then.
        let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, spool) = (heard.clone(), sp.clone());
        w.on_synced(Box::new(move |tli, lsn| {
            let recorded = spool.position().unwrap().map(|p| p.1);
            h.lock().unwrap().push((tli, lsn, recorded));
        }));
        w.write(TimelineId(1), Lsn(0), &[1u8; 3000]).unwrap();
        assert!(heard.lock().unwrap().is_empty(), "nothing synced yet");
        assert_eq!(w.sync().unwrap(), Lsn(3000));
        let first = heard.lock().unwrap()[0];
        assert_eq!(first, (TimelineId(1), Lsn(3000), Some(Lsn(0))));
        // Beside the writer: told when the sync returned, not before.
        w.write(TimelineId(1), Lsn(3000), &[2u8; 500]).unwrap();
        let p = w.begin_sync().unwrap().expect("bytes to sync");
        let n = heard.lock().unwrap().len();
        let r = p.run();
        assert_eq!(heard.lock().unwrap().len(), n, "told before synced()");
        assert_eq!(w.synced(p, r).unwrap(), Lsn(3500));
        assert_eq!(
            heard.lock().unwrap().last().copied(),
            Some((TimelineId(1), Lsn(3500), Some(Lsn(3000))))
        );
        // A failed sync tells it nothing.
        w.write(TimelineId(1), Lsn(3500), &[3u8; 10]).unwrap();
        let p = w.begin_sync().unwrap().expect("bytes to sync");
        let n = heard.lock().unwrap().len();
        let e = std::io::Error::from_raw_os_error(libc::EIO);
        assert!(w.synced(p, Err(e)).is_err());
        assert_eq!(heard.lock().unwrap().len(), n);
    }
}
