//! Shared test helpers: the harness over real PostgreSQL servers, fixtures,
//! pg_waldump as ground truth, and running the waltail binary.
//!
//! Servers come from `waltail::pg::Cluster`: throwaway clusters in temp dirs
//! on free loopback ports, run as the `postgres` user when the tests run as
//! root, stopped and removed when dropped (also when a test panics). A machine
//! without PostgreSQL fails every test that needs it, with what to install.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use waltail::pg::{Cluster, ClusterOptions, PgBin};
use waltail::wal::Lsn;

/// The PostgreSQL binaries, or a loud failure saying what to install.
pub fn pg_bin() -> PgBin {
    match PgBin::find() {
        Ok(b) => b,
        Err(e) => panic!("these tests need a real PostgreSQL server: {e}"),
    }
}

/// A started cluster with the given options.
pub fn cluster(name: &str, opts: ClusterOptions) -> Cluster {
    let mut c = Cluster::init(name, &opts).unwrap_or_else(|e| panic!("initdb for {name}: {e:#}"));
    c.start()
        .unwrap_or_else(|e| panic!("starting {name}: {e:#}"));
    c
}

/// A started cluster with 1 MB segments (small WAL, fast tests).
pub fn small_cluster(name: &str) -> Cluster {
    cluster(
        name,
        ClusterOptions {
            wal_segsize_mb: 1,
            ..Default::default()
        },
    )
}

pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One fixture segment: its kind, name, bytes, and the pg_waldump output
/// recorded when it was made.
pub struct Fixture {
    pub kind: String,
    pub name: String,
    pub bytes: Vec<u8>,
    pub waldump: String,
}

/// All fixtures of PostgreSQL `major` (fixtures/pg<major>/<kind>/<segment>.gz).
pub fn fixtures(major: u32) -> Vec<Fixture> {
    let root = repo_dir().join(format!("fixtures/pg{major}"));
    let mut out = Vec::new();
    let mut kinds: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    kinds.sort();
    for kind in kinds {
        let mut files: Vec<_> = std::fs::read_dir(&kind)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "gz"))
        {
            let name = f.file_stem().unwrap().to_string_lossy().to_string();
            let mut bytes = Vec::new();
            flate2::read::GzDecoder::new(std::fs::File::open(f).unwrap())
                .read_to_end(&mut bytes)
                .unwrap();
            let waldump = std::fs::read_to_string(f.with_extension("waldump")).unwrap();
            out.push(Fixture {
                kind: kind.file_name().unwrap().to_string_lossy().to_string(),
                name,
                bytes,
                waldump,
            });
        }
    }
    assert!(!out.is_empty(), "no fixtures under {}", root.display());
    out
}

/// What pg_waldump printed: the number of records and the last one's LSN.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Dump {
    pub records: u64,
    pub last: Option<Lsn>,
    pub first: Option<Lsn>,
}

pub fn parse_waldump(text: &str) -> Dump {
    let mut d = Dump {
        records: 0,
        last: None,
        first: None,
    };
    for line in text.lines().filter(|l| l.starts_with("rmgr:")) {
        let lsn = line
            .split(", lsn: ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .unwrap_or_else(|| panic!("no lsn in pg_waldump line {line:?}"));
        let lsn: Lsn = lsn.trim().parse().unwrap();
        d.records += 1;
        d.first.get_or_insert(lsn);
        d.last = Some(lsn);
    }
    d
}

/// Runs pg_waldump on one file (named like the segment it holds).
pub fn waldump(file: &Path) -> Dump {
    let out = Command::new(pg_bin().tool("pg_waldump"))
        .arg(file.file_name().unwrap())
        .current_dir(file.parent().unwrap())
        .output()
        .expect("running pg_waldump");
    parse_waldump(&String::from_utf8_lossy(&out.stdout))
}

pub fn waltail_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_waltail"))
}

/// Runs `waltail ARGS` to completion.
pub fn waltail(args: &[&str]) -> Output {
    Command::new(waltail_bin())
        .args(args)
        .output()
        .expect("running waltail")
}

/// `waltail inspect FILE --json`, parsed; Err(stderr, code) on failure.
pub fn inspect_json(file: &Path) -> Result<serde_json::Value, (String, i32)> {
    let out = waltail(&["inspect", file.to_str().unwrap(), "--json"]);
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON"))
    } else {
        Err((
            String::from_utf8_lossy(&out.stderr).to_string(),
            out.status.code().unwrap_or(-1),
        ))
    }
}

/// A small deterministic PRNG (xorshift64*), so failures replay from a seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The seed for randomized tests: `$WALTAIL_SEED`, or derived from the time
/// (printed, so a failure can be replayed).
pub fn seed() -> u64 {
    let s = std::env::var("WALTAIL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("WALTAIL_SEED={s}");
    s
}
