//! Throwaway PostgreSQL clusters for the demo, the benchmarks and the tests.
//!
//! A [`Cluster`] lives in its own temporary directory (data directory, log,
//! socket directory, optional WAL archive), listens on a free port on
//! 127.0.0.1 only, and is stopped and removed when dropped, also when the
//! owner panics. PostgreSQL refuses to run as root, so when waltail runs as
//! root the server and its tools run as an unprivileged user
//! (`$WALTAIL_PG_USER`, default `postgres`).
//!
//! The server runs in its own process group so that [`Cluster::kill`] can
//! SIGKILL the postmaster and every backend at once: a primary that dies.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::bin::PgBin;

/// How to initialise a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `initdb --wal-segsize`, in MB (a power of two, 1 to 1024).
    pub wal_segsize_mb: u32,
    /// Turn on archive_mode with an `archive_command` that copies every
    /// finished segment into `<root>/archive` (ground truth for tests; a
    /// file appears there only whole, copied under a temporary name first).
    pub archive: bool,
    /// `archive_timeout` in seconds (0: off).
    pub archive_timeout: u32,
    /// `fsync`: off makes tests faster; a killed process loses nothing either way.
    pub fsync: bool,
    /// More `postgresql.conf` lines, as (name, value).
    pub settings: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            wal_segsize_mb: 16,
            archive: false,
            archive_timeout: 0,
            fsync: false,
            settings: Vec::new(),
        }
    }
}

/// The unprivileged user servers run as when we are root.
#[derive(Clone, Copy, Debug)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// `None` when not root; the server user's ids when root.
    pub fn for_servers() -> Result<Option<RunAs>> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let name = std::env::var("WALTAIL_PG_USER").unwrap_or_else(|_| "postgres".into());
        match nix::unistd::User::from_name(&name) {
            Ok(Some(u)) => Ok(Some(RunAs {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            })),
            _ => bail!("running as root, and PostgreSQL refuses to run as root; there is no user {name:?} to run it as: create one (useradd --system {name}) or set WALTAIL_PG_USER"),
        }
    }

    pub fn apply(&self, cmd: &mut Command) {
        cmd.uid(self.uid).gid(self.gid).env_remove("HOME");
    }

    pub fn chown(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("chown {}", path.display()))
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One throwaway server (see the module header).
pub struct Cluster {
    pub bin: PgBin,
    pub name: String,
    pub root: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    pub archive: Option<PathBuf>,
    pub run_as: Option<RunAs>,
    /// A network namespace (`ip netns` name) the server runs in, for tests
    /// of two hosts: clients then reach it through its Unix socket.
    pub netns: Option<String>,
    child: Option<Child>,
    keep: bool,
    owns_root: bool,
}

impl Cluster {
    /// Runs initdb in a new temporary directory and configures the server.
    pub fn init(name: &str, opts: &ClusterOptions) -> Result<Cluster> {
        let bin = PgBin::find().map_err(anyhow::Error::msg)?;
        Cluster::init_with(bin, name, opts)
    }

