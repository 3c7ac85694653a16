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

use clap::{Parser, Subcommand};

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "waltail",
    version,
    about = "Stream a PostgreSQL primary's live WAL to a standby in byte ranges",
    after_help = "Exit codes: 0 success, 1 operation failed, 2 bad input.\n\nExample:\n  waltail inspect /var/lib/postgresql/15/main/pg_wal/000000010000000000000003 --json"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
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
}

/// Runs the command line; the binary's `main` is only this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    ExitCode::from(run(cli))
}

fn run(cli: Cli) -> u8 {
    match cli.command {
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
