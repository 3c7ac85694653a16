//! The standby side end to end on real servers, in both styles: restore,
//! cleanup, init-standby, and the failover after the primary is SIGKILLed.

use std::time::Duration;

use crate::util::*;
use tokio_util::sync::CancellationToken;
use waltail::load::{self, Acked};
use waltail::wal::Lsn;

const SECRET: &str = "test-secret-0123456789abcdef";
/// The password stream-style standbys authenticate with to `receive --serve`.
pub const SERVE_PASSWORD: &str = "standby password 1";

pub struct Setup {
    pub w: Workdir,
    pub primary: Cluster,
    pub rx: Daemon,
    pub tx: Daemon,
    pub spool: std::path::PathBuf,
    pub standby: Cluster,
    /// stream style: the address of `receive --serve`.
    pub serve: Option<String>,
    /// The receiver's address (for the shipper).
    pub addr: String,
}

/// The receiver arguments that serve the spool on `addr` to standbys
/// authenticating with [`SERVE_PASSWORD`] (its verifier made by `waltail
/// scram-verifier`).
pub fn serve_args(w: &Workdir, addr: &str) -> Vec<String> {
    let pw = w.secret("serve-password", &format!("{SERVE_PASSWORD}\n"));
    let out = waltail(&["scram-verifier", "--password-file", pw.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verifier = String::from_utf8(out.stdout).unwrap();
    assert!(verifier.starts_with("SCRAM-SHA-256$4096:"), "{verifier}");
    let vf = w.secret("serve-verifier", &verifier);
    vec![
        "--serve".into(),
        addr.into(),
        "--serve-verifier-file".into(),
        vf.to_str().unwrap().into(),
    ]
}

fn setup(name: &str, style: &str) -> Setup {
    setup_with(name, style, 1, "auto")
}

/// `setup` with the primary's WAL segments of `seg_mb` MB and init-standby's
/// `--method`.
pub fn setup_with(name: &str, style: &str, seg_mb: u32, method: &str) -> Setup {
    setup_opts(name, style, seg_mb, method, &[], &[])
}

/// [`setup_with`] with settings for the primary and arguments for the shipper.
pub fn setup_opts(
    name: &str,
    style: &str,
    seg_mb: u32,
    method: &str,
    settings: &[(&str, &str)],
    ship_args: &[&str],
) -> Setup {
    let w = Workdir::new();
    let primary = cluster(
        &format!("{name}-primary"),
        ClusterOptions {
            wal_segsize_mb: seg_mb,
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        },
    );
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let serve = (style == "stream")
        .then(|| format!("127.0.0.1:{}", waltail::pg::cluster::free_port().unwrap()));
    let extra = serve
        .as_deref()
        .map(|a| serve_args(&w, a))
        .unwrap_or_default();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (rx, addr) = start_receiver(&w, &spool, &secret, &extra);
    let mut args = vec!["--interval", "2ms"];
    args.extend(ship_args);
    let tx = start_shipper(&w, &primary, &addr, &secret, &args);
    rt().block_on(load::create_table(&primary.conninfo(), "t"))
        .unwrap();
    wait_durable(&spool, flush_lsn(&primary), 30, &[&rx, &tx]);
    let pgdata = w.path("standby");
    let pw = w.path("serve-password");
    let conninfo = primary.conninfo();
    let mut args = vec![
        "init-standby",
        "--primary",
        &conninfo,
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
        "--method",
        method,
    ];
    // The stream style is init-standby's default when --serve is given.
    match &serve {
        Some(a) => args.extend(["--serve", a, "--serve-password-file", pw.to_str().unwrap()]),
        None => args.extend(["--style", style]),
    }
    let out = waltail(&args);
    assert!(
        out.status.success(),
        "init-standby: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    if method == "copy" {
        assert!(said.contains("during a low-level backup"), "{said}");
    }
    let signal = if style == "recovery" {
        "recovery.signal"
    } else {
        "standby.signal"
    };
    assert!(pgdata.join(signal).exists());
    let mut standby = Cluster::adopt(&format!("{name}-standby"), &pgdata).unwrap();
    if let Err(e) = start_hot_standby(&mut standby, &primary) {
        let mut ls: Vec<_> = std::fs::read_dir(&spool)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        ls.sort();
        let dump = std::process::Command::new(pg_bin().tool("pg_waldump"))
            .args(["-p", spool.to_str().unwrap(), "000000010000000000000007"])
            .output()
            .unwrap();
        panic!(
            "standby did not start: {e:#}\nspool: {ls:?}\nwaldump: {}{}\n--- ship\n{}\n--- receive\n{}",
            String::from_utf8_lossy(&dump.stdout).lines().rev().take(8).collect::<Vec<_>>().join("\n"),
            String::from_utf8_lossy(&dump.stderr),
            tx.log_text(),
            rx.log_text()
        );
    }
    Setup {
        w,
        primary,
        rx,
        tx,
        spool,
        standby,
        serve,
        addr,
    }
}

/// Starts the standby and waits until it takes queries. A hot standby does
/// once it has replayed a running-transactions record that shows no
/// transaction in progress; the one in the backup's checkpoint may show one
/// (autovacuum's, say) and an idle primary writes no other, so a checkpoint
/// on the primary every few seconds writes a fresh one.
pub fn start_hot_standby(standby: &mut Cluster, primary: &Cluster) -> anyhow::Result<()> {
    standby.spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        match standby.wait_ready(Duration::from_secs(3)) {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline || !standby.is_running() => {
                return Err(e)
            }
            Err(_) => {
                primary.psql("checkpoint")?;
            }
        }
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs the numbered load until `secs` pass or the primary dies.
pub fn start_load(
    conninfo: String,
    secs: u64,
    stop: CancellationToken,
) -> std::thread::JoinHandle<Vec<Acked>> {
    std::thread::spawn(move || {
        rt().block_on(load::numbered_inserts(
            &conninfo,
            "t",
            stop,
            1_000_000,
            Duration::from_secs(secs),
            true,
        ))
        .unwrap()
    })
}

/// The newest acked commit whose WAL was durable in the spool at `durable`:
/// a failover must keep it and every commit before it.
pub fn last_durable_commit(acked: &[Acked], durable: Lsn) -> i64 {
    acked
        .iter()
        .filter(|a| a.lsn_after.is_some_and(|l| l <= durable))
        .map(|a| a.id)
        .max()
        .unwrap_or(0)
}

pub fn failover(s: &Setup) -> serde_json::Value {
    let out = waltail(&[
        "failover",
        "--spool",
        s.spool.to_str().unwrap(),
        "--standby",
        &s.standby.conninfo(),
        "--alive-window",
        "1s",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "failover: {}\n--- ship\n{}\n--- receive\n{}\n--- standby\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.tx.log_text(),
        s.rx.log_text(),
        s.standby.log_tail(40)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn kill_and_fail_over(style: &str, seg_mb: u32) {
    let mut s = setup_with(&format!("kill-{style}-{seg_mb}mb"), style, seg_mb, "auto");
    let stop = CancellationToken::new();
    let load = start_load(s.primary.conninfo(), 20, stop.clone());
    std::thread::sleep(Duration::from_millis(2500));
    if style == "stream" {
        // Through the spool's walsender, not restore_command.
        let st = s
            .standby
            .psql("select status from pg_stat_wal_receiver")
            .unwrap();
        assert_eq!(st, "streaming", "standby log:\n{}", s.standby.log_tail(30));
    }
    if style != "recovery" {
        // Hot standby sees commits while the primary writes, mid-segment.
        let seen: i64 = s
            .standby
            .psql("select count(*) from t")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            seen > 0,
            "standby sees no commits while the primary writes; standby log:\n{}",
            s.standby.log_tail(30)
        );
    }
    s.primary.kill();
    let acked = load.join().unwrap();
    assert!(acked.len() > 50, "load acked only {} commits", acked.len());
    std::thread::sleep(Duration::from_millis(1200));
    let (_, durable) = spool_position(&s.spool).unwrap();
    let report = failover(&s);
    assert_eq!(report["state"], "done");
    assert_eq!(report["promoted"], true);
    assert_eq!(report["old_timeline"], 1);
    let new_tli = report["new_timeline"].as_u64().unwrap();
    assert!(new_tli >= 2, "{report}");
    let final_lsn: Lsn = report["final_lsn"].as_str().unwrap().parse().unwrap();
    assert!(final_lsn <= durable);

    let ids = rt()
        .block_on(load::ids(&s.standby.conninfo(), "t"))
        .unwrap();
    assert!(
        load::is_gap_free_prefix(&ids),
        "not a gap-free prefix: {} rows, max {:?}",
        ids.len(),
        ids.last()
    );
    let kept = ids.len() as i64;
    let max_acked = acked.last().unwrap().id;
    assert!(
        kept <= max_acked + 1,
        "standby has {kept} commits, only {max_acked} were acked (+1 in flight)"
    );
    // Every commit whose WAL was durable in the spool survived.
    let must = last_durable_commit(&acked, durable);
    assert!(
        kept >= must,
        "lost commit {must} although its WAL was durable in the spool (kept {kept}, durable {durable}); report {report}\n--- standby log\n{}",
        s.standby.log_tail(40)
    );
    eprintln!("{style}: acked {max_acked}, kept {kept}, durable {durable}, final {final_lsn}, report {report}");
    // The promoted standby takes writes on its new timeline.
    s.standby.psql("insert into t values (-1)").unwrap();
    let tli = s
        .standby
        .psql("select substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
        .unwrap();
    assert_eq!(u64::from_str_radix(&tli, 16).unwrap(), new_tli);
    // The shipper stopped itself: the spool is fenced.
    assert!(s.spool.join("FENCED").exists());
    {
        use std::os::unix::fs::PermissionsExt;
        for e in std::fs::read_dir(&s.spool).unwrap().flatten() {
            let m = e.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(m, 0o600, "{} has mode {m:o}", e.path().display());
        }
    }
    // Run again: already done, nothing changes.
    let listing = |p: &std::path::Path| {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(p)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != "status.json")
            .map(|e| {
                (
                    e.file_name().to_string_lossy().to_string(),
                    std::fs::read(e.path()).unwrap_or_default(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = listing(&s.spool);
    let again = failover(&s);
    assert_eq!(again["already_done"], true);
    assert_eq!(again["final_lsn"], report["final_lsn"]);
    assert!(
        listing(&s.spool) == before,
        "a second failover changed the spool"
    );
    let _ = &s.w;
}

#[test]
fn kill_and_fail_over_standby_signal_style() {
    kill_and_fail_over("standby", 1);
}

/// The stream style: the standby streams from `receive --serve`; the
/// failover fences the spool, lets it replay what is durable, promotes.
#[test]
fn kill_and_fail_over_stream_style() {
    kill_and_fail_over("stream", 1);
}

#[test]
fn kill_and_fail_over_recovery_signal_style() {
    kill_and_fail_over("recovery", 1);
}

/// The same with 64 MB segments (the others use 1 MB): the last segment the
/// failover cuts and publishes is mostly empty.
#[test]
fn kill_and_fail_over_with_64mb_segments() {
    kill_and_fail_over("standby", 64);
}

/// `init-standby --method copy` (the primary's data directory copied during
/// a low-level backup: pg_backup_start/stop on 15+, pg_start/stop_backup on
/// 13 and 14) makes a standby that follows the primary; `--method
/// basebackup` without a pg_basebackup for the primary's version says so.
#[test]
fn init_standby_by_copy_follows_the_primary() {
    let s = setup_with("copy", "standby", 1, "copy");
    let bin = s.primary.bin.clone();
    let other = s.w.path("other");
    let out = waltail(&[
        "init-standby",
        "--primary",
        &s.primary.conninfo(),
        "--pgdata",
        other.to_str().unwrap(),
        "--spool",
        s.spool.to_str().unwrap(),
        "--method",
        "basebackup",
    ]);
    if bin.find_tool("pg_basebackup").is_none() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!(
                "no pg_basebackup of PostgreSQL {} or newer",
                bin.major
            )),
            "{err}"
        );
    } else {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The backup's label was used (and set aside) by recovery.
    assert!(!s.standby.data.join("backup_label").exists());
    assert!(s.standby.data.join("backup_label.old").exists());
    s.primary
        .psql("insert into t select generate_series(1, 100)")
        .unwrap();
    wait_durable(&s.spool, flush_lsn(&s.primary), 30, &[&s.rx, &s.tx]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = s
            .standby
            .psql("select count(*) from t")
            .unwrap()
            .parse()
            .unwrap();
        if n == 100 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "standby sees {n} of 100 rows; log:\n{}",
            s.standby.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(s.standby.psql("select pg_is_in_recovery()").unwrap(), "t");
}

#[test]
fn a_planned_switchover_loses_nothing() {
    let mut s = setup("switchover", "standby");
    let stop = CancellationToken::new();
    let load = start_load(s.primary.conninfo(), 2, stop);
    let acked = load.join().unwrap();
    let flush = flush_lsn(&s.primary);
    wait_durable(&s.spool, flush, 30, &[&s.rx, &s.tx]);
    s.primary.stop().unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    failover(&s);
    let ids = rt()
        .block_on(load::ids(&s.standby.conninfo(), "t"))
        .unwrap();
    assert_eq!(
        ids.len(),
        acked.len(),
        "a clean switchover kept every acked commit"
    );
    assert!(load::is_gap_free_prefix(&ids));
}

#[test]
fn an_interrupted_failover_runs_again_and_finishes() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mut s = setup("interrupted", "standby");
    let stop = CancellationToken::new();
    let load = start_load(s.primary.conninfo(), 20, stop);
    std::thread::sleep(Duration::from_millis(2000));
    s.primary.kill();
    let acked = load.join().unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let (_, durable) = spool_position(&s.spool).unwrap();
    // Kill points move later each attempt, so they land in every phase
    // (fence, cut, publish, promotion) until one run gets to finish.
    let mut kills = 0;
    for i in 0..12u64 {
        let mut child = std::process::Command::new(waltail_bin())
            .args(["failover", "--spool"])
            .arg(&s.spool)
            .args(["--standby", &s.standby.conninfo(), "--alive-window", "1s"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(i * 25 + rng.below(25)));
        if child.try_wait().unwrap().is_none() {
            kills += 1;
            let _ = child.kill();
        }
        let st = child.wait().unwrap();
        if st.success() {
            break;
        }
    }
    assert!(
        kills > 0,
        "no failover was killed while running (seed {seed})"
    );
    let report = failover(&s);
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["promoted"], true, "{report}");
    let ids = rt()
        .block_on(load::ids(&s.standby.conninfo(), "t"))
        .unwrap();
    assert!(
        load::is_gap_free_prefix(&ids),
        "not a gap-free prefix (seed {seed})"
    );
    let must = last_durable_commit(&acked, durable);
    assert!(
        ids.len() as i64 >= must,
        "lost commit {must}, durable before the kills (seed {seed}); report {report}"
    );
    s.standby.psql("insert into t values (-1)").unwrap();
    eprintln!(
        "failover killed {kills} times, then finished: kept {} commits (seed {seed})",
        ids.len()
    );
}

#[test]
fn failover_is_refused_while_the_primary_is_alive() {
    let s = setup("alive", "standby");
    s.primary.psql("insert into t values (1)").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = waltail(&[
        "failover",
        "--spool",
        s.spool.to_str().unwrap(),
        "--standby",
        &s.standby.conninfo(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("split brain"), "{err}");
    assert!(!s.spool.join("FENCED").exists());
    // A standby of another cluster is refused even with --force, before
    // anything is fenced or published.
    let other = small_cluster("alive-other");
    let out = waltail(&[
        "failover",
        "--spool",
        s.spool.to_str().unwrap(),
        "--standby",
        &other.conninfo(),
        "--force",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another cluster"), "{err}");
    assert!(!s.spool.join("FENCED").exists());
    assert!(!s.spool.join("failover.json").exists());
    // A --standby that does not answer (a typo in the port), or that is a
    // primary (the old primary itself): refused with --force too, before
    // anything is fenced or published.
    let nowhere = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=2",
        waltail::pg::cluster::free_port().unwrap()
    );
    for (standby, says) in [
        (nowhere.as_str(), "cannot reach the standby"),
        (s.primary.conninfo().as_str(), "not in recovery"),
    ] {
        let out = waltail(&[
            "failover",
            "--spool",
            s.spool.to_str().unwrap(),
            "--standby",
            standby,
            "--force",
        ]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(says) && err.contains("nothing was fenced"),
            "{err}"
        );
        assert!(!s.spool.join("FENCED").exists());
        assert!(!s.spool.join("failover.json").exists());
    }
    // Streaming goes on.
    s.primary.psql("insert into t values (2)").unwrap();
    wait_durable(&s.spool, flush_lsn(&s.primary), 30, &[&s.rx, &s.tx]);
    assert_eq!(s.standby.psql("select pg_is_in_recovery()").unwrap(), "t");
}

#[test]
fn restore_refuses_hostile_names_and_cleanup_keeps_what_is_needed() {
    let w = Workdir::new();
    let c = small_cluster("restore-names");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let tx = start_shipper(&w, &c, &addr, &secret, &[]);
    c.psql("create table x(i int)").unwrap();
    for _ in 0..3 {
        c.psql("insert into x select generate_series(1, 20000)")
            .unwrap();
        c.psql("select pg_switch_wal()").unwrap();
    }
    c.psql("insert into x values (1)").unwrap();
    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);
    let dest = w.path("dest");
    std::fs::create_dir_all(&dest).unwrap();
    let long = "0".repeat(300);
    for bad in [
        "../../etc/passwd",
        "/etc/passwd",
        "000000010000000000000001/x",
        "..",
        long.as_str(),
        "00000001000000000000000G",
    ] {
        let out = waltail(&[
            "restore",
            bad,
            dest.join("RECOVERYXLOG").to_str().unwrap(),
            "--spool",
            spool.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert_eq!(
            std::fs::read_dir(&dest).unwrap().count(),
            0,
            "nothing written for {bad}"
        );
    }
    // A missing history file: not found at once, never a wait.
    let t0 = std::time::Instant::now();
    let out = waltail(&[
        "restore",
        "00000005.history",
        dest.join("h").to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(t0.elapsed() < Duration::from_secs(5));
    // A complete segment is restored byte for byte; the live one full size.
    let mut complete: Vec<String> = std::fs::read_dir(&spool)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.len() == 24)
        .collect();
    complete.sort();
    assert!(complete.len() >= 3);
    let out = waltail(&[
        "restore",
        &complete[1],
        dest.join("RECOVERYXLOG").to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        std::fs::read(dest.join("RECOVERYXLOG")).unwrap()
            == std::fs::read(spool.join(&complete[1])).unwrap()
    );
    let live = c
        .psql("select pg_walfile_name(pg_current_wal_flush_lsn())")
        .unwrap();
    let out = waltail(&[
        "restore",
        &live,
        dest.join("LIVE").to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(std::fs::metadata(dest.join("LIVE")).unwrap().len(), 1 << 20);
    // Cleanup: everything older than the second complete segment goes; history
    // and the segment being received stay.
    std::fs::write(spool.join("00000001.history"), "x").unwrap();
    let out = waltail(&["cleanup", &complete[1], "--spool", spool.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(!spool.join(&complete[0]).exists());
    assert!(spool.join(&complete[1]).exists());
    assert!(spool.join("00000001.history").exists());
    assert!(spool.join(format!("{live}.partial")).exists());
    let out = waltail(&["cleanup", "../../x", "--spool", spool.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_fence_command_decides_whether_the_failover_goes_on() {
    let mut s = setup("fence", "standby");
    s.primary.psql("insert into t values (1)").unwrap();
    wait_durable(&s.spool, flush_lsn(&s.primary), 30, &[&s.rx, &s.tx]);
    s.primary.kill();
    std::thread::sleep(Duration::from_millis(1200));
    let run = |cmd: &str| {
        waltail(&[
            "failover",
            "--spool",
            s.spool.to_str().unwrap(),
            "--standby",
            &s.standby.conninfo(),
            "--alive-window",
            "1s",
            "--fence-command",
            cmd,
            "--json",
        ])
    };
    // A fence that fails: nothing fenced, published or promoted.
    let out = run("echo the power switch did not answer; exit 4");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exit 4") && err.contains("power switch"),
        "{err}"
    );
    assert!(!s.spool.join("FENCED").exists());
    assert!(!s.spool.join("failover.json").exists());
    assert_eq!(s.standby.psql("select pg_is_in_recovery()").unwrap(), "t");
    // A fence that works: the failover goes on and the report records it.
    let seen = s.w.path("fenced-addr");
    let out = run(&format!(
        "echo \"$WALTAIL_PRIMARY_ADDR\" > {}",
        seen.display()
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["fence"]["exit_code"], 0, "{report}");
    assert!(std::fs::read_to_string(&seen)
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert_eq!(s.standby.psql("select pg_is_in_recovery()").unwrap(), "f");
}

/// restore copies the received prefix of a 1 GB `.partial` with constant
/// memory: it runs with its address space limited to 32 MB (RLIMIT_AS),
/// where a buffer the size of the prefix (about 1 GB) cannot be had. (Its
/// peak RSS is not read from wait4: after posix_spawn that counts the
/// parent's pages.) `.history` of a timeline the spool lacks is "not
/// found" at once.
#[test]
fn restore_serves_a_1gb_partial_in_constant_memory() {
    use waltail::spool::{Spool, SpoolMeta};
    use waltail::wal::{SegmentName, SegmentNo, SegmentSize, TimelineId};
    let w = Workdir::new();
    let dir = w.path("spool");
    let sp = Spool::create(&dir).unwrap();
    let seg_size = SegmentSize::new(1 << 30).unwrap();
    sp.write_meta(&SpoolMeta {
        system_identifier: "7000000000000000001".into(),
        segment_size: seg_size.bytes(),
        pg_version: 150000,
    })
    .unwrap();
    let seg = SegmentName::new(TimelineId(1), SegmentNo(1));
    let part = std::fs::File::create(sp.partial_path(seg, seg_size)).unwrap();
    part.set_len(seg_size.bytes()).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&part, b"head", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&part, b"tail", (1 << 30) - 8192 - 4).unwrap();
    let received = Lsn(seg.start_lsn(seg_size).0 + (1 << 30) - 8192);
    Spool::set_position(&sp.position_file().unwrap(), TimelineId(1), received, true).unwrap();
    let dest = w.path("RECOVERYXLOG");
    let name = seg.file_name(seg_size);
    let mut cmd = std::process::Command::new(waltail_bin());
    cmd.args([
        "restore",
        &name,
        dest.to_str().unwrap(),
        "--spool",
        dir.to_str().unwrap(),
    ]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let lim = libc::rlimit {
                rlim_cur: 32 << 20,
                rlim_max: 32 << 20,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "restore in 32 MB of address space: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::fs::File::open(&dest).unwrap();
    assert_eq!(out.metadata().unwrap().len(), 1 << 30);
    let mut b = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&out, &mut b, (1 << 30) - 8192 - 4).unwrap();
    assert_eq!(&b, b"tail");
    let o = waltail(&[
        "restore",
        "00000007.history",
        dest.to_str().unwrap(),
        "--spool",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "not found, at once");
}