    pub fn init_with(bin: PgBin, name: &str, opts: &ClusterOptions) -> Result<Cluster> {
        let mut c = Cluster::empty(bin, name)?;
        let mut cmd = c.command(&c.bin.tool("initdb"));
        cmd.arg("-D")
            .arg(&c.data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .arg(format!("--wal-segsize={}", opts.wal_segsize_mb));
        c.run_quiet(cmd, "initdb")?;
        c.configure(opts)?;
        Ok(c)
    }

    /// A new empty root directory owned by the server user.
    fn empty(bin: PgBin, name: &str) -> Result<Cluster> {
        let run_as = RunAs::for_servers()?;
        let root = tempfile::Builder::new()
            .prefix(&format!("waltail-{name}-"))
            .tempdir()
            .context("creating a temporary directory")?
            .keep();
        if let Some(r) = run_as {
            r.chown(&root)?;
        }
        let data = root.join("data");
        Ok(Cluster {
            bin,
            name: name.to_string(),
            data,
            root,
            port: free_port()?,
            archive: None,
            run_as,
            netns: None,
            child: None,
            keep: std::env::var_os("WALTAIL_KEEP_DIRS").is_some(),
            owns_root: true,
        })
    }

    fn configure(&mut self, opts: &ClusterOptions) -> Result<()> {
        let mut conf = format!(
            "\n# waltail throwaway cluster\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             wal_level = replica\n\
             max_wal_senders = 10\n\
             max_replication_slots = 10\n\
             hot_standby = on\n\
             fsync = {}\n\
             shared_buffers = 32MB\n\
             max_connections = 40\n\
             log_line_prefix = '%m [%p] '\n",
            self.root.display(),
            if opts.fsync { "on" } else { "off" },
        );
        if opts.archive {
            let dir = self.root.join("archive");
            fs::create_dir_all(&dir)?;
            if let Some(r) = self.run_as {
                r.chown(&dir)?;
            }
            conf.push_str(&format!(
                "archive_mode = on\narchive_command = 'test ! -f {d}/%f && cp %p {d}/.%f.tmp && mv {d}/.%f.tmp {d}/%f'\n",
                d = dir.display()
            ));
            self.archive = Some(dir);
        }
        if opts.archive_timeout > 0 {
            conf.push_str(&format!("archive_timeout = {}\n", opts.archive_timeout));
        }
        for (k, v) in &opts.settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        self.append_conf(&conf)
    }

    /// Makes a new cluster from a base backup of `primary` (pg_basebackup,
    /// WAL streamed into the backup), configured but not started and with no
    /// signal file: the caller makes it a standby. Without a pg_basebackup
    /// that accepts the primary's version (the npm builds have none, and an
    /// older one refuses a newer server), the data directory is copied
    /// during a low-level backup instead ([`super::backup`]).
    pub fn from_base_backup(
        primary: &Cluster,
        name: &str,
        opts: &ClusterOptions,
    ) -> Result<Cluster> {
        let mut c = Cluster::empty(primary.bin.clone(), name)?;
        if let Some(tool) = c.bin.find_tool("pg_basebackup") {
            let mut cmd = c.command(&tool);
            cmd.arg("-D")
                .arg(&c.data)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-sync",
                ])
                .args(["-p", &primary.port.to_string()]);
            c.run_quiet(cmd, "pg_basebackup")?;
        } else {
            let (conninfo, data, owner) = (primary.conninfo(), c.data.clone(), c.run_as);
            // A thread of its own: the caller may be inside a tokio runtime.
            std::thread::spawn(move || -> Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(super::backup::copy_backup(&conninfo, &data, owner))?;
                Ok(())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the copy backup thread panicked"))?
            .context("copy backup (no pg_basebackup for this server version)")?;
        }
        // The copied postgresql.conf names the primary's socket directory and archive.
        c.append_conf(&format!(
            "\n# standby copy\nunix_socket_directories = '{}'\narchive_mode = off\n",
            c.root.display()
        ))?;
        c.configure(&ClusterOptions {
            archive: false,
            ..opts.clone()
        })?;
        Ok(c)
    }

    /// Takes charge of an existing data directory (made by `waltail
    /// init-standby`, say): a free port, its parent as the socket directory.
    /// The directory is not removed on drop.
    pub fn adopt(name: &str, data: &Path) -> Result<Cluster> {
        let bin = PgBin::find().map_err(anyhow::Error::msg)?;
        let root = data
            .parent()
            .context("data directory has no parent")?
            .to_path_buf();
        let c = Cluster {
            bin,
            name: name.to_string(),
            data: data.to_path_buf(),
            root,
            port: free_port()?,
            archive: None,
            run_as: RunAs::for_servers()?,
            netns: None,
            child: None,
            keep: true,
            owns_root: false,
        };
        c.append_conf(&format!(
            "\n# adopted by waltail\nunix_socket_directories = '{}'\nlisten_addresses = '127.0.0.1'\narchive_mode = off\n",
            c.root.display()
        ))?;
        Ok(c)
    }

