//! Configuration files: one TOML file per role (`--config FILE` or
//! `WALTAIL_CONFIG`), merged under the command line.
//!
//! Precedence, highest first: a flag, its environment variable, the file,
//! the built-in default. The merge looks at clap's `ValueSource` of each
//! argument: a value that came from the command line or the environment is
//! kept; one that is a default (or absent) is replaced by the file's value.
//!
//! Every role's file is a flat table of keys named like the long flags with
//! `_` for `-` (`secret_file`, `idle_timeout`, ...), plus `log_level` (an
//! `EnvFilter` directive such as `info` or `debug,tokio_postgres=warn`; the
//! `WALTAIL_LOG` variable overrides it). Unknown keys and bad values are
//! errors that name the file, the line and the key ([`ConfigError`], exit 2).
//! Samples live in `docs/config/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::{Deserialize, Deserializer};

use crate::wal::Lsn;

/// A config file that could not be used; its message is one line naming the
/// file and, where known, the line and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// A duration written like the flags take it: "10ms", "2s", "1m 30s".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::cli::parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

fn dur(d: Option<Dur>) -> Option<Duration> {
    d.map(|d| d.0)
}

/// `ship`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipFile {
    pub primary: Option<String>,
    pub receiver: Option<String>,
    pub interval: Option<Dur>,
    pub wake: Option<crate::ship::wake::WakeMode>,
    pub ack_timeout: Option<Dur>,
    pub slot: Option<String>,
    pub no_slot: Option<bool>,
    pub start_lsn: Option<Lsn>,
    pub pg_wal: Option<PathBuf>,
    pub synchronous: Option<bool>,
    pub application_name: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub insecure_no_auth: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub metrics_addr: Option<String>,
    pub log_level: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveFile {
    pub listen: Option<String>,
    pub spool: Option<PathBuf>,
    pub idle_timeout: Option<Dur>,
    pub max_connections: Option<usize>,
    pub secret_file: Option<PathBuf>,
    pub insecure_no_auth: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub metrics_addr: Option<String>,
    pub log_level: Option<String>,
    pub serve: Option<String>,
    pub serve_verifier_file: Option<PathBuf>,
    pub serve_user: Option<String>,
}

/// `restore` and `cleanup` (the standby's restore_command and archive_cleanup_command).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreFile {
    pub spool: Option<PathBuf>,
    pub wait: Option<bool>,
    pub poll: Option<Dur>,
    pub max_wait: Option<Dur>,
    pub log_level: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverFile {
    pub spool: Option<PathBuf>,
    pub standby: Option<String>,
    pub fence_command: Option<String>,
    pub alive_window: Option<Dur>,
    pub timeout: Option<Dur>,
    pub log_level: Option<String>,
}

/// `status` and `check`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusFile {
    pub spool: Option<PathBuf>,
    pub primary: Option<String>,
    pub standby: Option<String>,
    pub warning: Option<String>,
    pub critical: Option<String>,
    pub stale_after: Option<Dur>,
    pub log_level: Option<String>,
}

/// Reads and parses a role's config file.
pub fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
    parse(&text, path)
}

/// Parses a role's config text; `path` is only for messages.
pub fn parse<T: for<'de> Deserialize<'de>>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
                let line = text.lines().nth(line_no - 1).unwrap_or("");
                let key = line.split('=').next().unwrap_or("").trim();
                if !key.is_empty() && !key.starts_with('[') && line.contains('=') {
                    ConfigError(format!(
                        "config file {} line {line_no}, key `{key}`: {msg}",
                        path.display()
                    ))
                } else {
                    ConfigError(format!(
                        "config file {} line {line_no}: {msg}",
                        path.display()
                    ))
                }
            }
            None => ConfigError(format!("config file {}: {msg}", path.display())),
        }
    })
}

/// Whether the argument `id` was given on the command line or through its
/// environment variable (and so wins over the file).
pub fn explicit(m: &ArgMatches, id: &str) -> bool {
    matches!(
        m.value_source(id),
        Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
    )
}

/// Takes the file's value for `id` unless the command line or environment set it.
pub fn merge<T>(m: &ArgMatches, id: &str, cli: &mut T, file: Option<T>) {
    if let Some(v) = file {
        if !explicit(m, id) {
            *cli = v;
        }
    }
}

/// [`merge`] for optional arguments.
pub fn merge_opt<T>(m: &ArgMatches, id: &str, cli: &mut Option<T>, file: Option<T>) {
    if let Some(v) = file {
        if !explicit(m, id) {
            *cli = Some(v);
        }
    }
}

/// [`merge`] for durations.
pub fn merge_dur(m: &ArgMatches, id: &str, cli: &mut Duration, file: Option<Dur>) {
    merge(m, id, cli, dur(file))
}

/// [`merge`] for optional durations.
pub fn merge_opt_dur(m: &ArgMatches, id: &str, cli: &mut Option<Duration>, file: Option<Dur>) {
    merge_opt(m, id, cli, dur(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_the_key_and_file() {
        let e = parse::<ShipFile>(
            "interval = \"10ms\"\nintervall = \"5ms\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(e.0.contains("x.toml"), "{e}");
        assert!(e.0.contains("intervall"), "{e}");
        assert!(!e.0.contains('\n'), "{e}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let e =
            parse::<ReceiveFile>("max_connections = \"many\"\n", Path::new("r.toml")).unwrap_err();
        assert!(e.0.contains("max_connections"), "{e}");
        let e = parse::<ShipFile>("primary = \"\"\ninterval = \"soon\"\n", Path::new("s.toml"))
            .unwrap_err();
        assert!(e.0.contains("`interval`") && e.0.contains("line 2"), "{e}");
        let e = parse::<ShipFile>("start_lsn = \"nope\"\n", Path::new("s.toml")).unwrap_err();
        assert!(e.0.contains("start_lsn"), "{e}");
    }

    #[test]
    fn values_parse() {
        let f: ShipFile = parse(
            "interval = \"25ms\"\nstart_lsn = \"0/3000000\"\nno_slot = true\n",
            Path::new("s.toml"),
        )
        .unwrap();
        assert_eq!(f.interval, Some(Dur(Duration::from_millis(25))));
        assert_eq!(f.start_lsn, Some(Lsn(0x300_0000)));
        assert_eq!(f.no_slot, Some(true));
    }
}
