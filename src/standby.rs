//! `waltail init-standby`: one command from nothing to a standby fed by the spool.
//!
//! It takes a base backup of the primary (pg_basebackup, WAL streamed into the
//! backup so it is consistent on its own; or, `--method copy`, a copy of the
//! data directory of a primary on the same host taken during a low-level
//! backup, see [`crate::pg::backup`]) and writes the recovery settings:
//!
//! * `restore_command = '<waltail> restore %f %p --spool <dir>'`, with `--wait`
//!   for the recovery.signal style;
//! * `archive_cleanup_command = '<waltail> cleanup %r --spool <dir>'`;
//! * `wal_retrieve_retry_interval` (standby style: how soon a growing partial
//!   segment is read again, which sets hot-standby visibility lag);
//! * `recovery_target_timeline = 'latest'`, `hot_standby = on`;
//! * the signal file: `standby.signal` or `recovery.signal`;
//! * stream style: `primary_conninfo` pointing at `waltail receive --serve`
//!   (host, port, user, password, sslmode, application_name), with
//!   restore_command kept as the fallback for complete segments.
//!
//! Before it writes anything it checks what the server will need
//! ([`check_preconditions`]): the data directory is empty (or `--force`d, and
//! no server runs in it); the spool exists, or is made with the server
//! user's ownership, and that user can read it. A failure names the path,
//! the user and the fix. The settings replace an earlier block of this
//! command's (a backup of a standby made by waltail carries one) instead of
//! adding a second.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::pg::cluster::RunAs;
use crate::pg::PgBin;

/// How init-standby takes the base backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// pg_basebackup when one that accepts the primary's version is installed,
    /// else `copy` when the primary runs on this host.
    Auto,
    /// pg_basebackup (of the primary's major version or newer).
    Basebackup,
    /// Copy the primary's data directory (same host) during a low-level backup.
    Copy,
}

/// What init-standby made.
#[derive(Clone, Debug)]
pub struct StandbyMade {
    pub pgdata: PathBuf,
    /// How the base backup was taken, for the user.
    pub how: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Style {
    /// standby.signal: restore answers at once and serves the growing partial segment.
    Standby,
    /// recovery.signal: restore waits for complete segments until a failover (pg_standby style).
    Recovery,
    /// standby.signal with primary_conninfo at `waltail receive --serve`: the standby
    /// streams WAL from the spool; restore_command serves complete segments as a fallback.
    Stream,
}

impl Style {
    pub fn signal_file(self) -> &'static str {
        match self {
            Style::Standby | Style::Stream => "standby.signal",
            Style::Recovery => "recovery.signal",
        }
    }
}

/// Where a stream-style standby connects: the spool's `receive --serve`.
#[derive(Clone, Debug)]
pub struct StreamTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    /// libpq sslmode (disable, prefer, require, verify-ca, verify-full).
    pub sslmode: String,
    /// libpq sslrootcert: the CA that signed the serve certificate (for
    /// verify-ca and verify-full).
    pub sslrootcert: Option<PathBuf>,
    pub application_name: String,
}

