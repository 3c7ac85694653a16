//! The mistakes tired operators make, and what waltail does about them: a
//! broken spool never promotes a standby; init-standby checks what the
//! server will need before it writes anything; settings that cannot work
//! exit 2 at start; failover checks the standby before it fences; messages
//! name the real problem (the path, its owner, the fix).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::*;
use waltail::pg::cluster::RunAs;
use waltail::pg::Cluster;

const SECRET: &str = "test-secret-0123456789abcdef";

/// The ways an operator breaks a spool.
#[derive(Clone, Copy, Debug)]
enum Break {
    /// Moved away (or never made).
    Missing,
    /// Owned by root (when root; else mode 0000): the server cannot read it.
    WrongOwner,
    /// Every complete segment at mode 0000.
    UnreadableSegments,
    /// `spool.json` overwritten with garbage.
    CorruptMeta,
}

const BREAKS: [Break; 4] = [
    Break::Missing,
    Break::WrongOwner,
    Break::UnreadableSegments,
    Break::CorruptMeta,
];

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn segments(spool: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(spool)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .collect()
}

impl Break {
    fn apply(self, spool: &Path) {
        match self {
            Break::Missing => std::fs::rename(spool, spool.with_extension("away")).unwrap(),
            Break::WrongOwner => match RunAs::for_servers().unwrap() {
                Some(_) => std::os::unix::fs::chown(spool, Some(0), Some(0)).unwrap(),
                None => set_mode(spool, 0),
            },
            Break::UnreadableSegments => {
                let segs = segments(spool);
                assert!(
                    !segs.is_empty(),
                    "no complete segment in {}",
                    spool.display()
                );
                for s in segs {
                    set_mode(&s, 0);
                }
            }
            Break::CorruptMeta => {
                std::fs::write(spool.join("spool.json"), b"{\"system_iden").unwrap()
            }
        }
    }

    fn repair(self, spool: &Path, meta: &[u8]) {
        match self {
            Break::Missing => std::fs::rename(spool.with_extension("away"), spool).unwrap(),
            Break::WrongOwner => match RunAs::for_servers().unwrap() {
                Some(r) => r.chown(spool).unwrap(),
                None => set_mode(spool, 0o700),
            },
            Break::UnreadableSegments => {
                for s in segments(spool) {
                    set_mode(&s, 0o600);
                }
            }
            Break::CorruptMeta => std::fs::write(spool.join("spool.json"), meta).unwrap(),
        }
    }
}

