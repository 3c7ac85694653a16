//! The bench's report: the markdown tables (`bench.md`, the README's) and
//! the targets, each printed as met or missed with its ratio and
//! the figures it was judged on.
//!
//! Targets, for waltail with its defaults against streaming replication in
//! the same run: commit-to-durable p50 within 1.2x idle and under pgbench,
//! p99 within 2x; idle CPU of ship plus its backend under 0.5% of a core;
//! catch-up at least streaming's; in the SIGKILL trials, the most WAL lost
//! at most streaming's most plus one commit-to-durable latency's worth of
//! WAL (the p50 under pgbench, at the fastest WAL rate of the trials).

use super::{Latency, Method, MethodResult};

fn lat(l: &Option<Latency>) -> String {
    match l {
        Some(l) => format!("{:.1} / {:.1} / {:.1}", l.p50_ms, l.p99_ms, l.max_ms),
        None => "-".into(),
    }
}

fn num(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into())
}

/// Idle CPU of one method: per process, and the sum.
fn cpu(r: &MethodResult) -> String {
    if r.idle_cpu.is_empty() {
        return "-".into();
    }
    let total: f64 = r.idle_cpu.iter().map(|c| c.pct).sum();
    let each = r
        .idle_cpu
        .iter()
        .map(|c| format!("{} {:.2}", c.process, c.pct))
        .collect::<Vec<_>>()
        .join(", ");
    format!("{total:.2} ({each})")
}

/// The markdown report: latency, CPU and ceiling; visibility and loss; targets.
pub fn table(rs: &[MethodResult]) -> String {
    let mut s = String::from(
        "| method | commit-to-durable idle, ms (p50 / p99 / max) | under pgbench -c 4, ms (p50 / p99 / max) | idle CPU, % of a core: total (each process) | bulk: WAL durable MB/s | catch-up MB/s | CPU s per GB, peak RSS |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rs {
        let cost = r
            .cost
            .iter()
            .map(|c| {
                format!(
                    "{}: {:.1} s/GB, {:.0} MB",
                    c.process, c.cpu_s_per_gb, c.peak_rss_mb
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.label,
            lat(&r.idle),
            lat(&r.pgbench),
            cpu(r),
            num(r.bulk_mb_s),
            num(r.catch_up_mb_s),
            if cost.is_empty() { "-".into() } else { cost }
        ));
    }
    s.push_str(
        "\n| method | commit-to-visible idle, ms (p50 / p99 / max) | under pgbench -c 4, ms | SIGKILL trials | bytes lost (median / max) | commits lost (median / max) | real failover: commits primary / standby |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rs {
        let (trials, bytes, commits, check) = match &r.loss {
            Some(l) => (
                l.trials.len().to_string(),
                format!("{} / {}", l.median_bytes, l.max_bytes),
                format!("{} / {}", l.median_commits, l.max_commits),
                l.failover_check
                    .as_ref()
                    .map(|c| {
                        format!(
                            "{} / {} (WAL count: {} lost)",
                            c.primary_commits, c.standby_commits, c.lost_commits_by_wal
                        )
                    })
                    .unwrap_or_else(|| "-".into()),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {trials} | {bytes} | {commits} | {check} |\n",
            r.label,
            lat(&r.idle_visible),
            lat(&r.pgbench_visible),
        ));
    }
    s.push('\n');
    s.push_str(&targets(rs));
    s
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "missed"
    }
}

/// The targets (see the module header), each with its figures.
pub fn targets(rs: &[MethodResult]) -> String {
    let find = |m: Method| rs.iter().find(|r| r.method == m);
    let mut s =
        String::from("Targets (waltail with its defaults vs streaming replication, same run):\n\n");
    let (Some(w), Some(st)) = (find(Method::WALTAIL_DEFAULTS), find(Method::Streaming)) else {
        s.push_str("- not judged: needs waltail with its defaults and streaming replication\n");
        return s;
    };
    for (name, a, b) in [
        ("idle", &w.idle, &st.idle),
        ("under pgbench -c 4", &w.pgbench, &st.pgbench),
    ] {
        let (Some(a), Some(b)) = (a, b) else { continue };
        for (q, x, y, within) in [
            ("p50", a.p50_ms, b.p50_ms, 1.2),
            ("p99", a.p99_ms, b.p99_ms, 2.0),
        ] {
            let ratio = x / y.max(1e-9);
            s.push_str(&format!(
                "- commit-to-durable {q} {name}: {x:.1} ms vs {y:.1} ms ({ratio:.2}x; target within {within}x): {}\n",
                verdict(ratio <= within)
            ));
        }
    }
    let part = |r: &MethodResult, p: &str| {
        r.idle_cpu
            .iter()
            .filter(|c| c.process == p)
            .map(|c| c.pct)
            .sum::<f64>()
    };
    if !w.idle_cpu.is_empty() {
        let (ship, backend, rx) = (
            part(w, "waltail ship"),
            part(w, "waltail ship backend"),
            part(w, "waltail receive"),
        );
        let streaming: f64 = st.idle_cpu.iter().map(|c| c.pct).sum();
        s.push_str(&format!(
            "- idle CPU of ship + its backend: {:.2}% of a core ({ship:.2} + {backend:.2}; receive {rx:.2}; streaming's walsender + walreceiver {streaming:.2}) over {:.0} s (target under 0.5%): {}\n",
            ship + backend,
            w.idle_cpu_window_s,
            verdict(ship + backend < 0.5)
        ));
    }
    if let (Some(a), Some(b)) = (w.catch_up_mb_s, st.catch_up_mb_s) {
        s.push_str(&format!(
            "- catch-up ceiling: {a:.0} MB/s vs {b:.0} MB/s ({:.2}x; target at least 1x): {}\n",
            a / b.max(1e-9),
            verdict(a >= b)
        ));
    }
    if let (Some(lw), Some(ls), Some(p)) = (&w.loss, &st.loss, &w.pgbench) {
        let rate = lw.trials.iter().map(|t| t.wal_mb_s).fold(0.0, f64::max);
        let allowance = (rate * f64::from(1u32 << 20) * p.p50_ms / 1000.0) as u64;
        let limit = ls.max_bytes + allowance;
        s.push_str(&format!(
            "- loss window: at most {} bytes lost in {} SIGKILL trials vs streaming's {} + one p50 commit-to-durable ({:.1} ms at up to {rate:.1} MB/s: {allowance} bytes) = {limit} ({:.2}x of the limit; target at most 1x): {}\n",
            lw.max_bytes,
            lw.trials.len(),
            ls.max_bytes,
            p.p50_ms,
            lw.max_bytes as f64 / (limit.max(1)) as f64,
            verdict(lw.max_bytes <= limit)
        ));
    }
    s
}
