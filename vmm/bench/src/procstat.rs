//! CPU time of a process and its children, from /proc/<pid>/stat.

use std::fs;

/// utime + stime of `pid`, in clock ticks; `None` if it is gone.
fn ticks(pid: u32) -> Option<(u32, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest: state(3) ppid(4) ... utime(14) stime(15), 1-based in stat(5).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// Clock ticks per second of /proc's times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// CPU seconds used so far by `pid` and its direct children (the VMM and
/// the backend processes it started).
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    let mut total = ticks(pid).map_or(0, |(_, t)| t);
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some((ppid, t)) = ticks(child) {
                if ppid == pid {
                    total += t;
                }
            }
        }
    }
    total as f64 / ticks_per_second()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPU seconds this process has used, all threads, from the kernel's
    /// own clock for it (not /proc).
    fn process_cpu_seconds() -> f64 {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec, which `now` is.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
        assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
        now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
    }

    /// However long the work takes on a busy machine, /proc shows this
    /// process's CPU time grow by as much as the kernel's CPU clock for it
    /// says it used.
    #[test]
    fn own_cpu_time_grows_with_work() {
        const WORK: f64 = 0.3;
        let me = std::process::id();
        let before = tree_cpu_seconds(me);
        let start = process_cpu_seconds();
        let mut x = 0u64;
        while process_cpu_seconds() - start < WORK {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        let after = tree_cpu_seconds(me);
        // /proc truncates utime and stime to whole clock ticks each.
        let rounding = 2.0 / ticks_per_second();
        assert!(
            after - before >= WORK - rounding,
            "{before} -> {after} after {WORK} s of work"
        );
        assert_eq!(tree_cpu_seconds(u32::MAX), 0.0);
    }
}
