//! `waltail rejoin`: turn a stopped old primary into a standby of the new
//! primary, the way repmgr's `node rejoin` and Patroni's `use_pg_rewind` do.
//!
//! Steps, none of which starts the server:
//! 1. **Check**: the data directory holds no running server; its control
//!    file and the new primary's name the same system identifier; the new
//!    primary is not in recovery; the old one has `wal_log_hints` or data
//!    checksums, without which pg_rewind cannot work (then only
//!    `--allow-rebuild` goes on, with a fresh base backup as `init-standby
//!    --force` takes it).
//! 2. **No rewind when none is needed**: an old primary that stopped cleanly
//!    (its control file says "shut down") before the new primary's timeline
//!    branched off, as after `waltail switchover`, holds a prefix of the new
//!    primary's history: it is configured as a standby, pg_rewind is not run.
//! 3. **Checkpoint the new primary** when its control file still names an
//!    older timeline than the one it writes (true until the first checkpoint
//!    after `pg_promote()`): pg_rewind reads the timeline from there and would
//!    otherwise say "no rewind required".
//! 4. **Rewind**: keep the node's own configuration files (pg_rewind copies
//!    the source's over them), point its restore_command at `--wal-from` (a
//!    spool, or an archived one, holding the old primary's WAL) when given,
//!    and run pg_rewind `--restore-target-wal` with it; so WAL the old primary
//!    already recycled comes from the spool.
//! 5. **Configure**: put the node's files back and write the standby
//!    settings of the chosen style with its spool ([`crate::standby::configure`]).
//!
//! The report says what was done. A failure before step 4 changes nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::pg::cluster::RunAs;
use crate::pg::PgBin;
use crate::standby::{InitStandby, Precondition, Style};

/// What `waltail rejoin` is asked to do.
#[derive(Clone, Copy, Debug)]
pub struct Rejoin<'a> {
    /// The old primary's data directory (stopped).
    pub pgdata: &'a Path,
    /// conninfo of the new primary.
    pub primary: &'a str,
    /// The spool this node will be fed from, as a standby.
    pub spool: &'a Path,
    pub style: Style,
    /// A spool (or archived spool) holding the old primary's WAL, for WAL
    /// the old primary no longer has.
    pub wal_from: Option<&'a Path>,
    /// Without wal_log_hints or checksums, take a fresh base backup instead.
    pub allow_rebuild: bool,
}

/// What rejoin did.
#[derive(Clone, Debug, Serialize)]
pub struct RejoinReport {
    pub pgdata: PathBuf,
    /// "rewound", "no rewind needed" or "rebuilt".
    pub action: String,
    /// Whether the new primary was checkpointed first.
    pub checkpointed_primary: bool,
    /// The node's own configuration files, kept through the rewind.
    pub kept: Vec<String>,
    pub style: String,
    pub pg_rewind_output: String,
}

/// The configuration files a node keeps through a rewind: the usual ones
/// and any other `*.conf` at the top of its data directory.
fn config_files(pgdata: &Path) -> Vec<String> {
    let mut v: Vec<String> = [
        "postgresql.conf",
        "postgresql.auto.conf",
        "pg_hba.conf",
        "pg_ident.conf",
    ]
    .map(String::from)
    .to_vec();
    if let Ok(rd) = std::fs::read_dir(pgdata) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.ends_with(".conf") && !v.contains(&n) && e.path().is_file() {
                v.push(n);
            }
        }
    }
    v.retain(|n| pgdata.join(n).is_file());
    v.sort();
    v
}

