//! Child processes of the demo and the benchmarks: starting waltail daemons
//! (as the server user when we are root) with their log in a file, waiting
//! for a condition with a deadline, and reading a process's CPU time and
//! resident memory from /proc.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::cluster::RunAs;

/// Starts `exe ARGS` with stderr to `log`, as `run_as` if given.
pub fn spawn_logged(
    exe: &Path,
    args: &[String],
    log: &Path,
    run_as: Option<RunAs>,
) -> Result<Child> {
    let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(f)
        .env("WALTAIL_LOG", "info");
    if let Some(r) = run_as {
        r.chown(log)?;
        r.apply(&mut cmd);
    }
    cmd.spawn()
        .with_context(|| format!("starting {}", exe.display()))
}

/// Polls `f` every 20 ms until it holds, or fails after `d`.
pub fn wait_until(d: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + d;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out after {d:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// User plus system CPU seconds a process has used (0 if it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    proc_cpu_seconds(pid, false)
}

/// [`cpu_seconds`], plus the CPU of the children it waited for when
/// `children` (utime, stime, cutime, cstime of `/proc/<pid>/stat`).
pub fn proc_cpu_seconds(pid: u32, children: bool) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let own = t(11) + t(12);
    let waited = if children { t(13) + t(14) } else { 0.0 };
    (own + waited) / 100.0
}

/// Resident set size in MB (0 if the process is gone).
pub fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// A running `waltail receive` + `waltail ship` pair on this machine.
pub struct Pair {
    pub receive: Child,
    pub ship: Child,
    pub spool: std::path::PathBuf,
    /// The receiver's command line, to start it again.
    pub receive_args: Vec<String>,
}

/// Starts `exe receive` on a free loopback port with its spool in `work`,
/// then `exe ship` from `primary_conninfo` to it, with a fresh secret file
/// (all readable by `run_as`); waits until WAL reaches the spool. Logs go to
/// `work/receive.log` and `work/ship.log`.
pub fn start_pair(
    exe: &Path,
    primary_conninfo: &str,
    work: &Path,
    interval: Duration,
    run_as: Option<RunAs>,
) -> Result<Pair> {
    let iv = format!("{}ms", interval.as_millis().max(1));
    start_pair_with(
        exe,
        primary_conninfo,
        work,
        &["--interval", &iv],
        run_as,
        &[],
    )
}

/// What a stream-style standby needs of `receive --serve` on loopback: the
/// receiver's extra arguments (a verifier for a random password, both
/// written into `work`) and where the standby connects.
pub fn serve_on_loopback(
    work: &Path,
    run_as: Option<RunAs>,
) -> Result<(Vec<String>, crate::standby::StreamTarget)> {
    let port = super::cluster::free_port()?;
    let mut pw = [0u8; 18];
    getrandom::getrandom(&mut pw).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    let password: String = pw.iter().map(|b| format!("{b:02x}")).collect();
    let vf = work.join("serve-verifier");
    std::fs::write(&vf, crate::serve::auth::make_verifier(&password))?;
    if let Some(r) = run_as {
        r.chown(&vf)?;
    }
    let args = vec![
        "--serve".to_string(),
        format!("127.0.0.1:{port}"),
        "--serve-verifier-file".into(),
        vf.display().to_string(),
    ];
    let target = crate::standby::StreamTarget {
        host: "127.0.0.1".into(),
        port,
        user: "waltail".into(),
        password: Some(password),
        sslmode: "disable".into(),
        sslrootcert: None,
        application_name: "waltail-standby".into(),
    };
    Ok((args, target))
}

/// As [`start_pair`], with `ship_flags` for the shipper instead of an
/// interval, and more arguments for the receiver (`--serve ...`).
pub fn start_pair_with(
    exe: &Path,
    primary_conninfo: &str,
    work: &Path,
    ship_flags: &[&str],
    run_as: Option<RunAs>,
    receive_extra: &[String],
) -> Result<Pair> {
    let secret = work.join("secret");
    let mut s = [0u8; 24];
    getrandom::getrandom(&mut s).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    std::fs::write(
        &secret,
        s.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    )?;
    if let Some(r) = run_as {
        r.chown(&secret)?;
    }
    let spool = work.join("spool");
    let addr = format!("127.0.0.1:{}", super::cluster::free_port()?);
    let owned = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (sp, sec) = (spool.display().to_string(), secret.display().to_string());
    let mut receive_args = owned(&[
        "receive",
        "--listen",
        &addr,
        "--spool",
        &sp,
        "--secret-file",
        &sec,
    ]);
    receive_args.extend(receive_extra.iter().cloned());
    let receive = spawn_logged(exe, &receive_args, &work.join("receive.log"), run_as)?;
    wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(&addr).is_ok()
    })
    .context("waltail receive did not start listening")?;
    let mut ship_args = owned(&[
        "ship",
        "--primary",
        primary_conninfo,
        "--receiver",
        &addr,
        "--secret-file",
        &sec,
    ]);
    ship_args.extend(owned(ship_flags));
    let ship = spawn_logged(exe, &ship_args, &work.join("ship.log"), run_as)?;
    let pos = spool.join("position");
    wait_until(Duration::from_secs(30), || pos.exists()).context("no WAL reached the spool")?;
    Ok(Pair {
        receive,
        ship,
        spool,
        receive_args,
    })
}
