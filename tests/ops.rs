//! Operating waltail on real servers: config files, `status` and `check`,
//! the Prometheus endpoints, SIGTERM and SIGHUP, and `--help` examples.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::*;
use waltail::config::{self, Dur};
use waltail::wal::Lsn;

const SECRET: &str = "test-secret-0123456789abcdef";
const SEG: u64 = 1 << 20;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn wait_scrape(addr: &str, name: &str, min: f64, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (code, body) = http_get(addr, "/metrics");
        assert_eq!(code, 200, "{body}");
        if sample(&body, name) >= min {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed below {min}:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_addr() -> String {
    format!("127.0.0.1:{}", waltail::pg::cluster::free_port().unwrap())
}

#[test]
fn sample_configs_load_and_bad_keys_are_named() {
    let dir = repo_dir().join("docs/config");
    let ship: config::ShipFile = config::load(&dir.join("ship.toml")).unwrap();
    assert_eq!(ship.interval, Some(Dur(Duration::from_millis(250))));
    assert_eq!(ship.metrics_addr.as_deref(), Some("127.0.0.1:9187"));
    assert_eq!(ship.slot.as_deref(), Some("waltail"));
    let rx: config::ReceiveFile = config::load(&dir.join("receive.toml")).unwrap();
    assert_eq!(rx.max_connections, Some(8));
    assert_eq!(rx.idle_timeout, Some(Dur(Duration::from_secs(30))));
    let r: config::RestoreFile = config::load(&dir.join("restore.toml")).unwrap();
    assert_eq!(
        r.spool.as_deref(),
        Some(Path::new("/var/lib/waltail/spool"))
    );
    assert_eq!(r.wait, Some(false));
    let f: config::FailoverFile = config::load(&dir.join("failover.toml")).unwrap();
    assert_eq!(f.timeout, Some(Dur(Duration::from_secs(120))));
    let s: config::StatusFile = config::load(&dir.join("status.toml")).unwrap();
    assert_eq!(s.warning.as_deref(), Some("16MB,10s"));
    assert_eq!(s.stale_after, Some(Dur(Duration::from_secs(10))));
    // Every sample in the directory is one of those.
    let n = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(n, 5, "a new sample needs a test");

    // Through the binary: an unknown key and a bad value, one line naming them, exit 2.
    let w = Workdir::new();
    let bad = w.path("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:1\"\nspoool = \"/tmp/x\"\n").unwrap();
    let out = waltail(&["receive", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("spoool") && e.contains("bad.toml"), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    std::fs::write(&bad, "interval = \"often\"\n").unwrap();
    let out = waltail(&["ship", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("`interval`"), "{}", stderr(&out));
    // Through the environment, for check: UNKNOWN.
    let out = std::process::Command::new(waltail_bin())
        .args(["check"])
        .env("WALTAIL_CONFIG", &bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with("WALTAIL UNKNOWN"),
        "{}",
        stdout(&out)
    );
    // A missing file.
    let out = waltail(&["status", "--config", "/nonexistent/status.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/nonexistent/status.toml"));
}

#[test]
fn every_subcommand_help_carries_an_example() {
    use clap::CommandFactory;
    let cmd = waltail::cli::Cli::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    assert!(names.iter().any(|n| n == "status") && names.iter().any(|n| n == "check"));
    for n in &names {
        let out = waltail(&[n, "--help"]);
        assert!(out.status.success(), "{n} --help");
        assert!(
            stdout(&out).contains("Example"),
            "{n} --help has no example"
        );
    }
    assert!(stdout(&waltail(&["--help"])).contains("Example"));
}

#[test]
fn metrics_endpoints_count_what_flows() {
    let w = Workdir::new();
    let c = small_cluster("ops-metrics");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rm, sm) = (free_addr(), free_addr());
    let (rx, addr) = start_receiver(&w, &spool, &secret, &["--metrics-addr", &rm]);
    let tx = start_shipper(&w, &c, &addr, &secret, &["--metrics-addr", &sm]);
    c.psql("create table m(i int, pad text)").unwrap();
    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);
    let r1 = wait_scrape(&rm, "waltail_receive_acks_total", 1.0, 20);
    let s1 = wait_scrape(&sm, "waltail_ship_acks_total", 1.0, 20);
    assert!(
        sample(&s1, "waltail_ship_bytes_shipped_total") > 0.0,
        "{s1}"
    );
    assert!(
        sample(&r1, "waltail_receive_bytes_written_total") > 0.0,
        "{r1}"
    );
    assert_eq!(sample(&r1, "waltail_receive_connected"), 1.0, "{r1}");
    assert_eq!(sample(&s1, "waltail_ship_connected"), 1.0, "{s1}");
    assert!(r1.contains("waltail_receive_fsync_seconds_count"), "{r1}");
    for name in [
        "waltail_ship_reconnects_total",
        "waltail_ship_auth_failures_total",
        "waltail_ship_lag_bytes",
        "waltail_ship_lag_seconds",
    ] {
        assert!(s1.contains(name), "ship lacks {name}:\n{s1}");
    }
    for name in [
        "waltail_receive_frames_rejected_total",
        "waltail_receive_auth_failures_total",
        "waltail_receive_lag_bytes",
        "waltail_receive_lag_seconds",
    ] {
        assert!(r1.contains(name), "receive lacks {name}:\n{r1}");
    }
    // Some WAL, then the counters have moved.
    c.psql("insert into m select g, repeat('x', 200) from generate_series(1, 5000) g")
        .unwrap();
    let flush = flush_lsn(&c);
    wait_durable(&spool, flush, 30, &[&rx, &tx]);
    let written1 = sample(&r1, "waltail_receive_bytes_written_total");
    let shipped1 = sample(&s1, "waltail_ship_bytes_shipped_total");
    let r2 = wait_scrape(
        &rm,
        "waltail_receive_bytes_written_total",
        written1 + 500_000.0,
        20,
    );
    let s2 = wait_scrape(
        &sm,
        "waltail_ship_bytes_shipped_total",
        shipped1 + 500_000.0,
        20,
    );
    assert!(sample(&r2, "waltail_receive_acks_total") > sample(&r1, "waltail_receive_acks_total"));
    assert!(sample(&s2, "waltail_ship_acks_total") > sample(&s1, "waltail_ship_acks_total"));
    assert!(
        sample(&r2, "waltail_receive_fsync_seconds_count")
            > sample(&r1, "waltail_receive_fsync_seconds_count")
    );
    // The durable LSN gauge reaches the flush position.
    let s3 = wait_scrape(&sm, "waltail_ship_durable_lsn", flush.0 as f64, 20);
    assert!(sample(&s3, "waltail_ship_durable_lsn") >= flush.0 as f64);
    // Wrong authentication shows as an auth failure on the receiver.
    let other = w.secret("other", "another-secret-0123456789");
    let mut bad = start_shipper(&w, &c, &addr, &other, &["--no-slot"]);
    assert_eq!(bad.wait_exit(30), Some(3), "{}", bad.log_text());
    wait_scrape(&rm, "waltail_receive_auth_failures_total", 1.0, 10);
    // Only GET /metrics.
    assert_eq!(http_get(&rm, "/").0, 404);
    assert_eq!(http_get(&sm, "/other").0, 404);
}

fn status_json(spool: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["status", "--spool", spool.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out = waltail(&args);
    assert!(out.status.success(), "status: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

fn check(spool: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["check", "--spool", spool.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = waltail(&args);
    let line = stdout(&out);
    assert_eq!(line.trim_end().lines().count(), 1, "one line: {line}");
    let code = out.status.code().unwrap_or(-1);
    if code != 3 {
        assert!(line.contains(" | lag_bytes="), "perfdata: {line}");
    }
    (code, line)
}

#[test]
fn status_and_check_follow_the_pair_and_the_standby() {
    let w = Workdir::new();
    let primary = small_cluster("ops-status-primary");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (mut rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let tx = start_shipper(&w, &primary, &addr, &secret, &["--interval", "5ms"]);
    primary.psql("create table s(i int)").unwrap();
    wait_durable(&spool, flush_lsn(&primary), 30, &[&rx, &tx]);
    // A standby fed from the spool, for the replay LSN.
    let pgdata = w.path("standby");
    let out = waltail(&[
        "init-standby",
        "--primary",
        &primary.conninfo(),
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "init-standby: {}", stderr(&out));
    let mut standby = Cluster::adopt("ops-status-standby", &pgdata).unwrap();
    standby.start().unwrap();
    primary.psql("insert into s values (1)").unwrap();
    let flush = flush_lsn(&primary);
    wait_durable(&spool, flush, 30, &[&rx, &tx]);
    let pc = primary.conninfo();
    let sc = standby.conninfo();
    // Caught up: lag 0, the LSNs line up, the replay LSN comes from the standby.
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = status_json(&spool, &["--primary", &pc, "--standby", &sc]);
        let replayed = st["replay_lsn"]
            .as_str()
            .and_then(|l| l.parse::<Lsn>().ok())
            .is_some_and(|l| l >= flush);
        if st["lag_bytes"] == 0 && replayed && st["connection"] == "connected" {
            break st;
        }
        assert!(Instant::now() < deadline, "never caught up: {st}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(st["receiver_running"], true, "{st}");
    assert_eq!(st["receiver_state"], "streaming", "{st}");
    assert_eq!(st["primary_flush_source"], "primary", "{st}");
    assert_eq!(st["lag_seconds"], 0.0, "{st}");
    assert_eq!(st["timeline"], 1, "{st}");
    assert!(st["current_segment"].as_str().is_some(), "{st}");
    let durable: Lsn = st["durable_lsn"].as_str().unwrap().parse().unwrap();
    let shipped: Lsn = st["shipped_lsn"].as_str().unwrap().parse().unwrap();
    let pf: Lsn = st["primary_flush_lsn"].as_str().unwrap().parse().unwrap();
    assert!(shipped >= durable && pf == durable, "{st}");
    // The human form says the same.
    let out = waltail(&[
        "status",
        "--spool",
        spool.to_str().unwrap(),
        "--primary",
        &pc,
    ]);
    let text = stdout(&out);
    assert!(
        text.contains("durable LSN") && text.contains("streaming"),
        "{text}"
    );

    // check: OK when caught up; thresholds of 0 are reached at once.
    let (code, line) = check(&spool, &["--primary", &pc]);
    assert_eq!(code, 0, "{line}");
    assert!(line.starts_with("WALTAIL OK"), "{line}");
    let (code, line) = check(&spool, &["--primary", &pc, "--warning", "0"]);
    assert_eq!(code, 1, "{line}");
    let (code, line) = check(
        &spool,
        &["--primary", &pc, "--warning", "0", "--critical", "0s"],
    );
    assert_eq!(code, 2, "{line}");

    // The receiver stops while the primary writes: CRITICAL, and the lag shows.
    assert_eq!(rx.terminate(), Some(0));
    primary
        .psql("insert into s select generate_series(1, 20000)")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (code, line) = check(&spool, &["--primary", &pc]);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("receiver not running"), "{line}");
    let st = status_json(&spool, &["--primary", &pc]);
    assert!(st["lag_bytes"].as_u64().unwrap() > 0, "{st}");
    assert!(st["lag_seconds"].as_f64().unwrap() > 0.0, "{st}");
    assert_eq!(st["connection"], "disconnected", "{st}");

    // No spool: UNKNOWN (check) and bad input (status).
    let missing = w.path("no-such-spool");
    let (code, line) = check(&missing, &[]);
    assert_eq!(code, 3, "{line}");
    assert!(line.starts_with("WALTAIL UNKNOWN"), "{line}");
    let out = waltail(&["status", "--spool", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    // A bad threshold is UNKNOWN too.
    let (code, _) = check(&spool, &["--warning", "soon-ish"]);
    assert_eq!(code, 3);
    drop(tx);
}

#[test]
fn sigterm_mid_stream_leaves_a_consistent_spool_and_exits_0() {
    let w = Workdir::new();
    let c = archived_cluster("ops-sigterm");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (mut rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let mut tx = start_shipper(&w, &c, &addr, &secret, &["--interval", "2ms"]);
    c.psql("create table k(i int, pad text)").unwrap();
    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);
    let conn = c.conninfo();
    let bin = c.bin.tool("psql");
    let load = std::thread::spawn(move || {
        std::process::Command::new(bin)
            .args(["-X", "-q", "-d", &conn, "-c"])
            .arg("insert into k select g, repeat('x', 200) from generate_series(1, 30000) g")
            .status()
            .unwrap()
    });
    // Mid-stream: the spool is moving.
    let start = spool_position(&spool).unwrap().1;
    let deadline = Instant::now() + Duration::from_secs(20);
    while spool_position(&spool).unwrap().1 < Lsn(start.0 + 200_000) {
        assert!(Instant::now() < deadline, "the spool did not move");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    assert_eq!(rx.terminate(), Some(0), "{}", rx.log_text());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    rx.wait_log(&["SIGTERM: shutting down", "receiver stopped"], 5);
    assert!(load.join().unwrap().success());
    // Consistent: the position is valid, everything below it equals the primary's WAL.
    assert_spool_matches(&spool, &c, SEG);
    let st = waltail::spool::Spool::open(&spool)
        .unwrap()
        .status()
        .unwrap();
    assert_eq!(st.state, waltail::spool::ReceiverState::Stopped);
    // And it resumes from there.
    let (rx2, _) = {
        let port = addr.rsplit(':').next().unwrap().to_string();
        start_receiver_on(&w, &spool, &secret, &port)
    };
    c.psql("select pg_switch_wal()").unwrap();
    c.psql("select pg_logical_emit_message(true, 'x', 'y')")
        .unwrap();
    wait_durable(&spool, flush_lsn(&c), 60, &[&rx2, &tx]);
    assert!(assert_spool_matches(&spool, &c, SEG) >= 2);
    // The shipper stops cleanly on SIGTERM too.
    assert_eq!(tx.terminate(), Some(0), "{}", tx.log_text());
    tx.wait_log(&["shipper stopped"], 5);
}

fn hup(d: &Daemon) {
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
}

#[test]
fn sighup_reloads_the_interval_and_the_limits_from_the_config_file() {
    let w = Workdir::new();
    let c = small_cluster("ops-sighup");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let listen = free_addr();
    let metrics = free_addr();
    // The receiver takes everything from its config file.
    let rconf = w.path("receive.toml");
    let rtext = |idle: &str| {
        format!(
            "listen = \"{listen}\"\nspool = \"{}\"\nsecret_file = \"{}\"\nidle_timeout = \"{idle}\"\nmax_connections = 4\n",
            spool.display(),
            secret.display()
        )
    };
    std::fs::write(&rconf, rtext("30s")).unwrap();
    let mut rx = Daemon::start(
        "receive",
        &[
            "receive".into(),
            "--config".into(),
            rconf.display().to_string(),
        ],
        w.path("receive.log"),
    );
    rx.wait_log(&["receiver listening"], 20);
    assert!(rx.log_text().contains(&listen), "{}", rx.log_text());
    // The shipper: its file gives the interval and the metrics address; the
    // command line gives the rest.
    let sconf = w.path("ship.toml");
    let stext = |interval: &str| {
        format!("interval = \"{interval}\"\nmetrics_addr = \"{metrics}\"\nlog_level = \"info\"\n")
    };
    std::fs::write(&sconf, stext("10ms")).unwrap();
    let mut tx = start_shipper(
        &w,
        &c,
        &listen,
        &secret,
        &["--config", sconf.to_str().unwrap()],
    );
    c.psql("create table h(i int)").unwrap();
    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);
    let body = wait_scrape(&metrics, "waltail_ship_interval_seconds", 0.01, 10);
    assert_eq!(sample(&body, "waltail_ship_interval_seconds"), 0.01);

    std::fs::write(&sconf, stext("250ms")).unwrap();
    hup(&tx);
    tx.wait_log(&["SIGHUP: reloading", "poll interval now 250ms"], 10);
    let body = wait_scrape(&metrics, "waltail_ship_interval_seconds", 0.25, 10);
    assert_eq!(sample(&body, "waltail_ship_interval_seconds"), 0.25);
    // Still shipping at the new pace.
    c.psql("insert into h values (1)").unwrap();
    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);

    std::fs::write(&rconf, rtext("5s")).unwrap();
    hup(&rx);
    rx.wait_log(&["limits now idle_timeout 5s, max_connections 4"], 10);

    // A broken file on SIGHUP: logged, the process keeps what it has.
    std::fs::write(&sconf, "interval = \"whenever\"\n").unwrap();
    hup(&tx);
    tx.wait_log(&["keeping the running configuration"], 10);
    assert!(tx.running() && rx.running());
    c.psql("insert into h values (2)").unwrap();
    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);
    assert_eq!(tx.terminate(), Some(0));
    assert_eq!(rx.terminate(), Some(0));
}

#[test]
fn json_logs_are_one_object_a_line() {
    let w = Workdir::new();
    let spool = w.path("spool");
    let secret = w.secret("secret", SECRET);
    let (mut rx, _) = start_receiver(&w, &spool, &secret, &["--log-format", "json"]);
    rx.wait_log(&["receiver listening"], 10);
    assert_eq!(rx.terminate(), Some(0));
    let log = rx.log_text();
    let mut n = 0;
    for l in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
        n += 1;
    }
    assert!(n >= 2, "{log}");
    // A fatal error is a JSON line too.
    let out = waltail(&[
        "receive",
        "--log-format",
        "json",
        "--listen",
        "256.0.0.1:1",
        "--spool",
        spool.to_str().unwrap(),
        "--insecure-no-auth",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let last = err.lines().last().unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(v["level"], "ERROR", "{err}");
}
