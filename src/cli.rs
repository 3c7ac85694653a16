//! Command-line interface: argument parsing, logging set-up and exit codes.
//!
//! Exit codes (documented in the README and in `--help`):
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | the operation failed (server unreachable, I/O error, refused) |
//! | 2 | bad input: a bad argument, a bad config file, a file that is not what it should be, settings that cannot work together |
//! | 3 | `ship`, `receive`: refused for good (a fenced spool, a wrong secret, another cluster); the units do not restart on it |
//! | 126 | `restore --wait`: bad arguments (fatal to PostgreSQL, so recovery stops rather than promoting) |
//!
//! `waltail check` is the exception: it exits with the Nagios codes 0 OK,
//! 1 WARNING, 2 CRITICAL, 3 UNKNOWN (bad arguments included).
//!
//! Roles with a config file (`--config`, see [`crate::config`]) merge it under
//! the command line here; `ship` and `receive` reload parts of it on SIGHUP.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{self, explicit, merge, merge_dur, merge_opt, merge_opt_dur};

use crate::proto::tls::TlsOptions;
use crate::proto::Secret;
use crate::wal::Lsn;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;
/// The peer refuses for good (a fenced spool, a wrong secret, another
/// cluster): only an operator can fix it, so the systemd units do not
/// restart on it (`RestartPreventExitStatus=2 3`).
pub const EXIT_REFUSED: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "waltail",
    propagate_version = true,
    version,
    about = "Stream a PostgreSQL primary's live WAL to a standby in byte ranges",
    after_help = "Exit codes: 0 success, 1 operation failed, 2 bad input.\n\nExample:\n  waltail inspect /var/lib/postgresql/15/main/pg_wal/000000010000000000000003 --json"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "WALTAIL_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// The role's TOML config file; flags and environment variables override it (see docs/config/).
    #[arg(long, global = true, env = "WALTAIL_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parses "10ms", "1ms", "2s", "500us".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 10ms or 2s: {e}"))
}

#[derive(Args, Debug, Clone)]
pub struct AuthArgs {
    /// File holding the shared secret (the same file on both hosts).
    #[arg(long, env = "WALTAIL_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Run without authentication. For local demos only: anyone who can reach
    /// the receiver could write WAL into the standby's spool.
    #[arg(long, conflicts_with = "secret_file")]
    pub insecure_no_auth: bool,
    /// TLS certificate (PEM): the receiver's server certificate, or the shipper's client certificate.
    #[arg(long, env = "WALTAIL_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, env = "WALTAIL_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM): the shipper verifies the receiver with it; the
    /// receiver, when given one, requires shippers to present a certificate it signed.
    #[arg(long, env = "WALTAIL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl AuthArgs {
    pub fn secret(&self) -> Result<Secret, String> {
        match (&self.secret_file, self.insecure_no_auth) {
            (_, true) => Ok(Secret::insecure_none()),
            (Some(p), false) => Secret::from_file(p),
            (None, false) => Err(
                "--secret-file is required (or `secret_file` in the config file; --insecure-no-auth for a local demo)"
                    .into(),
            ),
        }
    }

    /// Takes the config file's values where the command line set none.
    #[allow(clippy::too_many_arguments)]
    fn merge(
        &mut self,
        m: &ArgMatches,
        secret_file: Option<PathBuf>,
        insecure_no_auth: Option<bool>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        tls_ca: Option<PathBuf>,
    ) {
        merge_opt(m, "secret_file", &mut self.secret_file, secret_file);
        merge(
            m,
            "insecure_no_auth",
            &mut self.insecure_no_auth,
            insecure_no_auth,
        );
        merge_opt(m, "tls_cert", &mut self.tls_cert, tls_cert);
        merge_opt(m, "tls_key", &mut self.tls_key, tls_key);
        merge_opt(m, "tls_ca", &mut self.tls_ca, tls_ca);
    }
    pub fn tls(&self) -> TlsOptions {
        TlsOptions {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Report what one WAL segment file holds and where its valid WAL ends.
    #[command(
        after_help = "Example:\n  waltail inspect pg_wal/000000010000000000000003 --json\n\nThe record count and last record match what `pg_waldump FILE` prints for the same file.\nExit codes: 0 success, 2 the file is missing, unreadable, not WAL or of the wrong size."
    )]
    Inspect {
        /// A segment file (full size, or a whole number of 8 kB pages of one).
        file: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Ship the primary's flushed WAL to a receiver as it is written (run on the primary's host).
    #[command(
        after_help = "Example:\n  waltail ship --primary 'host=/var/run/postgresql user=postgres' \\\n      --receiver standby.example.com:5433 --secret-file /etc/waltail/secret\n\nThe role needs superuser (it reads pg_control, data_directory and manages a replication slot).\nExit codes: 0 stopped by SIGTERM/SIGINT, 1 a fatal error (WAL gone), 2 bad arguments or settings that
cannot work (no port, TLS on one side only, a certificate it cannot accept), 3 refused by the receiver
for good (fenced spool: see the walk-through; wrong secret; another cluster)."
    )]
    Ship(ShipArgs),
    /// Receive WAL from a shipper into a spool directory (run on the standby's host).
    #[command(
        after_help = "Example:\n  waltail receive --listen 0.0.0.0:5433 --spool /var/lib/waltail/spool \\\n      --secret-file /etc/waltail/secret\n\nExit codes: 0 stopped by SIGTERM/SIGINT, 1 a fatal error, 2 bad arguments or a spool it cannot use
