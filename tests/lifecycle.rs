//! The HA lifecycle after a failover: the old primary rejoins as a standby
//! of the new one, and the fenced spool is reset for the way back.

use std::time::{Duration, Instant};

use crate::util::*;
use waltail::pg::cluster::ClusterOptions;
use waltail::pg::Cluster;
use waltail::wal::Lsn;

const SECRET: &str = "test-secret-0123456789abcdef";

/// Starts a hot standby and waits until it takes queries (checkpoints on
/// its primary give it a running-transactions record to get there).
fn start_standby(s: &mut Cluster, primary: &Cluster) {
    s.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while s.wait_ready(Duration::from_secs(3)).is_err() {
        assert!(
            Instant::now() < deadline && s.is_running(),
            "standby did not start:\n{}",
            s.log_tail(40)
        );
        let _ = primary.psql("checkpoint");
    }
}

fn wait_rows(s: &Cluster, sql: &str, want: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if s.psql(sql).ok().as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql} never gave {want}:\n{}",
            s.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// After a partition: A took 100 rows that reached B and 100 (1001-1100)
/// that did not; B failed over from its spool and ships to a new spool on
/// A's side, with 10 rows of its own (2001-2010); A is stopped, with a rule
/// of its own in pg_hba.conf.
struct Partitioned {
    w: Workdir,
    a: Cluster,
    b: Cluster,
    /// B's fenced spool, and the new one on A's side.
    spool1: std::path::PathBuf,
    spool2: std::path::PathBuf,
    hba: String,
    _daemons: Vec<Daemon>,
}

