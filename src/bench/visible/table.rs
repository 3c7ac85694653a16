//! `bench --visible`'s report (visible.md): the table of both rigs, the
//! profile (where a commit's time goes, stage by stage; what the WAL's path
//! costs and waits for the CPU under pgbench) and the targets' verdicts.

use super::{Percentiles, RigResult};
use crate::bench::procs::WindowUse;

fn lat(p: &Option<Percentiles>) -> String {
    p.as_ref()
        .map(|p| format!("{:.1} / {:.1} / {:.1}", p.p50, p.p99, p.max))
        .unwrap_or_else(|| "-".into())
}

fn p50(p: &Option<Percentiles>) -> String {
    p.as_ref()
        .map(|p| format!("{:.2}", p.p50))
        .unwrap_or_else(|| "-".into())
}

/// "label 0.15%, label 0.05%": the standby host's processes' CPU.
fn standby_cpu(w: &WindowUse) -> String {
    w.processes
        .iter()
        .filter(|p| p.standby_host)
        .map(|p| format!("{} {:.2}%", p.process, p.cpu_pct))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The tables, the profile and the targets, as markdown.
pub fn table(rs: &[RigResult]) -> String {
    let mut s = String::from(
        "| rig | segment | commit-to-visible idle, ms (p50 / p99 / max) | under pgbench -c 4 | standby host CPU idle, segment start / near its end | under pgbench | standby log lines at idle |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rs {
        s.push_str(&format!(
            "| {} | {} MB | {} | {} | {:.2}% / {:.2}% | {:.1}% | {} |\n",
            r.rig,
            r.segment_mb,
            lat(&r.visible_idle_ms),
            lat(&r.visible_pgbench_ms),
            r.cpu_idle_segment_start,
            r.cpu_idle_segment_end,
            r.cpu_pgbench,
            r.standby_log_lines_idle
        ));
    }
    s.push_str("\nCPU by process at idle, % of a core (segment start; near its end):\n\n");
    for r in rs {
        s.push_str(&format!(
            "- {} ({} MB): {}; {}\n",
            r.rig,
            r.segment_mb,
            standby_cpu(&r.idle_start),
            standby_cpu(&r.idle_end)
        ));
    }
    s.push_str("\nProfile, stage by stage: ms from the commit (p50) until the commit's WAL is on disk in the spool (stream rig: ship, then receive's fdatasync), on the standby's disk (its walreceiver's flush, `pg_last_wal_receive_lsn()`), and visible (replayed; each stage is seen by the probe's poll, every 0.2 ms plus a query's round trip):\n\n");
    s.push_str("| rig | segment | idle: in the spool / on the standby's disk / visible | under pgbench -c 4 |\n|---|---|---|---|\n");
    for r in rs {
        s.push_str(&format!(
            "| {} | {} MB | {} / {} / {} | {} / {} / {} |\n",
            r.rig,
            r.segment_mb,
            p50(&r.durable_idle_ms),
            p50(&r.received_idle_ms),
            p50(&r.visible_idle_ms),
            p50(&r.durable_pgbench_ms),
            p50(&r.received_pgbench_ms),
            p50(&r.visible_pgbench_ms),
        ));
    }
    s.push_str("\nUnder pgbench -c 4, the processes on the WAL's path, both hosts (they share this machine's CPUs with the primary's backends and pgbench): CPU, % of a core / time runnable but waiting for a CPU, % of the window:\n\n");
    for r in rs {
        let procs = r
            .pgbench
            .processes
            .iter()
            .map(|p| format!("{} {:.1}% / {:.1}%", p.process, p.cpu_pct, p.runqueue_pct))
            .collect::<Vec<_>>()
            .join(", ");
        let wait: f64 = r.pgbench.processes.iter().map(|p| p.runqueue_pct).sum();
        s.push_str(&format!(
            "- {} ({} MB): {procs}; run-queue wait summed {wait:.1}%; machine busy {:.0}%\n",
            r.rig, r.segment_mb, r.pgbench.machine_busy_pct
        ));
    }
    s.push_str("\nTargets:\n\n");
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    for pair in rs.chunks(2) {
        let [w, n] = pair else { continue };
        let seg = w.segment_mb;
        for (what, a, b) in [
            ("idle", &w.visible_idle_ms, &n.visible_idle_ms),
            (
                "under pgbench -c 4",
                &w.visible_pgbench_ms,
                &n.visible_pgbench_ms,
            ),
        ] {
            if let (Some(a), Some(b)) = (a, b) {
                let ratio = a.p50 / b.p50.max(0.001);
                s.push_str(&format!(
                    "- {seg} MB, commit-to-visible p50 {what}: stream {:.1} ms vs native {:.1} ms ({ratio:.2}x; target within 2x): {}\n",
                    a.p50,
                    b.p50,
                    verdict(ratio <= 2.0)
                ));
            }
        }
        // Window by window (one clock tick in a 20 s window is 0.05 %: the
        // floor of a ratio's denominator).
        let ratio = |a: f64, b: f64| a / b.max(0.05);
        let (rs, re) = (
            ratio(w.cpu_idle_segment_start, n.cpu_idle_segment_start),
            ratio(w.cpu_idle_segment_end, n.cpu_idle_segment_end),
        );
        let idle_w = w.cpu_idle_segment_start.max(w.cpu_idle_segment_end);
        s.push_str(&format!(
            "- {seg} MB, standby host CPU idle (segment start; near its end): stream {:.2}%; {:.2}% vs native {:.2}%; {:.2}% ({rs:.1}x; {re:.1}x; target within 2x): {}; under 1% of a core: {}\n",
            w.cpu_idle_segment_start,
            w.cpu_idle_segment_end,
            n.cpu_idle_segment_start,
            n.cpu_idle_segment_end,
            verdict(rs <= 2.0 && re <= 2.0),
            verdict(idle_w < 1.0)
        ));
        s.push_str(&format!(
            "- {seg} MB, standby log lines at idle: {} (target 0): {}\n",
            w.standby_log_lines_idle,
            verdict(w.standby_log_lines_idle == 0)
        ));
    }
    s
}
