//! The test harness itself: servers start on loopback as an unprivileged
//! user, take options, and are stopped even when a test panics.

use crate::util::*;

fn postmaster_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn cluster_runs_unprivileged_on_loopback_with_options() {
    let c = cluster(
        "harness-opts",
        ClusterOptions {
            wal_segsize_mb: 2,
            archive: true,
            archive_timeout: 60,
            ..Default::default()
        },
    );
    assert_eq!(c.psql("show wal_segment_size").unwrap(), "2MB");
    assert_eq!(c.psql("show archive_mode").unwrap(), "on");
    assert_eq!(c.psql("show archive_timeout").unwrap(), "1min");
    assert_eq!(c.psql("show listen_addresses").unwrap(), "127.0.0.1");
    assert_ne!(
        c.psql("select current_setting('data_directory')").unwrap(),
        ""
    );
    // Not root: PostgreSQL would refuse, and the harness must not try.
    let pid: i32 = std::fs::read_to_string(c.data.join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        !uid_line.split_whitespace().skip(1).all(|u| u == "0"),
        "{uid_line}"
    );
    // The archive really receives segments.
    c.psql("select pg_switch_wal()").unwrap();
    c.psql("create table a(i int)").unwrap();
    c.psql("select pg_switch_wal()").unwrap();
    let arch = c.archive.clone().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_dir(&arch).unwrap().count() == 0 {
        assert!(std::time::Instant::now() < deadline, "nothing archived");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_panicking_test_still_stops_and_removes_its_server() {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let c = small_cluster("harness-panic");
        let pid: i32 = std::fs::read_to_string(c.data.join("postmaster.pid"))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        tx.send((pid, c.root.clone())).unwrap();
        panic!("deliberate panic with a running server");
    });
    assert!(h.join().is_err());
    let (pid, root) = rx.recv().unwrap();
    assert!(!postmaster_alive(pid), "postmaster {pid} still running");
    assert!(!root.exists(), "{} left behind", root.display());
}

#[test]
fn kill_takes_the_whole_server_down_and_standby_copies_start() {
    let mut p = small_cluster("harness-kill");
    p.psql("create table k(i int); insert into k values (1)")
        .unwrap();
    let mut s = Cluster::from_base_backup(&p, "harness-copy", &ClusterOptions::default()).unwrap();
    p.kill();
    assert!(!p.is_running());
    assert!(p.psql("select 1").is_err());
    s.start().unwrap();
    assert_eq!(s.psql("select count(*) from k").unwrap(), "1");
    // It restarts after the crash and recovers what was committed.
    p.start().unwrap();
    assert_eq!(p.psql("select count(*) from k").unwrap(), "1");
}
