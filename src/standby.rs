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

use std::fs::OpenOptions;
use std::io::Write;
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
        if let Some(p) = &self.password {
            c.push_str(&format!(" password={}", conninfo_value(p)));
        }
        c
    }
}

/// A path as a shell word inside a postgresql.conf string: bare when it is
/// plain, else in double quotes (shell) with single quotes doubled (conf).
fn shell_word(p: &Path) -> String {
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
        "\n# written by waltail init-standby\n\
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
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(&conf)
        .with_context(|| format!("opening {}", conf.display()))?;
    f.write_all(recovery_settings_with(exe, spool, style, retry, server_major, stream).as_bytes())?;
    drop(f);
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

/// `waltail init-standby`.
///
/// In the recovery.signal style the standby only replays complete segments,
/// so the primary is asked to switch to a new segment after the backup: the
/// backup's last segment completes at once and the standby becomes
/// consistent (and, with hot_standby, readable) without waiting for traffic.
pub async fn init_standby(
    exe: &Path,
    primary: &str,
    pgdata: &Path,
    spool: &Path,
    style: Style,
    retry: Duration,
    method: Method,
) -> Result<StandbyMade> {
    init_standby_with(exe, primary, pgdata, spool, style, retry, method, None).await
}

/// [`init_standby`], with the stream style's server.
#[allow(clippy::too_many_arguments)]
pub async fn init_standby_with(
    exe: &Path,
    primary: &str,
    pgdata: &Path,
    spool: &Path,
    style: Style,
    retry: Duration,
    method: Method,
    stream: Option<&StreamTarget>,
) -> Result<StandbyMade> {
    if style == Style::Stream && stream.is_none() {
        bail!("--style stream needs --serve HOST:PORT, the address of `waltail receive --serve`");
    }
    if pgdata.exists()
        && std::fs::read_dir(pgdata)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} exists and is not empty: init-standby makes a new data directory",
            pgdata.display()
        );
    }
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
    let owner = RunAs::for_servers()?;
    if let Some(r) = owner {
        if let Some(parent) = pgdata.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(pgdata)?;
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
            sslmode: "require".into(),
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
            conf.contains("primary_conninfo = 'host=standby-host port=5434 user=waltail sslmode=require application_name=s1 password=''it\\\\''s secret'''"),
            "{conf}"
        );
        assert!(conf.contains("--spool /spool --no-partial'"), "{conf}");
        assert!(
            conf.contains("wal_retrieve_retry_interval = '1000ms'"),
            "{conf}"
        );
    }
}
