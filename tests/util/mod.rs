//! Shared test helpers: the harness over real PostgreSQL servers, fixtures,
//! pg_waldump as ground truth, and running the waltail binary.
//!
//! Servers come from `waltail::pg::Cluster`: throwaway clusters in temp dirs
//! on free loopback ports, run as the `postgres` user when the tests run as
//! root, stopped and removed when dropped (also when a test panics). A machine
//! without PostgreSQL fails every test that needs it, with what to install.

#![allow(dead_code)]

pub mod netns;
pub mod proxy;

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

/// Runs pg_waldump on one file (named like the segment it holds): the
/// pg_waldump of the PostgreSQL version that wrote it (pg_waldump reads only
/// its own version's WAL), which must be installed.
pub fn waldump(file: &Path) -> Dump {
    let bytes = std::fs::read(file).unwrap_or_default();
    let magic = match bytes.get(..2) {
        Some(b) => u16::from_le_bytes([b[0], b[1]]),
        None => panic!("{}: too short to be WAL", file.display()),
    };
    // A magic no version writes (a bit flip in a fixture): any pg_waldump
    // refuses the file; the fixtures' own (15) is the one that must be there.
    let major = waltail::wal::page::major_version_of_magic(magic).unwrap_or(15);
    let tool = waldump_of(major).unwrap_or_else(|| {
        panic!("no pg_waldump of PostgreSQL {major} installed (install postgresql-{major}): it is the ground truth for WAL of {major}")
    });
    let out = Command::new(tool)
        .arg(file.file_name().unwrap())
        .current_dir(file.parent().unwrap())
        .output()
        .expect("running pg_waldump");
    parse_waldump(&String::from_utf8_lossy(&out.stdout))
}

