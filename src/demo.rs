//! `waltail demo`: the whole story on one machine in under a minute.
//!
//! It makes a throwaway primary and a standby (in a temporary directory, on
//! free loopback ports), starts `waltail receive` and `waltail ship` as real
//! daemons, runs a write load that numbers its commits, shows the hot standby
//! answering while the primary writes, SIGKILLs the primary mid-load, runs the
//! failover, and prints what survived. Everything it made is removed at the
//! end, also after Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio_util::sync::CancellationToken;

use crate::failover::{FailoverConfig, FailoverReport};
use crate::load;
use crate::pg::cluster::RunAs;
use crate::pg::{Cluster, ClusterOptions};
use crate::standby::Style;
use crate::wal::{scan_segment, Lsn, ScanConfig, SegmentName, SegmentSize};

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub seconds: u64,
    pub style: Style,
    pub interval: Duration,
    pub keep: bool,
}

/// A daemon child process, killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The results the demo prints.
#[derive(Clone, Debug)]
pub struct DemoResult {
    pub acked: i64,
    pub kept: i64,
    pub gap_free: bool,
    pub lost: i64,
    pub cut: Lsn,
    pub primary_end: Lsn,
    pub report: FailoverReport,
    pub standby_seen_while_writing: i64,
}

pub async fn run(opts: &DemoOptions, stop: CancellationToken) -> Result<DemoResult> {
    tokio::select! {
        r = run_inner(opts) => r,
        _ = stop.cancelled() => bail!("interrupted; everything the demo made has been removed"),
    }
}

async fn run_inner(opts: &DemoOptions) -> Result<DemoResult> {
    let t0 = Instant::now();
    let say = |msg: String| println!("[{:5.1}s] {msg}", t0.elapsed().as_secs_f64());
    let exe = std::env::current_exe()?;
    let run_as = RunAs::for_servers()?;
    let work = tempfile::Builder::new().prefix("waltail-demo-").tempdir()?;
    if let Some(r) = run_as {
        r.chown(work.path())?;
    }
    let path = |n: &str| work.path().join(n);

    say("creating a throwaway primary (initdb, 16 MB segments)".into());
    let mut primary = Cluster::init("demo-primary", &ClusterOptions::default())?;
    primary.start()?;
    say(format!("primary is up on 127.0.0.1:{}", primary.port));

    let (extra, target) = if opts.style == Style::Stream {
        let (a, t) = crate::pg::process::serve_on_loopback(work.path(), run_as)?;
        (a, Some(t))
    } else {
        (Vec::new(), None)
    };
    let interval = format!("{}ms", opts.interval.as_millis().max(1));
    // A hot standby fed by the spool: the shipper is woken by the
    // primary's walsender, at each flush, as the README sets it up.
    let (wake, woken_by) = if opts.style == Style::Stream {
        ("walsender", "the primary's walsender at each WAL flush")
    } else {
        ("inotify", "WAL writes")
    };
    let pair = crate::pg::process::start_pair_with(
        &exe,
        &primary.conninfo(),
        work.path(),
        &["--interval", &interval, "--wake", wake],
        run_as,
        &extra,
    )?;
    let spool = pair.spool.clone();
    let (_rx, _tx) = (Daemon(pair.receive), Daemon(pair.ship));
    say(format!(
        "waltail receive has WAL in spool {}; waltail ship is woken by {woken_by} (a poll every {interval} as the safety net)",
        spool.display()
    ));
    load::create_table(&primary.conninfo(), "demo").await?;

    say(match &target {
        Some(t) => format!(
            "making the standby (waltail init-standby, stream style: it streams from waltail receive --serve on 127.0.0.1:{})",
            t.port
        ),
        None => format!(
            "making the standby (waltail init-standby, {} style)",
            opts.style.signal_file()
        ),
    });
    let pgdata = path("standby");
    crate::standby::init_standby(
        &exe,
        &crate::standby::InitStandby {
            style: opts.style,
            stream: target.as_ref(),
            ..crate::standby::InitStandby::new(&primary.conninfo(), &pgdata, &spool)
        },
    )
    .await?;
    let mut standby = Cluster::adopt("demo-standby", &pgdata)?;
    standby.start()?;
    say(format!(
        "standby is up on 127.0.0.1:{}, in recovery, fed only by the spool",
        standby.port
    ));

    say(format!(
        "write load: numbered commits for {} s, then the primary is killed",
        opts.seconds
    ));
    let stopper = CancellationToken::new();
    let conninfo = primary.conninfo();
    let st = stopper.clone();
    let max_time = Duration::from_secs(opts.seconds + 30);
    let writer = tokio::spawn(async move {
        load::numbered_inserts(&conninfo, "demo", st, 10_000_000, max_time, false).await
    });
    let standby_client = crate::pg::client::connect(&standby.conninfo()).await?;
    let started = Instant::now();
    let mut seen = 0;
    while started.elapsed() < Duration::from_secs(opts.seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(row) = standby_client
            .query_one("SELECT count(*), coalesce(max(id), 0) FROM demo", &[])
            .await
        {
            seen = row.get::<_, i64>(1);
            say(format!(
                "  standby answers: {} commits visible (read-only query while the primary writes)",
                row.get::<_, i64>(0)
            ));
        }
    }
    drop(standby_client);
    say("SIGKILL to the primary's postmaster and every backend".into());
    primary.kill();
    let acked_list = writer.await??;
    let acked = acked_list.last().map(|a| a.id).unwrap_or(0);
    say(format!(
        "the load saw {acked} commits acknowledged before the primary died"
    ));

    // The receiver must stop hearing from the primary before failover agrees.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    say("waltail failover: fence, cut the last segment at the last valid record, promote".into());
    let report = crate::failover::run(&FailoverConfig {
        spool: spool.clone(),
        standby: Some(standby.conninfo()),
        force: false,
        alive_window: Duration::from_secs(1),
        timeout: Duration::from_secs(60),
        fence_command: None,
    })
    .await?;
    let ids = load::ids(&standby.conninfo(), "demo").await?;
    let kept = ids.len() as i64;
    let gap_free = load::is_gap_free_prefix(&ids);
    let primary_end = wal_end_on_disk(&primary.pg_wal(), report.final_lsn, primary.bin.clone());
    let result = DemoResult {
        acked,
        kept,
        gap_free,
        lost: (acked - kept).max(0),
        cut: report.final_lsn,
        primary_end,
        report,
        standby_seen_while_writing: seen,
    };
    if opts.keep {
        primary.keep_files();
        let kept_dir = work.keep();
        say(format!(
            "keeping everything in {} and {}",
            kept_dir.display(),
            primary.root.display()
        ));
    }
    drop(standby);
    Ok(result)
}

