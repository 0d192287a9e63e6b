//! One measurement: a child `pvstack run` with one device in one mode
//! running one workload, and what it reported.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;

use super::procstat::tree_cpu_seconds;
use crate::error::{Error, Result};
use crate::running;

/// Guest RAM of every benchmark VM.
const GUEST_MEMORY: &str = "256M";

/// What one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub ios: u64,
    pub bytes: u64,
    pub iops: f64,
    pub mbps: f64,
    /// VM exits to the VMM per request (the guest's COUNTERS hypercall);
    /// `None` where the workload does not report them (`net-bench`).
    pub exits_per_req: Option<f64>,
    /// Doorbell kicks per request (the guest driver's count); `None` for
    /// the host row (no VM).
    pub kicks_per_req: Option<f64>,
    /// Interrupts raised per request, where the device that raises them
    /// reports a count (see `Summary::interrupts_note`).
    pub interrupts_per_req: Option<f64>,
    /// CPU seconds of the VMM and its backend processes per GiB moved,
    /// over the measured interval.
    pub cpu_s_per_gib: f64,
}

/// One child `pvstack run` of a benchmark workload.
pub struct VmRun<'a> {
    pub pvstack: &'a Path,
    pub kernel: Option<&'a Path>,
    /// Network namespace to run it in (with `ip netns exec`), if any.
    pub netns: Option<&'a str>,
    /// Device options, e.g. `--blk image=...`.
    pub devices: Vec<OsString>,
    pub guest_args: String,
    /// The console line (prefix) the guest prints when it starts measuring.
    pub started: &'a str,
    /// The RESULT line prefix it reports with.
    pub result: &'a str,
    /// The mode and workload, for error messages.
    pub what: String,
    /// A backend process the benchmark started for this VM, whose CPU
    /// time counts with the VM's.
    pub backend_pid: Option<u32>,
}

/// What a [`VmRun`] printed and used.
pub struct VmOutput {
    /// The guest's RESULT line.
    pub result: String,
    /// CPU seconds of the VMM and its children between the start line and
    /// the RESULT line.
    pub cpu_seconds: f64,
    /// The VMM's log (stderr).
    pub log: String,
}

impl VmRun<'_> {
    /// The error for this run.
    pub fn failed(&self, reason: String) -> Error {
        Error::Bench {
            what: self.what.clone(),
            reason,
        }
    }

    /// Runs it to the end; its RESULT line, CPU time and log.
    pub fn run(&self) -> Result<VmOutput> {
        let mut command = match self.netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns]).arg(self.pvstack);
                command
            }
            None => Command::new(self.pvstack),
        };
        command
            .arg("run")
            .args(["--memory", GUEST_MEMORY])
            .args(&self.devices)
            .arg("--guest-args")
            .arg(&self.guest_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(kernel) = self.kernel {
            command.arg("--kernel").arg(kernel);
        }
        let failed = |reason: String| self.failed(reason);
        let mut child = running::spawn(&mut command)
            .map_err(|e| failed(format!("cannot start {}: {e}", self.pvstack.display())))?;
        // `ip netns exec` execs the program, so this is pvstack's pid.
        let pid = child.id();
        let cpu_now = || tree_cpu_seconds(pid) + self.backend_pid.map_or(0.0, tree_cpu_seconds);
        let mut stderr = child
            .stderr
            .take()
            .ok_or_else(|| failed("no stderr pipe".to_string()))?;
        let stderr_reader = std::thread::spawn(move || {
            let mut text = String::new();
            // A read error only loses log lines; the run's result comes from stdout.
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| failed("no stdout pipe".to_string()))?;
        // CPU time is sampled when the guest starts measuring (just after it
        // prints its device line) and when it reports, so boot and teardown
        // are left out.
        let mut cpu_start = None;
        let mut cpu_end = None;
        let mut result = None;
        let mut console = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with(self.started) {
                cpu_start = Some(cpu_now());
            } else if line.starts_with(self.result) {
                cpu_end = Some(cpu_now());
                result = Some(line.clone());
            }
            console.push(line);
        }
        let status = running::wait(&mut child);
        let log = stderr_reader.join().unwrap_or_default();
        let status = status.map_err(|e| failed(format!("cannot wait for pvstack run: {e}")))?;
        if !status.success() {
            let last = log
                .lines()
                .chain(console.iter().map(String::as_str))
                .rfind(|l| l.contains("error") || l.contains("PANIC"))
                .unwrap_or("no error message");
            return Err(failed(format!(
                "pvstack run ended with {status}: {last}\n{}",
                log_tail(&log)
            )));
        }
        let result =
            result.ok_or_else(|| failed("the guest printed no RESULT line".to_string()))?;
        let cpu_seconds = match (cpu_start, cpu_end) {
            (Some(start), Some(end)) => end - start,
            _ => {
                return Err(failed(format!(
                    "the guest printed no {:?} line",
                    self.started
                )))
            }
        };
        Ok(VmOutput {
            result,
            cpu_seconds,
            log,
        })
    }
}

