//! What wakes the shipper: write events on pg_wal, and the fixed poll that
//! catches whatever the events miss. Each test writes WAL, waits (bounded)
//! for the spool to hold it durably, and compares the spool with the
//! primary's archive; speed is for the bench, not asserted here.

use crate::util::*;
use waltail::wal::Lsn;

const SECRET: &str = "test-secret-0123456789abcdef";
const SEG: u64 = 1 << 20;

fn free_addr() -> String {
    format!("127.0.0.1:{}", waltail::pg::cluster::free_port().unwrap())
}

/// The shipper's metrics once `name` is at least `min` (bounded wait).
fn scrape_until(addr: &str, name: &str, min: f64) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (code, body) = http_get(addr, "/metrics");
        assert_eq!(code, 200, "{body}");
        if sample(&body, name) >= min {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} stayed below {min}:\n{body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Commits, one statement each, then a segment switch, and waits for the
/// spool to hold all of it; returns the segments compared with the archive.
fn commit_and_check(c: &Cluster, spool: &std::path::Path, logs: &[&Daemon]) -> usize {
    c.psql("create table w(i int, pad text)").unwrap();
    for i in 0..20 {
        c.psql(&format!("insert into w values ({i}, repeat('x', 3000))"))
            .unwrap();
        if i % 5 == 4 {
            wait_durable(spool, flush_lsn(c), 60, logs);
        }
    }
    c.psql("insert into w select g, repeat('y', 200) from generate_series(1, 8000) g")
        .unwrap();
    c.psql("select pg_switch_wal()").unwrap();
    c.psql("insert into w values (-1, 'after the switch')")
        .unwrap();
    wait_durable(spool, flush_lsn(c), 60, logs);
    assert_spool_matches(spool, c, SEG)
}

#[test]
fn write_events_wake_the_shipper_and_the_spool_matches_the_primary() {
    let w = Workdir::new();
    let c = archived_cluster("wake-events");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let metrics = free_addr();
    let tx = start_shipper(&w, &c, &addr, &secret, &["--metrics-addr", &metrics]);
    tx.wait_log(&["waking on WAL writes"], 30);
    let n = commit_and_check(&c, &spool, &[&rx, &tx]);
    assert!(n >= 1, "only {n} segments compared");
    let m = scrape_until(&metrics, "waltail_ship_wakeups_total", 1.0);
    assert!(sample(&m, "waltail_ship_polls_total") >= 1.0, "{m}");
}

/// Every event is dropped (as if the kernel's queue had overflowed each
/// time without saying so): the interval poll alone still ships all of it.
#[test]
fn wal_reaches_the_spool_by_the_fallback_poll_when_every_write_event_is_lost() {
    if !cfg!(feature = "failpoints") {
        panic!("this test injects faults: run the suite with `cargo test --features failpoints` (the README's test command)");
    }
    let w = Workdir::new();
    let c = archived_cluster("wake-dropped");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let metrics = free_addr();
    let tx = start_shipper_env(
        &w,
        &c,
        &addr,
        &secret,
        &["--metrics-addr", &metrics, "--interval", "50ms"],
        &[("FAILPOINTS", "ship-wake-drop=return")],
    );
    tx.wait_log(&["waking on WAL writes"], 30);
    let n = commit_and_check(&c, &spool, &[&rx, &tx]);
    assert!(n >= 1, "only {n} segments compared");
    let m = scrape_until(&metrics, "waltail_ship_polls_total", 1.0);
    assert_eq!(
        sample(&m, "waltail_ship_wakeups_total"),
        0.0,
        "events were to be dropped:\n{m}"
    );
}

/// The watch cannot be set up at all: the shipper says so and polls.
#[test]
fn wal_reaches_the_spool_by_the_poll_when_the_watch_cannot_be_set_up() {
    if !cfg!(feature = "failpoints") {
        panic!("this test injects faults: run the suite with `cargo test --features failpoints` (the README's test command)");
    }
    let w = Workdir::new();
    let c = archived_cluster("wake-nowatch");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let tx = start_shipper_env(
        &w,
        &c,
        &addr,
        &secret,
        &["--interval", "50ms"],
        &[("FAILPOINTS", "ship-wake-init=return")],
    );
    tx.wait_log(&["cannot watch pg_wal", "polling only"], 30);
    let n = commit_and_check(&c, &spool, &[&rx, &tx]);
    assert!(n >= 1, "only {n} segments compared");
}

/// `--wake walsender`: the walsender's XLogData wakes the shipper; the
/// spool matches the primary, and its slot follows the receiver's reports.
#[test]
fn walsender_messages_wake_the_shipper_and_the_spool_matches_the_primary() {
    let w = Workdir::new();
    let c = archived_cluster("wake-walsender");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let metrics = free_addr();
    let tx = start_shipper(
        &w,
        &c,
        &addr,
        &secret,
        &["--wake", "walsender", "--metrics-addr", &metrics],
    );
    tx.wait_log(&["waking on the walsender's flushed WAL"], 30);
    let n = commit_and_check(&c, &spool, &[&rx, &tx]);
    assert!(n >= 1, "only {n} segments compared");
    scrape_until(&metrics, "waltail_ship_wakeups_total", 1.0);
    // Not listed in synchronous_standby_names: an asynchronous walsender.
    assert_eq!(
        c.psql("select sync_state from pg_stat_replication where application_name = 'waltail'")
            .unwrap(),
        "async"
    );
    // The walsender moved the slot to what the spool holds.
    let (_, durable) = spool_position(&spool).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let restart: Lsn = c
            .psql("select restart_lsn from pg_replication_slots where slot_name = 'waltail'")
            .unwrap()
            .parse()
            .unwrap();
        if restart >= durable {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slot at {restart}, spool durable at {durable}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The replication connection cannot be made: the shipper says so, and the
/// write events (inotify) wake it meanwhile; everything reaches the spool.
#[test]
fn wal_reaches_the_spool_on_write_events_when_the_walsender_cannot_be_reached() {
    if !cfg!(feature = "failpoints") {
        panic!("this test injects faults: run the suite with `cargo test --features failpoints` (the README's test command)");
    }
    let w = Workdir::new();
    let c = archived_cluster("wake-nowalsender");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let metrics = free_addr();
    let tx = start_shipper_env(
        &w,
        &c,
        &addr,
        &secret,
        &["--wake", "walsender", "--metrics-addr", &metrics],
        &[("FAILPOINTS", "ship-walsender-connect=return")],
    );
    tx.wait_log(
        &["replication connection to the primary failed", "WAL writes"],
        30,
    );
    let n = commit_and_check(&c, &spool, &[&rx, &tx]);
    assert!(n >= 1, "only {n} segments compared");
    // The wake-ups came from the watch: the walsender never connected.
    let m = scrape_until(&metrics, "waltail_ship_wakeups_total", 1.0);
    assert_eq!(
        sample(&m, "waltail_ship_sync_connected"),
        0.0,
        "the walsender connection is not down:\n{m}"
    );
}