(others can get at it, files it cannot write), 3 the spool is fenced by a failover."
    )]
    Receive(ReceiveArgs),
    /// restore_command: copy a WAL file from the spool to where recovery wants it.
    #[command(
        after_help = "Example (postgresql.conf on the standby):\n  restore_command = 'waltail restore %f %p --spool /var/lib/waltail/spool'\n  restore_command = 'waltail restore %f %p --spool /var/lib/waltail/spool --wait'   # recovery.signal style\n\nExit codes:\n  0    restored\n  1    not found: recovery goes on (standby.signal) or, with --wait, ends and promotes, which\n       restore answers only when the spool is healthy and a failover has finished; standby.signal\n       style also after 5 s of a spool it cannot read (PostgreSQL asks again)\n  2    bad arguments (standby.signal style)\n  126  bad arguments with --wait: fatal to PostgreSQL, so recovery stops instead of promoting\nWith --wait a missing, unreadable or damaged spool is waited out (the reason on stderr every\n5 s, in the server's log), never answered. Never 127 or a signal."
    )]
    Restore {
        /// %f: the file name recovery asks for.
        file: String,
        /// %p: where to put it.
        dest: PathBuf,
        #[arg(long, env = "WALTAIL_SPOOL")]
        spool: Option<PathBuf>,
        /// recovery.signal style: wait until the segment is complete, or a failover ends the wait.
        #[arg(long)]
        wait: bool,
        /// stream style: serve complete segments only, never the growing `.partial`
        /// (the standby streams that from `receive --serve`).
        #[arg(long, conflicts_with = "wait")]
        no_partial: bool,
        /// How often --wait looks again.
        #[arg(long, default_value = "100ms", value_parser = parse_duration)]
        poll: Duration,
        /// Give up waiting after this long (default: wait until a failover).
        #[arg(long, value_parser = parse_duration)]
        max_wait: Option<Duration>,
    },
    /// archive_cleanup_command: remove spooled segments recovery no longer needs.
    #[command(
        after_help = "Example (postgresql.conf on the standby):\n  archive_cleanup_command = 'waltail cleanup %r --spool /var/lib/waltail/spool'\n\nExit codes: 0 done, 1 an I/O error, 2 bad arguments."
    )]
    Cleanup {
        /// %r: the oldest segment to keep.
        oldest_kept: String,
        #[arg(long, env = "WALTAIL_SPOOL")]
        spool: Option<PathBuf>,
        /// Only print what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// The failover hook: fence the receiver, finalize the last segment, promote the standby.
    #[command(
        after_help = "Example:\n  waltail failover --spool /var/lib/waltail/spool --standby 'host=/var/run/postgresql user=postgres' --json\n\nExit codes: 0 done (or already done), 1 refused or failed (a live primary, another cluster's spool, a timeout), 2 bad arguments."
    )]
    Failover {
        #[arg(long, env = "WALTAIL_SPOOL")]
        spool: Option<PathBuf>,
        /// conninfo of the standby to promote (without it, only the spool is finalized).
        #[arg(long)]
        standby: Option<String>,
        /// Fail over even though the receiver heard from a live primary.
        #[arg(long)]
        force: bool,
        /// A primary heard from within this long counts as alive (the receiver
        /// records what it hears about once a second: keep this at 2 s or more).
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        alive_window: Duration,
        /// How long to wait for replay and promotion (and for the fence command).
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
        /// Fence the old primary first (STONITH, a cloud API call, a firewall rule): run with
        /// `sh -c` before anything is fenced or promoted; only its exit 0 lets the failover go on.
        /// Gets WALTAIL_SPOOL and WALTAIL_PRIMARY_ADDR.
        #[arg(long)]
        fence_command: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A planned role change with zero loss and no rewind: wait for the stopped primary's shutdown checkpoint in the spool, promote the standby.
    #[command(
        after_help = "Example (on the standby's host):\n  waltail switchover --spool /var/lib/waltail/spool --standby 'host=/var/run/postgresql user=postgres' \\\n      --stop-command \"ssh a.example.com sudo -u postgres pg_ctlcluster 15 main stop -m fast\" \\\n      --rejoin-command \"ssh a.example.com sudo -u postgres waltail rejoin --pgdata /var/lib/postgresql/15/main --primary 'host=b.example.com' --spool /var/lib/waltail/spool\"\n\nThe primary must stop cleanly (pg_ctl stop -m fast) with waltail ship running beside it, which then ships its\nshutdown checkpoint. Exit codes: 0 done (a failed rejoin command is reported, the switchover stands), 1 failed,\n2 refused with nothing changed (a live primary, a spool without the shutdown checkpoint, a fenced spool)."
    )]
    Switchover {
        #[arg(long, env = "WALTAIL_SPOOL")]
        spool: PathBuf,
        /// conninfo of the standby to promote.
        #[arg(long)]
        standby: String,
        /// conninfo of the old primary: refused while it takes connections.
        #[arg(long)]
        primary: Option<String>,
        /// Stops the old primary cleanly (`sh -c`; exit 0 or nothing is promoted).
        #[arg(long)]
        stop_command: Option<String>,
        /// Run after the promotion to make the old primary follow (`sh -c`), e.g. waltail rejoin over ssh.
        #[arg(long)]
        rejoin_command: Option<String>,
        /// How long to wait for each step.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
        /// Physical slot created on the standby before its promotion, for the shipper that will run there.
        #[arg(long, default_value = "waltail")]
        slot: String,
        /// Create no slot on the standby.
        #[arg(long)]
        no_slot: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Turn a stopped old primary into a standby of the new primary (pg_rewind, keeping its own configuration).
    #[command(
        after_help = "Example (on the old primary's host, after a failover to B):\n  waltail rejoin --pgdata /var/lib/postgresql/15/main --primary 'host=b.example.com user=postgres' \\\n      --spool /var/lib/waltail/spool --wal-from /mnt/b-spool/archived/2026-12-02T17:00:00Z\n\nNeeds wal_log_hints = on or data checksums (else --allow-rebuild takes a fresh base backup).\nExit codes: 0 done, 1 failed (pg_rewind), 2 a precondition (a running server, another cluster, no hints)."
    )]
    Rejoin {
        /// The old primary's data directory (stopped).
        #[arg(long)]
        pgdata: PathBuf,
        /// conninfo of the new primary.
        #[arg(long, env = "WALTAIL_PRIMARY")]
        primary: String,
        /// The spool this node will be fed from as a standby.
        #[arg(long, env = "WALTAIL_SPOOL")]
        spool: PathBuf,
        #[arg(long, value_enum, default_value = "standby")]
        style: crate::standby::Style,
        /// A spool (or archived spool) with the old primary's WAL, for what it recycled.
        #[arg(long)]
        wal_from: Option<PathBuf>,
        /// Without wal_log_hints or data checksums, rebuild from a fresh base backup.
        #[arg(long)]
        allow_rebuild: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Spool maintenance: `spool reset` readies a fenced spool for the next primary.
    #[command(after_help = "Example:\n  waltail spool reset --spool /var/lib/waltail/spool")]
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// How far the standby host is behind the primary: LSNs, lag, connection, last error.
    #[command(
        after_help = "Example:\n  waltail status --spool /var/lib/waltail/spool \\\n      --primary 'host=primary.example.com user=postgres' --standby 'host=/var/run/postgresql user=postgres' --json\n\nLag in seconds: 0 while the spool durably holds the primary's flush position, else the time since it last did.\nWithout --primary the primary's flush position is the one the shipper last reported.\nExit codes: 0 printed, 1 printed but --primary or --standby could not be asked, 2 bad arguments or no spool."
    )]
    Status {
        #[command(flatten)]
        target: StatusTarget,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Nagios/Icinga check of the ship/receive pair: one line with perfdata.
    #[command(
        after_help = "Example:\n  waltail check --spool /var/lib/waltail/spool --primary 'host=primary.example.com user=postgres' \\\n      --warning 16MB,10s --critical 256MB,60s\n\nA threshold is reached when the lag is at or above it. Receiver not running or spool fenced: CRITICAL;\nno shipper connected or no heartbeat for --stale-after: WARNING.\nExit codes (Nagios): 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (no spool, a server that cannot be asked, bad arguments)."
    )]
    Check {
        #[command(flatten)]
        target: StatusTarget,
        /// Warning threshold: bytes and/or seconds of lag, like 16MB,10s.
        #[arg(long, default_value = "16MB,10s")]
        warning: String,
        /// Critical threshold: bytes and/or seconds of lag, like 256MB,60s.
        #[arg(long, default_value = "256MB,60s")]
        critical: String,
        /// No heartbeat from the shipper for this long is a WARNING.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        stale_after: Duration,
    },
    /// Throwaway primary + standby on this machine: ship, load, kill the primary, fail over, report.
    #[command(
        after_help = "Example:\n  waltail demo\n  waltail demo --style standby --seconds 8\n\nNeeds PostgreSQL installed (WALTAIL_PG_BIN to pick one); run as root, the servers run as `postgres`.\nExit codes: 0 the promoted standby holds a gap-free prefix of the acknowledged commits, 1 it does not, or the demo failed."
    )]
    Demo {
        /// How long the load runs before the primary is killed.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, value_enum, default_value = "stream")]
        style: crate::standby::Style,
        /// The shipper's poll interval.
        #[arg(long, default_value = "10ms", value_parser = parse_duration)]
        interval: Duration,
        /// Keep the directories instead of removing them.
        #[arg(long)]
        keep: bool,
    },
    /// Compare waltail with streaming replication, pg_receivewal and archive_command, on throwaway clusters.
    #[command(
        after_help = "Example:\n  waltail bench --out bench-results\n  waltail bench --methods waltail-1,streaming --seconds 5\n\nWrites bench.json, bench.md (tables and targets) and latency-cdf.svg into --out.\nTakes about 20 minutes with every method and 10 kill trials each.\nExit codes: 0 done, 1 a method failed to run."
    )]
    Bench {
        /// Directory for bench.json and bench.md.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Comma-separated: waltail (its defaults: inotify, 250ms poll), waltail-1 and
        /// waltail-10 (--wake poll at 1ms, 10ms), waltail-walsender (--wake walsender),
        /// streaming, receivewal, archive-1, archive-60.
        #[arg(
            long,
            default_value = "waltail,waltail-1,streaming,receivewal,archive-1,archive-60"
        )]
        methods: String,
        /// Seconds of the idle CPU window per method.
        #[arg(long, default_value_t = 15)]
        idle_cpu_seconds: u64,
        /// Seconds of probe commits per workload.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Rows of the bulk load (about 250 bytes of WAL each).
        #[arg(long, default_value_t = 4_000_000)]
        bulk_rows: i64,
        /// SIGKILL trials per method for the loss window (0 to skip).
        #[arg(long, default_value_t = 10)]
        trials: usize,
        /// Seed of the trials' kill timings (default: from the clock, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Instead: the hot standby fed by `receive --serve` against native streaming
        /// (commit-to-visible, standby host CPU); writes visible.json, visible.md and visible-cdf.svg.
        #[arg(long)]
        visible: bool,
        /// Instead: what a synchronous commit costs with `ship --synchronous`, synchronous
        /// streaming and pg_receivewal (fsync on); writes sync.json and sync.md.
        #[arg(long)]
        sync: bool,
        /// With --visible: the segment sizes, in MB.
        #[arg(long, value_delimiter = ',', default_value = "16,1024")]
        segment_mb: Vec<u32>,
    },
    /// Print a SCRAM-SHA-256 verifier for a password, for `receive --serve-verifier-file`.
    #[command(
        name = "scram-verifier",
        after_help = "Example:\n  waltail scram-verifier --password-file /etc/waltail/standby-password > /etc/waltail/serve-verifier\n  echo 'my password' | waltail scram-verifier\n\nThe password is the first line of the file (or of stdin). The verifier has the format of\npg_authid.rolpassword; it holds no password.\nExit codes: 0 printed, 2 no password."
    )]
    ScramVerifier {
        /// File whose first line is the password (default: stdin).
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Make a standby data directory fed from the spool (base backup + recovery settings).
    #[command(
        name = "init-standby",
        after_help = "Example:\n  waltail init-standby --primary 'host=primary.example.com user=postgres' \\\n      --pgdata /var/lib/postgresql/15/standby --spool /var/lib/waltail/spool --style standby\n\nWith --method copy (or auto, when no pg_basebackup for the primary's version is installed) the\nprimary must run on this host: its data directory is copied between pg_backup_start and\npg_backup_stop (pg_start_backup/pg_stop_backup on 13 and 14), with the WAL of the backup.\n\nExit codes: 0 done, 1 failed, 2 bad arguments or a precondition (data directory not empty, a spool
the server's user cannot read), with nothing written."
    )]
    InitStandby {
        #[arg(long, env = "WALTAIL_PRIMARY")]
        primary: String,
        #[arg(long)]
        pgdata: PathBuf,
        #[arg(long, env = "WALTAIL_SPOOL")]
        spool: PathBuf,
        /// Default: stream when --serve is given (the hot standby with the least
        /// lag and CPU; see the README's bench), else standby.
        #[arg(long, value_enum)]
        style: Option<crate::standby::Style>,
        /// wal_retrieve_retry_interval: how soon recovery reads a growing segment again.
        #[arg(long, default_value = "100ms", value_parser = parse_duration)]
        retry_interval: Duration,
        /// How to take the base backup: pg_basebackup, or copy the data directory of a
        /// primary on this host during a low-level backup; auto: pg_basebackup if one for
        /// the primary's version is installed, else copy.
        #[arg(long, value_enum, default_value = "auto")]
        method: crate::standby::Method,
        /// Replace what a non-empty --pgdata holds (never while a server runs in it).
        #[arg(long)]
        force: bool,
        /// stream style: HOST:PORT of `waltail receive --serve`, as the standby reaches it.
        #[arg(long)]
        serve: Option<String>,
        /// stream style: the user of `receive --serve-user`.
        #[arg(long, default_value = "waltail")]
        serve_user: String,
        /// stream style: file whose first line is the password (written into primary_conninfo).
        #[arg(long)]
        serve_password_file: Option<PathBuf>,
        /// stream style: libpq sslmode of primary_conninfo.
        #[arg(long, default_value = "prefer")]
        sslmode: String,
        /// stream style: libpq sslrootcert, the CA of the serve certificate (needed by verify-ca, verify-full).
        #[arg(long)]
        sslrootcert: Option<PathBuf>,
        /// stream style: application_name of the standby's walreceiver.
        #[arg(long, default_value = "waltail-standby")]
        application_name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum SpoolCommand {
    /// After a failover: archive the fenced spool's files under <spool>/archived/<time>/ and
    /// leave it empty, for the next primary (roles swapped back, say).
    #[command(
        after_help = "Example:\n  waltail spool reset --spool /var/lib/waltail/spool\n\nOnly a fenced spool with no receiver running is reset; nothing is deleted.\nExit codes: 0 reset, 1 refused (not fenced, a receiver running) or failed, 2 bad arguments."
    )]
    Reset {
        #[arg(long, env = "WALTAIL_SPOOL")]
        spool: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What `status` and `check` look at.
#[derive(Args, Debug, Clone)]
pub struct StatusTarget {
    /// The spool directory the receiver writes.
    #[arg(long, env = "WALTAIL_SPOOL")]
    pub spool: Option<PathBuf>,
    /// conninfo of the primary: its flush LSN is queried now (else the shipper's last heartbeat counts).
    #[arg(long, env = "WALTAIL_PRIMARY")]
    pub primary: Option<String>,
    /// conninfo of the standby server: its replay LSN is shown.
    #[arg(long, env = "WALTAIL_STANDBY")]
    pub standby: Option<String>,
}

impl StatusTarget {
    fn merge(&mut self, m: &ArgMatches, f: &config::StatusFile) {
        merge_opt(m, "spool", &mut self.spool, f.spool.clone());
        merge_opt(m, "primary", &mut self.primary, f.primary.clone());
        merge_opt(m, "standby", &mut self.standby, f.standby.clone());
    }
}

#[derive(Args, Debug, Clone)]
pub struct ShipArgs {
    /// libpq conninfo of the primary; PGHOST, PGPORT, PGUSER, PGDATABASE fill in what it leaves out.
    #[arg(long, env = "WALTAIL_PRIMARY", default_value = "")]
    pub primary: String,
    /// The receiver, as host:port.
    #[arg(long, env = "WALTAIL_RECEIVER")]
    pub receiver: Option<String>,
    /// How often to poll the flush position (1ms to 10s) whatever the write
    /// events say: the safety net beside them, or the only trigger with
    /// `--wake poll`.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub interval: Duration,
    /// What wakes the shipper between polls: `inotify` (writes into pg_wal's
    /// segments), `walsender` (a replication connection's flushed WAL) or
    /// `poll` (the interval alone).
    #[arg(long, value_enum, default_value = "inotify")]
    pub wake: crate::ship::wake::WakeMode,
    /// Reconnect when WAL sent has gone unacknowledged this long, or a send
    /// blocks this long (a dead link that never closes).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ack_timeout: Duration,
    /// Physical replication slot that keeps unshipped WAL on the primary.
    #[arg(long, default_value = "waltail")]
    pub slot: String,
    /// Do not use a replication slot (WAL may be recycled before it is shipped).
    #[arg(long)]
    pub no_slot: bool,
    /// Where a new spool starts (default: the slot's restart LSN).
    #[arg(long)]
    pub start_lsn: Option<Lsn>,
    /// The primary's pg_wal directory (default: <data_directory>/pg_wal).
    #[arg(long)]
    pub pg_wal: Option<PathBuf>,
    /// Synchronous mode: also report the spool's durable position to the
    /// primary over a replication connection, so that with this name in
    /// `synchronous_standby_names` commits wait until the spool holds them.
    #[arg(long)]
    pub synchronous: bool,
    /// The application_name of that connection (what synchronous_standby_names lists).
    #[arg(long, default_value = "waltail")]
    pub application_name: String,
    /// Serve Prometheus metrics on this address (GET /metrics), like 127.0.0.1:9187.
    #[arg(long, env = "WALTAIL_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    #[command(flatten)]
    pub auth: AuthArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ReceiveArgs {
    /// Address to listen on.
    #[arg(long, env = "WALTAIL_LISTEN")]
    pub listen: Option<String>,
    /// Spool directory (created 0700).
    #[arg(long, env = "WALTAIL_SPOOL")]
    pub spool: Option<PathBuf>,
    /// Close a streaming connection after this long without a frame.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Connections served at once.
    #[arg(long, default_value_t = 8)]
    pub max_connections: usize,
    /// Serve Prometheus metrics on this address (GET /metrics), like 127.0.0.1:9188.
    #[arg(long, env = "WALTAIL_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Also serve the spool to standbys over PostgreSQL's streaming
    /// replication protocol on this address (their primary_conninfo points here).
    #[arg(long, env = "WALTAIL_SERVE")]
    pub serve: Option<String>,
    /// File holding the SCRAM-SHA-256 verifier standbys authenticate against
    /// (`waltail scram-verifier` makes one). Required unless --serve is loopback.
    #[arg(long, env = "WALTAIL_SERVE_VERIFIER_FILE")]
    pub serve_verifier_file: Option<PathBuf>,
    /// The user name standbys connect as.
    #[arg(long, default_value = "waltail")]
    pub serve_user: String,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// Reads a verifier file (one line, `SCRAM-SHA-256$...`).
fn read_verifier(p: &std::path::Path) -> Result<crate::serve::auth::Verifier, String> {
    let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    text.parse()
        .map_err(|e: String| format!("{}: {e}", p.display()))
}

/// Runs the command line; the binary's `main` is only this.
pub fn main() -> ExitCode {
    // `restore --wait` is the recovery.signal style's restore_command, where
    // exit 2 would read as "not found" and promote: its bad arguments exit
    // 126, which PostgreSQL takes as fatal (recovery stops, nothing promotes).
    let waiting_restore = std::env::args().nth(1).as_deref() == Some("restore")
        && std::env::args().any(|a| a == "--wait");
    let fatal_if_waiting = |code: u8| {
        if waiting_restore && code == EXIT_BAD_INPUT {
            crate::restore::EXIT_FATAL
        } else {
            code
        }
    };
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            use clap::error::ErrorKind;
            if waiting_restore
                && !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
            {
                let _ = e.print();
                return ExitCode::from(crate::restore::EXIT_FATAL);
            }
            let is_check = std::env::args().nth(1).as_deref() == Some("check");
            if is_check && !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let msg = e.to_string();
                let first = msg.lines().next().unwrap_or("bad arguments");
                println!("WALTAIL UNKNOWN - {}", first.trim_start_matches("error: "));
                return ExitCode::from(crate::status::NAGIOS_UNKNOWN);
            }
            e.exit()
        }
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) if waiting_restore => {
            let _ = e.print();
            return ExitCode::from(crate::restore::EXIT_FATAL);
        }
        Err(e) => e.exit(),
    };
    let sub = matches
        .subcommand()
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    ExitCode::from(fatal_if_waiting(run(cli, &sub)))
}

type LogHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

static LOG_HANDLE: std::sync::OnceLock<LogHandle> = std::sync::OnceLock::new();

/// Whether stderr carries JSON log lines (`--log-format json`).
static LOG_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

const DEFAULT_LOG: &str = "info,tokio_postgres=warn";

/// The log filter: `WALTAIL_LOG`, else the config file's `log_level`, else the default.
fn log_filter(level: Option<&str>) -> Result<tracing_subscriber::EnvFilter, String> {
    use tracing_subscriber::EnvFilter;
    if let Ok(f) = EnvFilter::try_from_env("WALTAIL_LOG") {
        return Ok(f);
    }
    match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("key `log_level` = {l:?}: {e}")),
        None => Ok(EnvFilter::new(DEFAULT_LOG)),
    }
}

fn init_logging(format: LogFormat, level: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = log_filter(level)?;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let _ = LOG_HANDLE.set(handle);
    let reg = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => reg.with(fmt).try_init(),
        LogFormat::Json => {
            LOG_JSON.store(true, std::sync::atomic::Ordering::Relaxed);
            reg.with(fmt.json()).try_init()
        }
    };
    Ok(())
}

/// Applies a reloaded `log_level` (unless `WALTAIL_LOG` pins it).
fn reload_log_level(level: Option<&str>) {
    let Some(h) = LOG_HANDLE.get() else { return };
    match log_filter(level) {
        Ok(f) => {
            let shown = f.to_string();
            if h.modify(|cur| *cur = f).is_ok() {
                info!("log level now {shown}");
            }
        }
        Err(e) => warn!("SIGHUP: {e}; keeping the log level"),
    }
}

