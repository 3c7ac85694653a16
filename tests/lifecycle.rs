//! The HA lifecycle after a failover: the old primary rejoins as a standby
//! of the new one, and the fenced spool is reset for the way back.

use std::time::{Duration, Instant};

use crate::util::*;
use waltail::pg::cluster::ClusterOptions;
use waltail::pg::Cluster;

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

#[test]
fn a_failed_over_primary_rejoins_as_a_standby_of_the_new_one() {
    let w = Workdir::new();
    let mut a = cluster(
        "rejoin-a",
        ClusterOptions {
            wal_segsize_mb: 1,
            settings: vec![("wal_log_hints".into(), "on".into())],
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
    let mut b = Cluster::adopt("rejoin-b", &b_data).unwrap();
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
    // A's own settings, which a rewind from B would overwrite.
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
