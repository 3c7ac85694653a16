//! Storage faults and dying processes: a full spool disk, failing fsyncs,
//! WAL recycled under a stalled shipper without a slot, restore killed
//! mid-copy. Each test ends by comparing the spool byte for byte with the
//! primary's archive: nothing acknowledged may be lost or wrong.
//!
//! The injected faults (failing fsync, write errors) come from `fail`
//! failpoints, compiled in with `--features failpoints` (the README's test
//! command); the full disk is a real small tmpfs when the tests run as root.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::*;
use waltail::wal::Lsn;

const SECRET: &str = "test-secret-0123456789abcdef";
const SEG: u64 = 1 << 20;

/// Tests that inject faults need the failpoints compiled in; without them
/// they would test nothing, so they fail and say how to run them.
fn require_failpoints() {
    if !cfg!(feature = "failpoints") {
        panic!("this test injects faults: run the suite with `cargo test --features failpoints` (the README's test command)");
    }
}

/// Writes about `mb` MB of WAL with one statement.
fn write_wal(c: &Cluster, table: &str, mb: u64) {
    c.psql(&format!(
        "insert into {table} select g, repeat('w', 200) from generate_series(1, {}) g",
        mb * 4000
    ))
    .unwrap();
}

/// The spool is private to its owner: the directory 0700, every file 0600.
fn assert_private(spool: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(spool), 0o700, "spool directory mode");
    let mut n = 0;
    for e in std::fs::read_dir(spool).unwrap().flatten() {
        let m = mode(&e.path());
        let want = if e.path().is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m, want, "{} has mode {m:o}", e.path().display());
        n += 1;
    }
    assert!(n >= 5, "only {n} files in the spool");
}

/// Lines of a daemon's log that contain `needle`.
fn count_log(d: &Daemon, needle: &str) -> usize {
    d.log_text().lines().filter(|l| l.contains(needle)).count()
}

/// The durable position never moves back, sampled while `f` runs.
fn watch_durable<T>(spool: &Path, f: impl FnOnce() -> T) -> (T, Lsn) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let spool = spool.to_path_buf();
        std::thread::spawn(move || {
            let mut high = Lsn(0);
            let deadline = Instant::now() + Duration::from_secs(300);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                if let Some((_, l)) = spool_position(&spool) {
                    assert!(
                        l >= high,
                        "the durable position went back from {high} to {l}"
                    );
                    high = l;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            high
        })
    };
    let out = f();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let high = watcher.join().expect("durable position went back");
    (out, high)
}

#[test]
fn failing_fsyncs_are_never_acked_and_what_they_lost_is_sent_again() {
    require_failpoints();
    let w = Workdir::new();
    let c = archived_cluster("faults-fsync");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    // Six fsyncs fail, in two runs of three after the first syncs went
    // through, and lose the bytes they should have made durable (a fixed
    // pattern: the receiver syncs once per burst, too seldom for a
    // percentage to be sure to hit).
    let (rx, addr) = start_receiver_env(
        &w,
        &spool,
        &secret,
        &[],
        &[("FAILPOINTS", "spool-sync=2*off->3*return->3*off->3*return")],
    );
    let tx = start_shipper(&w, &c, &addr, &secret, &["--interval", "2ms"]);
    c.psql("create table f(i int, pad text)").unwrap();
    let ((), _) = watch_durable(&spool, || {
        for _ in 0..6 {
            write_wal(&c, "f", 1);
            c.psql("insert into f values (0, 'commit')").unwrap();
        }
    });
    c.psql("select pg_switch_wal()").unwrap();
    wait_durable(&spool, flush_lsn(&c), 90, &[&rx, &tx]);
    let failures = count_log(&rx, "Input/output error");
    assert!(
        failures >= 1,
        "no fsync failure was injected:\n{}",
        rx.log_text()
    );
    let compared = assert_spool_matches(&spool, &c, SEG);
    assert!(compared >= 5, "only {compared} segments compared");
    assert_private(&spool);
    eprintln!("fsync failures injected: {failures}; {compared} segments identical to the archive");
}