/// Loads the role's config file, if one was given.
fn load_file<T: Default + for<'de> serde::Deserialize<'de>>(
    path: &Option<PathBuf>,
) -> Result<T, config::ConfigError> {
    match path {
        Some(p) => config::load(p),
        None => Ok(T::default()),
    }
}

/// Runs `f` on every SIGHUP (which then no longer ends the process).
fn on_sighup(rt: &tokio::runtime::Runtime, mut f: impl FnMut() + Send + 'static) {
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            f();
        }
    });
}

/// Re-reads a role's config file on SIGHUP; None (logged) when it cannot be used.
fn reread<T: for<'de> serde::Deserialize<'de>>(path: &Option<PathBuf>) -> Option<T> {
    let Some(p) = path else {
        info!("SIGHUP: no config file (--config); nothing to reload");
        return None;
    };
    match config::load(p) {
        Ok(f) => {
            info!("SIGHUP: reloading {}", p.display());
            Some(f)
        }
        Err(e) => {
            warn!("SIGHUP: {e}; keeping the running configuration");
            None
        }
    }
}

/// A runtime, and a token cancelled by SIGTERM or SIGINT.
fn runtime() -> (tokio::runtime::Runtime, CancellationToken) {
    with_runtime(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("building the tokio runtime"),
    )
}

