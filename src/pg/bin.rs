//! Finding PostgreSQL's server binaries.
//!
//! Order: `$WALTAIL_PG_BIN` (a directory holding initdb, pg_ctl and postgres),
//! then the newest `/usr/lib/postgresql/<major>/bin` (Debian and Ubuntu),
//! then `/usr/pgsql-<major>/bin` (RPM packages), then `pg_config --bindir`.
//!
//! Client tools missing from that directory (the npm builds of PostgreSQL
//! carry only the server) are taken from another installation when they work
//! with the server's major version: psql, pg_isready and pgbench of any
//! version, pg_basebackup only as new or newer, pg_waldump only the same.

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
        let major =
            parse_major(&text).ok_or_else(|| format!("cannot read the version from {text:?}"))?;
        Ok(PgBin {
            dir: dir.to_path_buf(),
            major,
        })
    }

    /// Path of one of the binaries, or of a compatible client tool when
    /// `dir` lacks it (the npm builds ship only initdb, pg_ctl and postgres):
    /// see [`PgBin::find_tool`]. With none found, the bare name (looked up on
    /// `PATH` when run, failing with "No such file" there).
    pub fn tool(&self, name: &str) -> PathBuf {
        self.find_tool(name).unwrap_or_else(|| PathBuf::from(name))
    }

    /// A tool that works with servers of this major version: the one in
    /// `dir`, else one of another installed PostgreSQL (newest first:
    /// `/usr/lib/postgresql/<major>/bin`, `/usr/pgsql-<major>/bin`, then
    /// `PATH`) that is compatible (see [`Compat`]). `None` if there is none.
    pub fn find_tool(&self, name: &str) -> Option<PathBuf> {
        let p = self.dir.join(name);
        if p.is_file() {
            return Some(p);
        }
        let compat = Compat::of(name);
        other_installations()
            .into_iter()
            .map(|d| d.join(name))
            .filter(|p| p.is_file())
            .find(|p| compat.accepts(tool_major(p), self.major))
    }

    /// The tool of exactly PostgreSQL `major` (pg_waldump reads only the WAL
    /// of its own major version), from `dir` or another installation.
    pub fn tool_of_major(&self, name: &str, major: u32) -> Option<PathBuf> {
        std::iter::once(self.dir.clone())
            .chain(other_installations())
            .map(|d| d.join(name))
            .filter(|p| p.is_file())
            .find(|p| tool_major(p) == Some(major))
    }
}

/// Which server versions a client tool of another major version works with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compat {
    /// psql, pg_isready, pgbench: any server version this tool supports (13+).
    Any,
    /// pg_basebackup, pg_receivewal, pg_recvlogical: servers up to the
    /// tool's own major version (they refuse newer ones).
    NotNewer,
    /// pg_waldump, pg_controldata, initdb and the rest: only their own major.
    Same,
}

impl Compat {
    pub fn of(tool: &str) -> Compat {
        match tool {
            "psql" | "pg_isready" | "pgbench" => Compat::Any,
            "pg_basebackup" | "pg_receivewal" | "pg_recvlogical" => Compat::NotNewer,
            _ => Compat::Same,
        }
    }

    /// Whether a tool of `tool_major` (None: unknown) works with a server of `server_major`.
    pub fn accepts(self, tool_major: Option<u32>, server_major: u32) -> bool {
        match (self, tool_major) {
            (Compat::Any, _) => true,
            (Compat::NotNewer, Some(t)) => t >= server_major,
            (Compat::Same, Some(t)) => t == server_major,
            (_, None) => false,
        }
    }
}

/// Bin directories of installed PostgreSQL versions, newest first, then `PATH`.
fn other_installations() -> Vec<PathBuf> {
    let mut versioned: Vec<(u32, PathBuf)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            if let Ok(v) = e.file_name().to_string_lossy().parse::<u32>() {
                versioned.push((v, e.path().join("bin")));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/usr") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(v) = name.strip_prefix("pgsql-").and_then(|v| v.parse().ok()) {
                versioned.push((v, e.path().join("bin")));
            }
        }
    }
    versioned.sort();
    let mut dirs: Vec<PathBuf> = versioned.into_iter().rev().map(|(_, d)| d).collect();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs
}

/// The major version a tool reports with `--version` ("pg_waldump (PostgreSQL) 15.18").
pub fn tool_major(path: &Path) -> Option<u32> {
    let out = Command::new(path).arg("--version").output().ok()?;
    parse_major(&String::from_utf8_lossy(&out.stdout))
}

/// The major version in a `--version` line.
pub fn parse_major(text: &str) -> Option<u32> {
    text.split_whitespace()
        .skip_while(|w| !w.contains("PostgreSQL"))
        .skip(1)
        .chain(text.split_whitespace())
        .find_map(|w| w.split('.').next()?.parse::<u32>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majors_and_compatibility() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_major("pg_basebackup (PostgreSQL) 17.10"), Some(17));
        assert_eq!(parse_major("nothing here"), None);
        assert!(Compat::of("psql").accepts(Some(15), 18));
        assert!(Compat::of("pg_basebackup").accepts(Some(15), 14));
        assert!(!Compat::of("pg_basebackup").accepts(Some(15), 16));
        assert!(!Compat::of("pg_waldump").accepts(Some(15), 17));
        assert!(Compat::of("pg_waldump").accepts(Some(17), 17));
        assert!(!Compat::of("pg_controldata").accepts(None, 17));
    }
}
