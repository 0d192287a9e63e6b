//! Helpers for pvstack's integration tests: finding the binaries that
//! `cargo build --workspace --bins` made for the same profile as the test,
//! running them with a generous timeout (so a hang fails instead of
//! blocking forever), and reading the guest's `RESULT` lines.

pub mod api_vm;
pub mod blk_process;
pub mod blk_vm;
pub mod inject;
pub mod nested;
pub mod net;
pub mod other_user;
pub mod process;
pub mod qemu;
pub mod qsd;
pub mod vhost_frontend;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Longest a pvstack run in a test may take before it counts as hung.
/// Not a performance limit: every test run finishes in well under a second.
pub const HANG_TIMEOUT: Duration = Duration::from_secs(120);

/// target/<profile>/, found from the running test executable
/// (target/<profile>/deps/<test>-<hash>).
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// A binary of the workspace, built for the test's profile. Panics with the
/// build command if it is missing.
pub fn binary(name: &str) -> PathBuf {
    let dir = target_profile_dir();
    let path = dir.join(name);
    if !path.is_file() {
        let release = if dir.ends_with("release") {
            " --release"
        } else {
            ""
        };
        panic!(
            "{} is missing: build it first with `cargo build --workspace --bins{release}`",
            path.display()
        );
    }
    path
}

/// The pvstack VMM binary.
pub fn pvstack() -> PathBuf {
    binary("pvstack")
}

/// The guest image, as a standalone ELF (for `--kernel`).
pub fn guest_image() -> PathBuf {
    binary("pvstack-guest")
}

/// What a finished process left behind.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The exit code; panics (with the output) if a signal killed it.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {self:#?}"))
    }

    /// The `RESULT <workload> key=value ...` line's values, panicking with
    /// the whole output if there is none.
    pub fn result(&self, workload: &str) -> BTreeMap<String, String> {
        parse_result(&self.stdout, workload)
            .unwrap_or_else(|| panic!("no `RESULT {workload}` line in the output: {self:#?}"))
    }

    /// A value of the `RESULT` line as text.
    fn result_value(&self, workload: &str, key: &str) -> String {
        self.result(workload)
            .remove(key)
            .unwrap_or_else(|| panic!("RESULT {workload} has no {key}: {self:#?}"))
    }

    /// A numeric value of the `RESULT` line, for rates and comparisons
    /// that need no more than f64's 53 bits; counts and checksums go
    /// through [`result_u64`](Self::result_u64).
    pub fn result_number(&self, workload: &str, key: &str) -> f64 {
        let text = self.result_value(workload, key);
        parse_number(&text).unwrap_or_else(|| panic!("{key}={text} is not a number: {self:#?}"))
    }

    /// An integer value of the `RESULT` line (decimal or `0x` hex), exactly:
    /// for counts and 64-bit checksums such as `fnv=0x...`.
    pub fn result_u64(&self, workload: &str, key: &str) -> u64 {
        let text = self.result_value(workload, key);
        parse_u64(&text).unwrap_or_else(|| panic!("{key}={text} is not an integer: {self:#?}"))
    }

    /// Asserts exit status `code` and stderr ending in the process's one
    /// `PROGRAM: error: ...` line, which contains every one of `needles`.
    pub fn assert_error(&self, program: &str, code: i32, needles: &[&str]) {
        assert_eq!(self.code(), code, "{self:#?}");
        let prefix = format!("{program}: error: ");
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .collect();
        assert_eq!(errors.len(), 1, "one {program} error line: {self:#?}");
        assert_eq!(self.stderr.lines().last(), Some(errors[0]), "{self:#?}");
        for needle in needles {
            assert!(errors[0].contains(needle), "{needle:?} missing: {self:#?}");
        }
    }

    /// Asserts that stderr is one line (nothing but the error was printed).
    pub fn assert_stderr_one_line(&self) {
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "one line expected: {self:#?}"
        );
    }
}