/// A libpq conninfo value, quoted when it needs to be.
fn conninfo_value(v: &str) -> String {
    if !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@".contains(&b))
    {
        return v.to_string();
    }
    let mut q = String::from("'");
    for c in v.chars() {
        if c == '\\' || c == '\'' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('\'');
    q
}

impl StreamTarget {
    /// Parses `HOST:PORT`.
    pub fn parse_addr(addr: &str) -> Result<(String, u16), String> {
        let (h, p) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("{addr:?} is not HOST:PORT"))?;
        let port = p.parse().map_err(|_| format!("{addr:?}: bad port {p:?}"))?;
        Ok((
            h.trim_start_matches('[').trim_end_matches(']').to_string(),
            port,
        ))
    }

    /// The conninfo the standby's walreceiver uses.
    pub fn conninfo(&self) -> String {
        let mut c = format!(
            "host={} port={} user={} sslmode={} application_name={}",
            conninfo_value(&self.host),
            self.port,
            conninfo_value(&self.user),
            conninfo_value(&self.sslmode),
            conninfo_value(&self.application_name)
        );
        if let Some(r) = &self.sslrootcert {
            c.push_str(&format!(
                " sslrootcert={}",
                conninfo_value(&r.to_string_lossy())
            ));
        }
        if let Some(p) = &self.password {
            c.push_str(&format!(" password={}", conninfo_value(p)));
        }
        c
    }

    /// Settings libpq would reject only once the standby runs: an unknown
    /// sslmode, or verify-ca/verify-full without the CA to verify with.
    pub fn check(&self) -> Result<(), String> {
        const MODES: [&str; 6] = [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ];
        if !MODES.contains(&self.sslmode.as_str()) {
            return Err(format!(
                "--sslmode {:?} is not one of {}",
                self.sslmode,
                MODES.join(", ")
            ));
        }
        match &self.sslrootcert {
            None if self.sslmode.starts_with("verify") => Err(format!(
                "--sslmode {} needs --sslrootcert FILE: the CA that signed the certificate of `receive --serve` (its --tls-cert)",
                self.sslmode
            )),
            Some(r) if !r.is_file() => Err(format!("--sslrootcert {}: no such file", r.display())),
            _ => Ok(()),
        }
    }
}