/// `pg_controldata` of `pgdata`, as (key, value) lines.
fn control_data(bin: &PgBin, pgdata: &Path) -> Result<Vec<(String, String)>> {
    let tool = bin.tool("pg_controldata");
    let out = Command::new(&tool)
        .arg("-D")
        .arg(pgdata)
        .env("LC_ALL", "C")
        .output()
        .with_context(|| format!("running {}", tool.display()))?;
    if !out.status.success() {
        bail!(
            "pg_controldata -D {}: {}",
            pgdata.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}

fn field<'a>(cd: &'a [(String, String)], key: &str) -> Option<&'a str> {
    cd.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The major version of the data directory (`PG_VERSION`).
fn data_major(pgdata: &Path) -> Result<u32> {
    let v = std::fs::read_to_string(pgdata.join("PG_VERSION")).with_context(|| {
        format!(
            "{} is not a PostgreSQL data directory (no PG_VERSION)",
            pgdata.display()
        )
    })?;
    v.trim()
        .parse()
        .with_context(|| format!("PG_VERSION of {} is {v:?}", pgdata.display()))
}

/// Runs `waltail rejoin`.
pub async fn rejoin(exe: &Path, o: &Rejoin<'_>) -> Result<RejoinReport> {
    let owner = RunAs::for_servers()?;
    let pgdata = o.pgdata;
    if let Some(pid) = crate::standby::running_postmaster(pgdata) {
        return Err(Precondition(format!(
            "a server is running in {} (pid {pid}): stop it first (pg_ctl -D {} stop -m fast)",
            pgdata.display(),
            pgdata.display()
        ))
        .into());
    }
    let major = data_major(pgdata)?;
    let bin = PgBin {
        major,
        ..PgBin::find().map_err(anyhow::Error::msg)?
    };
    let ctl = crate::pg::control::read(pgdata).map_err(|e| Precondition(e.to_string()))?;
    let sysid = ctl.sysid;
    let c = crate::pg::client::connect(o.primary).await?;
    let info = crate::pg::client::server_info(&c).await?;
    if info.sysid != sysid {
        return Err(Precondition(format!(
            "{} is system {sysid}, the new primary is system {}: not the same cluster, nothing to rejoin",
            pgdata.display(),
            info.sysid
        ))
        .into());
    }
    if info.in_recovery {
        return Err(Precondition(
            "the server at --primary is in recovery: rejoin follows a primary (promote it first)"
                .into(),
        )
        .into());
    }
    // The standby settings of the chosen style, on top of the node's files.
    let write_standby_settings = || {
        crate::standby::configure(
            pgdata,
            exe,
            &std::path::absolute(o.spool)?,
            o.style,
            Duration::from_millis(100),
            owner,
            major,
        )
    };
    // Stopped cleanly exactly where the new primary's timeline branched
    // off (a switchover): nothing to rewind.
    if let Some(sp) = clean_stop_before_fork(&c, &ctl, info.seg_size).await {
        write_standby_settings()?;
        return Ok(RejoinReport {
            pgdata: pgdata.to_path_buf(),
            action: "no rewind needed".into(),
            checkpointed_primary: false,
            kept: config_files(pgdata),
            style: o.style.signal_file().into(),
            pg_rewind_output: format!(
                "not run: the server stopped cleanly at {} (its shutdown checkpoint), before the new primary's timeline branched off at {sp}",
                ctl.checkpoint
            ),
        });
    }
    let cd = control_data(&bin, pgdata)?;
    let hints = field(&cd, "wal_log_hints setting") == Some("on");
    let checksums = field(&cd, "Data page checksum version").is_some_and(|v| v != "0");
    if !hints && !checksums && !o.allow_rebuild {
        return Err(Precondition(format!(
            "{} has neither wal_log_hints nor data checksums, so pg_rewind cannot rewind it: rebuild it from a fresh base backup with --allow-rebuild (and set wal_log_hints = on for next time)",
            pgdata.display()
        ))
        .into());
    }
    // The new primary's control file must name the timeline it writes.
    let row = c
        .query_one(
            "SELECT (SELECT timeline_id FROM pg_control_checkpoint()),
                    pg_walfile_name(pg_current_wal_lsn())",
            &[],
        )
        .await?;
    let control_tli: i32 = row.get(0);
    let name: String = row.get(1);
    let current_tli = crate::pg::client::timeline_of(&name, info.seg_size)
        .with_context(|| format!("the new primary names its WAL file {name:?}"))?;
    let checkpointed = (control_tli as u32) < current_tli.0;
    if checkpointed {
        c.batch_execute("CHECKPOINT").await.context(
            "CHECKPOINT on the new primary (its control file still named the old timeline)",
        )?;
    }
    // Keep the node's own configuration.
    let kept: Vec<(String, Vec<u8>)> = config_files(pgdata)
        .into_iter()
        .map(|n| {
            let b = std::fs::read(pgdata.join(&n))?;
            Ok((n, b))
        })
        .collect::<std::io::Result<_>>()?;
    if !hints && !checksums {
        let made = crate::standby::init_standby(
            exe,
            &InitStandby {
                style: o.style,
                force: true,
                ..InitStandby::new(o.primary, pgdata, o.spool)
            },
        )
        .await?;
        // The fresh copy came with the new primary's files: the node's own
        // come back, then the standby settings go on top.
        put_back(pgdata, &kept, owner)?;
        write_standby_settings()?;
        return Ok(RejoinReport {
            pgdata: pgdata.to_path_buf(),
            action: "rebuilt".into(),
            checkpointed_primary: checkpointed,
            kept: kept.iter().map(|(n, _)| n.clone()).collect(),
            style: o.style.signal_file().into(),
            pg_rewind_output: made.how,
        });
    }
    let tool = bin
        .find_tool("pg_rewind")
        .with_context(|| format!("no pg_rewind of PostgreSQL {major} is installed"))?;
    let mut cmd = Command::new(&tool);
    cmd.arg("--target-pgdata")
        .arg(pgdata)
        .arg("--source-server")
        .arg(crate::pg::client::conninfo_with_env(o.primary));
    if let Some(w) = o.wal_from {
        let w = std::path::absolute(w)?;
        // pg_rewind asks the target's own configuration for restore_command.
        let conf = pgdata.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
        text.push_str(&format!(
            "\n# waltail rejoin: WAL the old primary no longer has, for pg_rewind\nrestore_command = '{} restore %f %p --spool {}'\n",
            crate::standby::shell_word(exe),
            crate::standby::shell_word(&w)
        ));
        std::fs::write(&conf, text)?;
        cmd.arg("--restore-target-wal");
    }
    if let Some(r) = owner {
        r.apply(&mut cmd);
    }
    let out = cmd.output().context("running pg_rewind")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Whatever pg_rewind did, the node's files come back.
    put_back(pgdata, &kept, owner)?;
    if !out.status.success() {
        bail!("pg_rewind failed: {}", said.trim());
    }
    write_standby_settings()?;
    Ok(RejoinReport {
        pgdata: pgdata.to_path_buf(),
        action: if said.contains("no rewind required") {
            "no rewind needed".into()
        } else {
            "rewound".into()
        },
        checkpointed_primary: checkpointed,
        kept: kept.into_iter().map(|(n, _)| n).collect(),
        style: o.style.signal_file().into(),
        pg_rewind_output: said.trim().to_string(),
    })
}

/// The new primary's switch point off the old primary's timeline, when the
/// old primary stopped cleanly (a shutdown checkpoint, nothing after it)
/// before it: then its WAL is a prefix of the new primary's history and it
/// can follow as it is. None when that cannot be shown (then pg_rewind
/// decides).
async fn clean_stop_before_fork(
    c: &tokio_postgres::Client,
    ctl: &crate::pg::control::ControlFile,
    seg_size: crate::wal::SegmentSize,
) -> Option<crate::wal::Lsn> {
    if ctl.state != crate::pg::control::DbState::ShutDown {
        return None;
    }
    let name: String = c
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await
        .ok()?
        .get(0);
    let tli = crate::pg::client::timeline_of(&name, seg_size)?;
    if tli <= ctl.tli {
        return None;
    }
    let path = format!("pg_wal/{}", crate::wal::segment::history_file_name(tli));
    let bytes: Vec<u8> = c
        .query_one("SELECT pg_read_binary_file($1)", &[&path])
        .await
        .map_err(|e| tracing::debug!("reading the new primary's {path}: {e}"))
        .ok()?
        .get(0);
    let entries = crate::wal::history::parse_history(&String::from_utf8_lossy(&bytes)).ok()?;
    let sp = crate::wal::history::switchpoint_of(&entries, ctl.tli)?;
    (ctl.checkpoint < sp).then_some(sp)
}

/// Writes the node's own configuration files back (after pg_rewind or a
/// fresh base backup brought the new primary's).
fn put_back(pgdata: &Path, kept: &[(String, Vec<u8>)], owner: Option<RunAs>) -> Result<()> {
    for (n, b) in kept {
        crate::fsio::write_atomic(&pgdata.join(n), b)?;
        if let Some(r) = owner {
            r.chown(&pgdata.join(n))?;
        }
    }
    Ok(())
}
