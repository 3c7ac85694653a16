//! `waltail receive --serve`: stock PostgreSQL standbys stream WAL from the
//! spool over the replication protocol, authenticate with SCRAM-SHA-256,
//! follow timeline switches, and lose nothing when the receiver is killed.

use std::time::{Duration, Instant};

use crate::standby::{rt, serve_args, setup_with, start_load, Setup, SERVE_PASSWORD};
use crate::util::*;
use tokio_util::sync::CancellationToken;
use waltail::load;

const SECRET: &str = "test-secret-0123456789abcdef";

/// Waits (bounded) until `sql` on `c` returns `want`.
fn wait_value(c: &Cluster, sql: &str, want: &str, secs: u64, logs: &[&Daemon]) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last;
    loop {
        last = c.psql(sql).unwrap_or_else(|e| format!("error: {e:#}"));
        if last == want {
            return;
        }
        if Instant::now() > deadline {
            let mut msg = format!(
                "{sql:?} gave {last:?}, not {want:?}, within {secs} s\n--- {} log\n{}",
                c.name,
                c.log_tail(40)
            );
            for d in logs {
                msg.push_str(&format!("\n--- {} log\n{}", d.name, d.log_text()));
            }
            panic!("{msg}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `sql` over a replication connection with psql; (success, stdout, stderr).
fn psql_replication(addr: &str, user: &str, password: &str, sql: &str) -> (bool, String, String) {
    psql_replication_with(addr, user, password, "sslmode=disable", sql)
}

/// As [`psql_replication`], with more conninfo (`ssl...`).
fn psql_replication_with(
    addr: &str,
    user: &str,
    password: &str,
    more: &str,
    sql: &str,
) -> (bool, String, String) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let out = std::process::Command::new(pg_bin().tool("psql"))
        .arg(format!(
            "host={host} port={port} user={user} password='{password}' replication=true dbname=replication {more} connect_timeout=10"
        ))
        .args(["-XAtc", sql])
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A primary shipping into a spool whose receiver serves it on a port of its own.
fn rig(name: &str) -> (Workdir, Cluster, Daemon, Daemon, String) {
    let w = Workdir::new();
    let primary = small_cluster(name);
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let serve = format!("127.0.0.1:{}", waltail::pg::cluster::free_port().unwrap());
    let extra = serve_args(&w, &serve);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (rx, addr) = start_receiver(&w, &spool, &secret, &extra);
    let tx = start_shipper(&w, &primary, &addr, &secret, &["--interval", "2ms"]);
    primary.psql("create table t(i int)").unwrap();
    wait_durable(&spool, flush_lsn(&primary), 30, &[&rx, &tx]);
    (w, primary, rx, tx, serve)
}

#[test]
fn a_stock_standby_streams_from_the_spool_and_replays() {
    let mut s = setup_with("serve-basic", "stream", 1, "auto");
    let serve = s.serve.clone().unwrap();
    s.primary
        .psql("create table v(i int); insert into v select generate_series(1, 1000)")
        .unwrap();
    wait_value(&s.standby, "select count(*) from v", "1000", 30, &[&s.rx]);
    // Through the spool's server, not restore_command.
    wait_value(
        &s.standby,
        "select status || ' ' || sender_port from pg_stat_wal_receiver",
        &format!("streaming {}", serve.rsplit(':').next().unwrap()),
        30,
        &[&s.rx],
    );
    // Across segments, and up to the primary's flush position.
    for i in 0..3 {
        s.primary
            .psql("insert into v select generate_series(1, 1000); select pg_switch_wal()")
            .unwrap();
        s.primary.psql("insert into v values (0)").unwrap();
        let flush = flush_lsn(&s.primary);
        wait_value(
            &s.standby,
            &format!("select pg_last_wal_replay_lsn() >= '{flush}'"),
            "t",
            30,
            &[&s.rx],
        );
        wait_value(
            &s.standby,
            "select count(*) from v",
            &(2001 + i * 1001).to_string(),
            30,
            &[&s.rx],
        );
    }
    s.rx.wait_log(&["standby connected", "streaming to the standby"], 10);
    // A standby restarted in the middle of a segment resumes streaming there.
    s.primary
        .psql("insert into v select generate_series(1, 500)")
        .unwrap();
    let flush = flush_lsn(&s.primary);
    assert_ne!(flush.0 % (1 << 20), 0, "mid-segment");
    wait_value(
        &s.standby,
        &format!("select pg_last_wal_replay_lsn() >= '{flush}'"),
        "t",
        30,
        &[&s.rx],
    );
    s.standby.stop().unwrap();
    s.standby.start().unwrap();
    s.primary
        .psql("insert into v select generate_series(1, 500)")
        .unwrap();
    wait_value(&s.standby, "select count(*) from v", "5003", 30, &[&s.rx]);
    wait_value(
        &s.standby,
        "select status from pg_stat_wal_receiver",
        "streaming",
        30,
        &[&s.rx],
    );
    let log = std::fs::read_to_string(s.standby.log_path()).unwrap();
    assert!(log.contains("started streaming WAL from primary"), "{log}");
}

#[test]
fn scram_takes_the_right_password_only_and_replication_connections_only() {
    let (_w, primary, rx, _tx, serve) = rig("serve-auth");
    let sysid = primary
        .psql("select system_identifier from pg_control_system()")
        .unwrap();
    let (ok, out, err) = psql_replication(&serve, "waltail", SERVE_PASSWORD, "IDENTIFY_SYSTEM");
    assert!(ok, "{err}\n{}", rx.log_text());
    assert!(out.starts_with(&format!("{sysid}|1|")), "{out}");
    let (ok, _, err) = psql_replication(&serve, "waltail", "not the password", "IDENTIFY_SYSTEM");
    assert!(!ok);
    assert!(
        err.contains("password authentication failed for user \"waltail\""),
        "{err}"
    );
    let (ok, _, err) = psql_replication(&serve, "postgres", SERVE_PASSWORD, "IDENTIFY_SYSTEM");
    assert!(!ok);
    assert!(
        err.contains("password authentication failed for user \"postgres\""),
        "{err}"
    );
    // Commands it does not serve get an error naming them; the connection stays usable.
    let (ok, _, err) = psql_replication(&serve, "waltail", SERVE_PASSWORD, "SELECT 1");
    assert!(!ok);
    assert!(err.contains("serves IDENTIFY_SYSTEM"), "{err}");
    // A plain (non-replication) connection is refused.
    let (host, port) = serve.rsplit_once(':').unwrap();
    let out = std::process::Command::new(pg_bin().tool("psql"))
        .arg(format!(
            "host={host} port={port} user=waltail password='{SERVE_PASSWORD}' dbname=postgres sslmode=disable"
        ))
        .args(["-XAtc", "select 1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("replication connections only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn without_a_verifier_it_serves_only_on_loopback() {
    let w = Workdir::new();
    let secret = w.secret("secret", SECRET);
    let port = waltail::pg::cluster::free_port().unwrap();
    let out = waltail(&[
        "receive",
        "--listen",
        &format!("127.0.0.1:{}", waltail::pg::cluster::free_port().unwrap()),
        "--spool",
        w.path("spool").to_str().unwrap(),
        "--secret-file",
        secret.to_str().unwrap(),
        "--serve",
        &format!("0.0.0.0:{port}"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "refusing to serve replication without authentication on a non-loopback address"
        ),
        "{err}"
    );
}

#[test]
fn a_standby_of_another_cluster_is_refused() {
    let (w, _primary, rx, _tx, serve) = rig("serve-other-a");
    let other = small_cluster("serve-other-b");
    let mut standby =
        Cluster::from_base_backup(&other, "serve-other-standby", &ClusterOptions::default())
            .unwrap();
    let (host, port) = serve.rsplit_once(':').unwrap();
    standby
        .append_conf(&format!(
            "primary_conninfo = 'host={host} port={port} user=waltail password=''{SERVE_PASSWORD}'' sslmode=disable'\nwal_retrieve_retry_interval = '200ms'\n"
        ))
        .unwrap();
    standby.touch("standby.signal").unwrap();
    drop(other);
    standby.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !standby
        .log_tail(200)
        .contains("database system identifier differs between the primary and standby")
    {
        assert!(
            Instant::now() < deadline,
            "standby log:\n{}\n--- receive\n{}",
            standby.log_tail(40),
            rx.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = &w;
}

#[test]
fn sigkill_of_receive_mid_stream_loses_nothing_and_the_standby_resumes() {
    let mut s: Setup = setup_with("serve-kill", "stream", 1, "auto");
    let serve = s.serve.clone().unwrap();
    let stop = CancellationToken::new();
    let load = start_load(s.primary.conninfo(), 6, stop);
    std::thread::sleep(Duration::from_millis(1500));
    wait_value(
        &s.standby,
        "select status from pg_stat_wal_receiver",
        "streaming",
        30,
        &[&s.rx],
    );
    s.rx.kill9();
    let at = spool_position(&s.spool).unwrap().1;
    eprintln!(
        "killed receive at durable {at} (offset {} in its 1 MB segment)",
        at.0 % (1 << 20)
    );
    std::thread::sleep(Duration::from_millis(500));
    let secret = s.w.path("secret");
    let extra = serve_args(&s.w, &serve);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    s.rx = start_receiver_at(&s.w, &s.spool, &secret, &s.addr, &extra, &[]);
    let acked = load.join().unwrap();
    assert!(acked.len() > 50, "load acked only {} commits", acked.len());
    let n = s.primary.psql("select count(*) from t").unwrap();
    wait_durable(&s.spool, flush_lsn(&s.primary), 30, &[&s.rx, &s.tx]);
    wait_value(
        &s.standby,
        "select count(*) from t",
        &n,
        60,
        &[&s.rx, &s.tx],
    );
    wait_value(
        &s.standby,
        "select status from pg_stat_wal_receiver",
        "streaming",
        30,
        &[&s.rx],
    );
    let ids = rt()
        .block_on(load::ids(&s.standby.conninfo(), "t"))
        .unwrap();
    assert!(load::is_gap_free_prefix(&ids));
    assert_eq!(
        ids.len(),
        acked.len(),
        "every acked commit is on the standby"
    );
}

#[test]
fn a_timeline_switch_is_followed_by_the_standby() {
    let mut s = setup_with("serve-tli", "stream", 1, "auto");
    s.primary
        .psql("create table v(i int); insert into v select generate_series(1, 100)")
        .unwrap();
    wait_value(&s.standby, "select count(*) from v", "100", 30, &[&s.rx]);
    // Archive recovery on the primary's own data directory ends on timeline 2.
    s.primary.stop().unwrap();
    s.primary.touch("recovery.signal").unwrap();
    s.primary
        .append_conf("restore_command = 'false'\n")
        .unwrap();
    s.primary.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.primary.psql("select pg_is_in_recovery()").unwrap() != "f" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    s.primary
        .psql("insert into v select generate_series(1, 100)")
        .unwrap();
    s.primary.psql("select pg_switch_wal()").unwrap();
    s.primary.psql("insert into v values (0)").unwrap();
    wait_value(
        &s.standby,
        "select count(*) from v",
        "201",
        60,
        &[&s.rx, &s.tx],
    );
    wait_value(
        &s.standby,
        "select received_tli || ' ' || status from pg_stat_wal_receiver",
        "2 streaming",
        30,
        &[&s.rx],
    );
    s.rx.wait_log(&["timeline ended"], 10);
}

#[test]
fn tls_is_served_with_the_receivers_certificate_and_required() {
    let w = Workdir::new();
    let primary = small_cluster("serve-tls");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (ca, cert, key) = crate::stream::make_tls(&w, "");
    let serve = format!("127.0.0.1:{}", waltail::pg::cluster::free_port().unwrap());
    let mut extra = serve_args(&w, &serve);
    extra.extend([
        "--tls-cert".to_string(),
        cert.to_str().unwrap().into(),
        "--tls-key".into(),
        key.to_str().unwrap().into(),
    ]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (rx, addr) = start_receiver(&w, &spool, &secret, &extra);
    let tx = start_shipper(
        &w,
        &primary,
        &addr,
        &secret,
        &["--interval", "2ms", "--tls-ca", ca.to_str().unwrap()],
    );
    primary.psql("create table t(i int)").unwrap();
    wait_durable(&spool, flush_lsn(&primary), 30, &[&rx, &tx]);
    let verified = "sslmode=require";
    let (ok, out, err) = psql_replication_with(
        &serve,
        "waltail",
        SERVE_PASSWORD,
        verified,
        "IDENTIFY_SYSTEM",
    );
    assert!(ok, "{err}\n{}", rx.log_text());
    assert!(out.contains("|1|"), "{out}");
    let (ok, _, err) = psql_replication(&serve, "waltail", SERVE_PASSWORD, "IDENTIFY_SYSTEM");
    assert!(!ok);
    assert!(err.contains("over TLS only"), "{err}");
    // verify-full checks the serve certificate against the CA and the name.
    let (ok, _, err) = psql_replication_with(
        &serve,
        "waltail",
        SERVE_PASSWORD,
        &format!("sslmode=verify-full sslrootcert={}", ca.display()),
        "IDENTIFY_SYSTEM",
    );
    assert!(ok, "{err}");
    let (other_ca, _, _) = crate::stream::make_tls(&w, "other-");
    let (ok, _, err) = psql_replication_with(
        &serve,
        "waltail",
        SERVE_PASSWORD,
        &format!("sslmode=verify-full sslrootcert={}", other_ca.display()),
        "IDENTIFY_SYSTEM",
    );
    assert!(!ok && err.contains("certificate"), "{err}");
    // A stream-style standby made with verify-full streams over it, by the
    // certificate's DNS name: the libpq of PostgreSQL 13 and 14 (in the
    // standby's walreceiver) ignores IP addresses in subjectAltName.
    let by_name = serve.replace("127.0.0.1", "localhost");
    let pgdata = w.path("standby");
    let pw = w.path("serve-password");
    let conninfo = primary.conninfo();
    let init = |extra: &[&str]| {
        let mut args = vec![
            "init-standby",
            "--primary",
            &conninfo,
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--spool",
            spool.to_str().unwrap(),
            "--style",
            "stream",
            "--serve",
            &by_name,
            "--serve-password-file",
            pw.to_str().unwrap(),
            "--sslmode",
            "verify-full",
        ];
        args.extend(extra);
        waltail(&args)
    };
    let out = init(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs --sslrootcert"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = init(&["--sslrootcert", ca.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut standby = Cluster::adopt("serve-tls-standby", &pgdata).unwrap();
    crate::standby::start_hot_standby(&mut standby, &primary).unwrap();
    primary
        .psql("insert into t select generate_series(1, 100)")
        .unwrap();
    wait_value(&standby, "select count(*) from t", "100", 30, &[&rx]);
    wait_value(
        &standby,
        "select status || ' ' || (conninfo like '%sslmode=verify-full%') from pg_stat_wal_receiver",
        "streaming true",
        30,
        &[&rx],
    );
}
