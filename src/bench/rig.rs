//! One method's running set-up for the bench: a fresh primary (`fsync =
//! on`), whatever receives its WAL, the hot standby where there is one, and
//! how to ask each how far WAL is durable on the standby side.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

use super::{IdleCpu, Method};
use crate::pg::client::connect;
use crate::pg::cluster::RunAs;
use crate::pg::process::{cpu_seconds, spawn_logged, start_pair_with};
use crate::pg::{Cluster, ClusterOptions};
use crate::spool::Spool;
use crate::wal::scan::{scan_segment, ScanConfig};
use crate::wal::{Lsn, SegmentSize, WalFileName};

/// One method's running set-up: the primary and whatever receives its WAL.
pub(super) struct Rig {
    pub(super) method: Method,
    pub(super) primary: Cluster,
    pub(super) standby: Option<Cluster>,
    /// waltail's hot standby (standby.signal style, fed from the spool).
    pub(super) hot_standby: Option<Cluster>,
    /// A connection to the hot standby, for commit-to-visible.
    pub(super) hot: Option<Client>,
    pub(super) children: Vec<(String, Child)>,
    pub(super) work: tempfile::TempDir,
    pub(super) archive_seg: SegmentSize,
    pub(super) probe: Option<Client>,
    /// How to start the receiving side again (index 0 of `children`).
    pub(super) restart: Option<(PathBuf, Vec<String>, PathBuf)>,
    pub(super) run_as: Option<RunAs>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(super) async fn rig(method: Method, exe: &Path) -> Result<Rig> {
    let run_as = RunAs::for_servers()?;
    let work = tempfile::Builder::new()
        .prefix("waltail-bench-")
        .tempdir()?;
    if let Some(r) = run_as {
        r.chown(work.path())?;
    }
    let mut opts = ClusterOptions {
        fsync: true,
        ..ClusterOptions::default()
    };
    if let Method::Archive { timeout_s } = method {
        opts.archive = true;
        opts.archive_timeout = timeout_s;
    }
    let mut primary = Cluster::init("bench-primary", &opts)?;
    primary.start()?;
    let mut r = Rig {
        method,
        standby: None,
        hot_standby: None,
        hot: None,
        children: Vec::new(),
        archive_seg: SegmentSize::DEFAULT,
        probe: None,
        restart: None,
        run_as,
        primary,
        work,
    };
    let p = |n: &str| r.work.path().join(n);
    match method {
        Method::Waltail { interval_ms, wake } => {
            let iv = format!("{interval_ms}ms");
            let wake = wake.name();
            // The receiver also serves the spool to the hot standby over the
            // replication protocol (init-standby --style stream, the
            // demo's style): no restore_command copies at idle.
            let (serve, target) = crate::pg::process::serve_on_loopback(r.work.path(), run_as)?;
            let pair = start_pair_with(
                exe,
                &format!("{} application_name={SHIP_APP}", r.primary.conninfo()),
                r.work.path(),
                &["--interval", &iv, "--wake", wake],
                run_as,
                &serve,
            )?;
            r.restart = Some((exe.to_path_buf(), pair.receive_args, p("receive2.log")));
            r.children.push(("waltail receive".into(), pair.receive));
            r.children.push(("waltail ship".into(), pair.ship));
            let pgdata = p("standby");
            crate::standby::init_standby(
                exe,
                &crate::standby::InitStandby {
                    style: crate::standby::Style::Stream,
                    stream: Some(&target),
                    ..crate::standby::InitStandby::new(&r.primary.conninfo(), &pgdata, &p("spool"))
                },
            )
            .await?;
            let mut s = Cluster::adopt("bench-standby", &pgdata)?;
            s.append_conf("fsync = on\n")?;
            s.start()?;
            r.hot = Some(connect(&s.conninfo()).await?);
            r.hot_standby = Some(s);
        }
        Method::Streaming => {
            let mut s = Cluster::from_base_backup(&r.primary, "bench-standby", &opts)?;
            // A slot, as pg_receivewal and waltail have, so a stopped
            // standby can always catch up.
            r.primary
                .psql("select pg_create_physical_replication_slot('bench_standby', true)")?;
            s.append_conf(&format!(
                "primary_conninfo = '{}'\nprimary_slot_name = 'bench_standby'\n",
                r.primary.conninfo()
            ))?;
            s.touch("standby.signal")?;
            s.start()?;
            r.probe = Some(connect(&s.conninfo()).await?);
            r.hot = Some(connect(&s.conninfo()).await?);
            r.standby = Some(s);
        }
        Method::Receivewal => {
            let dir = p("receivewal");
            std::fs::create_dir_all(&dir)?;
            if let Some(ra) = run_as {
                ra.chown(&dir)?;
            }
            r.primary
                .psql("select pg_create_physical_replication_slot('bench', true)")?;
            let args = receivewal_args(&dir, r.primary.port, Some("bench"));
            let tool = r.primary.bin.tool("pg_receivewal");
            let child = spawn_logged(&tool, &args, &p("receivewal.log"), run_as)?;
            r.children.push(("pg_receivewal".into(), child));
            r.restart = Some((tool, args, p("receivewal2.log")));
            r.probe = Some(connect(&r.primary.conninfo()).await?);
            let c = r.probe.as_ref().expect("set above");
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.query_opt("SELECT 1 FROM pg_stat_replication WHERE application_name = 'pg_receivewal' AND flush_lsn IS NOT NULL", &[]).await?.is_none() {
                if Instant::now() > deadline {
                    bail!("pg_receivewal did not connect");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Method::Archive { .. } => {}
    }
    Ok(r)
}

impl Rig {
    /// How far WAL is durable on the standby side (see the module header).
    pub(super) async fn durable(&self) -> Result<Lsn> {
        Ok(match self.method {
            Method::Waltail { .. } => Spool::open(&self.work.path().join("spool"))?
                .position()?
                .map(|p| p.1)
                .unwrap_or_default(),
            Method::Streaming => {
                let c = self.probe.as_ref().context("no probe")?;
                let s: Option<String> = c
                    .query_one("SELECT pg_last_wal_receive_lsn()::text", &[])
                    .await?
                    .get(0);
                s.and_then(|s| s.parse().ok()).unwrap_or_default()
            }
            Method::Receivewal => {
                let c = self.probe.as_ref().context("no probe")?;
                let row = c
                    .query_opt("SELECT flush_lsn::text FROM pg_stat_replication WHERE application_name = 'pg_receivewal'", &[])
                    .await?;
                row.and_then(|r| r.get::<_, Option<String>>(0))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_default()
            }
            Method::Archive { .. } => {
                let dir = self.primary.archive.clone().context("no archive")?;
                let mut best = Lsn(0);
                for e in std::fs::read_dir(dir)?.flatten() {
                    if let Ok(WalFileName::Segment(s)) =
                        WalFileName::parse(&e.file_name().to_string_lossy(), self.archive_seg)
                    {
                        best = best.max(s.end_lsn(self.archive_seg));
                    }
                }
                best
            }
        })
    }

    /// What the standby side holds durably once the primary is dead: as
    /// [`Rig::durable`], except that pg_receivewal's position is read from
    /// its directory (the end of valid WAL in its newest file), since the
    /// primary that reported it is gone.
    pub(super) async fn durable_after_kill(&self) -> Result<Lsn> {
        if self.method != Method::Receivewal {
            return self.durable().await;
        }
        let dir = self.work.path().join("receivewal");
        let seg = SegmentSize::DEFAULT;
        let mut newest = None;
        for e in std::fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let (s, partial) = match WalFileName::parse(&name, seg) {
                Ok(WalFileName::Segment(s)) => (s, false),
                Ok(WalFileName::Partial(s)) => (s, true),
                _ => continue,
            };
            if newest.as_ref().is_none_or(|(n, _, _)| s > *n) {
                newest = Some((s, partial, e.path()));
            }
        }
        let Some((s, partial, path)) = newest else {
            return Ok(Lsn(0));
        };
        if !partial {
            return Ok(s.end_lsn(seg));
        }
        let bytes = std::fs::read(&path)?;
        Ok(scan_segment(s.start_lsn(seg), &bytes, ScanConfig::new(seg)).end_lsn)
    }

    /// After a crash restart of the primary: what needs reconnecting.
    pub(super) async fn after_primary_restart(&mut self) -> Result<()> {
        if self.method == Method::Receivewal {
            // pg_receivewal --no-loop exits when its primary dies.
            if let Some((_, c)) = self.children.first_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            self.start_receiving().await?;
            self.probe = Some(connect(&self.primary.conninfo()).await?);
            let c = self.probe.as_ref().context("no probe")?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.query_opt("SELECT 1 FROM pg_stat_replication WHERE application_name = 'pg_receivewal' AND flush_lsn IS NOT NULL", &[]).await?.is_none() {
                if Instant::now() > deadline {
                    bail!("pg_receivewal did not reconnect");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Promotes the standby (waltail: the failover hook; streaming:
    /// `pg_promote()`); returns its conninfo.
    pub(super) async fn fail_over(&mut self) -> Result<String> {
        match self.method {
            Method::Waltail { .. } => {
                let s = self.hot_standby.as_ref().context("no standby")?;
                let cfg = crate::failover::FailoverConfig {
                    spool: self.work.path().join("spool"),
                    standby: Some(s.conninfo()),
                    force: false,
                    alive_window: Duration::from_secs(1),
                    timeout: Duration::from_secs(120),
                    fence_command: None,
                };
                let rep = crate::failover::run(&cfg).await?;
                eprintln!(
                    "    failover: {}",
                    rep.to_text().lines().next().unwrap_or("")
                );
                Ok(s.conninfo())
            }
            Method::Streaming => {
                let s = self.standby.as_ref().context("no standby")?;
                let c = connect(&s.conninfo()).await?;
                let ok: bool = c
                    .query_one("SELECT pg_promote(true, 60)", &[])
                    .await?
                    .get(0);
                if !ok {
                    bail!("pg_promote() did not finish within 60 s");
                }
                Ok(s.conninfo())
            }
            _ => bail!("no standby to promote for {}", self.method.label()),
        }
    }

    pub(super) fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .map(|(n, c)| (n.clone(), c.id()))
            .collect()
    }

    /// Every process the method runs at idle, on both hosts.
    pub(super) async fn idle_pids(&self) -> Result<Vec<(String, u32)>> {
        let mut out = self.pids();
        let c = connect(&self.primary.conninfo()).await?;
        let sql = match self.method {
            // Its SQL backend, and the walsender of `--wake walsender`.
            Method::Waltail { .. } => format!("SELECT 'waltail ship backend', pid FROM pg_stat_activity WHERE application_name IN ('{SHIP_APP}', 'waltail')"),
            Method::Streaming | Method::Receivewal => "SELECT 'walsender', pid FROM pg_stat_replication".into(),
            Method::Archive { .. } => "SELECT 'archiver', pid FROM pg_stat_activity WHERE backend_type = 'archiver'".into(),
        };
        for row in c.query(&sql, &[]).await? {
            out.push((row.get(0), row.get::<_, i32>(1) as u32));
        }
        if let (Method::Streaming, Some(s)) = (self.method, &self.standby) {
            let c = connect(&s.conninfo()).await?;
            for row in c
                .query("SELECT 'walreceiver', pid FROM pg_stat_wal_receiver", &[])
                .await?
            {
                out.push((row.get(0), row.get::<_, i32>(1) as u32));
            }
        }
        Ok(out)
    }
}

/// The `application_name` waltail ship connects with in the bench, so its
/// backend can be found.
pub(super) const SHIP_APP: &str = "waltail_ship";

/// Idle CPU of the method's processes over `window` (see the module header).
pub(super) async fn idle_cpu(r: &Rig, window: Duration) -> Result<Vec<IdleCpu>> {
    let c = connect(&r.primary.conninfo()).await?;
    c.batch_execute("CHECKPOINT").await?;
    drop(c);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids = r.idle_pids().await?;
    let before: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    tokio::time::sleep(window).await;
    Ok(pids
        .iter()
        .zip(before)
        .map(|((name, p), b)| IdleCpu {
            process: name.clone(),
            pct: (cpu_seconds(*p) - b).max(0.0) / window.as_secs_f64() * 100.0,
        })
        .collect())
}

impl Rig {
    /// Stops whatever receives WAL, so the primary runs ahead of it.
    pub(super) async fn stop_receiving(&mut self) -> Result<()> {
        if let Some(s) = &mut self.standby {
            self.probe = None;
            s.stop()?;
        } else if let Some((_, c)) = self.children.first_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Starts the receiving side again.
    pub(super) async fn start_receiving(&mut self) -> Result<()> {
        if let Some(s) = &mut self.standby {
            s.start()?;
            self.probe = Some(connect(&s.conninfo()).await?);
        } else if let Some((exe, args, log)) = &self.restart {
            let child = spawn_logged(exe, args, log, self.run_as)?;
            if let Some(slot) = self.children.first_mut() {
                slot.1 = child;
            }
        }
        Ok(())
    }
}

/// `pg_receivewal --synchronous` into `dir` from the server on loopback
/// `port`, with a slot when given.
pub(super) fn receivewal_args(dir: &Path, port: u16, slot: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = vec!["-D".into(), dir.display().to_string()];
    if let Some(s) = slot {
        args.extend(["--slot".into(), s.into()]);
    }
    let port = port.to_string();
    args.extend(
        [
            "--synchronous",
            "--no-loop",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
            &port,
        ]
        .iter()
        .map(|x| x.to_string()),
    );
    args
}
