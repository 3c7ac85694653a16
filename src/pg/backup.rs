//! Base backups by copying the data directory during a low-level backup,
//! for a standby on the primary's own host when no usable pg_basebackup is
//! installed (pg_basebackup refuses servers newer than itself).
//!
//! The steps are those of the documented "low-level base backup API", run in
//! one session that stays open throughout:
//!
//! 1. a temporary physical replication slot reserving WAL, so no segment the
//!    backup needs is recycled while it runs;
//! 2. `pg_backup_start(label, fast => true)` (PostgreSQL 15+) or
//!    `pg_start_backup(label, true, false)` (13/14, non-exclusive);
//! 3. a file copy of the data directory, skipping what pg_basebackup skips
//!    (postmaster.pid and .opts, the contents of pg_wal, pg_replslot,
//!    pg_dynshmem, pg_notify, pg_serial, pg_snapshots, pg_stat_tmp,
//!    pg_subtrans, pgsql_tmp*, pg_internal.init, backup_label,
//!    tablespace_map, the signal files); files that vanish meanwhile are
//!    skipped, as the server may remove them;
//! 4. `pg_backup_stop(true)` / `pg_stop_backup(false, true)`, whose label
//!    and tablespace map are written as `backup_label` and `tablespace_map`;
//!    the server switches to a new segment, so the WAL of the backup is
//!    complete;
//! 5. the WAL segments from the backup's start to its end, and the timeline
//!    history files, copied from pg_wal (what `pg_basebackup -X stream`
//!    includes), so the copy is consistent on its own.
//!
//! Tablespaces are refused: their symlinks would point at the primary's own
//! directories. When running as root, the copy is handed to the server user.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::client::{connect, server_info};
use super::cluster::RunAs;
use crate::wal::{Lsn, SegmentName, WalFileName};

/// Directories whose contents a base backup leaves out (the directory itself is kept).
const EXCLUDE_CONTENTS: &[&str] = &[
    "pg_wal",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// Files a base backup leaves out, wherever they are.
const EXCLUDE_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "pg_internal.init",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "tablespace_map.old",
    "standby.signal",
    "recovery.signal",
    "backup_manifest",
];

/// What a copy backup did.
#[derive(Clone, Debug)]
pub struct CopyBackup {
    /// The primary's data directory that was copied.
    pub source: PathBuf,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub server_major: u32,
    /// WAL segment files copied into the backup's pg_wal.
    pub wal_segments: usize,
}

