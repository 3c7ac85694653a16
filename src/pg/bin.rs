//! Finding PostgreSQL's server binaries.
//!
//! Order: `$WALTAIL_PG_BIN` (a directory holding initdb, pg_ctl and postgres),
//! then the newest `/usr/lib/postgresql/<major>/bin` (Debian and Ubuntu),
//! then `/usr/pgsql-<major>/bin` (RPM packages), then `pg_config --bindir`.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Debug)]
pub struct PgBin {
    pub dir: PathBuf,
    pub major: u32,
}

pub const INSTALL_HINT: &str = "PostgreSQL server binaries not found: install them (Debian/Ubuntu: apt-get install postgresql-15) or set WALTAIL_PG_BIN to the directory holding initdb, pg_ctl and postgres";

impl PgBin {
    /// Finds the binaries, or says what to install.
    pub fn find() -> Result<PgBin, String> {
        if let Some(dir) = std::env::var_os("WALTAIL_PG_BIN") {
            let dir = PathBuf::from(dir);
            return PgBin::at(&dir).map_err(|e| format!("WALTAIL_PG_BIN={}: {e}", dir.display()));
        }
        let mut candidates = Vec::new();
        for pattern_root in ["/usr/lib/postgresql", "/usr/pgsql-"] {
            let (parent, prefix) = if pattern_root.ends_with('-') {
                ("/usr", "pgsql-")
            } else {
                (pattern_root, "")
            };
            if let Ok(rd) = std::fs::read_dir(parent) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    if let Some(v) = name
                        .strip_prefix(prefix)
                        .and_then(|v| v.parse::<u32>().ok())
                    {
                        candidates.push((v, e.path().join("bin")));
                    }
                }
            }
        }
        candidates.sort();
        for (_, dir) in candidates.iter().rev() {
            if let Ok(b) = PgBin::at(dir) {
                return Ok(b);
            }
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if let Ok(b) = PgBin::at(&dir) {
                return Ok(b);
            }
        }
        Err(INSTALL_HINT.to_string())
    }

    /// Uses the binaries in `dir`.
    pub fn at(dir: &Path) -> Result<PgBin, String> {
        for tool in ["initdb", "pg_ctl", "postgres"] {
            if !dir.join(tool).is_file() {
                return Err(format!("no {tool} in {}", dir.display()));
            }
        }
        let out = Command::new(dir.join("postgres"))
            .arg("--version")
            .output()
            .map_err(|e| format!("cannot run {}/postgres: {e}", dir.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let major = text
            .split_whitespace()
            .find_map(|w| w.split('.').next()?.parse::<u32>().ok())
            .ok_or_else(|| format!("cannot read the version from {text:?}"))?;
        Ok(PgBin {
            dir: dir.to_path_buf(),
            major,
        })
    }

    /// Path of one of the binaries; client tools missing from `dir` (the npm
    /// packages ship only the server) are taken from the newest installed
    /// PostgreSQL, then from `PATH`.
    pub fn tool(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        if p.is_file() {
            return p;
        }
        if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut dirs: Vec<(u32, PathBuf)> = rd
                .flatten()
                .filter_map(|e| {
                    let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                    Some((v, e.path().join("bin").join(name)))
                })
                .filter(|(_, p)| p.is_file())
                .collect();
            dirs.sort();
            if let Some((_, p)) = dirs.pop() {
                return p;
            }
        }
        PathBuf::from(name)
    }
}
