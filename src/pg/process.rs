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
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
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