/// A path as a shell word inside a postgresql.conf string: bare when it is
/// plain, else in double quotes (shell) with single quotes doubled (conf).
pub(crate) fn shell_word(p: &Path) -> String {
    let s = p.display().to_string();
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b))
    {
        return s;
    }
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' | '$' | '`' => {
                q.push('\\');
                q.push(c);
            }
            '\'' => q.push_str("''"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// The line that starts init-standby's block in postgresql.auto.conf.
const BLOCK_MARK: &str = "# written by waltail init-standby";

/// The settings init-standby's block sets (an earlier block is recognised
/// by its mark and these names).
const BLOCK_KEYS: [&str; 7] = [
    "restore_command",
    "archive_cleanup_command",
    "wal_retrieve_retry_interval",
    "recovery_target_timeline",
    "hot_standby",
    "primary_conninfo",
    "recovery_prefetch",
];

/// `conf` without init-standby's earlier blocks: each mark line and the
/// lines right after it that set one of [`BLOCK_KEYS`].
pub fn without_block(conf: &str) -> String {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in conf.lines() {
        if line.trim() == BLOCK_MARK {
            in_block = true;
            // The blank line written before the mark goes with it.
            if out.last().is_some_and(|l: &&str| l.trim().is_empty()) {
                out.pop();
            }
            continue;
        }
        if in_block {
            let key = line.split('=').next().unwrap_or("").trim();
            if BLOCK_KEYS.contains(&key) {
                continue;
            }
            in_block = false;
        }
        out.push(line);
    }
    let mut s = out.join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    s
}

/// Why init-standby cannot go on: the server would not be able to use what
/// it makes. Exit 2; nothing was written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Precondition(pub String);

/// Checks, before anything is written, what the standby will need (see the
/// module header); makes the spool directory if it is missing; with `force`
/// empties a non-empty data directory that no server runs in.
pub fn check_preconditions(
    pgdata: &Path,
    spool: &Path,
    owner: Option<RunAs>,
    force: bool,
) -> Result<()> {
    let server = match owner {
        Some(r) => crate::access::Who::new(r.uid, r.gid),
        None => crate::access::Who::current(),
    };
    let server_name = crate::access::user_name(server.uid);
    let non_empty = pgdata.exists()
        && std::fs::read_dir(pgdata)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
    if non_empty && !force {
        return Err(Precondition(format!(
            "{} exists and is not empty: init-standby makes a new data directory (--force replaces what is in it)",
            pgdata.display()
        ))
        .into());
    }
    if non_empty {
        if let Some(pid) = running_postmaster(pgdata) {
            return Err(Precondition(format!(
                "{} is the data directory of a running server (pid {pid}, postmaster.pid): stop it first",
                pgdata.display()
            ))
            .into());
        }
    }
    match std::fs::metadata(spool) {
        Ok(m) if !m.is_dir() => {
            return Err(
                Precondition(format!("spool {} is not a directory", spool.display())).into(),
            )
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(spool)
                .map_err(|e| Precondition(format!("cannot make spool {}: {e}", spool.display())))?;
            if let Some(r) = owner {
                r.chown(spool)?;
            }
        }
        Err(e) => {
            return Err(
                Precondition(format!("cannot look at spool {}: {e}", spool.display())).into(),
            )
        }
    }
    if let Err(why) = server.check_can_read_dir(spool) {
        return Err(Precondition(format!(
            "the standby's server runs as {server_name}, and {why}: its restore_command could not read the spool. Fix: chown -R {} {} (and run waltail receive as that user too)",
            server_name.split(' ').next().unwrap_or_default(),
            spool.display()
        ))
        .into());
    }
    if let Err(why) = crate::access::check_private_dir(spool) {
        return Err(Precondition(why).into());
    }
    if non_empty {
        for e in std::fs::read_dir(pgdata)? {
            let p = e?.path();
            if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            }
            .with_context(|| format!("--force: removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// The pid in `pgdata/postmaster.pid` if that process is alive.
pub fn running_postmaster(pgdata: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    (pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok())
        .then_some(pid)
}

/// The recovery settings for a standby fed from `spool`.
///
/// In the recovery.signal style on PostgreSQL 15+, `recovery_prefetch` is
/// turned off: with read-ahead, the startup process asks for the next
/// segment before it replays the records it has already read, and a waiting
/// restore_command would then hold back their replay (a standby that never
/// becomes consistent after its base backup, for one).
pub fn recovery_settings(
    exe: &Path,
    spool: &Path,
    style: Style,
    retry: Duration,
    server_major: u32,
) -> String {
    recovery_settings_with(exe, spool, style, retry, server_major, None)
}

/// [`recovery_settings`], with the stream style's server.
pub fn recovery_settings_with(
    exe: &Path,
    spool: &Path,
    style: Style,
    retry: Duration,
    server_major: u32,
    stream: Option<&StreamTarget>,
) -> String {
    let wait = match style {
        Style::Recovery => " --wait",
        // The stream serves the growing segment; restore only complete ones.
        Style::Stream => " --no-partial",
        Style::Standby => "",
    };
    // Stream style: how soon the startup process retries the stream after
    // it broke (restore_command is asked in between).
    let retry = if style == Style::Stream {
        retry.max(Duration::from_secs(1))
    } else {
        retry
    };
    let conninfo = stream
        .filter(|_| style == Style::Stream)
        .map(|t| t.conninfo().replace('\\', "\\\\").replace('\'', "''"))
        .unwrap_or_default();
    let mut conf = format!(
        "\n{BLOCK_MARK}\n\
         restore_command = '{exe} restore %f %p --spool {spool}{wait}'\n\
         archive_cleanup_command = '{exe} cleanup %r --spool {spool}'\n\
         wal_retrieve_retry_interval = '{ms}ms'\n\
         recovery_target_timeline = 'latest'\n\
         hot_standby = on\n\
         primary_conninfo = '{conninfo}'\n",
        exe = shell_word(exe),
        spool = shell_word(spool),
        ms = retry.as_millis().max(1),
    );
    if style == Style::Recovery && server_major >= 15 {
        conf.push_str("recovery_prefetch = off\n");
    }
    conf
}

/// Writes the recovery settings and the signal file into `pgdata`.
pub fn configure(
    pgdata: &Path,
    exe: &Path,
    spool: &Path,
    style: Style,
    retry: Duration,
    owner: Option<RunAs>,
    server_major: u32,
) -> Result<()> {
    configure_with(pgdata, exe, spool, style, retry, owner, server_major, None)
}

/// [`configure`], with the stream style's server.
#[allow(clippy::too_many_arguments)]
pub fn configure_with(
    pgdata: &Path,
    exe: &Path,
    spool: &Path,
    style: Style,
    retry: Duration,
    owner: Option<RunAs>,
    server_major: u32,
    stream: Option<&StreamTarget>,
) -> Result<()> {
    if style == Style::Stream && stream.is_none() {
        bail!(
            "the stream style needs the address of `waltail receive --serve` (--serve HOST:PORT)"
        );
    }
    let conf = pgdata.join("postgresql.auto.conf");
    let old = match std::fs::read_to_string(&conf) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", conf.display())),
    };
    let text = without_block(&old)
        + &recovery_settings_with(exe, spool, style, retry, server_major, stream);
    crate::fsio::write_atomic(&conf, text.as_bytes())
        .with_context(|| format!("writing {}", conf.display()))?;
    // It may hold the password of primary_conninfo: the server's user only.
    std::fs::set_permissions(&conf, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    for other in ["standby.signal", "recovery.signal"] {
        let _ = std::fs::remove_file(pgdata.join(other));
    }
    let sig = pgdata.join(style.signal_file());
    std::fs::write(&sig, b"")?;
    if let Some(r) = owner {
        r.chown(&conf)?;
        r.chown(&sig)?;
    }
    Ok(())
}

/// What `waltail init-standby` is asked to make.
#[derive(Clone, Copy, Debug)]
pub struct InitStandby<'a> {
    /// conninfo of the primary to back up.
    pub primary: &'a str,
    pub pgdata: &'a Path,
    pub spool: &'a Path,
    pub style: Style,
    /// wal_retrieve_retry_interval.
    pub retry: Duration,
    pub method: Method,
    /// Replace what a non-empty `pgdata` holds.
    pub force: bool,
    /// The stream style's server (`waltail receive --serve`).
    pub stream: Option<&'a StreamTarget>,
}

impl<'a> InitStandby<'a> {
    /// The defaults: standby.signal style, 100 ms retries, any method, no force.
    pub fn new(primary: &'a str, pgdata: &'a Path, spool: &'a Path) -> Self {
        InitStandby {
            primary,
            pgdata,
            spool,
            style: Style::Standby,
            retry: Duration::from_millis(100),
            method: Method::Auto,
            force: false,
            stream: None,
        }
    }
}

/// `waltail init-standby`.
///
/// In the recovery.signal style the standby only replays complete segments,
/// so the primary is asked to switch to a new segment after the backup: the
/// backup's last segment completes at once and the standby becomes
/// consistent (and, with hot_standby, readable) without waiting for traffic.
pub async fn init_standby(exe: &Path, o: &InitStandby<'_>) -> Result<StandbyMade> {
    let InitStandby {
        primary,
        pgdata,
        spool,
        style,
        retry,
        method,
        force,
        stream,
    } = *o;
    if style == Style::Stream && stream.is_none() {
        bail!("--style stream needs --serve HOST:PORT, the address of `waltail receive --serve`");
    }
    let owner = RunAs::for_servers()?;
    check_preconditions(pgdata, spool, owner, force)?;
    let local = PgBin::find().map_err(anyhow::Error::msg)?;
    let info = {
        let c = crate::pg::client::connect(primary).await?;
        crate::pg::client::server_info(&c).await?
    };
    let major = info.major();
    // Client tools are picked for the primary's version.
    let bin = PgBin { major, ..local };
    let basebackup = bin.find_tool("pg_basebackup");
    let no_basebackup = || {
        format!(
            "no pg_basebackup of PostgreSQL {major} or newer is installed (looked in {}, /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin and PATH)",
            bin.dir.display()
        )
    };
    let use_copy = match (method, &basebackup) {
        (Method::Copy, _) => true,
        (Method::Basebackup, None) => bail!(
            "{}: install one, or use --method copy when the primary runs on this host",
            no_basebackup()
        ),
        (Method::Basebackup, Some(_)) | (Method::Auto, Some(_)) => false,
        (Method::Auto, None) => {
            crate::pg::backup::check_same_cluster(Path::new(&info.data_directory), info.sysid)
                .with_context(|| {
                    format!(
                        "{}, and a copy backup is not possible either",
                        no_basebackup()
                    )
                })?;
            true
        }
    };
    if let Some(r) = owner {
        if let Some(parent) = pgdata.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if !pgdata.exists() {
            std::fs::DirBuilder::new().mode(0o700).create(pgdata)?;
        }
        r.chown(pgdata)?;
    }
    let how = if use_copy {
        let b = crate::pg::backup::copy_backup(primary, pgdata, owner)
            .await
            .context("copy backup")?;
        let why = if method == Method::Auto {
            format!(" ({})", no_basebackup())
        } else {
            String::new()
        };
        format!(
            "base backup by copying {} during a low-level backup, {} to {}{why}",
            b.source.display(),
            b.start_lsn,
            b.stop_lsn
        )
    } else {
        let tool = basebackup.expect("checked above");
        let mut cmd = Command::new(&tool);
        cmd.arg("-D")
            .arg(pgdata)
            .args(["-X", "stream", "-c", "fast", "-d"])
            .arg(crate::pg::client::conninfo_with_env(primary));
        if let Some(r) = owner {
            r.apply(&mut cmd);
        }
        let out = cmd.output().context("running pg_basebackup")?;
        if !out.status.success() {
            bail!(
                "pg_basebackup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        format!("base backup by {}", tool.display())
    };
    let spool = std::path::absolute(spool)?;
    configure_with(pgdata, exe, &spool, style, retry, owner, major, stream)?;
    if style == Style::Recovery {
        let c = crate::pg::client::connect(primary).await?;
        c.query_one("SELECT pg_switch_wal()::text", &[])
            .await
            .context("pg_switch_wal() on the primary after the base backup")?;
    }
    Ok(StandbyMade {
        pgdata: pgdata.to_path_buf(),
        how,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_block_is_replaced_not_repeated() {
        let block = recovery_settings(
            Path::new("/usr/bin/waltail"),
            Path::new("/old-spool"),
            Style::Standby,
            Duration::from_millis(100),
            15,
        );
        let mine = "# Do not edit this file manually!\nwork_mem = '8MB'\n";
        let conf = format!("{mine}{block}log_min_messages = 'info'\n");
        let again = without_block(&conf)
            + &recovery_settings(
                Path::new("/usr/bin/waltail"),
                Path::new("/new-spool"),
                Style::Recovery,
                Duration::from_millis(100),
                15,
            );
        assert_eq!(again.matches(BLOCK_MARK).count(), 1, "{again}");
        assert!(again.starts_with(mine), "{again}");
        assert!(again.contains("log_min_messages = 'info'"), "{again}");
        assert!(!again.contains("/old-spool"), "{again}");
        assert!(again.contains("--spool /new-spool --wait"), "{again}");
        assert_eq!(without_block(mine), mine);
    }

    #[test]
    fn recovery_prefetch_is_set_only_where_it_exists() {
        let conf = |style, major| {
            recovery_settings(
                Path::new("/usr/bin/waltail"),
                Path::new("/spool"),
                style,
                Duration::from_millis(100),
                major,
            )
        };
        for major in [13, 14] {
            assert!(!conf(Style::Recovery, major).contains("recovery_prefetch"));
        }
        for major in [15, 16, 17, 18] {
            assert!(conf(Style::Recovery, major).contains("recovery_prefetch = off"));
            assert!(!conf(Style::Standby, major).contains("recovery_prefetch"));
        }
        assert!(conf(Style::Recovery, 17).contains("--spool /spool --wait'"));
    }

    #[test]
    fn the_stream_style_points_primary_conninfo_at_the_spool_server() {
        let t = StreamTarget {
            host: "standby-host".into(),
            port: 5434,
            user: "waltail".into(),
            password: Some("it's secret".into()),
            sslmode: "verify-full".into(),
            sslrootcert: Some("/etc/waltail/ca.pem".into()),
            application_name: "s1".into(),
        };
        let conf = recovery_settings_with(
            Path::new("/usr/bin/waltail"),
            Path::new("/spool"),
            Style::Stream,
            Duration::from_millis(100),
            17,
            Some(&t),
        );
        assert!(
            conf.contains("primary_conninfo = 'host=standby-host port=5434 user=waltail sslmode=verify-full application_name=s1 sslrootcert=/etc/waltail/ca.pem password=''it\\\\''s secret'''"),
            "{conf}"
        );
        assert!(conf.contains("--spool /spool --no-partial'"), "{conf}");
        assert!(
            conf.contains("wal_retrieve_retry_interval = '1000ms'"),
            "{conf}"
        );
    }
}
