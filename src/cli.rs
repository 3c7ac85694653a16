//! Command-line interface: argument parsing, logging set-up and exit codes.
//!
//! Exit codes (documented in the README and in `--help`):
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | the operation failed (server unreachable, I/O error, refused) |
//! | 2 | bad input: a bad argument, or a file that is not what it should be |

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::proto::tls::TlsOptions;
use crate::proto::Secret;
use crate::wal::Lsn;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;

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
    #[arg(
        long,
        env = "WALTAIL_SECRET_FILE",
        required_unless_present = "insecure_no_auth"
    )]
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
            (None, false) => {
                Err("--secret-file is required (or --insecure-no-auth for a local demo)".into())
            }
        }
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
        after_help = "Example:\n  waltail ship --primary 'host=/var/run/postgresql user=postgres' \\\n      --receiver standby.example.com:5433 --secret-file /etc/waltail/secret\n\nThe role needs superuser (it reads pg_control, data_directory and manages a replication slot).\nExit codes: 0 stopped by SIGTERM/SIGINT, 1 a fatal error (WAL gone, refused by the receiver), 2 bad arguments."
    )]
    Ship(ShipArgs),
    /// Receive WAL from a shipper into a spool directory (run on the standby's host).
    #[command(
        after_help = "Example:\n  waltail receive --listen 0.0.0.0:5433 --spool /var/lib/waltail/spool \\\n      --secret-file /etc/waltail/secret\n\nExit codes: 0 stopped by SIGTERM/SIGINT, 1 a fatal error, 2 bad arguments."
    )]
    Receive(ReceiveArgs),
    /// restore_command: copy a WAL file from the spool to where recovery wants it.
    #[command(
        after_help = "Example (postgresql.conf on the standby):\n  restore_command = 'waltail restore %f %p --spool /var/lib/waltail/spool'\n  restore_command = 'waltail restore %f %p --spool /var/lib/waltail/spool --wait'   # recovery.signal style\n\nExit codes: 0 restored, 1 not found (recovery goes on or, in archive recovery, ends), 2 bad arguments.\nNever 126, 127 or a signal, which PostgreSQL treats as fatal."
    )]
    Restore {
        /// %f: the file name recovery asks for.
        file: String,
        /// %p: where to put it.
        dest: PathBuf,
        #[arg(long, env = "WALTAIL_SPOOL")]
        spool: PathBuf,
        /// recovery.signal style: wait until the segment is complete, or a failover ends the wait.
        #[arg(long)]
        wait: bool,
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
        spool: PathBuf,
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
        spool: PathBuf,
        /// conninfo of the standby to promote (without it, only the spool is finalized).
        #[arg(long)]
        standby: Option<String>,
        /// Fail over even though the receiver heard from a live primary.
        #[arg(long)]
        force: bool,
        /// A primary heard from within this long counts as alive.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        alive_window: Duration,
        /// How long to wait for replay and promotion.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Throwaway primary + standby on this machine: ship, load, kill the primary, fail over, report.
    #[command(
        after_help = "Example:\n  waltail demo\n  waltail demo --style recovery --seconds 8\n\nNeeds PostgreSQL installed (WALTAIL_PG_BIN to pick one); run as root, the servers run as `postgres`.\nExit codes: 0 the promoted standby holds a gap-free prefix of the acknowledged commits, 1 it does not, or the demo failed."
    )]
    Demo {
        /// How long the load runs before the primary is killed.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, value_enum, default_value = "standby")]
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
        after_help = "Example:\n  waltail bench --out bench-results\n  waltail bench --methods waltail-1,streaming --seconds 5\n\nWrites bench.json and bench.md into --out. Takes about 5 minutes with every method.\nExit codes: 0 done, 1 a method failed to run."
    )]
    Bench {
        /// Directory for bench.json and bench.md.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Comma-separated: waltail-1, waltail-10, streaming, receivewal, archive-1, archive-60.
        #[arg(
            long,
            default_value = "waltail-1,waltail-10,streaming,receivewal,archive-1,archive-60"
        )]
        methods: String,
        /// Seconds of probe commits per workload.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Rows of the bulk load (about 250 bytes of WAL each).
        #[arg(long, default_value_t = 4_000_000)]
        bulk_rows: i64,
    },
    /// Make a standby data directory fed from the spool (base backup + recovery settings).
    #[command(
        name = "init-standby",
        after_help = "Example:\n  waltail init-standby --primary 'host=primary.example.com user=postgres' \\\n      --pgdata /var/lib/postgresql/15/standby --spool /var/lib/waltail/spool --style standby\n\nWith --method copy (or auto, when no pg_basebackup for the primary's version is installed) the\nprimary must run on this host: its data directory is copied between pg_backup_start and\npg_backup_stop (pg_start_backup/pg_stop_backup on 13 and 14), with the WAL of the backup.\n\nExit codes: 0 done, 1 failed, 2 bad arguments."
    )]
    InitStandby {
        #[arg(long, env = "WALTAIL_PRIMARY")]
        primary: String,
        #[arg(long)]
        pgdata: PathBuf,
        #[arg(long, env = "WALTAIL_SPOOL")]
        spool: PathBuf,
        #[arg(long, value_enum, default_value = "standby")]
        style: crate::standby::Style,
        /// wal_retrieve_retry_interval: how soon recovery reads a growing segment again.
        #[arg(long, default_value = "100ms", value_parser = parse_duration)]
        retry_interval: Duration,
        /// How to take the base backup: pg_basebackup, or copy the data directory of a
        /// primary on this host during a low-level backup; auto: pg_basebackup if one for
        /// the primary's version is installed, else copy.
        #[arg(long, value_enum, default_value = "auto")]
        method: crate::standby::Method,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ShipArgs {
    /// libpq conninfo of the primary; PGHOST, PGPORT, PGUSER, PGDATABASE fill in what it leaves out.
    #[arg(long, env = "WALTAIL_PRIMARY", default_value = "")]
    pub primary: String,
    /// The receiver, as host:port.
    #[arg(long, env = "WALTAIL_RECEIVER")]
    pub receiver: String,
    /// How often to poll the flush position (1ms to 10s).
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub interval: Duration,
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
    #[command(flatten)]
    pub auth: AuthArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ReceiveArgs {
    /// Address to listen on.
    #[arg(long, env = "WALTAIL_LISTEN")]
    pub listen: String,
    /// Spool directory (created 0700).
    #[arg(long, env = "WALTAIL_SPOOL")]
    pub spool: PathBuf,
    /// Close a streaming connection after this long without a frame.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Connections served at once.
    #[arg(long, default_value_t = 8)]
    pub max_connections: usize,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// Runs the command line; the binary's `main` is only this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    ExitCode::from(run(cli))
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WALTAIL_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_postgres=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
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

/// A single-threaded runtime: the shipper is one loop, and at idle one
/// thread wakes less often than a pool.
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
    eprintln!("waltail {cmd}: {e:#}");
    EXIT_FAILED
}

fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Ship(a) => {
            if a.interval < Duration::from_millis(1) || a.interval > Duration::from_secs(10) {
                return bad_input("ship", "--interval must be between 1ms and 10s");
            }
            let secret = match a.auth.secret() {
                Ok(s) => s,
                Err(e) => return bad_input("ship", e),
            };
            let mut cfg = crate::ship::ShipConfig::new(&a.primary, &a.receiver, secret);
            cfg.tls = a.auth.tls();
            cfg.interval = a.interval;
            cfg.slot = (!a.no_slot).then_some(a.slot);
            cfg.start_lsn = a.start_lsn;
            cfg.pg_wal = a.pg_wal;
            let (rt, token) = runtime_single();
            let (tx, _rx) = tokio::sync::watch::channel(Default::default());
            match rt.block_on(crate::ship::run(cfg, token, tx)) {
                Ok(()) => EXIT_OK,
                Err(e) => failed("ship", &e),
            }
        }
        Command::Restore {
            file,
            dest,
            spool,
            wait,
            poll,
            max_wait,
        } => {
            let req = crate::restore::RestoreRequest {
                file,
                dest,
                spool,
                wait,
                poll,
                max_wait,
            };
            match crate::restore::restore(&req) {
                Ok(code) => code,
                Err(crate::restore::RestoreError::BadArgs(e)) => bad_input("restore", e),
                Err(e) => {
                    eprintln!("waltail restore: {e}");
                    crate::restore::EXIT_NOT_FOUND
                }
            }
        }
        Command::Cleanup {
            oldest_kept,
            spool,
            dry_run,
        } => match crate::restore::cleanup(&spool, &oldest_kept, dry_run) {
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
        },
        Command::Failover {
            spool,
            standby,
            force,
            alive_window,
            timeout,
            json,
        } => {
            let cfg = crate::failover::FailoverConfig {
                spool,
                standby,
                force,
                alive_window,
                timeout,
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
        Command::InitStandby {
            primary,
            pgdata,
            spool,
            style,
            retry_interval,
            method,
        } => match runtime().0.block_on(crate::standby::init_standby(
            &std::env::current_exe().unwrap_or_else(|_| "waltail".into()),
            &primary,
            &pgdata,
            &spool,
            style,
            retry_interval,
            method,
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
            Err(e) => failed("init-standby", &e),
        },
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
            seconds,
            bulk_rows,
        } => {
            use crate::bench::Method;
            let mut ms = Vec::new();
            for m in methods.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                ms.push(match m {
                    "waltail-1" => Method::Waltail { interval_ms: 1 },
                    "waltail-10" => Method::Waltail { interval_ms: 10 },
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
        Command::Receive(a) => {
            let secret = match a.auth.secret() {
                Ok(s) => s,
                Err(e) => return bad_input("receive", e),
            };
            let mut cfg = crate::receive::ReceiveConfig::new(&a.listen, a.spool, secret);
            cfg.tls = a.auth.tls();
            cfg.idle_timeout = a.idle_timeout;
            cfg.max_connections = a.max_connections.max(1);
            let (rt, token) = runtime();
            let r = rt.block_on(async move {
                let rx = crate::receive::Receiver::bind(cfg).await?;
                rx.run(token).await
            });
            match r {
                Ok(()) => EXIT_OK,
                Err(e) => failed("receive", &e),
            }
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
