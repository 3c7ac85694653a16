//! What the processes of a `bench --visible` rig cost over a window, read
//! from `/proc`: CPU (utime + stime, plus cutime + cstime: the children a
//! process waited for, such as restore_command's), and the time they were
//! runnable but waited for a CPU (`/proc/<pid>/task/*/schedstat`, second
//! field, summed over threads), with the whole machine's busy share
//! (`/proc/stat`). Also: finding a standby's startup process and
//! walreceiver among its postmaster's children.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

/// CPU seconds and run-queue seconds of one process so far.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    cpu_s: f64,
    wait_s: f64,
}

fn usage(pid: u32) -> Usage {
    let mut wait_ns = 0u64;
    if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in d.flatten() {
            let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            wait_ns += s
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Usage {
        cpu_s: crate::pg::process::proc_cpu_seconds(pid, true),
        wait_s: wait_ns as f64 / 1e9,
    }
}

/// (busy, total) clock ticks of every CPU since boot, from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// One process over a window.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessUse {
    pub process: String,
    /// Percent of one core.
    pub cpu_pct: f64,
    /// Percent of the window spent runnable, waiting for a CPU.
    pub runqueue_pct: f64,
    /// Whether it runs on the standby's host (set by the caller).
    pub standby_host: bool,
}

/// Every watched process over a window, and the machine.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WindowUse {
    pub processes: Vec<ProcessUse>,
    /// Percent of all the machine's CPUs that were busy.
    pub machine_busy_pct: f64,
}

impl WindowUse {
    /// CPU of every process, summed (percent of one core).
    pub fn cpu_pct(&self) -> f64 {
        self.processes.iter().map(|p| p.cpu_pct).sum()
    }

    /// CPU of the standby host's processes, summed (percent of one core).
    pub fn standby_cpu_pct(&self) -> f64 {
        self.processes
            .iter()
            .filter(|p| p.standby_host)
            .map(|p| p.cpu_pct)
            .sum()
    }
}

/// Watches `procs` (label, pid) for `window`.
pub async fn over(procs: &[(String, u32)], window: Duration) -> WindowUse {
    let before: Vec<Usage> = procs.iter().map(|p| usage(p.1)).collect();
    let m0 = machine_ticks();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t0.elapsed().as_secs_f64();
    let m1 = machine_ticks();
    let processes = procs
        .iter()
        .zip(before)
        .map(|((l, pid), b)| {
            let a = usage(*pid);
            ProcessUse {
                process: l.clone(),
                cpu_pct: (a.cpu_s - b.cpu_s).max(0.0) / secs * 100.0,
                runqueue_pct: (a.wait_s - b.wait_s).max(0.0) / secs * 100.0,
                standby_host: false,
            }
        })
        .collect();
    let (busy, total) = (m1.0.saturating_sub(m0.0), m1.1.saturating_sub(m0.1));
    WindowUse {
        processes,
        machine_busy_pct: if total == 0 {
            0.0
        } else {
            busy as f64 / total as f64 * 100.0
        },
    }
}

/// The startup process and walreceiver of the server whose data directory
/// is `data`: (label, pid), found among its postmaster's children.
pub fn standby_processes(data: &Path) -> Vec<(String, u32)> {
    let mut v = Vec::new();
    let pm: u32 = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse().ok())
        .unwrap_or(0);
    if pm == 0 {
        return v;
    }
    let Ok(d) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in d.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid: u32 = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        if ppid != pm {
            continue;
        }
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        for what in ["startup", "walreceiver"] {
            if cmd.contains(what) {
                v.push((format!("postgres {what}"), pid));
            }
        }
    }
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_busy_thread_shows_as_cpu_and_the_machine_as_busy() {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let spin = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        let me = vec![("me".to_string(), std::process::id())];
        let w = over(&me, Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spin.join().unwrap();
        assert!(w.cpu_pct() > 50.0, "a spinning thread used {w:?}");
        assert!(w.machine_busy_pct > 0.0, "{w:?}");
        assert!(w.processes[0].runqueue_pct >= 0.0);
    }
}