/// Asserts that pvstack failed before its guest ran: exit status `code`,
/// nothing on stdout, and stderr ending in its one `pvstack: error:` line,
/// which contains every one of `needles`.
pub fn assert_pvstack_error(run: &Finished, code: i32, needles: &[&str]) {
    run.assert_error("pvstack", code, needles);
    assert!(run.stdout.is_empty(), "the guest never ran: {run:#?}");
}

/// Parses a RESULT value: decimal integer, decimal with a dot, or `0x` hex.
pub fn parse_number(text: &str) -> Option<f64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok().map(|v| v as f64),
        None => text.parse().ok(),
    }
}

/// Parses an integer RESULT value exactly: decimal or `0x` hex.
pub fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// The values of the first `RESULT <workload> ...` line in `output`.
pub fn parse_result(output: &str, workload: &str) -> Option<BTreeMap<String, String>> {
    output.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next() != Some("RESULT") || words.next() != Some(workload) {
            return None;
        }
        Some(
            words
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    })
}

/// Runs `command` to completion, capturing its output; kills it and
/// panics if it is still running after [`HANG_TIMEOUT`].
pub fn run_to_end(command: &mut Command) -> Finished {
    run_to_end_within(command, HANG_TIMEOUT)
}

/// [`run_to_end`] with another hang timeout, for commands that are slow by
/// nature (a whole VM under software emulation).
pub fn run_to_end_within(command: &mut Command, hang_timeout: Duration) -> Finished {
    let (mut child, output) = Captured::spawn(command);
    let status = wait_or_kill_after(&mut child, hang_timeout);
    output.finish(command, status, hang_timeout)
}

/// As [`run_to_end`], also returning the CPU time (user and system) the
/// process used, with that of the children it waited for, from wait4(2).
pub fn run_to_end_counting_cpu(command: &mut Command) -> (Finished, Duration) {
    let (mut child, output) = Captured::spawn(command);
    let waited = wait4_or_kill(&mut child);
    let cpu = waited.map_or(Duration::ZERO, |(_, cpu)| cpu);
    let status = waited.map(|(status, _)| status);
    (output.finish(command, status, HANG_TIMEOUT), cpu)
}

/// The output of a child being read, into strings, as it runs.
struct Captured {
    stdout: thread::JoinHandle<String>,
    stderr: thread::JoinHandle<String>,
}

impl Captured {
    /// Starts `command` with no stdin and its stdout and stderr read.
    fn spawn(command: &mut Command) -> (Child, Captured) {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let stdout = drain(child.stdout.take().expect("stdout is piped"));
        let stderr = drain(child.stderr.take().expect("stderr is piped"));
        (child, Captured { stdout, stderr })
    }

    /// What the child left, once it ended with `status`; panics if it
    /// did not (`None`: killed after `hang_timeout`).
    fn finish(
        self,
        command: &Command,
        status: Option<ExitStatus>,
        hang_timeout: Duration,
    ) -> Finished {
        let stdout = self.stdout.join().expect("stdout reader");
        let stderr = self.stderr.join().expect("stderr reader");
        let Some(status) = status else {
            panic!("{command:?} still ran after {hang_timeout:?}; killed it. stdout: {stdout} stderr: {stderr}");
        };
        Finished {
            status,
            stdout,
            stderr,
        }
    }
}

/// Polls `ready` every 10 ms until it holds; panics after
/// [`HANG_TIMEOUT`] (a hang, not a timing requirement).
pub fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < HANG_TIMEOUT,
            "{what}: still waiting after {HANG_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child`; kills it and returns `None` if it still runs after
/// [`HANG_TIMEOUT`].
pub fn wait_or_kill(child: &mut Child) -> Option<ExitStatus> {
    wait_or_kill_after(child, HANG_TIMEOUT)
}

/// Waits for `child`; kills it and returns `None` if it still runs after
/// `hang_timeout`.
pub fn wait_or_kill_after(child: &mut Child, hang_timeout: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waitpid works") {
            return Some(status);
        }
        if started.elapsed() > hang_timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// As [`wait_or_kill`], reaping `child` with wait4(2) to learn the CPU