/// The value of `key=` in a RESULT line.
pub fn field(line: &str, key: &str) -> std::result::Result<f64, String> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .ok_or_else(|| format!("RESULT line lacks {key}=: {line}"))?
        .parse()
        .map_err(|_| format!("RESULT line has a bad {key}=: {line}"))
}

/// CPU seconds per GiB of `bytes` moved (0 if nothing moved).
pub fn cpu_s_per_gib(cpu_seconds: f64, bytes: u64) -> f64 {
    let gib = bytes as f64 / f64::from(1u32 << 30);
    if gib > 0.0 {
        cpu_seconds / gib
    } else {
        0.0
    }
}

/// A disk sample from blk-bench's RESULT line.
pub fn parse_sample(
    line: &str,
    cpu_seconds: f64,
    interrupts_per_req: Option<f64>,
) -> std::result::Result<Sample, String> {
    let errors = field(line, "errors")?;
    if errors != 0.0 {
        return Err(format!("{errors} requests failed: {line}"));
    }
    let bytes = field(line, "bytes")? as u64;
    Ok(Sample {
        ios: field(line, "ios")? as u64,
        bytes,
        iops: field(line, "iops")?,
        mbps: field(line, "mbps")?,
        exits_per_req: Some(field(line, "exits_per_req")?),
        kicks_per_req: Some(field(line, "kicks_per_req")?),
        interrupts_per_req,
        cpu_s_per_gib: cpu_s_per_gib(cpu_seconds, bytes),
    })
}

/// Interrupts per request from the devices' closing log lines
/// (`...: served N requests, raised M interrupts`), summed over every
/// line; `None` if no device reported.
pub fn interrupts_per_request(log: &str) -> Option<f64> {
    let mut requests = 0u64;
    let mut interrupts = 0u64;
    let mut found = false;
    for line in log.lines() {
        let Some((_, tail)) = line.split_once("served ") else {
            continue;
        };
        let words: Vec<&str> = tail.split_whitespace().collect();
        if let [n, "requests,", "raised", m, "interrupts", ..] = words.as_slice() {
            if let (Ok(n), Ok(m)) = (n.parse::<u64>(), m.parse::<u64>()) {
                requests += n;
                interrupts += m;
                found = true;
            }
        }
    }
    (found && requests > 0).then(|| interrupts as f64 / requests as f64)
}

/// The pvstack binary to run children with: this one.
pub fn current_pvstack() -> Result<PathBuf> {
    std::env::current_exe().map_err(|source| Error::File {
        action: "find the running pvstack binary",
        path: PathBuf::from("/proc/self/exe"),
        cause: source,
    })
}

/// Lines of a failed run's log shown with its error: the backends pvstack
/// started log to the same stderr, and their reason for a closed
/// connection comes before pvstack's own error line.
const LOG_TAIL_LINES: usize = 10;

/// The last [`LOG_TAIL_LINES`] lines of `log`, indented under a heading.
fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    let mut text = String::from("the end of its log:");
    for line in tail {
        text.push_str("\n    ");
        text.push_str(line);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "RESULT blk-bench rw=randread bs=4096 qd=1 queues=1 ios=22049 \
        bytes=90312704 usecs=1000028 iops=22048.382 mbps=90.310 kicks_per_req=1.000 \
        exits_per_req=1.000 errors=0";

    #[test]
    fn result_line_becomes_a_sample() {
        let sample = parse_sample(LINE, 0.5, Some(0.25)).unwrap();
        assert_eq!((sample.ios, sample.bytes), (22049, 90312704));
        assert_eq!(sample.iops, 22048.382);
        assert_eq!(sample.kicks_per_req, Some(1.0));
        let gib = 90312704.0 / f64::from(1u32 << 30);
        assert!((sample.cpu_s_per_gib - 0.5 / gib).abs() < 1e-9);
        assert_eq!(sample.interrupts_per_req, Some(0.25));
        assert!(
            parse_sample(&LINE.replace("errors=0", "errors=2"), 0.5, None)
                .unwrap_err()
                .contains("2 requests failed")
        );
        assert!(parse_sample("RESULT blk-bench ios=1", 0.5, None)
            .unwrap_err()
            .contains("lacks errors="));
    }

    #[test]
    fn interrupt_counts_from_device_log_lines() {
        let log = "[INFO pvstack] blk0: served 100 requests, raised 4 interrupts\n\
                   [INFO pvstack-blk x.sock] queue 0: served 100 requests, raised 6 interrupts\n\
                   unrelated line\n";
        assert_eq!(interrupts_per_request(log), Some(0.05));
        assert_eq!(interrupts_per_request("nothing here"), None);
    }

    #[test]
    fn a_failed_runs_error_shows_the_end_of_its_log() {
        let log: String = (1..=12).map(|n| format!("line {n}\n")).collect();
        let tail = log_tail(&log);
        assert!(tail.starts_with("the end of its log:"), "{tail}");
        assert!(
            tail.contains("\n    line 3\n") && tail.ends_with("    line 12"),
            "{tail}"
        );
        assert!(!tail.contains("line 2\n"), "{tail}");
        assert_eq!(log_tail("one\n"), "the end of its log:\n    one");
    }
}