/// Copies the files of spool `from` into the (existing) directory `to`,
/// keeping their owner and mode.
fn copy_spool(from: &Path, to: &Path) {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A standby of either style, fed by a spool broken in each way at its first
/// start, stays in recovery for 30 s and catches up by itself once fixed.
fn a_broken_spool_never_promotes(style: &str) {
    let w = Workdir::new();
    let primary = small_cluster(&format!("broken-{style}"));
    let secret = w.secret("secret", SECRET);
    let live = w.path("spool");
    let (mut rx, addr) = start_receiver(&w, &live, &secret, &[]);
    let mut tx = start_shipper(&w, &primary, &addr, &secret, &["--interval", "2ms"]);
    primary.psql("create table t(i int)").unwrap();
    wait_durable(&live, flush_lsn(&primary), 30, &[&rx, &tx]);
    // One standby per way of breaking its spool, each with a spool of its own.
    let mut standbys = Vec::new();
    for (i, b) in BREAKS.iter().enumerate() {
        let spool = w.path(&format!("spool-{i}"));
        empty_spool(&spool);
        let pgdata = w.path(&format!("standby-{i}"));
        let out = waltail(&[
            "init-standby",
            "--primary",
            &primary.conninfo(),
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--spool",
            spool.to_str().unwrap(),
            "--style",
            style,
        ]);
        assert!(
            out.status.success(),
            "init-standby: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        standbys.push((*b, spool, pgdata));
    }
    // Rows that only the spool holds, in complete segments.
    primary
        .psql("insert into t select generate_series(1, 1000)")
        .unwrap();
    primary.psql("checkpoint").unwrap();
    primary.psql("select pg_switch_wal()").unwrap();
    wait_durable(&live, flush_lsn(&primary), 30, &[&rx, &tx]);
    tx.terminate();
    rx.terminate();
    let meta = std::fs::read(live.join("spool.json")).unwrap();
    let mut servers = Vec::new();
    for (i, (b, spool, pgdata)) in standbys.iter().enumerate() {
        copy_spool(&live, spool);
        b.apply(spool);
        let mut s = Cluster::adopt(&format!("broken-{style}-{i}"), pgdata).unwrap();
        s.spawn().unwrap();
        servers.push(s);
    }
    std::thread::sleep(Duration::from_secs(30));
    for ((b, _, _), s) in standbys.iter().zip(servers.iter_mut()) {
        assert!(
            s.is_running(),
            "{style} standby, spool {b:?}: the server stopped:\n{}",
            s.log_tail(30)
        );
        // Not promoted: no end of recovery, no new timeline.
        let log = s.log_tail(400);
        for promoted in ["selected new timeline ID", "archive recovery complete"] {
            assert!(
                !log.contains(promoted),
                "{style} standby, spool {b:?} promoted itself:\n{log}"
            );
        }
        assert!(
            !s.data.join("pg_wal/00000002.history").exists(),
            "{b:?}: a new timeline"
        );
        if style == "standby" {
            // Consistent from its own backup; queries run; still a standby.
            assert_eq!(s.psql("select pg_is_in_recovery()").unwrap(), "t", "{b:?}");
        }
        // The reason is in the server's log, named.
        let named = match b {
            Break::Missing => "no such spool directory",
            Break::WrongOwner | Break::UnreadableSegments => "ermission denied",
            Break::CorruptMeta => "spool.json is damaged",
        };
        assert!(
            log.contains(named),
            "{style} standby, spool {b:?}: no {named:?} in its log:\n{log}"
        );
    }
    // Fixed, each catches up by itself, and is still a standby.
    for (b, spool, _) in &standbys {
        b.repair(spool, &meta);
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    for ((b, _, _), s) in standbys.iter().zip(servers.iter_mut()) {
        loop {
            if s.psql("select count(*) from t").ok().as_deref() == Some("1000") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{style} standby, spool {b:?} fixed, did not catch up:\n{}",
                s.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            s.psql("select pg_is_in_recovery()").unwrap(),
            "t",
            "{style} {b:?}"
        );
    }
}

#[test]
fn a_broken_spool_never_promotes_a_recovery_signal_standby() {
    a_broken_spool_never_promotes("recovery");
}

#[test]
fn a_broken_spool_never_promotes_a_standby_signal_standby() {
    a_broken_spool_never_promotes("standby");
}

#[test]
fn restore_with_wait_stops_recovery_on_bad_arguments_instead_of_promoting() {
    let w = Workdir::new();
    let spool = w.path("spool");
    empty_spool(&spool);
    let dest = w.path("dest");
    // No --spool: with --wait, 126 (fatal to PostgreSQL); without, 2.
    let out = waltail(&[
        "restore",
        "000000010000000000000001",
        dest.to_str().unwrap(),
        "--wait",
    ]);
    assert_eq!(
        out.status.code(),
        Some(126),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--spool is required"));
    let out = waltail(&[
        "restore",
        "000000010000000000000001",
        dest.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    // A name PostgreSQL never asks for, likewise; an unknown flag too.
    let s = spool.to_str().unwrap();
    let out = waltail(&[
        "restore",
        "../../etc/passwd",
        dest.to_str().unwrap(),
        "--spool",
        s,
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(126));
    let out = waltail(&[
        "restore",
        "000000010000000000000001",
        dest.to_str().unwrap(),
        "--spool",
        s,
        "--wait",
        "--bogus",
    ]);
    assert_eq!(out.status.code(), Some(126));
    assert!(!dest.exists());
    // The help says so.
    let help = String::from_utf8_lossy(&waltail(&["restore", "--help"]).stdout).to_string();
    assert!(
        help.contains("126") && help.contains("never answered"),
        "{help}"
    );
}

fn init_standby(
    primary: &Cluster,
    pgdata: &Path,
    spool: &Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "init-standby",
        "--primary",
        &primary.conninfo(),
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--spool",
        spool.to_str().unwrap(),
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    waltail(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn init_standby_checks_what_the_server_will_need_before_it_writes() {
    let w = Workdir::new();
    let primary = small_cluster("init-checks");
    let server = RunAs::for_servers().unwrap();
    // A spool the server's user cannot read: refused, naming path, user, fix.
    let spool = w.path("spool");
    empty_spool(&spool);
    Break::WrongOwner.apply(&spool);
    let pgdata = w.path("standby");
    let out = init_standby(&primary, &pgdata, &spool, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(spool.to_str().unwrap()) && err.contains("chown"),
        "{err}"
    );
    if server.is_some() {
        assert!(
            err.contains("postgres") && err.contains("owned by root"),
            "{err}"
        );
    }
    assert!(
        !pgdata.exists(),
        "init-standby wrote {} before refusing",
        pgdata.display()
    );
    Break::WrongOwner.repair(&spool, b"");
    // A spool others can write into: refused too.
    set_mode(&spool, 0o777);
    let out = init_standby(&primary, &pgdata, &spool, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 0700"));
    set_mode(&spool, 0o700);
    // A missing spool is made, the server's and private.
    let new_spool = w.path("new-spool");
    // The primary's own auto.conf carries a block (a primary that was a
    // waltail standby once): the backup must not end with two.
    std::fs::write(
        primary.data.join("postgresql.auto.conf"),
        format!(
            "{}\n# written by waltail init-standby\nrestore_command = 'false'\nhot_standby = on\n",
            std::fs::read_to_string(primary.data.join("postgresql.auto.conf")).unwrap()
        ),
    )
    .unwrap();
    let out = init_standby(&primary, &pgdata, &new_spool, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = std::fs::metadata(&new_spool).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o700);
    if let Some(r) = server {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(m.uid(), r.uid);
    }
    let conf = std::fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    assert_eq!(
        conf.matches("# written by waltail init-standby").count(),
        1,
        "{conf}"
    );
    assert!(!conf.contains("restore_command = 'false'"), "{conf}");
    // A data directory that is not empty: refused, unless --force.
    let out = init_standby(&primary, &pgdata, &new_spool, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = init_standby(
        &primary,
        &pgdata,
        &new_spool,
        &["--force", "--style", "recovery"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf = std::fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    assert_eq!(
        conf.matches("# written by waltail init-standby").count(),
        1,
        "{conf}"
    );
    assert!(pgdata.join("recovery.signal").exists() && !pgdata.join("standby.signal").exists());
    // --force never touches a running server's directory.
    let out = init_standby(&primary, &primary.data, &new_spool, &["--force"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("running server"));
    assert_eq!(primary.psql("select 1").unwrap(), "1");
}

#[test]
fn settings_that_cannot_work_exit_2_at_start_and_say_why() {
    let w = Workdir::new();
    let c = small_cluster("settings");
    let secret = w.secret("secret", SECRET);
    let (ca, cert, key) = crate::stream::make_tls(&w, "t-");
    let ship = |receiver: &str, extra: &[&str]| {
        let mut args = vec![
            "ship".to_string(),
            "--primary".into(),
            c.conninfo(),
            "--receiver".into(),
            receiver.into(),
            "--secret-file".into(),
            secret.to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let n = std::fs::read_dir(w.dir.path()).unwrap().count();
        Daemon::start("ship", &args, w.path(&format!("ship-{n}.log")))
    };
    // An address without a port, a TLS name that cannot be checked.
    for (receiver, extra, says) in [
        ("127.0.0.1", vec![], "no port"),
        ("standby.example.com:x", vec![], "is not a port"),
        (
            "exa mple:5433",
            vec!["--tls-ca", ca.to_str().unwrap()],
            "not a valid TLS server name",
        ),
    ] {
        let mut tx = ship(receiver, &extra);
        assert_eq!(tx.wait_exit(10), Some(2), "{receiver}: {}", tx.log_text());
        assert!(
            tx.log_text().contains(says),
            "{receiver}: {}",
            tx.log_text()
        );
    }
    // TLS on the receiver only.
    let spool = w.path("spool-tls");
    let tls_rx = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let (rx, addr) = start_receiver(&w, &spool, &secret, &tls_rx);
    let mut tx = ship(&addr, &[]);
    assert_eq!(tx.wait_exit(30), Some(2), "{}", tx.log_text());
    let said = "the receiver speaks TLS and this shipper has no --tls-ca";
    assert!(tx.log_text().contains(said), "{}", tx.log_text());
    rx.wait_log(&[said], 10);
    drop(rx);
    // TLS on the shipper only.
    let spool = w.path("spool-plain");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let mut tx = ship(&addr, &["--tls-ca", ca.to_str().unwrap()]);
    assert_eq!(tx.wait_exit(30), Some(2), "{}", tx.log_text());
    assert!(
        tx.log_text()
            .contains("does not speak TLS, and this shipper has --tls-ca"),
        "{}",
        tx.log_text()
    );
    rx.wait_log(&["this receiver has no --tls-cert/--tls-key"], 10);
    assert!(spool_position(&spool).is_none());
}

/// `waltail ARGS` as the server's user (when root; else as this user).
fn waltail_as_server(args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(waltail_bin());
    cmd.args(args);
    if let Some(r) = RunAs::for_servers().unwrap() {
        r.apply(&mut cmd);
    }
    cmd.output().unwrap()
}

/// Makes `p` a file the server's user cannot write: root's (when root),
/// else read-only.
fn foreign_file(p: &Path) {
    std::fs::write(p, b"x").unwrap();
    match RunAs::for_servers().unwrap() {
        Some(_) => set_mode(p, 0o600),
        None => set_mode(p, 0o400),
    }
}

#[test]
fn messages_name_the_real_problem() {
    let w = Workdir::new();
    let c = small_cluster("messages");
    let secret = w.secret("secret", SECRET);
    let spool = w.path("spool");
    let (rx, addr) = start_receiver(&w, &spool, &secret, &[]);
    let tx = start_shipper(&w, &c, &addr, &secret, &[]);
    c.psql("create table t(i int)").unwrap();
    wait_durable(&spool, flush_lsn(&c), 30, &[&rx, &tx]);
    drop(tx);
    // A shipper with the wrong secret: check says why none is connected.
    let other = w.secret("other", "another-secret-0123456789");
    let mut bad = start_shipper(&w, &c, &addr, &other, &["--no-slot"]);
    bad.wait_exit(30);
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let out = waltail(&["check", "--spool", spool.to_str().unwrap()]);
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        if line.contains("last error") || Instant::now() > deadline {
            break line;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        line.contains("no shipper connected (last error: authentication"),
        "{line}"
    );
    drop(rx);
    // status and check by a user who cannot read the spool: permission
    // denied, with the path, not "no such spool directory".
    Break::WrongOwner.apply(&spool);
    let unreadable_by = if RunAs::for_servers().unwrap().is_some() {
        waltail_as_server
    } else {
        waltail
    };
    for cmd in ["status", "check"] {
        let out = unreadable_by(&[cmd, "--spool", spool.to_str().unwrap()]);
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("ermission denied") && said.contains(spool.to_str().unwrap()),
            "{cmd}: {said}"
        );
        assert!(!said.contains("no such spool directory"), "{cmd}: {said}");
    }
    Break::WrongOwner.repair(&spool, b"");
    // A receiver that cannot write a file left in the spool names it, its
    // owner and the fix, and does not start.
    let leftover = spool.join("000000010000000000000009.partial");
    foreign_file(&leftover);
    let start = |spool: &Path| {
        let args: Vec<String> = [
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--spool",
            spool.to_str().unwrap(),
            "--secret-file",
            secret.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        let n = std::fs::read_dir(w.dir.path()).unwrap().count();
        let mut d = Daemon::start("receive", &args, w.path(&format!("receive-x{n}.log")));
        let code = d.wait_exit(20);
        (code, d.log_text())
    };
    let (code, log) = start(&spool);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains(leftover.to_str().unwrap()) && log.contains("chown -R"),
        "{log}"
    );
    std::fs::remove_file(&leftover).unwrap();
    // A spool others can get at is refused.
    set_mode(&spool, 0o777);
    let (code, log) = start(&spool);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("mode 0777") && log.contains("chmod 0700"),
        "{log}"
    );
    set_mode(&spool, 0o700);
    // A fenced spool: the receiver says so and exits 3 (not restarted);
    // status says fenced in its text too.
    std::fs::write(spool.join("FENCED"), "fenced by the test\n").unwrap();
    if let Some(r) = RunAs::for_servers().unwrap() {
        r.chown(&spool.join("FENCED")).unwrap();
    }
    let (code, log) = start(&spool);
    assert_eq!(code, Some(3), "{log}");
    // A secret copied as root (`scp -p`): the service's user is told whose
    // file it is and what to chown.
    if RunAs::for_servers().unwrap().is_some() {
        let root_secret = w.path("root-secret");
        std::fs::write(&root_secret, SECRET).unwrap();
        std::os::unix::fs::chown(&root_secret, Some(0), Some(0)).unwrap();
        set_mode(&root_secret, 0o400);
        let out = waltail_as_server(&[
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--spool",
            w.path("other-spool").to_str().unwrap(),
            "--secret-file",
            root_secret.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("owned by root") && err.contains("chown postgres"),
            "{err}"
        );
    }
    assert!(
        log.contains("is fenced") && log.contains("new, empty spool"),
        "{log}"
    );
    let out = waltail(&["status", "--spool", spool.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("fenced") && l.contains("yes")),
        "{text}"
    );
}

#[test]
fn the_units_do_not_restart_on_refusals_and_follow_postgresql() {
    let dir = repo_dir().join("docs/systemd");
    for (unit, order) in [
        ("waltail-ship.service", "After"),
        ("waltail-receive.service", "Before"),
    ] {
        let text = std::fs::read_to_string(dir.join(unit)).unwrap();
        let values = |key: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.strip_prefix(&format!("{key}=")))
                .flat_map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
                .collect()
        };
        // The exit codes that an operator must act on are never restarted.
        let prevent = values("RestartPreventExitStatus");
        for code in [waltail::cli::EXIT_BAD_INPUT, waltail::cli::EXIT_REFUSED] {
            assert!(prevent.contains(&code.to_string()), "{unit}: {prevent:?}");
        }
        assert_eq!(values("Restart"), ["on-failure"], "{unit}");
        // Ordered against the real PostgreSQL unit (Debian's per-cluster one).
        assert!(
            values(order)
                .iter()
                .any(|u| u == "postgresql@15-main.service"),
            "{unit}"
        );
        // No Documentation= pointing at a file nothing installs.
        assert!(values("Documentation").is_empty(), "{unit}");
        if let Ok(out) = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.join(unit))
            .output()
        {
            let err = String::from_utf8_lossy(&out.stderr);
            // Only the binary's absence here is expected.
            for l in err.lines().filter(|l| !l.trim().is_empty()) {
                assert!(
                    l.contains("is not executable") || l.contains("not found"),
                    "{unit}: {l}"
                );
            }
        }
    }
}