    /// A command that runs as the server user when we are root.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root);
        match (&self.netns, self.run_as) {
            (Some(ns), r) => enter_netns(&mut cmd, ns, r),
            (None, Some(r)) => r.apply(&mut cmd),
            (None, None) => {}
        }
        cmd
    }

    /// Where clients connect: the loopback address, or the Unix socket's
    /// directory when the server runs in another network namespace.
    pub fn host(&self) -> String {
        match self.netns {
            Some(_) => self.root.display().to_string(),
            None => "127.0.0.1".into(),
        }
    }

    fn run_quiet(&self, mut cmd: Command, what: &str) -> Result<()> {
        let out = cmd
            .output()
            .with_context(|| format!("running {what} ({})", self.bin.dir.display()))?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Appends lines to postgresql.conf.
    pub fn append_conf(&self, text: &str) -> Result<()> {
        let mut f = OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .context("opening postgresql.conf")?;
        f.write_all(text.as_bytes())?;
        Ok(())
    }

    /// Creates an empty file in the data directory (standby.signal, recovery.signal).
    pub fn touch(&self, name: &str) -> Result<()> {
        let p = self.data.join(name);
        fs::write(&p, b"")?;
        if let Some(r) = self.run_as {
            r.chown(&p)?;
        }
        Ok(())
    }

    pub fn pg_wal(&self) -> PathBuf {
        self.data.join("pg_wal")
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.join(format!("{}.log", self.name))
    }

    /// The last lines of the server log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        // Connection attempts during start-up are noise here.
        let all: Vec<&str> = text
            .lines()
            .filter(|l| {
                !l.contains("not yet accepting connections")
                    && !l.contains("Consistent recovery state has not been")
            })
            .collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// libpq conninfo for this server.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.host(),
            self.port
        )
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&mut self) -> Result<()> {
        // A free port can be taken by another process between the check and
        // the bind: then try another one.
        for _ in 0..3 {
            self.spawn()?;
            match self.wait_ready(Duration::from_secs(90)) {
                Err(e) if format!("{e:#}").contains("Address already in use") => {
                    self.child = None;
                    self.port = free_port()?;
                }
                other => return other,
            }
        }
        self.spawn()?;
        self.wait_ready(Duration::from_secs(90))
    }

    /// Starts the server without waiting for it to accept connections (a
    /// standby in archive recovery may not for a while).
    pub fn spawn(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        if let Some(r) = self.run_as {
            r.chown(&self.log_path())?;
        }
        let mut cmd = self.command(&self.bin.tool("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        self.child = Some(cmd.spawn().context("starting postgres")?);
        Ok(())
    }

    /// Waits until the server accepts connections.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                bail!(
                    "{} server exited during start-up; log:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            let isready = self.bin.tool("pg_isready");
            let st = Command::new(&isready)
                .args(["-q", "-h", &self.host(), "-U", "postgres", "-d", "postgres"])
                .args(["-p", &self.port.to_string()])
                .status()
                .with_context(|| {
                    format!(
                        "cannot run {} (not in {} nor in another installed PostgreSQL)",
                        isready.display(),
                        self.bin.dir.display()
                    )
                })?;
            if st.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} server did not accept connections within {:?}; log:\n{}",
                    self.name,
                    timeout,
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: Signal, group: bool) {
        if let Some(c) = &self.child {
            let pid = Pid::from_raw(c.id() as i32);
            let _ = if group {
                nix::sys::signal::killpg(pid, sig)
            } else {
                nix::sys::signal::kill(pid, sig)
            };
        }
    }

    /// Clean "fast" shutdown (SIGINT), then SIGKILL if it takes over 30 s.
    pub fn stop(&mut self) -> Result<()> {
        if !self.is_running() {
            self.child = None;
            return Ok(());
        }
        self.signal(Signal::SIGINT, false);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.is_running() {
            if Instant::now() > deadline {
                self.kill();
                bail!("{} server did not stop within 30 s; killed", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = None;
        Ok(())
    }

    /// SIGKILL to the postmaster and every backend: the server dies.
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL, true);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        // Backends notice their postmaster is gone; wait until the group is empty.
        std::thread::sleep(Duration::from_millis(50));
    }

    /// A pgbench command aimed at this server (the caller adds options and runs it).
    pub fn pgbench(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.tool("pgbench"));
        c.args([
            "-h",
            &self.host(),
            "-U",
            "postgres",
            "-p",
            &self.port.to_string(),
        ])
        .args(args)
        .arg("postgres");
        c
    }

    /// Runs SQL with psql and returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let psql = self.bin.tool("psql");
        let out = Command::new(&psql)
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &self.host(), "-U", "postgres", "-d", "postgres"])
            .args(["-p", &self.port.to_string(), "-c", sql])
            .output()
            .with_context(|| {
                format!(
                    "cannot run {} (not in {} nor in another installed PostgreSQL)",
                    psql.display(),
                    self.bin.dir.display()
                )
            })?;
        if !out.status.success() {
            bail!(
                "psql on {} failed: {sql}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Leaves the directory in place when dropped (for debugging).
    pub fn keep_files(&mut self) {
        self.keep = true;
    }
}

/// Makes `cmd` run in network namespace `ns` (`/run/netns/<ns>`, made by
/// `ip netns add`), as `run_as` when given: the child joins the namespace
/// while it is still root, then drops to the user, then execs.
pub fn enter_netns(cmd: &mut Command, ns: &str, run_as: Option<RunAs>) {
    use std::os::unix::process::CommandExt;
    let path = PathBuf::from("/run/netns").join(ns);
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default();
    if run_as.is_some() {
        cmd.env_remove("HOME");
    }
    // SAFETY: between fork and exec the closure only makes system calls
    // (open, setns, close, setgroups, setgid, setuid), all
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            if let Some(r) = run_as {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(r.gid) != 0
                    || libc::setuid(r.uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.is_running() {
            self.signal(Signal::SIGQUIT, false);
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            self.signal(Signal::SIGKILL, true);
            if let Some(mut c) = self.child.take() {
                let _ = c.wait();
            }
        }
        if self.owns_root && !self.keep {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}
