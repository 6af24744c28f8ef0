//! CPU shares of the measured phase, from `/proc/stat` and `/proc/<pid>/stat` (Linux only).
//!
//! Owns: parsing those files, one [`CpuSample`] at the start and one at the end of the
//! measured phase, and turning the two into [`CpuReport`]. Every share is a percentage of the
//! whole machine (all cores = 100 %): both files count clock ticks summed over all CPUs.
//!
//! "other" is machine busy minus the tool and the listed servers, i.e. every other process
//! (builds, editors); it is clamped at 0 because the three readings are not atomic.
//! Anything unreadable (not Linux, a server PID that exited) becomes `None`, never an error.

use serde::Serialize;

/// Machine-wide tick counters from the `cpu ` line of `/proc/stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineTicks {
    /// user + nice + system + idle + iowait + irq + softirq + steal (guest time is already
    /// inside user and nice).
    pub total: u64,
    /// idle + iowait.
    pub idle: u64,
}

/// Parses the aggregate `cpu ` line of a `/proc/stat` text.
pub fn parse_proc_stat(text: &str) -> Option<MachineTicks> {
    let line = text.lines().find(|line| line.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(|field| field.parse().ok()).collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    let total = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some(MachineTicks { total, idle })
}

/// Parses utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` text. The command name
/// (field 2) is in parentheses and may contain spaces, so fields are counted after the last `)`.
pub fn parse_pid_stat(text: &str) -> Option<u64> {
    let after_name = &text[text.rfind(')')? + 1..];
    // After the name: field 3 (state) is index 0, so fields 14 and 15 are indices 11 and 12.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn read_machine() -> Option<MachineTicks> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn read_pid(pid: &str) -> Option<u64> {
    parse_pid_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Counters at one instant.
#[derive(Clone, Debug)]
pub struct CpuSample {
    machine: MachineTicks,
    tool_ticks: Option<u64>,
    server_ticks: Vec<(u32, Option<u64>)>,
}

impl CpuSample {
    /// Reads the counters now; `None` when `/proc/stat` is unreadable (not Linux).
    pub fn take(server_pids: &[u32]) -> Option<CpuSample> {
        let machine = read_machine()?;
        let tool_ticks = read_pid("self");
        let server_ticks = server_pids.iter().map(|&pid| (pid, read_pid(&pid.to_string()))).collect();
        Some(CpuSample { machine, tool_ticks, server_ticks })
    }
}

/// One server process's share.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ServerCpu {
    pub pid: u32,
    /// `None` when the process could not be read at start or end.
    pub pct: Option<f64>,
}

/// CPU shares over the measured phase, each a percentage of the whole machine.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CpuReport {
    /// Number of CPUs the percentages are spread over (100 % = all of them busy).
    pub cpus: usize,
    pub machine_busy_pct: f64,
    /// The `floe bench` process itself.
    pub tool_pct: Option<f64>,
    /// Sum over `--server-pids` that could be read (0 when none were given).
    pub servers_pct: f64,
    pub servers: Vec<ServerCpu>,
    /// machine busy − tool − servers, at least 0: other processes (builds, editors ...).
    pub other_pct: f64,
}

fn pct(ticks: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * ticks as f64 / total as f64
    }
}

/// The shares between two samples.
pub fn shares(start: &CpuSample, end: &CpuSample) -> CpuReport {
    let total = end.machine.total.saturating_sub(start.machine.total);
    let idle = end.machine.idle.saturating_sub(start.machine.idle);
    let machine_busy_pct = pct(total.saturating_sub(idle), total);
    let delta = |a: Option<u64>, b: Option<u64>| Some(pct(b?.saturating_sub(a?), total));
    let tool_pct = delta(start.tool_ticks, end.tool_ticks);
    let servers: Vec<ServerCpu> = start
        .server_ticks
        .iter()
        .zip(&end.server_ticks)
        .map(|(&(pid, a), &(_, b))| ServerCpu { pid, pct: delta(a, b) })
        .collect();
    let servers_pct: f64 = servers.iter().filter_map(|server| server.pct).sum();
    let other_pct = (machine_busy_pct - tool_pct.unwrap_or(0.0) - servers_pct).max(0.0);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    CpuReport { cpus, machine_busy_pct, tool_pct, servers_pct, servers, other_pct }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_aggregate_proc_stat_line() {
        let text = "cpu  4705 356 584 3699 23 0 23 5 7 0\ncpu0 1393 280 290 1799 12 0 20 0 0 0\nintr 1 2\n";
        let ticks = parse_proc_stat(text).unwrap();
        assert_eq!(ticks.total, 4705 + 356 + 584 + 3699 + 23 + 23 + 5, "guest (7) is inside user");
        assert_eq!(ticks.idle, 3699 + 23);
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4\n"), None, "only the aggregate line counts");
        assert_eq!(parse_proc_stat("cpu  1 x 3 4\n"), None);
    }

    #[test]
    fn parses_pid_stat_with_spaces_in_the_name() {
        let text = "4242 (floe (dev) x) S 1 4242 4242 0 -1 4194560 1500 0 0 0 250 50 0 0 20 0 12 0 100 0 0";
        assert_eq!(parse_pid_stat(text), Some(300));
        assert_eq!(parse_pid_stat("4242 (floe) S 1"), None);
    }

    #[test]
    fn shares_are_percentages_of_the_machine() {
        let start = CpuSample {
            machine: MachineTicks { total: 1000, idle: 500 },
            tool_ticks: Some(10),
            server_ticks: vec![(7, Some(100)), (8, None)],
        };
        let end = CpuSample {
            machine: MachineTicks { total: 1200, idle: 540 },
            tool_ticks: Some(40),
            server_ticks: vec![(7, Some(200)), (8, Some(5))],
        };
        let report = shares(&start, &end);
        assert_eq!(report.machine_busy_pct, 80.0);
        assert_eq!(report.tool_pct, Some(15.0));
        assert_eq!(report.servers, vec![ServerCpu { pid: 7, pct: Some(50.0) }, ServerCpu { pid: 8, pct: None }]);
        assert_eq!(report.servers_pct, 50.0);
        assert_eq!(report.other_pct, 15.0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_machine() {
        let sample = CpuSample::take(&[std::process::id()]).expect("/proc/stat on Linux");
        assert!(sample.tool_ticks.is_some());
        assert!(sample.server_ticks[0].1.is_some());
    }
}