/// The pg_waldump of PostgreSQL `major`, if installed.
pub fn waldump_of(major: u32) -> Option<PathBuf> {
    pg_bin().tool_of_major("pg_waldump", major)
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

/// A waltail daemon started from the command line, killed when dropped.
pub struct Daemon {
    pub child: std::process::Child,
    pub log: PathBuf,
    pub name: String,
}

impl Daemon {
    /// Starts `waltail ARGS` as the server user (so the spool it writes is
    /// readable by the server's restore_command), logging to `log`.
    pub fn start(name: &str, args: &[String], log: PathBuf) -> Daemon {
        Daemon::start_env(name, args, log, &[])
    }

    /// As [`Daemon::start`], with extra environment variables.
    pub fn start_env(name: &str, args: &[String], log: PathBuf, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_in(None, name, args, log, env)
    }

    /// As [`Daemon::start_env`], inside network namespace `netns` when given.
    pub fn start_in(
        netns: Option<&str>,
        name: &str,
        args: &[String],
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> Daemon {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(waltail_bin());
        cmd.args(args)
            .env("WALTAIL_LOG", "info")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        let run_as = waltail::pg::cluster::RunAs::for_servers().unwrap();
        if let Some(r) = run_as {
            r.chown(&log).unwrap();
        }
        match (netns, run_as) {
            (Some(ns), r) => waltail::pg::cluster::enter_netns(&mut cmd, ns, r),
            (None, Some(r)) => r.apply(&mut cmd),
            (None, None) => {}
        }
        let child = cmd.spawn().expect("starting waltail");
        Daemon {
            child,
            log,
            name: name.to_string(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log contains all of `needles`.
    pub fn wait_log(&self, needles: &[&str], secs: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let log = self.log_text();
            if needles.iter().all(|n| log.contains(n)) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} log lacks {needles:?}:\n{log}",
                self.name
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit code (SIGKILL after 20 s).
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if std::time::Instant::now() > deadline {
                self.kill9();
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself (bounded).
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "{} did not exit within {secs} s; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A working directory for a test's spool, secrets and logs, writable by
/// the server user; removed at the end.
pub struct Workdir {
    pub dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Workdir {
        let dir = tempfile::Builder::new()
            .prefix("waltail-test-")
            .tempdir()
            .unwrap();
        if let Some(r) = waltail::pg::cluster::RunAs::for_servers().unwrap() {
            r.chown(dir.path()).unwrap();
        }
        Workdir { dir }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// A secret file readable only by the server user.
    pub fn secret(&self, name: &str, value: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, value).unwrap();
        if let Some(r) = waltail::pg::cluster::RunAs::for_servers().unwrap() {
            r.chown(&p).unwrap();
        }
        p
    }
}

/// Starts a receiver on a free loopback port; returns it and its address.
pub fn start_receiver(
    w: &Workdir,
    spool: &Path,
    secret: &Path,
    extra: &[&str],
) -> (Daemon, String) {
    start_receiver_env(w, spool, secret, extra, &[])
}

/// As [`start_receiver`], with extra environment variables (`FAILPOINTS`).
pub fn start_receiver_env(
    w: &Workdir,
    spool: &Path,
    secret: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Daemon, String) {
    let addr = format!("127.0.0.1:{}", waltail::pg::cluster::free_port().unwrap());
    (start_receiver_at(w, spool, secret, &addr, extra, env), addr)
}

/// A receiver on `port` of 127.0.0.1 (a restart where the shipper looks).
pub fn start_receiver_on(w: &Workdir, spool: &Path, secret: &Path, port: &str) -> (Daemon, String) {
    let addr = format!("127.0.0.1:{port}");
    (start_receiver_at(w, spool, secret, &addr, &[], &[]), addr)
}

/// Starts a receiver listening on `addr`, each start logging to a file of
/// its own; returns once it listens.
pub fn start_receiver_at(
    w: &Workdir,
    spool: &Path,
    secret: &Path,
    addr: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Daemon {
    let mut args: Vec<String> = vec![
        "receive".into(),
        "--listen".into(),
        addr.into(),
        "--spool".into(),
        spool.to_str().unwrap().into(),
        "--secret-file".into(),
        secret.to_str().unwrap().into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let port = addr.rsplit(':').next().unwrap_or("0");
    let mut log = w.path(&format!("receive-{port}.log"));
    let mut n = 1;
    while log.exists() {
        n += 1;
        log = w.path(&format!("receive-{port}-{n}.log"));
    }
    let d = Daemon::start_env("receive", &args, log, env);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "receiver did not listen:\n{}",
            d.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    d
}

/// Starts a shipper from `c` to `addr`.
pub fn start_shipper(
    w: &Workdir,
    c: &Cluster,
    addr: &str,
    secret: &Path,
    extra: &[&str],
) -> Daemon {
    start_shipper_env(w, c, addr, secret, extra, &[])
}

/// As [`start_shipper`], with extra environment variables (`FAILPOINTS`).
pub fn start_shipper_env(
    w: &Workdir,
    c: &Cluster,
    addr: &str,
    secret: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Daemon {
    let mut args: Vec<String> = vec![
        "ship".into(),
        "--primary".into(),
        c.conninfo(),
        "--receiver".into(),
        addr.into(),
        "--secret-file".into(),
        secret.to_str().unwrap().into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let n = std::fs::read_dir(w.dir.path()).unwrap().count();
    Daemon::start_env("ship", &args, w.path(&format!("ship-{n}.log")), env)
}

/// The spool's durable position.
pub fn spool_position(spool: &Path) -> Option<(waltail::wal::TimelineId, Lsn)> {
    waltail::spool::Spool::open(spool).ok()?.position().ok()?
}

/// Waits until the spool holds `lsn` durably (bounded), or panics with logs.
pub fn wait_durable(spool: &Path, lsn: Lsn, secs: u64, logs: &[&Daemon]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some((_, l)) = spool_position(spool) {
            if l >= lsn {
                return;
            }
        }
        if std::time::Instant::now() > deadline {
            let mut msg = format!(
                "spool did not reach {lsn} within {secs} s (at {:?})\n",
                spool_position(spool)
            );
            for d in logs {
                msg.push_str(&format!("--- {} log:\n{}\n", d.name, d.log_text()));
            }
            panic!("{msg}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The server's current flush LSN.
pub fn flush_lsn(c: &Cluster) -> Lsn {
    c.psql("select pg_current_wal_flush_lsn()")
        .unwrap()
        .parse()
        .unwrap()
}

/// Runs pgbench with bounded time.
pub fn pgbench(c: &Cluster, args: &[&str]) {
    let out = c.pgbench(args).output().unwrap();
    assert!(
        out.status.success(),
        "pgbench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts every complete segment in the spool equals the archive's copy and
/// the spool's .partial equals pg_wal's file up to the durable position.
/// Returns how many complete segments were compared.
pub fn assert_spool_matches(spool: &Path, c: &Cluster, seg_size: u64) -> usize {
    let archive = c.archive.clone().expect("cluster with archive");
    let (tli, durable) = spool_position(spool).expect("spool has a position");
    let mut compared = 0;
    let mut names: Vec<String> = std::fs::read_dir(spool)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    names.sort();
    for n in &names {
        let ours = std::fs::read(spool.join(n)).unwrap();
        assert_eq!(ours.len() as u64, seg_size, "{n} is complete-size");
        let theirs = wait_file(&archive.join(n), 30);
        assert!(
            ours == theirs,
            "spool segment {n} differs from the archive's copy"
        );
        compared += 1;
    }
    let seg = waltail::wal::SegmentName::of_lsn(
        tli,
        durable,
        waltail::wal::SegmentSize::new(seg_size).unwrap(),
    );
    let off = durable.segment_offset(waltail::wal::SegmentSize::new(seg_size).unwrap()) as usize;
    if off > 0 {
        let name = seg.file_name(waltail::wal::SegmentSize::new(seg_size).unwrap());
        let ours = std::fs::read(spool.join(format!("{name}.partial"))).unwrap();
        // The archive's copy once the segment is complete (pg_wal may have
        // recycled it by then), else the live one.
        let theirs = c
            .archive
            .as_ref()
            .and_then(|a| std::fs::read(a.join(&name)).ok())
            .or_else(|| std::fs::read(c.pg_wal().join(&name)).ok())
            .unwrap_or_else(|| panic!("{name} is neither archived nor in pg_wal"));
        assert!(
            ours[..off] == theirs[..off],
            "{name}.partial differs from the primary's WAL below the durable {durable}"
        );
    }
    compared
}

/// Reads a file once it exists (bounded wait).
pub fn wait_file(p: &Path, secs: u64) -> Vec<u8> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Ok(b) = std::fs::read(p) {
            return b;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub fn archived_cluster(name: &str) -> Cluster {
    cluster(
        name,
        ClusterOptions {
            wal_segsize_mb: 1,
            archive: true,
            ..Default::default()
        },
    )
}

/// GET `path` over plain HTTP/1.1; (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_fmt(
        &mut s,
        format_args!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .unwrap();
    let mut buf = String::new();
    std::io::Read::read_to_string(&mut s, &mut buf).unwrap();
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (code, body.to_string())
}

/// A sample's value from a Prometheus text exposition (0 when absent).
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// An empty spool directory as the receiver makes one: the server's user's, 0700.
pub fn empty_spool(p: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(p).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
    if let Some(r) = waltail::pg::cluster::RunAs::for_servers().unwrap() {
        r.chown(p).unwrap();
    }
}
