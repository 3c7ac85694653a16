//! Who may read and write what: ownership and permission checks whose
//! messages name the path, its owner and mode, the user, and the fix.
//!
//! A bare "Permission denied (os error 13)" sends an operator guessing; the
//! usual cause is a step run as root (`waltail receive` by hand, `scp -p` of
//! the secret) that left files the service's user cannot use. Everything
//! here only reads metadata: it changes nothing.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A user as people read it: `postgres (uid 101)`.
pub fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("{} (uid {uid})", u.name),
        _ => format!("uid {uid}"),
    }
}

fn group_name(gid: u32) -> String {
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(g)) => g.name,
        _ => gid.to_string(),
    }
}

/// `owned by root:root, mode 0700`, or why that is unknown.
pub fn describe(path: &Path) -> String {
    match fs::symlink_metadata(path) {
        Ok(m) => format!(
            "owned by {}:{}, mode {:04o}",
            user_name(m.uid()).split(' ').next().unwrap_or_default(),
            group_name(m.gid()),
            m.permissions().mode() & 0o7777
        ),
        Err(e) => format!("cannot be looked at: {e}"),
    }
}

/// The user this process runs as.
pub fn me() -> String {
    user_name(nix::unistd::geteuid().as_raw())
}

/// A permission error on `path` rewritten to say whose file it is and who
/// was refused; other errors pass through.
pub fn explain(path: &Path, e: io::Error) -> io::Error {
    if e.kind() != io::ErrorKind::PermissionDenied {
        return e;
    }
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "permission denied on {} ({}), and this runs as {}",
            path.display(),
            describe(path),
            me()
        ),
    )
}

/// A user's ids, for checking what it may do.
#[derive(Clone, Debug)]
pub struct Who {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Who {
    /// The user with these ids, with its supplementary groups.
    pub fn new(uid: u32, gid: u32) -> Who {
        let mut groups = vec![gid];
        if let Ok(Some(u)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
            if let Ok(name) = std::ffi::CString::new(u.name) {
                if let Ok(gs) = nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)) {
                    groups.extend(gs.into_iter().map(|g| g.as_raw()));
                }
            }
        }
        Who { uid, gid, groups }
    }

    /// This process's user.
    pub fn current() -> Who {
        Who::new(
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    }

    /// Whether the mode bits of `m` give this user all of `want` (r=4, w=2, x=1).
    fn may(&self, m: &fs::Metadata, want: u32) -> bool {
        if self.uid == 0 {
            return true;
        }
        let mode = m.permissions().mode();
        let bits = if m.uid() == self.uid {
            (mode >> 6) & 7
        } else if self.groups.contains(&m.gid()) {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        bits & want == want
    }

    /// Checks that this user can list and read the directory `dir`: every
    /// directory above it searchable, `dir` itself readable and searchable.
    /// The error names the first path that stops it, its owner and mode.
    pub fn check_can_read_dir(&self, dir: &Path) -> Result<(), String> {
        let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let mut ancestors: Vec<PathBuf> = abs.ancestors().skip(1).map(Path::to_path_buf).collect();
        ancestors.reverse();
        for a in &ancestors {
            let m = fs::metadata(a).map_err(|e| format!("{}: {e}", a.display()))?;
            if !self.may(&m, 1) {
                return Err(format!(
                    "{} cannot enter {} ({})",
                    user_name(self.uid),
                    a.display(),
                    describe(a)
                ));
            }
        }
        let m = fs::metadata(&abs).map_err(|e| format!("{}: {e}", abs.display()))?;
        if !m.is_dir() {
            return Err(format!("{} is not a directory", abs.display()));
        }
        if !self.may(&m, 5) {
            return Err(format!(
                "{} cannot read {} ({})",
                user_name(self.uid),
                abs.display(),
                describe(&abs)
            ));
        }
        Ok(())
    }
}

/// Files directly in `dir` that `who` cannot both read and write (left, as
/// a rule, by a command run as root), with a line describing each.
pub fn unwritable_files(dir: &Path, who: &Who) -> io::Result<Vec<String>> {
    let mut bad = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let m = match e.path().symlink_metadata() {
            Ok(m) => m,
            Err(_) => continue, // gone meanwhile
        };
        if m.is_file() && !who.may(&m, 6) {
            bad.push(format!("{} ({})", e.path().display(), describe(&e.path())));
        }
    }
    bad.sort();
    Ok(bad)
}

/// Why `dir` must not be used as a spool, when others than its owner (and
/// its group, for reading) can get at it: WAL holds every row written.
pub fn check_private_dir(dir: &Path) -> Result<(), String> {
    let m = fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o027 != 0 {
        return Err(format!(
            "spool {} is mode {mode:04o}: {} can get at the WAL in it; make it private: chmod 0700 {}",
            dir.display(),
            if mode & 0o002 != 0 || mode & 0o020 != 0 {
                "others can write into it, and"
            } else {
                "others"
            },
            dir.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_open_to_others_are_refused() {
        let d = tempfile::tempdir().unwrap();
        for (mode, ok) in [
            (0o700, true),
            (0o750, true),
            (0o770, false),
            (0o755, false),
            (0o777, false),
        ] {
            fs::set_permissions(d.path(), fs::Permissions::from_mode(mode)).unwrap();
            let r = check_private_dir(d.path());
            assert_eq!(r.is_ok(), ok, "{mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(
                    e.contains(&format!("{mode:04o}")) && e.contains("chmod 0700"),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn a_directory_another_user_cannot_enter_is_named() {
        let d = tempfile::tempdir().unwrap();
        let inner = d.path().join("spool");
        fs::create_dir(&inner).unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let me = Who::current();
        // Someone who is neither the owner nor in its group.
        let other = Who {
            uid: me.uid.wrapping_add(12345).max(1),
            gid: 65534,
            groups: vec![65534],
        };
        let e = other.check_can_read_dir(&inner).unwrap_err();
        assert!(
            e.contains(&d.path().display().to_string()) && e.contains("mode 0700"),
            "{e}"
        );
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o711)).unwrap();
        fs::set_permissions(&inner, fs::Permissions::from_mode(0o700)).unwrap();
        let e = other.check_can_read_dir(&inner).unwrap_err();
        assert!(e.contains("cannot read") && e.contains("spool"), "{e}");
        assert!(me.check_can_read_dir(&inner).is_ok());
    }
}