/// Takes a base backup of the server at `conninfo` into `dest` (absent or
/// empty) by copying its data directory, which must be on this host.
pub async fn copy_backup(conninfo: &str, dest: &Path, owner: Option<RunAs>) -> Result<CopyBackup> {
    let client = connect(conninfo).await?;
    let info = server_info(&client).await?;
    if info.in_recovery {
        bail!("the server is in recovery: take the copy backup from the primary");
    }
    let source = PathBuf::from(&info.data_directory);
    check_same_cluster(&source, info.sysid)?;
    let tblspc: Vec<_> = fs::read_dir(source.join("pg_tblspc"))
        .map(|rd| rd.flatten().collect())
        .unwrap_or_default();
    if !tblspc.is_empty() {
        bail!(
            "{} has tablespaces, which a copy backup cannot take (their links point at the primary's directories): use pg_basebackup with --tablespace-mapping",
            source.display()
        );
    }
    let major = info.major();
    let seg_size = info.seg_size;
    let slot = format!("waltail_backup_{}", std::process::id());
    client
        .execute(
            "SELECT pg_create_physical_replication_slot($1, true, true)",
            &[&slot],
        )
        .await
        .context("creating a temporary replication slot to hold WAL during the backup")?;
    let start_sql = if major >= 15 {
        "SELECT pg_backup_start('waltail init-standby', true)::text"
    } else {
        "SELECT pg_start_backup('waltail init-standby', true, false)::text"
    };
    let start: String = client
        .query_one(start_sql, &[])
        .await
        .context("starting the backup")?
        .get(0);
    let start_lsn: Lsn = start.parse()?;

    let copy = {
        let (source, dest) = (source.clone(), dest.to_path_buf());
        tokio::task::spawn_blocking(move || copy_tree(&source, &dest, owner, true))
            .await
            .context("the copy thread")?
    };
    // Stop the backup whether or not the copy worked, so the server is not left in backup mode.
    let stop_sql = if major >= 15 {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(true)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, true)"
    };
    let stop = client.query_one(stop_sql, &[]).await;
    copy.with_context(|| format!("copying {}", source.display()))?;
    let stop = stop.context("stopping the backup")?;
    let stop_lsn: Lsn = stop.get::<_, String>(0).parse()?;
    let label: String = stop.get(1);
    let spcmap: Option<String> = stop.get(2);
    write_owned(&dest.join("backup_label"), label.as_bytes(), owner)?;
    if let Some(m) = spcmap.filter(|m| !m.is_empty()) {
        write_owned(&dest.join("tablespace_map"), m.as_bytes(), owner)?;
    }

    // The WAL of the backup: from the segment holding its start to the one
    // holding the last byte before its end (complete after the stop's switch).
    let first = start_lsn.segment_number(seg_size);
    let last = stop_lsn.prev_segment_number(seg_size).max(first);
    let (src_wal, dst_wal) = (source.join("pg_wal"), dest.join("pg_wal"));
    let mut segments = 0;
    let mut names: Vec<String> = fs::read_dir(&src_wal)
        .with_context(|| format!("reading {}", src_wal.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    for name in names {
        let wanted = match WalFileName::parse(&name, seg_size) {
            Ok(WalFileName::Segment(SegmentName { segno, .. })) => (first..=last).contains(&segno),
            Ok(WalFileName::History(_)) => true,
            _ => false,
        };
        if wanted {
            copy_file(&src_wal.join(&name), &dst_wal.join(&name), owner)
                .with_context(|| format!("copying WAL file {name}"))?;
            segments += usize::from(name.len() == 24);
        }
    }
    if segments == 0 {
        bail!(
            "no WAL segment of the backup ({start_lsn} to {stop_lsn}) is left in {}",
            src_wal.display()
        );
    }
    // Dropping the connection drops the temporary slot.
    drop(client);
    Ok(CopyBackup {
        source,
        start_lsn,
        stop_lsn,
        server_major: major,
        wal_segments: segments,
    })
}

/// Checks that `dir` is the data directory of the cluster with system identifier `sysid`
/// (`global/pg_control` starts with it), i.e. that the server runs on this host.
pub fn check_same_cluster(dir: &Path, sysid: u64) -> Result<()> {
    let control = dir.join("global/pg_control");
    let bytes = fs::read(&control).with_context(|| {
        format!(
            "cannot read the primary's {} (a copy backup needs the primary on this host, readable by this user)",
            control.display()
        )
    })?;
    let Some(head) = bytes.get(..8) else {
        bail!("{} is too short", control.display());
    };
    let found = u64::from_le_bytes(head.try_into().expect("8 bytes"));
    if found != sysid {
        bail!(
            "{} belongs to another cluster (system identifier {found}, the server says {sysid}): the primary is not on this host",
            dir.display()
        );
    }
    Ok(())
}

/// Whether a base backup leaves out the entry `name` (`top`: in the data directory itself).
fn excluded(top: bool, name: &str, is_dir: bool) -> bool {
    if is_dir {
        name.starts_with("pgsql_tmp")
    } else {
        EXCLUDE_FILES.contains(&name) || (top && name.ends_with(".tmp"))
    }
}

/// Copies the data directory `src` into `dest` (see the module header).
fn copy_tree(src: &Path, dest: &Path, owner: Option<RunAs>, top: bool) -> Result<()> {
    make_dir(dest, owner)?;
    let rd = match fs::read_dir(src) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !top => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", src.display())),
    };
    for e in rd {
        let e = e.with_context(|| format!("reading {}", src.display()))?;
        let name = e.file_name().to_string_lossy().to_string();
        let path = e.path();
        let ft = match e.file_type() {
            Ok(ft) => ft,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err).with_context(|| format!("{}", path.display())),
        };
        if excluded(top, &name, ft.is_dir()) {
            continue;
        }
        let to = dest.join(&name);
        if ft.is_dir() {
            if top && EXCLUDE_CONTENTS.contains(&name.as_str()) {
                make_dir(&to, owner)?;
                // pg_wal keeps its subdirectories (archive_status, summaries), empty.
                if name == "pg_wal" {
                    for sub in fs::read_dir(&path)?.flatten() {
                        if sub.file_type().is_ok_and(|t| t.is_dir()) {
                            make_dir(&to.join(sub.file_name()), owner)?;
                        }
                    }
                }
                continue;
            }
            copy_tree(&path, &to, owner, false)?;
        } else if ft.is_symlink() {
            bail!(
                "{} is a symbolic link (a relocated pg_wal or a tablespace), which a copy backup does not follow: use pg_basebackup",
                path.display()
            );
        } else if ft.is_file() {
            copy_file(&path, &to, owner).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

fn make_dir(p: &Path, owner: Option<RunAs>) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(p) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => {
            fs::set_permissions(p, fs::Permissions::from_mode(0o700))?;
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", p.display())),
    }
    if let Some(r) = owner {
        r.chown(p)?;
    }
    Ok(())
}

/// Copies one file (a file that vanished meanwhile is skipped).
fn copy_file(from: &Path, to: &Path, owner: Option<RunAs>) -> Result<()> {
    let mut src = match fs::File::open(from) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .with_context(|| format!("creating {}", to.display()))?;
    io::copy(&mut src, &mut dst)?;
    dst.sync_all()?;
    if let Some(r) = owner {
        r.chown(to)?;
    }
    Ok(())
}

fn write_owned(p: &Path, bytes: &[u8], owner: Option<RunAs>) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .with_context(|| format!("creating {}", p.display()))?;
    io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    if let Some(r) = owner {
        r.chown(p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions_follow_pg_basebackup() {
        assert!(excluded(true, "postmaster.pid", false));
        assert!(excluded(true, "backup_label", false));
        assert!(excluded(true, "standby.signal", false));
        assert!(excluded(false, "pg_internal.init", false));
        assert!(excluded(false, "pgsql_tmp", true));
        assert!(excluded(true, "postgresql.auto.conf.tmp", false));
        assert!(!excluded(true, "postgresql.conf", false));
        assert!(!excluded(true, "PG_VERSION", false));
        assert!(!excluded(false, "1259", false));
    }
}