/// A small tmpfs for the spool (root only), or `None` where mounting is not
/// allowed; then the disk-full test injects ENOSPC with a failpoint instead.
struct SmallFs {
    dir: std::path::PathBuf,
}

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> Option<SmallFs> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0755"))
            .arg("tmpfs")
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return None;
        }
        if let Some(r) = waltail::pg::cluster::RunAs::for_servers().unwrap() {
            r.chown(dir).unwrap();
        }
        Some(SmallFs {
            dir: dir.to_path_buf(),
        })
    }

    fn resize(&self, size: &str) {
        let st = std::process::Command::new("mount")
            .args(["-o"])
            .arg(format!("remount,size={size}"))
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(st.success(), "remounting the tmpfs");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

#[test]
fn a_full_spool_disk_stops_acks_and_recovers_when_space_returns() {
    let w = Workdir::new();
    let c = archived_cluster("faults-full");
    let secret = w.secret("secret", SECRET);
    let fs = SmallFs::mount(&w.path("spoolfs"), "3m");
    let spool = match &fs {
        Some(f) => f.dir.join("spool"),
        None => {
            require_failpoints();
            w.path("spool")
        }
    };
    // Without a mount, writes fail with ENOSPC after a first stretch.
    let env: Vec<(&str, &str)> = if fs.is_some() {
        vec![]
    } else {
        vec![("FAILPOINTS", "spool-write=40%20*return")]
    };
    let (rx, addr) = start_receiver_env(&w, &spool, &secret, &[], &env);
    let tx = start_shipper(&w, &c, &addr, &secret, &["--interval", "2ms"]);
    c.psql("create table f(i int, pad text)").unwrap();
    let (_, high) = watch_durable(&spool, || {
        for _ in 0..6 {
            write_wal(&c, "f", 1);
        }
        // Let the receiver run into the wall.
        std::thread::sleep(Duration::from_secs(2));
    });
    let target = flush_lsn(&c);
    if let Some(small) = &fs {
        assert!(
            high < target,
            "a 3 MB spool took all {target} of WAL: the disk never filled"
        );
        assert!(
            count_log(&rx, "No space left on device") >= 1,
            "no ENOSPC in the receiver's log:\n{}",
            rx.log_text()
        );
        // What was acked is intact while the disk is full.
        assert_spool_matches(&spool, &c, SEG);
        small.resize("64m");
    }
    let (_, _) = watch_durable(&spool, || {
        c.psql("select pg_switch_wal()").unwrap();
        wait_durable(&spool, flush_lsn(&c), 90, &[&rx, &tx]);
    });
    let compared = assert_spool_matches(&spool, &c, SEG);
    assert!(compared >= 6, "only {compared} segments compared");
    eprintln!(
        "disk full ({}): durable stopped at {high} of {target}; after space returned {compared} segments identical",
        if fs.is_some() { "tmpfs" } else { "failpoint" }
    );
    drop(rx);
    drop(tx);
}

#[test]
fn recycled_wal_under_a_stalled_shipper_without_a_slot_is_a_clear_error() {
    use nix::sys::signal::{kill, Signal};
    let w = Workdir::new();
    let c = archived_cluster("faults-recycle");
    c.append_conf("max_wal_size = 2MB\nmin_wal_size = 2MB\nwal_keep_size = 0\n")
        .unwrap();
    c.psql("select pg_reload_conf()").unwrap();
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let mut tx = start_shipper(&w, &c, &addr, &secret, &["--interval", "2ms", "--no-slot"]);
    c.psql("create table f(i int, pad text)").unwrap();
    write_wal(&c, "f", 1);
    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);
    let (_, stalled_at) = spool_position(&spool).unwrap();
    // Stall the shipper; the primary writes and checkpoints past it.
    let pid = nix::unistd::Pid::from_raw(tx.child.id() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    for _ in 0..8 {
        write_wal(&c, "f", 1);
        c.psql("checkpoint").unwrap();
    }
    let oldest_needed = waltail::wal::SegmentName::of_lsn(
        waltail::wal::TimelineId(1),
        stalled_at,
        waltail::wal::SegmentSize::new(SEG).unwrap(),
    )
    .file_name(waltail::wal::SegmentSize::new(SEG).unwrap());
    // Removed, or recycled (renamed away and another file in its place).
    let gone = std::fs::read(c.pg_wal().join(&oldest_needed)).ok()
        != std::fs::read(c.archive.as_ref().unwrap().join(&oldest_needed)).ok();
    assert!(
        gone,
        "{oldest_needed} is still in pg_wal unchanged: nothing was recycled"
    );
    kill(pid, Signal::SIGCONT).unwrap();
    // The shipper stops with a clear error naming the missing WAL.
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(st) = tx.child.try_wait().unwrap() {
            break st.code();
        }
        assert!(
            Instant::now() < deadline,
            "shipper still running after its WAL was recycled:\n{}",
            tx.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = tx.log_text();
    assert_eq!(code, Some(1), "shipper exit code; log:\n{log}");
    assert!(
        log.contains("recycled") || log.contains("removed") || log.contains("no longer"),
        "the error does not say the WAL is gone:\n{log}"
    );
    // Nothing stale was shipped: all the spool holds equals the archive.
    assert_spool_matches(&spool, &c, SEG);
    eprintln!(
        "recycled: {}",
        log.lines().rev().take(3).collect::<Vec<_>>().join(" / ")
    );
    tx.kill9();
}

#[test]
fn restore_killed_mid_copy_leaves_the_target_absent_or_whole() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let w = Workdir::new();
    let c = archived_cluster("faults-restore");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let tx = start_shipper(&w, &c, &addr, &secret, &["--interval", "2ms"]);
    c.psql("create table f(i int, pad text)").unwrap();
    write_wal(&c, "f", 2);
    c.psql("select pg_switch_wal()").unwrap();
    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);
    let mut segs: Vec<String> = std::fs::read_dir(&spool)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.len() == 24)
        .collect();
    segs.sort();
    let seg = segs.last().expect("a complete segment").clone();
    let want = std::fs::read(spool.join(&seg)).unwrap();
    let dest_dir = w.path("pg_wal");
    std::fs::create_dir_all(&dest_dir).unwrap();
    let dest = dest_dir.join("RECOVERYXLOG");
    let (mut killed, mut finished) = (0, 0);
    for _ in 0..40 {
        let _ = std::fs::remove_file(&dest);
        let mut child = std::process::Command::new(waltail_bin())
            .args(["restore", &seg])
            .arg(&dest)
            .arg("--spool")
            .arg(&spool)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(4000)));
        let _ = child.kill();
        let st = child.wait().unwrap();
        if st.success() {
            finished += 1;
        } else {
            killed += 1;
        }
        if dest.exists() {
            assert!(
                std::fs::read(&dest).unwrap() == want,
                "a killed restore left a partial {} (seed {seed})",
                dest.display()
            );
        }
    }
    // Run to completion: the file is whole, and no temp file piles up.
    let out = waltail(&[
        "restore",
        &seg,
        dest.to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert!(std::fs::read(&dest).unwrap() == want);
    let leftovers = std::fs::read_dir(&dest_dir).unwrap().count();
    assert!(leftovers <= 2, "{leftovers} files in the target directory");
    eprintln!("restore: {killed} killed mid-run, {finished} finished (seed {seed})");
    assert!(
        killed > 0,
        "no restore was killed while running (seed {seed})"
    );
}

/// What the primary's slot says the receiver acked (the shipper advances
/// it to each ack), once it has reached `lsn` (bounded wait).
fn wait_slot(c: &Cluster, lsn: Lsn, secs: u64, logs: &[&Daemon]) -> Lsn {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = c
            .psql("select restart_lsn from pg_replication_slots where slot_name = 'waltail'")
            .unwrap();
        if let Ok(l) = s.parse::<Lsn>() {
            if l >= lsn {
                return l;
            }
        }
        if Instant::now() > deadline {
            let mut msg = format!("the slot did not reach {lsn} within {secs} s (at {s})\n");
            for d in logs {
                msg.push_str(&format!("--- {} log:\n{}\n", d.name, d.log_text()));
            }
            panic!("{msg}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_power_loss_after_an_ack_never_takes_the_spool_below_what_was_acked() {
    require_failpoints();
    let w = Workdir::new();
    let c = archived_cluster("faults-position");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    // Every write of the position file that is not fsynced is lost, as
    // after a power loss; then the receiver dies.
    let (mut rx, addr) = start_receiver_env(
        &w,
        &spool,
        &secret,
        &[],
        &[("FAILPOINTS", "spool-position-unsynced-lost=return")],
    );
    let mut tx = start_shipper(&w, &c, &addr, &secret, &["--interval", "2ms"]);
    c.psql("create table p(i int, pad text)").unwrap();
    // A burst over several 1 MB segments, acked and passed on to the slot.
    write_wal(&c, "p", 4);
    c.psql("insert into p values (0, 'commit')").unwrap();
    let acked = wait_slot(&c, flush_lsn(&c), 60, &[&rx, &tx]);
    tx.kill9();
    rx.kill9();
    // Reopened, the spool holds at least everything the slot was given.
    let sp = waltail::spool::Spool::open(&spool).unwrap();
    let seg = waltail::wal::SegmentSize::new(SEG).unwrap();
    let reopened = waltail::spool::writer::SpoolWriter::open(sp, seg)
        .unwrap()
        .durable()
        .map(|d| d.1);
    assert!(
        reopened >= Some(acked),
        "acked {acked} to the primary, but the reopened spool is durable only to {reopened:?}"
    );
    // The primary may recycle what the slot released; the stream resumes
    // without needing it and ends identical to the archive.
    c.psql("checkpoint").unwrap();
    let port = addr.rsplit(':').next().unwrap().to_string();
    let (rx, addr) = start_receiver_on(&w, &spool, &secret, &port);
    let tx = start_shipper(&w, &c, &addr, &secret, &["--interval", "2ms"]);
    write_wal(&c, "p", 1);
    c.psql("select pg_switch_wal()").unwrap();
    wait_durable(&spool, flush_lsn(&c), 60, &[&rx, &tx]);
    let compared = assert_spool_matches(&spool, &c, SEG);
    assert!(compared >= 4, "only {compared} segments compared");
}