fn partitioned_failover(name: &str, settings: Vec<(String, String)>) -> Partitioned {
    let w = Workdir::new();
    let mut a = cluster(
        &format!("{name}-a"),
        ClusterOptions {
            wal_segsize_mb: 1,
            settings,
            ..Default::default()
        },
    );
    let secret = w.secret("secret", SECRET);
    let spool1 = w.path("spool-b");
    let (rx1, addr1) = start_receiver(&w, &spool1, &secret, &[]);
    let mut tx1 = start_shipper(&w, &a, &addr1, &secret, &["--interval", "2ms"]);
    a.psql("create table t(i int); insert into t select generate_series(1, 100)")
        .unwrap();
    wait_durable(&spool1, flush_lsn(&a), 30, &[&rx1, &tx1]);
    let b_data = w.path("b");
    let out = waltail(&[
        "init-standby",
        "--primary",
        &a.conninfo(),
        "--pgdata",
        b_data.to_str().unwrap(),
        "--spool",
        spool1.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut b = Cluster::adopt(&format!("{name}-b"), &b_data).unwrap();
    start_standby(&mut b, &a);
    wait_rows(&b, "select count(*) from t", "100", 30);
    // The link goes: A takes commits that never reach B (a partition).
    tx1.kill9();
    a.psql("insert into t select generate_series(1001, 1100)")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let out = waltail(&[
        "failover",
        "--spool",
        spool1.to_str().unwrap(),
        "--standby",
        &b.conninfo(),
        "--alive-window",
        "1s",
    ]);
    assert!(
        out.status.success(),
        "failover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.stop().unwrap();
    // A's own settings, which a rewind or a rebuild from B would overwrite.
    let hba = std::fs::read_to_string(a.data.join("pg_hba.conf")).unwrap() + "# A's own rule\n";
    std::fs::write(a.data.join("pg_hba.conf"), &hba).unwrap();
    // The way back: B ships to a spool on A's side.
    let spool2 = w.path("spool-a");
    empty_spool(&spool2);
    let (rx2, addr2) = start_receiver(&w, &spool2, &secret, &[]);
    let tx2 = start_shipper(&w, &b, &addr2, &secret, &["--interval", "2ms"]);
    b.psql("insert into t select generate_series(2001, 2010)")
        .unwrap();
    wait_durable(&spool2, flush_lsn(&b), 30, &[&rx2, &tx2]);
    Partitioned {
        w,
        a,
        b,
        spool1,
        spool2,
        hba,
        _daemons: vec![rx1, tx1, rx2, tx2],
    }
}

#[test]
fn a_failed_over_primary_rejoins_as_a_standby_of_the_new_one() {
    let Partitioned {
        w: _w,
        mut a,
        b,
        spool1,
        spool2,
        hba,
        _daemons,
    } = partitioned_failover("rejoin", vec![("wal_log_hints".into(), "on".into())]);
    let out = waltail(&[
        "rejoin",
        "--pgdata",
        a.data.to_str().unwrap(),
        "--primary",
        &b.conninfo(),
        "--spool",
        spool2.to_str().unwrap(),
        "--wal-from",
        spool1.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "rejoin: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["action"], "rewound", "{r}");
    // (B's own checkpoint after promotion usually beats rejoin to it; when
    // not, rejoin checkpoints B, and says so.)
    assert!(r["checkpointed_primary"].is_boolean(), "{r}");
    assert_eq!(
        std::fs::read_to_string(a.data.join("pg_hba.conf")).unwrap(),
        hba
    );
    let auto = std::fs::read_to_string(a.data.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains(spool2.to_str().unwrap()), "{auto}");
    assert!(
        !auto.contains(spool1.to_str().unwrap()),
        "B's restore_command came along:\n{auto}"
    );
    assert!(a.data.join("standby.signal").exists());
    // A follows B: B's rows, none of the commits that B never had.
    start_standby(&mut a, &b);
    b.psql("insert into t select generate_series(3001, 3005)")
        .unwrap();
    wait_rows(&a, "select count(*) from t where i > 3000", "5", 60);
    assert_eq!(a.psql("select count(*) from t").unwrap(), "115");
    assert_eq!(
        a.psql("select count(*) from t where i between 1001 and 1100")
            .unwrap(),
        "0"
    );
    assert_eq!(a.psql("select pg_is_in_recovery()").unwrap(), "t");
    // A precondition: a running server is refused, with nothing changed.
    let out = waltail(&[
        "rejoin",
        "--pgdata",
        a.data.to_str().unwrap(),
        "--primary",
        &b.conninfo(),
        "--spool",
        spool2.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is running"));
}

/// Where the shutdown checkpoint of the stopped server in `c` ends, by
/// pg_waldump of its major (its "len (rec/tot)" from the control file's
/// checkpoint location), or else by `waltail inspect` of the segment.
fn shutdown_checkpoint_end(c: &Cluster) -> (Lsn, Lsn) {
    let ctl = waltail::pg::control::read(&c.data).unwrap();
    assert_eq!(ctl.state, waltail::pg::control::DbState::ShutDown);
    if let Some(cd) = c.bin.find_tool("pg_controldata") {
        let out = std::process::Command::new(cd)
            .arg(&c.data)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            text.contains(&format!(
                "Latest checkpoint location:           {}",
                ctl.checkpoint
            )),
            "{text}"
        );
    }
    let seg = waltail::wal::SegmentSize::new(1 << 20).unwrap();
    let name = waltail::wal::SegmentName::of_lsn(ctl.tli, ctl.checkpoint, seg).file_name(seg);
    let end = match waldump_of(c.bin.major) {
        Some(wd) => {
            let out = std::process::Command::new(wd)
                .args(["-p", c.pg_wal().to_str().unwrap(), "-n", "1", "-t"])
                .arg(ctl.tli.0.to_string())
                .arg("-s")
                .arg(ctl.checkpoint.to_string())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                text.contains("CHECKPOINT_SHUTDOWN"),
                "{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let tot: u64 = text
                .split("len (rec/tot):")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .and_then(|r| r.trim().split('/').nth(1))
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or_else(|| panic!("no length in {text}"));
            // The record's bytes, with the page headers of pages it runs into.
            let (mut pos, mut left) = (ctl.checkpoint.0, tot);
            loop {
                let room = 8192 - pos % 8192;
                if left <= room {
                    pos += left;
                    break;
                }
                left -= room;
                pos += room;
                pos += if pos % (1 << 20) == 0 { 40 } else { 24 };
            }
            Lsn(pos.div_ceil(8) * 8)
        }
        None => {
            let r = inspect_json(&c.pg_wal().join(&name)).unwrap();
            assert_eq!(r["last_record_lsn"], ctl.checkpoint.to_string(), "{r}");
            r["end_lsn"].as_str().unwrap().parse().unwrap()
        }
    };
    (ctl.checkpoint, end)
}

fn run_ok(args: &[&str]) -> serde_json::Value {
    let out = waltail(args);
    assert!(
        out.status.success(),
        "waltail {}: {}",
        args[0],
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "waltail {} printed no JSON ({e}): {}",
            args[0],
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A clean stop ships the shutdown checkpoint; with it, a switchover loses
/// nothing and the old primary follows without a rewind; and back again.
#[test]
fn a_clean_switchover_and_switchback_lose_nothing_and_need_no_rewind() {
    let w = Workdir::new();
    let mut a = cluster(
        "switch-a",
        ClusterOptions {
            wal_segsize_mb: 1,
            ..Default::default()
        },
    );
    let secret = w.secret("secret", SECRET);
    let spool_b = w.path("spool-b");
    let (mut rx_b, addr_b) = start_receiver(&w, &spool_b, &secret, &[]);
    let mut tx_a = start_shipper(&w, &a, &addr_b, &secret, &[]);
    a.psql("create table t(i int); insert into t select generate_series(1, 100)")
        .unwrap();
    wait_durable(&spool_b, flush_lsn(&a), 30, &[&rx_b, &tx_a]);
    let b_data = w.path("b");
    let out = waltail(&[
        "init-standby",
        "--primary",
        &a.conninfo(),
        "--pgdata",
        b_data.to_str().unwrap(),
        "--spool",
        spool_b.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut b = Cluster::adopt("switch-b", &b_data).unwrap();
    start_standby(&mut b, &a);
    for i in 0..20 {
        a.psql(&format!("insert into t values ({})", 200 + i))
            .unwrap();
    }
    // 1. A stops cleanly: the spool ends exactly with its shutdown checkpoint.
    a.stop().unwrap();
    let (ckpt, end) = shutdown_checkpoint_end(&a);
    wait_durable(&spool_b, end, 30, &[&rx_b, &tx_a]);
    assert_eq!(spool_position(&spool_b).map(|p| p.1), Some(end));
    tx_a.wait_log(&["shutdown checkpoint is durable"], 10);
    // 2. Switchover to B: 0 bytes lost, the new timeline begins at the end.
    let r = run_ok(&[
        "switchover",
        "--spool",
        spool_b.to_str().unwrap(),
        "--standby",
        &b.conninfo(),
        "--primary",
        &a.conninfo(),
        "--json",
    ]);
    assert_eq!(r["switch_lsn"], end.to_string(), "{r}");
    assert_eq!(r["shutdown_checkpoint"], ckpt.to_string(), "{r}");
    assert_eq!(r["bytes_discarded"], 0, "{r}");
    assert_eq!(r["new_timeline"], 2, "{r}");
    assert_eq!(b.psql("select count(*) from t").unwrap(), "120");
    assert_eq!(b.psql("select pg_is_in_recovery()").unwrap(), "f");
    // 3. The way back: B ships to a spool on A's side (from the slot the
    // switchover made), and A rejoins without pg_rewind.
    tx_a.kill9();
    let spool_a = w.path("spool-a");
    empty_spool(&spool_a);
    let (rx_a, addr_a) = start_receiver(&w, &spool_a, &secret, &[]);
    let mut tx_b = start_shipper(&w, &b, &addr_a, &secret, &[]);
    b.psql("insert into t select generate_series(1001, 1010)")
        .unwrap();
    wait_durable(&spool_a, flush_lsn(&b), 30, &[&rx_a, &tx_b]);
    let r = run_ok(&[
        "rejoin",
        "--pgdata",
        a.data.to_str().unwrap(),
        "--primary",
        &b.conninfo(),
        "--spool",
        spool_a.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r["action"], "no rewind needed", "{r}");
    start_standby(&mut a, &b);
    wait_rows(&a, "select count(*) from t", "130", 60);
    assert_eq!(a.psql("select pg_is_in_recovery()").unwrap(), "t");
    // 4. Switch back: B stops cleanly, A takes over, nothing lost.
    for i in 0..10 {
        b.psql(&format!("insert into t values ({})", 2000 + i))
            .unwrap();
    }
    b.stop().unwrap();
    let (_, end_b) = shutdown_checkpoint_end(&b);
    let r = run_ok(&[
        "switchover",
        "--spool",
        spool_a.to_str().unwrap(),
        "--standby",
        &a.conninfo(),
        "--json",
    ]);
    assert_eq!(r["switch_lsn"], end_b.to_string(), "{r}");
    assert_eq!(r["new_timeline"], 3, "{r}");
    assert_eq!(a.psql("select count(*) from t").unwrap(), "140");
    // 5. B follows A again, on the spool it had, reset for the new primary.
    tx_b.kill9();
    rx_b.terminate();
    run_ok(&[
        "spool",
        "reset",
        "--spool",
        spool_b.to_str().unwrap(),
        "--json",
    ]);
    let (rx_b2, addr_b2) = start_receiver(&w, &spool_b, &secret, &[]);
    let tx_a2 = start_shipper(&w, &a, &addr_b2, &secret, &[]);
    a.psql("insert into t values (3000)").unwrap();
    wait_durable(&spool_b, flush_lsn(&a), 30, &[&rx_b2, &tx_a2]);
    let r = run_ok(&[
        "rejoin",
        "--pgdata",
        b.data.to_str().unwrap(),
        "--primary",
        &a.conninfo(),
        "--spool",
        spool_b.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r["action"], "no rewind needed", "{r}");
    start_standby(&mut b, &a);
    wait_rows(&b, "select count(*) from t", "141", 60);
    drop(rx_a);
}

/// A switchover needs the primary stopped cleanly: while it runs, or after
/// it crashed, switchover refuses (exit 2) and changes nothing.
#[test]
fn switchover_refuses_a_running_or_crashed_primary_and_changes_nothing() {
    let w = Workdir::new();
    let mut a = small_cluster("switch-refuse-a");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let tx = start_shipper(&w, &a, &addr, &secret, &[]);
    a.psql("create table t(i int); insert into t select generate_series(1, 10)")
        .unwrap();
    wait_durable(&spool, flush_lsn(&a), 30, &[&rx, &tx]);
    let b_data = w.path("b");
    let out = waltail(&[
        "init-standby",
        "--primary",
        &a.conninfo(),
        "--pgdata",
        b_data.to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut b = Cluster::adopt("switch-refuse-b", &b_data).unwrap();
    start_standby(&mut b, &a);
    let switchover = |extra: &[&str]| {
        let mut args = vec![
            "switchover",
            "--spool",
            spool.to_str().unwrap(),
            "--timeout",
            "2s",
        ];
        let standby = b.conninfo();
        args.extend(["--standby", standby.as_str()]);
        args.extend(extra);
        waltail(&args)
    };
    let unchanged = |b: &Cluster| {
        assert!(!spool.join("FENCED").exists(), "the spool was fenced");
        assert_eq!(b.psql("select pg_is_in_recovery()").unwrap(), "t");
    };
    // Running, and named: refused at once.
    let out = switchover(&["--primary", &a.conninfo()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("still takes connections"), "{err}");
    unchanged(&b);
    // Running, not named: the spool does not end with a shutdown checkpoint.
    let out = switchover(&[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("shutdown checkpoint"), "{err}");
    unchanged(&b);
    // A stop command that fails: nothing promoted.
    let out = switchover(&["--stop-command", "echo cannot reach a >&2; exit 4"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("exit 4") && err.contains("nothing was promoted"),
        "{err}"
    );
    unchanged(&b);
    // Crashed: no shutdown checkpoint, refused; failover is the way.
    a.kill();
    let out = switchover(&[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("use waltail failover"), "{err}");
    unchanged(&b);
}

/// Without wal_log_hints or data checksums pg_rewind cannot work: rejoin
/// refuses (exit 2, nothing changed), and with --allow-rebuild takes a
/// fresh base backup, keeping the node's own configuration.
#[test]
fn without_hints_rejoin_refuses_and_rebuilds_only_when_allowed() {
    let Partitioned {
        w: _w,
        mut a,
        b,
        spool2,
        hba,
        _daemons,
        ..
    } = partitioned_failover("rebuild", vec![]);
    let rejoin = |extra: &[&str]| {
        let mut args = vec!["rejoin", "--pgdata", a.data.to_str().unwrap(), "--primary"];
        let conninfo = b.conninfo();
        args.push(&conninfo);
        args.extend(["--spool", spool2.to_str().unwrap(), "--json"]);
        args.extend(extra);
        waltail(&args)
    };
    let out = rejoin(&[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("neither wal_log_hints nor data checksums") && err.contains("--allow-rebuild"),
        "{err}"
    );
    assert!(
        !a.data.join("standby.signal").exists(),
        "a refused rejoin changed the node"
    );
    let out = rejoin(&["--allow-rebuild"]);
    assert!(
        out.status.success(),
        "rejoin --allow-rebuild: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["action"], "rebuilt", "{r}");
    assert_eq!(
        std::fs::read_to_string(a.data.join("pg_hba.conf")).unwrap(),
        hba
    );
    assert!(a.data.join("standby.signal").exists());
    start_standby(&mut a, &b);
    wait_rows(&a, "select count(*) from t", "110", 60);
    assert_eq!(
        a.psql("select count(*) from t where i between 1001 and 1100")
            .unwrap(),
        "0"
    );
    assert_eq!(a.psql("select pg_is_in_recovery()").unwrap(), "t");
}
