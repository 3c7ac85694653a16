//! Fencing the old primary before a failover promotes its standby: an
//! operator's command (STONITH, a cloud API call, a firewall rule), in the
//! style of Patroni's and pacemaker's hooks.
//!
//! `failover --fence-command CMD` runs `sh -c CMD` once the split-brain check
//! passed and before anything in the spool is fenced or the standby
//! promoted. Exit 0 means the old primary can no longer take writes: the
//! failover goes on. Anything else (another status, a signal, no answer
//! within the timeout) stops the failover with nothing changed, because a
//! primary that may still be alive must not get a twin. The command gets
//! `WALTAIL_SPOOL` and, when the receiver knew it, `WALTAIL_PRIMARY_ADDR`
//! (the shipper's last address, `host:port`) in its environment; what it
//! printed and its status go into the report. Commands should be safe to
//! run twice: an interrupted failover runs it again.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// What the fence command did, for the failover report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceOutcome {
    pub command: String,
    /// The exit status (None: ended by a signal or timed out).
    pub exit_code: Option<i32>,
    /// The last few lines it printed (stdout, then stderr).
    pub output: String,
}

/// Keeps the end of what the command printed.
fn tail(bytes: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim_end();
    match s.char_indices().rev().nth(max.max(1) - 1) {
        Some((i, _)) if i > 0 => format!("...{}", &s[i..]),
        _ => s.to_string(),
    }
}

/// Runs the fence command; Ok only when it exited 0 within `timeout`.
pub async fn run(
    command: &str,
    spool: &Path,
    primary_addr: Option<&str>,
    timeout: Duration,
) -> Result<FenceOutcome> {
    run_hook(
        "fence command",
        "nothing was fenced or promoted: the old primary may still be alive",
        command,
        spool,
        primary_addr,
        timeout,
    )
    .await
}

/// Runs an operator's hook (`what`: "fence command", "stop command", ...)
/// with `sh -c`; Ok only when it exited 0 within `timeout`, else an error
/// that ends with `unchanged` (what its failure left as it was).
pub async fn run_hook(
    what: &str,
    unchanged: &str,
    command: &str,
    spool: &Path,
    primary_addr: Option<&str>,
    timeout: Duration,
) -> Result<FenceOutcome> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("WALTAIL_SPOOL", spool)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(a) = primary_addr {
        cmd.env("WALTAIL_PRIMARY_ADDR", a);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot run the {what} {command:?}"))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.with_context(|| format!("running the {what} {command:?}"))?,
        Err(_) => bail!("the {what} {command:?} did not finish within {timeout:?}; {unchanged}"),
    };
    let mut printed = out.stdout;
    printed.extend_from_slice(&out.stderr);
    let outcome = FenceOutcome {
        command: command.to_string(),
        exit_code: out.status.code(),
        output: tail(&printed, 2000),
    };
    if !out.status.success() {
        bail!(
            "the {what} {command:?} failed ({}){}; {unchanged}",
            match outcome.exit_code {
                Some(c) => format!("exit {c}"),
                None => "killed by a signal".into(),
            },
            if outcome.output.is_empty() {
                String::new()
            } else {
                format!(": {}", outcome.output.replace('\n', " | "))
            }
        );
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_exit_0_lets_the_failover_go_on() {
        let d = tempfile::tempdir().unwrap();
        let ok = run(
            "echo fenced $WALTAIL_PRIMARY_ADDR",
            d.path(),
            Some("a:1"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(ok.exit_code, Some(0));
        assert_eq!(ok.output, "fenced a:1");
        let e = run(
            "echo no way >&2; exit 7",
            d.path(),
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("exit 7") && e.contains("no way") && e.contains("nothing was fenced"),
            "{e}"
        );
        let e = run("sleep 5", d.path(), None, Duration::from_millis(200))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not finish"), "{e}");
        assert_eq!(tail(b"abcdef", 3), "...def");
    }
}