/// time it and its waited-for children used. `child` must not be waited
/// for (or signalled) again afterwards: std does not know it is reaped.
fn wait4_or_kill(child: &mut Child) -> Option<(ExitStatus, Duration)> {
    use std::os::unix::process::ExitStatusExt;
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    let started = Instant::now();
    // Set once the child has been killed for hanging: then reap it,
    // blocking, and report the hang.
    let mut hung = false;
    loop {
        let mut status = 0;
        // SAFETY: all-zero is a valid rusage, which wait4 then fills.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let flags = if hung { 0 } else { libc::WNOHANG };
        // SAFETY: wait4 on our own unreaped child, writing into the two
        // locals.
        let rc = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
        if rc == pid {
            let seconds = |t: libc::timeval| {
                Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
            };
            let cpu = seconds(usage.ru_utime) + seconds(usage.ru_stime);
            return (!hung).then(|| (ExitStatus::from_raw(status), cpu));
        }
        assert_eq!(rc, 0, "wait4({pid}): {}", std::io::Error::last_os_error());
        if started.elapsed() > HANG_TIMEOUT {
            let _ = child.kill();
            hung = true;
        } else {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Sends `signal` to `child` (which must not be reaped yet), panicking if
/// kill(2) fails.
pub fn send_signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped,
    // so the pid cannot belong to another process.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// `pvstack ARGS...` with logging at `warn` (so stderr holds only what
/// matters), run to completion.
pub fn run_pvstack(args: &[&str]) -> Finished {
    run_to_end(Command::new(pvstack()).args(args).env("RUST_LOG", "warn"))
}

/// A fresh directory for one test's files, removed on drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(test: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("pvstack-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("can create a scratch dir");
        ScratchDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_parsed() {
        let out = "hello\nRESULT blk-verify bytes=67108864 mismatches=0 fnv=0x00000000000000ff rate=1.5\n";
        let values = parse_result(out, "blk-verify").unwrap();
        assert_eq!(values["bytes"], "67108864");
        assert_eq!(parse_number(&values["fnv"]), Some(255.0));
        assert_eq!(parse_number(&values["rate"]), Some(1.5));
        assert_eq!(parse_u64("0xfedcba9876543211"), Some(0xfedc_ba98_7654_3211));
        assert_eq!(parse_u64(&values["bytes"]), Some(67108864));
        assert_eq!(parse_u64(&values["rate"]), None);
        assert!(parse_result(out, "blk").is_none());
    }

    #[test]
    fn checksums_are_read_with_all_64_bits() {
        let run = Finished {
            status: std::os::unix::process::ExitStatusExt::from_raw(0),
            stdout: "RESULT blk-checksum bytes=1 fnv=0xab6b6eb07c6b9f71\n".to_string(),
            stderr: String::new(),
        };
        assert_eq!(run.result_u64("blk-checksum", "fnv"), 0xab6b_6eb0_7c6b_9f71);
    }

    #[test]
    fn cpu_time_of_a_busy_child_is_counted_and_of_a_sleeping_one_not() {
        let (busy, busy_cpu) = run_to_end_counting_cpu(Command::new("sh").args([
            "-c",
            "i=0; while [ $i -lt 50000 ]; do i=$((i+1)); done; echo $i; exit 4",
        ]));
        assert_eq!((busy.code(), busy.stdout.as_str()), (4, "50000\n"));
        let (sleeper, sleeper_cpu) = run_to_end_counting_cpu(Command::new("sleep").arg("0.3"));
        assert_eq!(sleeper.code(), 0);
        // The loop's work is fixed, so its CPU time does not depend on
        // the machine's load; sleep's is next to nothing.
        assert!(
            busy_cpu > 10 * sleeper_cpu && busy_cpu > Duration::from_millis(20),
            "busy {busy_cpu:?}, sleeping {sleeper_cpu:?}"
        );
    }

    #[test]
    fn output_and_status_are_captured() {
        let finished =
            run_to_end(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]));
        assert_eq!(finished.code(), 3);
        assert_eq!(
            (finished.stdout.as_str(), finished.stderr.as_str()),
            ("out\n", "err\n")
        );
    }
}