/// Where valid WAL ends in a dead primary's pg_wal, from the segment holding
/// `from` onwards (the true end of what the primary wrote).
fn wal_end_on_disk(pg_wal: &Path, from: Lsn, _bin: crate::pg::PgBin) -> Lsn {
    let mut end = from;
    let Some(seg_size) = std::fs::read_dir(pg_wal).ok().and_then(|mut d| {
        d.find_map(|e| {
            let e = e.ok()?;
            let len = e.metadata().ok()?.len();
            (e.file_name().len() == 24)
                .then(|| SegmentSize::new(len))
                .flatten()
        })
    }) else {
        return end;
    };
    let tli = crate::wal::TimelineId(1);
    let mut seg = SegmentName::of_lsn(tli, from, seg_size);
    for _ in 0..64 {
        let p: PathBuf = pg_wal.join(seg.file_name(seg_size));
        let Ok(bytes) = std::fs::read(&p) else { break };
        let s = scan_segment(seg.start_lsn(seg_size), &bytes, ScanConfig::new(seg_size));
        if s.records == 0 {
            break;
        }
        end = end.max(s.end_lsn);
        if !matches!(
            s.end.kind,
            crate::wal::EndKind::SegmentEnd | crate::wal::EndKind::Switch
        ) {
            break;
        }
        seg = SegmentName::new(tli, seg.segno.next());
    }
    end
}

impl DemoResult {
    pub fn table(&self) -> String {
        let window = self.primary_end.bytes_since(self.cut).unwrap_or(0);
        format!(
            "\n| what | value |\n|---|---|\n\
             | commits acknowledged by the primary | {} |\n\
             | commits on the promoted standby | {} |\n\
             | commits lost | {} |\n\
             | standby holds a gap-free prefix | {} |\n\
             | WAL kept: the standby ends at | {} |\n\
             | WAL the primary had written up to | {} |\n\
             | lost window | {} bytes ({} .. {}) |\n\
             | bytes of the last segment kept / discarded | {} / {} |\n\
             | timeline | {} -> {} |\n\
             | failover time | {:.3} s |\n",
            self.acked,
            self.kept,
            self.lost,
            if self.gap_free { "yes" } else { "NO" },
            self.cut,
            self.primary_end,
            window,
            self.cut,
            self.primary_end,
            self.report.bytes_kept,
            self.report.bytes_discarded,
            self.report.old_timeline,
            self.report
                .new_timeline
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
            self.report.seconds,
        )
    }
}
