//! Synchronous mode (`ship --synchronous` with the shipper in
//! `synchronous_standby_names`): a commit is acknowledged only once its WAL
//! is durable in the spool. Checked the way a user would: the rows that
//! clients were told are committed survive a SIGKILL of the primary and a
//! failover, over ten trials, and while the link between the hosts is cut
//! no commit is acknowledged at all.

use std::time::{Duration, Instant};

use crate::standby::{failover, rt, setup_opts, start_hot_standby, start_load};
use crate::util::netns::TwoHosts;
use crate::util::*;
use tokio_util::sync::CancellationToken;
use waltail::load;

const SECRET: &str = "test-secret-0123456789abcdef";
const SYNC_NAMES: (&str, &str) = ("synchronous_standby_names", "'waltail'");

/// The rows on the promoted standby: a gap-free prefix holding every
/// acknowledged commit.
fn check_kept(standby: &Cluster, max_acked: i64, what: &str) -> i64 {
    let ids = rt().block_on(load::ids(&standby.conninfo(), "t")).unwrap();
    assert!(
        load::is_gap_free_prefix(&ids),
        "{what}: not a gap-free prefix: {} rows, max {:?}",
        ids.len(),
        ids.last()
    );
    let kept = ids.len() as i64;
    assert!(
        kept >= max_acked,
        "{what}: {} acknowledged commits lost (acked up to {max_acked}, the standby kept {kept})",
        max_acked - kept
    );
    assert!(
        kept <= max_acked + 1,
        "{what}: kept {kept}, only {max_acked} acked (+1 in flight)"
    );
    kept
}

#[test]
fn synchronous_mode_loses_no_acknowledged_commit_over_ten_sigkill_trials() {
    let mut rng = Rng::new(seed());
    let mut summary = vec![];
    for trial in 0..10 {
        let mut s = setup_opts(
            &format!("sync-{trial}"),
            "standby",
            1,
            "auto",
            &[SYNC_NAMES],
            &["--synchronous"],
        );
        // The setup's CREATE TABLE already waited for the shipper's report.
        let state = s
            .primary
            .psql("select sync_state from pg_stat_replication where application_name = 'waltail'")
            .unwrap();
        assert_eq!(state, "sync", "trial {trial}:\n{}", s.tx.log_text());
        let stop = CancellationToken::new();
        let load = start_load(s.primary.conninfo(), 20, stop.clone());
        std::thread::sleep(Duration::from_millis(1000 + rng.below(1500)));
        s.primary.kill();
        let acked = load.join().unwrap();
        let max_acked = acked.last().map_or(0, |a| a.id);
        assert!(
            max_acked > 20,
            "trial {trial}: only {max_acked} commits acked"
        );
        // The receiver's alive window (failover refuses within it).
        std::thread::sleep(Duration::from_millis(1200));
        let report = failover(&s);
        assert_eq!(report["promoted"], true, "{report}");
        let kept = check_kept(&s.standby, max_acked, &format!("trial {trial}"));
        summary.push(format!("{max_acked}/{kept}"));
    }
    eprintln!("acked/kept per trial: {}", summary.join(" "));
}

/// Host A runs the primary and the shipper, host B the receiver and a hot
/// standby; the link between them is cut under load.
#[test]
fn with_the_link_cut_commits_wait_and_none_is_acknowledged_that_the_spool_lacks() {
    let hosts = TwoHosts::new();
    let w = Workdir::new();
    let mut primary = Cluster::init(
        "sync-part-primary",
        &ClusterOptions {
            wal_segsize_mb: 1,
            settings: vec![(SYNC_NAMES.0.into(), SYNC_NAMES.1.into())],
            ..Default::default()
        },
    )
    .unwrap();
    primary.netns = Some(hosts.a.clone());
    primary.start().unwrap();
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let listen = format!("{}:5499", hosts.b_addr);
    let rx = Daemon::start_in(
        Some(&hosts.b),
        "receive",
        &[
            "receive".into(),
            "--listen".into(),
            listen.clone(),
            "--spool".into(),
            spool.to_str().unwrap().into(),
            "--secret-file".into(),
            secret.to_str().unwrap().into(),
        ],
        w.path("receive.log"),
        &[],
    );
    rx.wait_log(&["receiver listening"], 20);
    let tx = Daemon::start_in(
        Some(&hosts.a),
        "ship",
        &[
            "ship".into(),
            "--primary".into(),
            primary.conninfo(),
            "--receiver".into(),
            listen.clone(),
            "--secret-file".into(),
            secret.to_str().unwrap().into(),
            "--synchronous".into(),
            "--ack-timeout".into(),
            "2s".into(),
        ],
        w.path("ship.log"),
        &[],
    );
    rt().block_on(load::create_table(&primary.conninfo(), "t"))
        .unwrap();
    wait_durable(&spool, flush_lsn(&primary), 30, &[&rx, &tx]);
    let pgdata = w.path("standby");
    let out = waltail(&[
        "init-standby",
        "--primary",
        &primary.conninfo(),
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
        "--style",
        "standby",
    ]);
    assert!(
        out.status.success(),
        "init-standby: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut standby = Cluster::adopt("sync-part-standby", &pgdata).unwrap();
    standby.netns = Some(hosts.b.clone());
    start_hot_standby(&mut standby, &primary).unwrap();

    let stop = CancellationToken::new();
    let t0 = Instant::now();
    let load = start_load(primary.conninfo(), 20, stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    let cut_at = t0.elapsed();
    hosts.cut();
    std::thread::sleep(Duration::from_millis(2500));
    // The primary's own view: its synchronous standby is gone or stalled,
    // and a commit is waiting for it.
    let waiting = primary
        .psql("select count(*) from pg_stat_activity where wait_event = 'SyncRep'")
        .unwrap();
    assert_eq!(
        waiting, "1",
        "no commit waits for the spool during the partition"
    );
    primary.kill();
    let acked = load.join().unwrap();
    let max_acked = acked.last().map_or(0, |a| a.id);
    assert!(
        max_acked > 20,
        "only {max_acked} commits acked before the cut"
    );
    // Commits acknowledged after the link went down: none beyond those
    // whose acks were already on the wire.
    let late: Vec<_> = acked
        .iter()
        .filter(|a| a.at > cut_at + Duration::from_millis(300))
        .collect();
    assert!(
        late.is_empty(),
        "{} commits acknowledged during the partition (first: id {} at {:?}, cut at {cut_at:?})",
        late.len(),
        late[0].id,
        late[0].at
    );
    let out = waltail(&[
        "failover",
        "--spool",
        spool.to_str().unwrap(),
        "--standby",
        &standby.conninfo(),
        "--alive-window",
        "1s",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "failover: {}\n--- ship\n{}\n--- receive\n{}",
        String::from_utf8_lossy(&out.stderr),
        tx.log_text(),
        rx.log_text()
    );
    let kept = check_kept(&standby, max_acked, "after the partition");
    eprintln!("partition: acked {max_acked}, kept {kept}, cut at {cut_at:?}");
    drop(tx);
    drop(rx);
}
