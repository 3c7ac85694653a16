//! The whole HA lifecycle on two hosts made of network namespaces (see
//! `util::netns`): host A starts as the primary, host B as its standby fed
//! from B's spool. In order: a partition (A's link cut) and a failover to
//! B; A rejoins as B's standby (pg_rewind over the link, with the WAL A
//! recycled taken from the fenced spool); a switchover back to A; a
//! switchover again to B. Each waltail command runs on the host it belongs
//! to (`ip netns exec`), and after each step the committed rows are counted
//! on both sides.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::util::netns::TwoHosts;
use crate::util::*;

const SECRET: &str = "test-secret-0123456789abcdef";

/// `waltail ARGS` on host `ns`.
fn waltail_on(ns: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(waltail_bin())
        .args(args)
        .output()
        .expect("running ip netns exec waltail")
}

fn ok_on(ns: &str, args: &[&str]) -> serde_json::Value {
    let out = waltail_on(ns, args);
    assert!(
        out.status.success(),
        "waltail {} on {ns}: {}",
        args[0],
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn start_standby(s: &mut Cluster, primary: &Cluster) {
    crate::standby::start_hot_standby(s, primary)
        .unwrap_or_else(|e| panic!("{} did not start: {e:#}\n{}", s.name, s.log_tail(40)));
}

fn count(c: &Cluster) -> i64 {
    c.psql("select count(*) from t").unwrap().parse().unwrap()
}

fn wait_count(c: &Cluster, want: i64, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while c.psql("select count(*) from t").ok() != Some(want.to_string()) {
        assert!(
            Instant::now() < deadline,
            "{} never showed {want} rows (has {:?}):\n{}",
            c.name,
            c.psql("select count(*) from t"),
            c.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Commits `n` rows one by one from `from`, each acknowledged.
fn commit(c: &Cluster, from: i64, n: i64) {
    for i in from..from + n {
        c.psql(&format!("insert into t values ({i})")).unwrap();
    }
}

/// A receiver on host `ns` at `addr`, writing `spool`.
fn receiver(h: &str, w: &Workdir, addr: &str, spool: &std::path::Path, tag: &str) -> Daemon {
    let d = Daemon::start_in(
        Some(h),
        "receive",
        &[
            "receive".into(),
            "--listen".into(),
            addr.into(),
            "--spool".into(),
            spool.to_str().unwrap().into(),
            "--secret-file".into(),
            w.path("secret").to_str().unwrap().into(),
        ],
        w.path(&format!("receive-{tag}.log")),
        &[],
    );
    d.wait_log(&["receiver listening"], 20);
    d
}

/// A shipper on host `ns` from `c` (over its Unix socket) to `addr`.
fn shipper(h: &str, w: &Workdir, c: &Cluster, addr: &str, tag: &str) -> Daemon {
    Daemon::start_in(
        Some(h),
        "ship",
        &[
            "ship".into(),
            "--primary".into(),
            c.conninfo(),
            "--receiver".into(),
            addr.into(),
            "--secret-file".into(),
            w.path("secret").to_str().unwrap().into(),
            "--ack-timeout".into(),
            "2s".into(),
        ],
        w.path(&format!("ship-{tag}.log")),
        &[],
    )
}

#[test]
fn failover_rejoin_switchover_back_and_again_across_two_hosts() {
    let h = TwoHosts::new();
    let w = Workdir::new();
    w.secret("secret", SECRET);
    let mut a = Cluster::init(
        "hosts-a",
        &ClusterOptions {
            wal_segsize_mb: 1,
            settings: vec![("wal_log_hints".into(), "on".into())],
            ..Default::default()
        },
    )
    .unwrap();
    a.append_conf(&format!("listen_addresses = '127.0.0.1,{}'\n", h.a_addr))
        .unwrap();
    let hba = a.data.join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).unwrap();
    rules.push_str("host all all 10.231.0.0/16 trust\nhost replication all 10.231.0.0/16 trust\n");
    std::fs::write(&hba, rules).unwrap();
    a.netns = Some(h.a.clone());
    a.start().unwrap();
    let over_link = |addr: &str, c: &Cluster| {
        format!("host={addr} port={} user=postgres dbname=postgres", c.port)
    };

    // A ships to B's spool; B is a hot standby fed from it.
    let spool_b = w.path("spool-b");
    let b_listen = format!("{}:5433", h.b_addr);
    let mut rx_b = receiver(&h.b, &w, &b_listen, &spool_b, "b1");
    let tx_a = shipper(&h.a, &w, &a, &b_listen, "a1");
    a.psql("create table t(i int8 primary key)").unwrap();
    commit(&a, 1, 50);
    wait_durable(&spool_b, flush_lsn(&a), 30, &[&rx_b, &tx_a]);
    let b_data = w.path("b");
    ok_on(
        &h.b,
        &[
            "init-standby",
            "--primary",
            &over_link(&h.a_addr, &a),
            "--pgdata",
            b_data.to_str().unwrap(),
            "--spool",
            spool_b.to_str().unwrap(),
            "--method",
            "basebackup",
        ],
    );
    let mut b = Cluster::adopt("hosts-b", &b_data).unwrap();
    b.append_conf(&format!("listen_addresses = '127.0.0.1,{}'\n", h.b_addr))
        .unwrap();
    b.netns = Some(h.b.clone());
    start_standby(&mut b, &a);
    wait_count(&b, 50, 60);
    assert_eq!((count(&a), count(&b)), (50, 50));

    // 1. The partition: A's link goes down while A takes commits (acked to
    // its clients, asynchronous mode); B fails over from its spool.
    h.cut();
    commit(&a, 1001, 30);
    std::thread::sleep(Duration::from_millis(1200));
    let report = ok_on(
        &h.b,
        &[
            "failover",
            "--spool",
            spool_b.to_str().unwrap(),
            "--standby",
            &b.conninfo(),
            "--alive-window",
            "1s",
            "--json",
        ],
    );
    assert_eq!(report["promoted"], true, "{report}");
    commit(&b, 2001, 20);
    // A's 30 partitioned commits are A's alone; B has the 50 and its own 20.
    assert_eq!((count(&a), count(&b)), (80, 70));
    a.stop().unwrap();
    drop(tx_a);
    h.heal();

    // 2. A rejoins as B's standby: B ships to a spool on A's host, pg_rewind
    // runs over the link, with WAL from B's fenced spool.
    let spool_a = w.path("spool-a");
    empty_spool(&spool_a);
    let a_listen = format!("{}:5433", h.a_addr);
    let mut rx_a = receiver(&h.a, &w, &a_listen, &spool_a, "a1");
    let tx_b = shipper(&h.b, &w, &b, &a_listen, "b1");
    commit(&b, 2021, 10);
    wait_durable(&spool_a, flush_lsn(&b), 30, &[&rx_a, &tx_b]);
    let r = ok_on(
        &h.a,
        &[
            "rejoin",
            "--pgdata",
            a.data.to_str().unwrap(),
            "--primary",
            &over_link(&h.b_addr, &b),
            "--spool",
            spool_a.to_str().unwrap(),
            "--wal-from",
            spool_b.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(r["action"], "rewound", "{r}");
    start_standby(&mut a, &b);
    wait_count(&a, 80, 60);
    assert_eq!((count(&a), count(&b)), (80, 80));
    assert_eq!(
        a.psql("select count(*) from t where i between 1001 and 1030")
            .unwrap(),
        "0",
        "A kept commits of the partition that B never had"
    );

    // 3. Switchover back to A: B stops cleanly, its shutdown checkpoint
    // reaches A's spool, A is promoted with nothing discarded.
    commit(&b, 3001, 10);
    wait_count(&a, 90, 60);
    b.stop().unwrap();
    let r = ok_on(
        &h.a,
        &[
            "switchover",
            "--spool",
            spool_a.to_str().unwrap(),
            "--standby",
            &a.conninfo(),
            "--primary",
            &over_link(&h.b_addr, &b),
            "--json",
        ],
    );
    assert_eq!(r["bytes_discarded"], 0, "{r}");
    assert_eq!(a.psql("select pg_is_in_recovery()").unwrap(), "f");
    assert_eq!(count(&a), 90);
    drop(tx_b);
    rx_b.terminate();
    ok_on(
        &h.b,
        &[
            "spool",
            "reset",
            "--spool",
            spool_b.to_str().unwrap(),
            "--json",
        ],
    );
    let rx_b2 = receiver(&h.b, &w, &b_listen, &spool_b, "b2");
    let tx_a2 = shipper(&h.a, &w, &a, &b_listen, "a2");
    commit(&a, 4001, 10);
    wait_durable(&spool_b, flush_lsn(&a), 30, &[&rx_b2, &tx_a2]);
    let r = ok_on(
        &h.b,
        &[
            "rejoin",
            "--pgdata",
            b.data.to_str().unwrap(),
            "--primary",
            &over_link(&h.a_addr, &a),
            "--spool",
            spool_b.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(r["action"], "no rewind needed", "{r}");
    start_standby(&mut b, &a);
    wait_count(&b, 100, 60);
    assert_eq!((count(&a), count(&b)), (100, 100));

    // 4. Switchover again, to B.
    commit(&a, 5001, 10);
    wait_count(&b, 110, 60);
    a.stop().unwrap();
    let r = ok_on(
        &h.b,
        &[
            "switchover",
            "--spool",
            spool_b.to_str().unwrap(),
            "--standby",
            &b.conninfo(),
            "--primary",
            &over_link(&h.a_addr, &a),
            "--json",
        ],
    );
    assert_eq!(r["bytes_discarded"], 0, "{r}");
    assert_eq!(b.psql("select pg_is_in_recovery()").unwrap(), "f");
    commit(&b, 6001, 5);
    assert_eq!(count(&b), 115);
    tx_a2.wait_log(&["shutdown checkpoint is durable"], 10);
    rx_a.terminate();
}