/// A single-threaded runtime: the shipper and the receiver are each one
/// loop, and at idle one thread wakes less often than a pool.
fn runtime_single() -> (tokio::runtime::Runtime, CancellationToken) {
    with_runtime(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building the tokio runtime"),
    )
}

fn with_runtime(rt: tokio::runtime::Runtime) -> (tokio::runtime::Runtime, CancellationToken) {
    let token = CancellationToken::new();
    let t = token.clone();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        t.cancel();
    });
    (rt, token)
}

fn bad_input(cmd: &str, e: impl std::fmt::Display) -> u8 {
    eprintln!("waltail {cmd}: {e}");
    EXIT_BAD_INPUT
}

fn failed(cmd: &str, e: &anyhow::Error) -> u8 {
    if LOG_JSON.load(std::sync::atomic::Ordering::Relaxed) {
        // One JSON object per line on stderr, like every other log line.
        tracing::error!("waltail {cmd}: {e:#}");
    } else {
        eprintln!("waltail {cmd}: {e:#}");
    }
    EXIT_FAILED
}

fn run(cli: Cli, sub: &ArgMatches) -> u8 {
    let format = cli.log_format;
    let path = cli.config.clone();
    macro_rules! logging {
        ($cmd:expr, $level:expr) => {
            if let Err(e) = init_logging(format, $level) {
                return bad_input(
                    $cmd,
                    match &path {
                        Some(p) => format!("config file {}, {e}", p.display()),
                        None => e,
                    },
                );
            }
        };
    }
    macro_rules! file {
        ($cmd:expr) => {
            match load_file(&path) {
                Ok(f) => f,
                Err(e) => return bad_input($cmd, e),
            }
        };
    }
    if matches!(
        cli.command,
        Command::InitStandby { .. }
            | Command::Rejoin { .. }
            | Command::Switchover { .. }
            | Command::Demo { .. }
            | Command::Bench { .. }
            | Command::Inspect { .. }
    ) {
        let _ = init_logging(format, None);
    }
    match cli.command {
        Command::Ship(mut a) => {
            let f: config::ShipFile = file!("ship");
            let m = sub;
            merge(m, "primary", &mut a.primary, f.primary);
            merge_opt(m, "receiver", &mut a.receiver, f.receiver);
            merge_dur(m, "interval", &mut a.interval, f.interval);
            merge(m, "wake", &mut a.wake, f.wake);
            merge_dur(m, "ack_timeout", &mut a.ack_timeout, f.ack_timeout);
            merge(m, "slot", &mut a.slot, f.slot);
            merge(m, "no_slot", &mut a.no_slot, f.no_slot);
            merge_opt(m, "start_lsn", &mut a.start_lsn, f.start_lsn);
            merge_opt(m, "pg_wal", &mut a.pg_wal, f.pg_wal);
            merge(m, "synchronous", &mut a.synchronous, f.synchronous);
            merge(
                m,
                "application_name",
                &mut a.application_name,
                f.application_name,
            );
            merge_opt(m, "metrics_addr", &mut a.metrics_addr, f.metrics_addr);
            a.auth.merge(
                m,
                f.secret_file,
                f.insecure_no_auth,
                f.tls_cert,
                f.tls_key,
                f.tls_ca,
            );
            logging!("ship", f.log_level.as_deref());
            if a.interval < Duration::from_millis(1) || a.interval > Duration::from_secs(10) {
                return bad_input("ship", "--interval must be between 1ms and 10s");
            }
            let Some(receiver) = a.receiver.clone() else {
                return bad_input(
                    "ship",
                    "--receiver is required (or WALTAIL_RECEIVER, or `receiver` in the config file)",
                );
            };
            let metrics = match a.metrics_addr.as_deref().map(crate::metrics::parse_addr) {
                None => None,
                Some(Ok(addr)) => Some(addr),
                Some(Err(e)) => return bad_input("ship", e),
            };
            let secret = match a.auth.secret() {
                Ok(s) => s,
                Err(e) => return bad_input("ship", e),
            };
            let mut cfg = crate::ship::ShipConfig::new(&a.primary, &receiver, secret);
            cfg.tls = a.auth.tls();
            if let Err(e) = cfg.check() {
                return bad_input("ship", e);
            }
            cfg.interval = a.interval;
            cfg.wake = a.wake;
            cfg.ack_timeout = a.ack_timeout.max(Duration::from_millis(100));
            cfg.slot = (!a.no_slot).then_some(a.slot);
            cfg.start_lsn = a.start_lsn;
            cfg.pg_wal = a.pg_wal;
            cfg.synchronous = a.synchronous.then_some(a.application_name);
            let (itx, irx) = tokio::sync::watch::channel(a.interval);
            cfg.reload_interval = Some(irx);
            let (rt, token) = runtime_single();
            let m = m.clone();
            let p = path.clone();
            on_sighup(&rt, move || {
                let Some(f) = reread::<config::ShipFile>(&p) else {
                    return;
                };
                if explicit(&m, "interval") {
                    info!("SIGHUP: interval is set on the command line; keeping it");
                } else {
                    let every = f.interval.map_or(crate::ship::DEFAULT_INTERVAL, |d| d.0);
                    if every < Duration::from_millis(1) || every > Duration::from_secs(10) {
                        warn!("SIGHUP: interval must be between 1ms and 10s; keeping it");
                    } else {
                        itx.send_if_modified(|cur| std::mem::replace(cur, every) != every);
                    }
                }
                reload_log_level(f.log_level.as_deref());
            });
            let (tx, _rx) = tokio::sync::watch::channel(Default::default());
            match rt.block_on(async move {
                if let Some(addr) = metrics {
                    crate::metrics::serve(addr, crate::metrics::Role::Ship).await?;
                }
                crate::ship::run(cfg, token, tx).await
            }) {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    let code = failed("ship", &e);
                    if e.downcast_ref::<crate::ship::Refused>().is_some() {
                        EXIT_REFUSED
                    } else if e.downcast_ref::<crate::ship::Misconfigured>().is_some() {
                        EXIT_BAD_INPUT
                    } else {
                        code
                    }
                }
            }
        }
        Command::Restore {
            file,
            dest,
            mut spool,
            mut wait,
            no_partial,
            mut poll,
            mut max_wait,
        } => {
            let f: config::RestoreFile = file!("restore");
            merge_opt(sub, "spool", &mut spool, f.spool);
            merge(sub, "wait", &mut wait, f.wait);
            merge_dur(sub, "poll", &mut poll, f.poll);
            merge_opt_dur(sub, "max_wait", &mut max_wait, f.max_wait);
            logging!("restore", f.log_level.as_deref());
            let Some(spool) = spool else {
                return bad_input(
                    "restore",
                    "--spool is required (or `spool` in the config file)",
                );
            };
            let req = crate::restore::RestoreRequest {
                file,
                dest,
                spool,
                wait,
                no_partial,
                poll,
                max_wait,
            };
            match crate::restore::restore(&req) {
                Ok(code) => code,
                Err(crate::restore::RestoreError::BadArgs(e)) if wait => {
                    bad_input("restore", e);
                    crate::restore::EXIT_FATAL
                }
                Err(crate::restore::RestoreError::BadArgs(e)) => bad_input("restore", e),
                Err(e) => {
                    eprintln!("waltail restore: {e}; PostgreSQL will ask again");
                    crate::restore::EXIT_NOT_FOUND
                }
            }
        }
        Command::Cleanup {
            oldest_kept,
            mut spool,
            dry_run,
        } => {
            let f: config::RestoreFile = file!("cleanup");
            merge_opt(sub, "spool", &mut spool, f.spool);
            logging!("cleanup", f.log_level.as_deref());
            let Some(spool) = spool else {
                return bad_input(
                    "cleanup",
                    "--spool is required (or `spool` in the config file)",
                );
            };
            match crate::restore::cleanup(&spool, &oldest_kept, dry_run) {
                Ok(removed) => {
                    for r in removed {
                        if dry_run {
                            println!("would remove {r}");
                        }
                    }
                    EXIT_OK
                }
                Err(crate::restore::RestoreError::BadArgs(e)) => bad_input("cleanup", e),
                Err(e) => {
                    eprintln!("waltail cleanup: {e}");
                    EXIT_FAILED
                }
            }
        }
        Command::Failover {
            mut spool,
            mut standby,
            force,
            mut alive_window,
            mut timeout,
            mut fence_command,
            json,
        } => {
            let f: config::FailoverFile = file!("failover");
            merge_opt(sub, "spool", &mut spool, f.spool);
            merge_opt(sub, "standby", &mut standby, f.standby);
            merge_opt(sub, "fence_command", &mut fence_command, f.fence_command);
            merge_dur(sub, "alive_window", &mut alive_window, f.alive_window);
            merge_dur(sub, "timeout", &mut timeout, f.timeout);
            logging!("failover", f.log_level.as_deref());
            let Some(spool) = spool else {
                return bad_input(
                    "failover",
                    "--spool is required (or `spool` in the config file)",
                );
            };
            let cfg = crate::failover::FailoverConfig {
                spool,
                standby,
                force,
                alive_window,
                timeout,
                fence_command,
            };
            let (rt, _token) = runtime();
            match rt.block_on(crate::failover::run(&cfg)) {
                Ok(r) => {
                    if json {
                        println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    } else {
                        print!("{}", r.to_text());
                    }
                    EXIT_OK
                }
                Err(e) => failed("failover", &e),
            }
        }
        Command::Switchover {
            spool,
            standby,
            primary,
            stop_command,
            rejoin_command,
            timeout,
            slot,
            no_slot,
            json,
        } => {
            let cfg = crate::switchover::SwitchoverConfig {
                spool,
                standby,
                primary,
                stop_command,
                rejoin_command,
                timeout,
                slot: (!no_slot).then_some(slot),
            };
            match runtime().0.block_on(crate::switchover::run(&cfg)) {
                Ok(r) => {
                    if json {
                        println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    } else {
                        print!("{}", r.to_text());
                    }
                    EXIT_OK
                }
                Err(e) if e.downcast_ref::<crate::standby::Precondition>().is_some() => {
                    bad_input("switchover", e)
                }
                Err(e) => failed("switchover", &e),
            }
        }
        Command::Rejoin {
            pgdata,
            primary,
            spool,
            style,
            wal_from,
            allow_rebuild,
            json,
        } => {
            let exe = std::env::current_exe().unwrap_or_else(|_| "waltail".into());
            let o = crate::rejoin::Rejoin {
                pgdata: &pgdata,
                primary: &primary,
                spool: &spool,
                style,
                wal_from: wal_from.as_deref(),
                allow_rebuild,
            };
            match runtime().0.block_on(crate::rejoin::rejoin(&exe, &o)) {
                Ok(r) => {
                    if json {
                        println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    } else {
                        println!(
                            "{}: {}{}; kept {}; now a {} standby of the new primary: start it",
                            r.pgdata.display(),
                            r.action,
                            if r.checkpointed_primary {
                                " (the new primary was checkpointed first)"
                            } else {
                                ""
                            },
                            r.kept.join(", "),
                            r.style
                        );
                    }
                    EXIT_OK
                }
                Err(e) if e.downcast_ref::<crate::standby::Precondition>().is_some() => {
                    bad_input("rejoin", e)
                }
                Err(e) => failed("rejoin", &e),
            }
        }
        Command::Spool {
            command: SpoolCommand::Reset { spool, json },
        } => {
            let r = crate::spool::Spool::open(&spool).and_then(|s| s.reset());
            match r {
                Ok(r) => {
                    if json {
                        println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    } else {
                        println!(
                            "spool {} reset: {} files archived in {}; it is empty, for the next primary",
                            r.spool.display(),
                            r.files_moved,
                            r.archived_to.display()
                        );
                    }
                    EXIT_OK
                }
                Err(e) => failed("spool reset", &anyhow::Error::new(e)),
            }
        }
        Command::Status { mut target, json } => {
            let f: config::StatusFile = file!("status");
            target.merge(sub, &f);
            logging!("status", f.log_level.as_deref());
            let Some(spool) = target.spool.clone() else {
                return bad_input(
                    "status",
                    "--spool is required (or `spool` in the config file)",
                );
            };
            let o = crate::status::StatusOptions {
                spool,
                primary: target.primary,
                standby: target.standby,
            };
            match runtime().0.block_on(crate::status::gather(&o)) {
                Ok(st) => {
                    if json {
                        println!("{}", serde_json::to_string(&st).unwrap_or_default());
                    } else {
                        print!("{}", st.to_text());
                    }
                    if st.errors.is_empty() {
                        EXIT_OK
                    } else {
                        EXIT_FAILED
                    }
                }
                Err(e) => bad_input("status", e),
            }
        }
        Command::Check {
            mut target,
            mut warning,
            mut critical,
            mut stale_after,
        } => {
            use crate::status::{Threshold, NAGIOS_UNKNOWN};
            let unknown = |e: String| {
                println!("WALTAIL UNKNOWN - {}", e.replace('\n', " "));
                NAGIOS_UNKNOWN
            };
            let f: config::StatusFile = match load_file(&path) {
                Ok(f) => f,
                Err(e) => return unknown(e.to_string()),
            };
            target.merge(sub, &f);
            merge(sub, "warning", &mut warning, f.warning.clone());
            merge(sub, "critical", &mut critical, f.critical.clone());
            merge_dur(sub, "stale_after", &mut stale_after, f.stale_after);
            if let Err(e) = init_logging(format, f.log_level.as_deref()) {
                return unknown(e);
            }
            let Some(spool) = target.spool.clone() else {
                return unknown("--spool is required (or `spool` in the config file)".into());
            };
            let parse = |name: &str, v: &str| -> Result<Threshold, String> {
                v.parse().map_err(|e| format!("--{name}: {e}"))
            };
            let (warning, critical) =
                match (parse("warning", &warning), parse("critical", &critical)) {
                    (Ok(w), Ok(c)) => (w, c),
                    (Err(e), _) | (_, Err(e)) => return unknown(e),
                };
            let o = crate::status::StatusOptions {
                spool,
                primary: target.primary,
                standby: target.standby,
            };
            match runtime().0.block_on(crate::status::gather(&o)) {
                Ok(st) => {
                    let (code, line) = crate::status::check(
                        &st,
                        &crate::status::CheckOptions {
                            warning,
                            critical,
                            stale_after,
                        },
                    );
                    println!("{line}");
                    code
                }
                Err(e) => unknown(e.to_string()),
            }
        }
        Command::InitStandby {
            primary,
            pgdata,
            spool,
            style,
            retry_interval,
            method,
            force,
            serve,
            serve_user,
            serve_password_file,
            sslmode,
            sslrootcert,
            application_name,
        } => {
            let target = match &serve {
                None => None,
                Some(addr) => {
                    let (host, port) = match crate::standby::StreamTarget::parse_addr(addr) {
                        Ok(x) => x,
                        Err(e) => return bad_input("init-standby", format!("--serve: {e}")),
                    };
                    let password = match &serve_password_file {
                        None => None,
                        Some(p) => match std::fs::read_to_string(p) {
                            Ok(t) => Some(t.lines().next().unwrap_or("").to_string()),
                            Err(e) => {
                                return bad_input("init-standby", format!("{}: {e}", p.display()))
                            }
                        },
                    };
                    let t = crate::standby::StreamTarget {
                        host,
                        port,
                        user: serve_user,
                        password,
                        sslmode,
                        sslrootcert: sslrootcert.map(|p| std::path::absolute(&p).unwrap_or(p)),
                        application_name,
                    };
                    if let Err(e) = t.check() {
                        return bad_input("init-standby", e);
                    }
                    Some(t)
                }
            };
            let style = style.unwrap_or(if target.is_some() {
                crate::standby::Style::Stream
            } else {
                crate::standby::Style::Standby
            });
            if style == crate::standby::Style::Stream && target.is_none() {
                return bad_input("init-standby", "--style stream needs --serve HOST:PORT (the address of `waltail receive --serve`)");
            }
            match runtime().0.block_on(crate::standby::init_standby(
                &std::env::current_exe().unwrap_or_else(|_| "waltail".into()),
                &crate::standby::InitStandby {
                    primary: &primary,
                    pgdata: &pgdata,
                    spool: &spool,
                    style,
                    retry: retry_interval,
                    method,
                    force,
                    stream: target.as_ref(),
                },
            )) {
                Ok(made) => {
                    println!(
                    "standby data directory ready in {} ({} style; {}); start it with pg_ctl -D {} start",
                    made.pgdata.display(),
                    style.signal_file(),
                    made.how,
                    made.pgdata.display()
                );
                    EXIT_OK
                }
                Err(e) if e.downcast_ref::<crate::standby::Precondition>().is_some() => {
                    bad_input("init-standby", e)
                }
                Err(e) => failed("init-standby", &e),
            }
        }
        Command::Demo {
            seconds,
            style,
            interval,
            keep,
        } => {
            let (rt, token) = runtime();
            let opts = crate::demo::DemoOptions {
                seconds: seconds.clamp(1, 120),
                style,
                interval,
                keep,
            };
            match rt.block_on(crate::demo::run(&opts, token)) {
                Ok(r) => {
                    print!("{}", r.table());
                    if r.gap_free {
                        EXIT_OK
                    } else {
                        EXIT_FAILED
                    }
                }
                Err(e) => failed("demo", &e),
            }
        }
        Command::Bench {
            out,
            methods,
            idle_cpu_seconds,
            seconds,
            bulk_rows,
            trials,
            seed,
            visible,
            sync,
            segment_mb,
        } => {
            use crate::bench::Method;
            if sync {
                let (rt, _t) = runtime();
                return match rt.block_on(crate::bench::sync::run(&out, seconds.clamp(1, 600))) {
                    Ok(r) => {
                        print!("{}", crate::bench::sync::table(&r));
                        EXIT_OK
                    }
                    Err(e) => failed("bench", &e),
                };
            }
            if visible {
                let o = crate::bench::visible::VisibleOptions {
                    out,
                    segment_mb,
                    seconds: seconds.clamp(1, 600),
                };
                let (rt, _t) = runtime();
                return match rt.block_on(crate::bench::visible::run(&o)) {
                    Ok(r) => {
                        print!("{}", crate::bench::visible::table(&r));
                        EXIT_OK
                    }
                    Err(e) => failed("bench", &e),
                };
            }
            let mut ms = Vec::new();
            for m in methods.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                ms.push(match m {
                    "waltail" => Method::WALTAIL_DEFAULTS,
                    "waltail-1" => Method::Waltail {
                        interval_ms: 1,
                        wake: crate::ship::wake::WakeMode::Poll,
                    },
                    "waltail-10" => Method::Waltail {
                        interval_ms: 10,
                        wake: crate::ship::wake::WakeMode::Poll,
                    },
                    "waltail-walsender" => Method::Waltail {
                        interval_ms: crate::ship::DEFAULT_INTERVAL.as_millis() as u64,
                        wake: crate::ship::wake::WakeMode::Walsender,
                    },
                    "streaming" => Method::Streaming,
                    "receivewal" => Method::Receivewal,
                    "archive-1" => Method::Archive { timeout_s: 1 },
                    "archive-60" => Method::Archive { timeout_s: 60 },
                    other => return bad_input("bench", format!("unknown method {other:?}")),
                });
            }
            let opts = crate::bench::BenchOptions {
                out,
                methods: ms,
                seconds: seconds.clamp(1, 600),
                bulk_rows: bulk_rows.clamp(1000, 100_000_000),
                trials: trials.min(100),
                idle_cpu_secs: idle_cpu_seconds.clamp(1, 600),
                seed: seed.unwrap_or_else(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(1)
                }),
            };
            let (rt, _t) = runtime();
            match rt.block_on(crate::bench::run(&opts)) {
                Ok(r) => {
                    print!("{}", crate::bench::table(&r));
                    EXIT_OK
                }
                Err(e) => failed("bench", &e),
            }
        }
        Command::Receive(mut a) => {
            let f: config::ReceiveFile = file!("receive");
            let m = sub;
            merge_opt(m, "listen", &mut a.listen, f.listen);
            merge_opt(m, "spool", &mut a.spool, f.spool);
            merge_dur(m, "idle_timeout", &mut a.idle_timeout, f.idle_timeout);
            merge(
                m,
                "max_connections",
                &mut a.max_connections,
                f.max_connections,
            );
            merge_opt(m, "metrics_addr", &mut a.metrics_addr, f.metrics_addr);
            merge_opt(m, "serve", &mut a.serve, f.serve);
            merge_opt(
                m,
                "serve_verifier_file",
                &mut a.serve_verifier_file,
                f.serve_verifier_file,
            );
            merge(m, "serve_user", &mut a.serve_user, f.serve_user);
            a.auth.merge(
                m,
                f.secret_file,
                f.insecure_no_auth,
                f.tls_cert,
                f.tls_key,
                f.tls_ca,
            );
            logging!("receive", f.log_level.as_deref());
            let (Some(listen), Some(spool)) = (a.listen.clone(), a.spool.clone()) else {
                return bad_input(
                    "receive",
                    "--listen and --spool are required (or `listen` and `spool` in the config file)",
                );
            };
            let metrics = match a.metrics_addr.as_deref().map(crate::metrics::parse_addr) {
                None => None,
                Some(Ok(addr)) => Some(addr),
                Some(Err(e)) => return bad_input("receive", e),
            };
            let secret = match a.auth.secret() {
                Ok(s) => s,
                Err(e) => return bad_input("receive", e),
            };
            if let Err(e) = crate::proto::host_of(&listen, "--listen") {
                return bad_input("receive", e);
            }
            let mut cfg = crate::receive::ReceiveConfig::new(&listen, spool, secret);
            cfg.tls = a.auth.tls();
            if let Some(addr) = &a.serve {
                let verifier = match a.serve_verifier_file.as_deref().map(read_verifier) {
                    None => None,
                    Some(Ok(v)) => Some(v),
                    Some(Err(e)) => return bad_input("receive", e),
                };
                let tls = match cfg.tls.acceptor() {
                    Ok(t) => t,
                    Err(e) => return bad_input("receive", e),
                };
                cfg.serve = Some(crate::serve::ServeConfig {
                    listen: addr.clone(),
                    verifier,
                    user: a.serve_user.clone(),
                    tls,
                    max_connections: 8,
                });
            } else if a.serve_verifier_file.is_some() {
                return bad_input("receive", "--serve-verifier-file needs --serve ADDR");
            }
            cfg.idle_timeout = a.idle_timeout;
            cfg.max_connections = a.max_connections.max(1);
            let limits = crate::receive::ReceiveLimits {
                idle_timeout: cfg.idle_timeout,
                max_connections: cfg.max_connections,
            };
            let (ltx, lrx) = tokio::sync::watch::channel(limits);
            cfg.reload = Some(lrx);
            // One thread: a commit's range goes from the shipper's socket to
            // the spool, its fdatasync and the server's socket without a
            // hand-off between threads (each a wait in a busy host's run
            // queue); a catch-up's fdatasyncs run on the blocking pool.
            let (rt, token) = runtime_single();
            let m = m.clone();
            let p = path.clone();
            on_sighup(&rt, move || {
                let Some(f) = reread::<config::ReceiveFile>(&p) else {
                    return;
                };
                let mut l = *ltx.borrow();
                if !explicit(&m, "idle_timeout") {
                    l.idle_timeout = f.idle_timeout.map_or(Duration::from_secs(30), |d| d.0);
                }
                if !explicit(&m, "max_connections") {
                    l.max_connections = f.max_connections.unwrap_or(8).max(1);
                }
                if ltx.send_if_modified(|cur| std::mem::replace(cur, l) != l) {
                    info!(
                        "limits now idle_timeout {}, max_connections {}",
                        humantime::format_duration(l.idle_timeout),
                        l.max_connections
                    );
                }
                reload_log_level(f.log_level.as_deref());
            });
            let r = rt.block_on(async move {
                if let Some(addr) = metrics {
                    crate::metrics::serve(addr, crate::metrics::Role::Receive).await?;
                }
                let rx = crate::receive::Receiver::bind(cfg).await?;
                rx.run(token).await
            });
            match r {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    let code = failed("receive", &e);
                    match e.downcast_ref::<crate::receive::StartRefused>() {
                        Some(crate::receive::StartRefused::Fenced(_)) => EXIT_REFUSED,
                        Some(crate::receive::StartRefused::Unusable(_)) => EXIT_BAD_INPUT,
                        None => code,
                    }
                }
            }
        }
        Command::ScramVerifier { password_file } => {
            let text = match &password_file {
                Some(p) => std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display())),
                None => {
                    let mut l = String::new();
                    std::io::stdin()
                        .read_line(&mut l)
                        .map(|_| l)
                        .map_err(|e| format!("stdin: {e}"))
                }
            };
            let pw = match text {
                Ok(t) => t.lines().next().unwrap_or("").to_string(),
                Err(e) => return bad_input("scram-verifier", e),
            };
            if pw.is_empty() {
                return bad_input("scram-verifier", "the password is empty");
            }
            println!("{}", crate::serve::auth::make_verifier(&pw));
            EXIT_OK
        }
        Command::Inspect { file, json } => match crate::inspect::inspect(&file) {
            Ok(report) => {
                if json {
                    match serde_json::to_string(&report) {
                        Ok(s) => println!("{s}"),
                        Err(e) => {
                            eprintln!("waltail: cannot encode report: {e}");
                            return EXIT_FAILED;
                        }
                    }
                } else {
                    print!("{}", report.to_text());
                }
                EXIT_OK
            }
            Err(e) => {
                eprintln!("waltail inspect: {e}");
                EXIT_BAD_INPUT
            }
        },
    }
}
