//! Running pvstack under nested SVM: scripts/nested-run boots an L1 Linux
//! under QEMU in software emulation (`-cpu max` emulates AMD SVM with
//! nested paging), loads KVM there and runs a shell script in it, with
//! this profile's pvstack binaries at the same paths as here. That is the
//! VMX/SVM path (the guest at CPL0), which the host's own KVM (PVM) never
//! takes.
//!
//! A test builds the L1's script from named steps; each step's output is
//! framed by `BEGIN name` / `END name` lines followed by `STATUS name N`,
//! so the test reads each step's exit status, RESULT lines and output.
//! Booting an L1 takes seconds and everything in it runs emulated, so runs
//! are serialized within a test process and their hang timeout is long.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::prelude::{Engine, BASE64_STANDARD};

use crate::qemu::{linux_guest_assets, GuestRun};
use crate::{parse_result, run_to_end_within, target_profile_dir, Finished, ScratchDir};

/// Longest one L1 run (boot, script, power-off) may take before the
/// harness kills it, unless [`Nested::timeout`] says otherwise: a hang,
/// never a timing requirement.
const L1_TIMEOUT: Duration = Duration::from_secs(1200);

/// Shell functions every script can use.
const PRELUDE: &str = r#"
# wait_until WHAT COMMAND...: runs COMMAND every 0.1 s until it succeeds;
# gives up (status 1) after 10 minutes, which only turns a hang into a
# failure.
wait_until() {
    what=$1
    shift
    tries=0
    until "$@"; do
        tries=$((tries + 1))
        if [ "$tries" -ge 6000 ]; then
            echo "gave up waiting for $what"
            return 1
        fi
        sleep 0.1
    done
}

# running PID: whether this shell's child PID still runs (`kill -0` also
# succeeds on a child that ended and was not waited for yet).
running() {
    [ -r /proc/$1/status ] && ! grep -q '^State:.*Z' /proc/$1/status
}

# ended_or PID COMMAND...: succeeds once PID has ended or COMMAND succeeds,
# so that wait_until stops waiting for what an ended process cannot do.
ended_or() {
    pid=$1
    shift
    ! running $pid || "$@"
}
"#;

/// Where [`Nested::with_linux_guest`] puts the L2 kernel in the L1.
pub const L2_KERNEL: &str = "/l2/vmlinuz";
/// Where [`Nested::with_linux_guest`] puts the L2 initramfs in the L1.
pub const L2_INITRAMFS: &str = "/l2/initramfs.cpio.gz";

/// An L1 step that writes the L2's test script to /tmp/guest.sh and its
/// base64, what the initramfs takes in `pvtest=`, to /tmp/guest.b64.
pub fn guest_script(script: &str) -> String {
    format!(
        "cat >/tmp/guest.sh <<'GUEST'\n{script}\nGUEST\nbase64 -w0 /tmp/guest.sh >/tmp/guest.b64"
    )
}

/// The rest of the first line of `text` that starts with `prefix` (after
/// trailing whitespace is cut); panics with `text` if there is none.
pub fn line_after<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find_map(|line| line.trim_end().strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line `{prefix}...` in:\n{text}"))
}

/// One L1 runs at a time: two would share the host's cores and memory.
static L1: Mutex<()> = Mutex::new(());

/// An L1 run being put together: its script steps and extra files.
pub struct Nested {
    name: String,
    script: String,
    harness_args: Vec<String>,
    timeout: Duration,
}

impl Nested {
    /// A run named `name` (in scratch paths and messages).
    pub fn new(name: &str) -> Nested {
        Nested {
            name: name.to_string(),
            script: PRELUDE.to_string(),
            harness_args: Vec::new(),
            timeout: L1_TIMEOUT,
        }
    }

    /// Adds step `name`: `commands` (busybox sh) run in a subshell with
    /// stderr merged into stdout; the step's status is the subshell's.
    pub fn step(mut self, name: &str, commands: &str) -> Nested {
        assert!(
            !name.is_empty() && !name.contains(char::is_whitespace) && !name.contains('\''),
            "step names are single words: {name:?}"
        );
        self.script.push_str(&format!(
            "echo 'BEGIN {name}'\n(\n{commands}\n) 2>&1\nstep_status=$?\necho 'END {name}'\necho \"STATUS {name} $step_status\"\n"
        ));
        self
    }

    /// Copies the host file `host` into the L1 at `l1` (with the libraries
    /// `ldd` lists, if it is a dynamically linked program).
    pub fn file(mut self, host: &Path, l1: &Path) -> Nested {
        self.harness_args.push("--file".to_string());
        self.harness_args
            .push(format!("{}:{}", host.display(), l1.display()));
        self
    }

    /// Copies the host program `name` (found on PATH) into the L1 at the
    /// same path, with its libraries. Panics if the host has none.
    pub fn program(self, name: &str) -> Nested {
        let path = host_program(name);
        self.file(&path, &path)
    }

    /// Allows this run `timeout` before it counts as hung (default
    /// [`L1_TIMEOUT`]): for runs that move a lot of data through an L2,
    /// where everything is emulated twice over.
    pub fn timeout(mut self, timeout: Duration) -> Nested {
        self.timeout = timeout;
        self
    }

    /// Puts the Linux guest of scripts/fetch-linux-guest (an L2 for
    /// pvstack in the L1) at [`L2_KERNEL`] and [`L2_INITRAMFS`].
    pub fn with_linux_guest(self) -> Nested {
        let assets = linux_guest_assets();
        self.file(&assets.kernel, Path::new(L2_KERNEL))
            .file(&assets.initramfs, Path::new(L2_INITRAMFS))
    }

    /// Also copies QEMU (qemu-system-x86_64, its libraries and firmware)
    /// into the L1.
    pub fn with_qemu(mut self) -> Nested {
        self.harness_args.push("--with-qemu".to_string());
        self
    }

    /// Boots the L1, runs the steps and returns what its console showed.
    /// Panics (with the harness's error and the console) if the L1 did not
    /// run the script to its end.
    ///
    /// A run the emulated platform ended (see [`platform_failure`]) is
    /// booted again, saying so, up to [`BOOTS`] boots in all; the last
    /// one's failure fails the test.
    pub fn run(self) -> NestedRun {
        let scratch = ScratchDir::new(&format!("nested-{}", self.name));
        let script = scratch.path("l1-script.sh");
        std::fs::write(&script, &self.script)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", script.display()));
        let _one_at_a_time = L1.lock().unwrap_or_else(PoisonError::into_inner);
        let mut finished = self.boot(&script);
        for _ in 1..BOOTS {
            let Some(failure) = platform_failure(&finished) else {
                break;
            };
            eprintln!(
                "nested run {}: {failure}; booting the L1 once more.\nconsole:\n{}",
                self.name, finished.stdout
            );
            finished = self.boot(&script);
        }
        // The trace lines follow the steps' output, which is all a failed
        // assertion shows.
        for shutdown in l2_shutdowns(&finished.stdout) {
            eprintln!("nested run {}: {shutdown}", self.name);
        }
        let console = finished.stdout;
        let Some(status) = exit_marker(&console) else {
            panic!(
                "the L1 of {} did not finish its script ({}): {}\nconsole:\n{console}",
                self.name,
                finished.status,
                finished.stderr.trim_end()
            );
        };
        NestedRun {
            run: GuestRun {
                console,
                script_status: Some(status),
            },
        }
    }

    /// One L1 boot running `script`, to its end.
    fn boot(&self, script: &Path) -> Finished {
        let mut command = Command::new(harness());
        command
            .arg("--bin-dir")
            .arg(target_profile_dir())
            .arg("--timeout")
            .arg(self.timeout.as_secs().to_string())
            .args(&self.harness_args)
            .arg("--script")
            .arg(script);
        let started = Instant::now();
        // The harness stops QEMU itself at the timeout; this only guards
        // against the harness hanging.
        let finished = run_to_end_within(&mut command, self.timeout + Duration::from_secs(60));
        let summary = format!(
            "nested run {}: {:.1} s (L1 boot, script, power-off), {}",
            self.name,
            started.elapsed().as_secs_f64(),
            outcome(&finished)
        );
        eprintln!("{summary}");
        record_run(&summary, &finished);
        finished
    }
}

/// Where every L1 boot of the tests leaves a line (and its L2 shutdown
/// lines): libtest shows a passing test's output to no one, and a run the
/// platform failed, then booted again, passes. scripts/test prints it
/// after the tests, so CI's log tells how often the platform failed.
const RUNS_LOG: &str = "nested-runs.log";

/// Appends `summary` and `finished`'s L2 shutdown lines to [`RUNS_LOG`]
/// in the target directory (best effort: the record must never fail a
/// test).
fn record_run(summary: &str, finished: &Finished) {
    let mut lines = format!("{summary}\n");
    for shutdown in l2_shutdowns(&finished.stdout) {
        lines.push_str(&format!("  {shutdown}\n"));
    }
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(target_profile_dir().join(RUNS_LOG))
        .and_then(|mut log| std::io::Write::write_all(&mut log, lines.as_bytes()));
    if let Err(e) = appended {
        eprintln!("cannot record the nested run in {RUNS_LOG}: {e}");
    }
}

/// One line on how an L1 boot ended.
fn outcome(finished: &Finished) -> String {
    match (exit_marker(&finished.stdout), platform_failure(finished)) {
        (_, Some(failure)) => format!("platform failure: {failure}"),
        (Some(status), None) => format!("script ran to its end (status {status})"),
        (None, None) => format!(
            "did not finish its script: {}",
            finished.stderr.lines().last().unwrap_or("no message")
        ),
    }
}

/// What scripts/nested-run says of an L1 that powered off or reset by
/// itself before the script's end (QEMU's exit status is then 0).
const L1_STOPPED_BY_ITSELF: &str =
    "the L1 stopped before the command finished (QEMU exit status 0: QEMU's shutdown reason: guest-";

/// Boots of one nested run when the emulated platform ends them (see
/// [`platform_failure`]). Three were not always enough: a clean-clone run
/// lost all three boots of the TAP test (nested_linux_io.rs), one to the
/// L1 crash and two to L2 triple faults. On one machine, 14 of 70 boots
/// of that test (sending 8 MiB each way) ended so, with or without
/// variations that did not clearly change the rate (pvstack-net not
/// polling, the L1's KVM without virtual GIF, the L2's virtio_net without
/// TX interrupts). In clean-clone runs of the whole suite it may be
/// higher: 2 of the 4 boots of two runs. At one in two, ten boots in a
/// row fail once in some 1,000 runs; each costs the TAP test about 25 s.
/// A failure that is not the platform's is never booted again.
const BOOTS: usize = 10;

/// How scripts/nested-run starts the line of each triple fault of an L2.
const L2_SHUTDOWN: &str = "NESTED-L2-SHUTDOWN ";

/// The console's `NESTED-L2-SHUTDOWN` lines, without line endings.
fn l2_shutdowns(console: &str) -> impl Iterator<Item = &str> {
    console
        .lines()
        .filter(|line| line.starts_with(L2_SHUTDOWN))
        .map(str::trim_end)
}

/// How the emulated platform (QEMU's software SVM, or the L1's KVM on
/// it), not the code under test, ended an L1 run, if it did:
///
/// - The L1 stopped by itself before the script's end. Nothing a process
///   in the L1 does, pvstack included, may take the L1's kernel down.
///   Seen: the L1's kernel taking an interrupt (a reschedule IPI) on the
///   instruction after KVM's VMRUN, before KVM had restored its own GS
///   base; on real hardware interrupts wait there (GIF is 0), here the
///   handler ran on the L2's per-CPU base and page-faulted until its
///   stack ran out.
/// - An L2 vCPU shut down (a triple fault: a `NESTED-L2-SHUTDOWN` line),
///   while no kernel panicked (a panicking Linux reboots, which may end in
///   a triple fault) and not in a breakpoint (Linux's last way to reset
///   is an int3 with no IDT). Seen with no device at all, the L2 only
///   computing while the L1 made cross-CPU wake-ups: the traced one was
///   delivering a not-present page fault on an instruction fetch of its
///   own kernel text during boot (`__init_single_page+6`), then could not
///   deliver the double fault: its page tables had read as empty. With no
///   device nothing but the L2 writes its memory once pvstack has loaded
///   the kernel, so that is the emulated nested paging's view. QEMU/KVM in
///   the L1 loses its L2s the same way: booting the same L2 alternately
///   with pvstack under the same load, it lost one with the same trace
///   (`intr_info 0x80000b0e error_code 0x00000010`).
fn platform_failure(finished: &Finished) -> Option<String> {
    if finished.stderr.contains(L1_STOPPED_BY_ITSELF) {
        return Some(format!(
            "the L1 stopped by itself ({})",
            finished.stderr.trim_end()
        ));
    }
    if finished.stdout.contains("Kernel panic") {
        return None;
    }
    l2_shutdowns(&finished.stdout)
        .find(|line| !delivering_a_breakpoint(line))
        .map(|line| format!("an L2 vCPU shut down: {line}"))
}

/// Whether a `NESTED-L2-SHUTDOWN` line (KVM's kvm_exit trace) shows the
/// vCPU delivering vector 3, a breakpoint: its `intr_info` is SVM's
/// EXITINTINFO, valid in bit 31, the vector in bits 0-7.
fn delivering_a_breakpoint(line: &str) -> bool {
    const VALID: u32 = 1 << 31;
    const BREAKPOINT: u32 = 3;
    line.split_once("intr_info 0x")
        .and_then(|(_, rest)| rest.get(..8))
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .is_some_and(|info| info & VALID != 0 && info & 0xff == BREAKPOINT)
}

/// What an L1 run printed, step by step.
pub struct NestedRun {
    /// The L1's console; `script_status` is the script's exit status.
    pub run: GuestRun,
}

impl NestedRun {
    /// Step `name`'s output (stdout and stderr), one string.
    pub fn output(&self, name: &str) -> String {
        self.run.section(name).join("\n")
    }

    /// Step `name`'s exit status.
    pub fn status(&self, name: &str) -> i32 {
        let prefix = format!("STATUS {name} ");
        self.run
            .console
            .lines()
            .find_map(|line| line.trim_end().strip_prefix(&prefix)?.parse().ok())
            .unwrap_or_else(|| panic!("no `{prefix}N` line on the console:\n{}", self.run.console))
    }

    /// Asserts that step `name` exited with `expected`, showing its output
    /// if not.
    pub fn assert_status(&self, name: &str, expected: i32) {
        assert_eq!(
            self.status(name),
            expected,
            "step {name} exited with another status; its output:\n{}",
            self.output(name)
        );
    }

    /// The values of the `RESULT <workload> ...` line in step `name`'s
    /// output; panics with the output if there is none.
    pub fn result(&self, name: &str, workload: &str) -> BTreeMap<String, String> {
        let output = self.output(name);
        parse_result(&output, workload)
            .unwrap_or_else(|| panic!("step {name} printed no `RESULT {workload}`:\n{output}"))
    }

    /// The bytes step `name` printed in base64 (e.g. `base64 FILE`: a file
    /// of the L1 brought back); panics if its output is not base64.
    pub fn bytes(&self, name: &str) -> Vec<u8> {
        let text: String = self.run.section(name).concat();
        BASE64_STANDARD
            .decode(text.trim())
            .unwrap_or_else(|e| panic!("step {name} printed no base64 ({e}):\n{text}"))
    }

    /// The rest of the first line of step `name`'s output that starts
    /// with `prefix`; panics with the output if there is none.
    pub fn line_after(&self, name: &str, prefix: &str) -> String {
        line_after(&self.output(name), prefix).to_string()
    }
}

/// The status in the L1 init's last `NESTED-EXIT <n>` line.
fn exit_marker(console: &str) -> Option<i32> {
    console
        .lines()
        .filter_map(|line| line.trim_end().strip_prefix("NESTED-EXIT ")?.parse().ok())
        .next_back()
}

/// scripts/nested-run, the harness.
pub fn harness() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/nested-run")
}

/// The absolute path of host program `name`, from PATH.
fn host_program(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed on this host (scripts/install-deps)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_exit_marker_counts() {
        let console = "NESTED-START\nNESTED-EXIT 3 (not a marker)\nNESTED-EXIT 9\r\nNESTED-EXIT 4\n[ 1.0] reboot: Power down\n";
        assert_eq!(exit_marker(console), Some(4));
        assert_eq!(exit_marker("NESTED-START\n[ 1.0] Kernel panic\n"), None);
    }

    fn finished(stdout: &str, stderr: &str) -> Finished {
        Finished {
            status: std::os::unix::process::ExitStatusExt::from_raw(0),
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
        }
    }

    #[test]
    fn only_the_platforms_failures_are_booted_again() {
        let shutdown = |intr_info: &str| {
            format!("NESTED-L2-SHUTDOWN vcpu0-150 [000] ..... 397.676123: kvm_exit: vcpu 0 reason shutdown rip 0xffffffff81a0db86 info1 0x0000000000000000 info2 0x0000000000000000 intr_info {intr_info} error_code 0x00000010\nNESTED-EXIT 1\n")
        };
        let l1_reset = format!(
            "nested-run: error: {L1_STOPPED_BY_ITSELF}reset); see the console output above"
        );
        assert!(platform_failure(&finished("NESTED-START\n", &l1_reset)).is_some());
        // A page fault no double fault could follow: the platform.
        let page_fault = shutdown("0x80000b0e");
        assert!(platform_failure(&finished(&page_fault, "")).is_some());
        // A panicking L2 or Linux's int3 reset: the guest's own doing.
        let panicked = format!("[ 3.1] Kernel panic - not syncing: Fatal exception\n{page_fault}");
        assert_eq!(platform_failure(&finished(&panicked, "")), None);
        assert_eq!(
            platform_failure(&finished(&shutdown("0x80000403"), "")),
            None
        );
        // A run with no shutdown, or a script that failed on its own.
        assert_eq!(
            platform_failure(&finished("NESTED-START\nNESTED-EXIT 1\n", "")),
            None
        );
    }

    #[test]
    fn each_boot_is_summed_up_in_one_line() {
        assert_eq!(
            outcome(&finished("NESTED-START\nNESTED-EXIT 0\n", "")),
            "script ran to its end (status 0)"
        );
        let l1_reset = format!("nested-run: error: {L1_STOPPED_BY_ITSELF}reset)");
        let failed = outcome(&finished("NESTED-START\n", &l1_reset));
        assert!(
            failed.starts_with("platform failure: the L1 stopped by itself"),
            "{failed}"
        );
        let hung = "nested-run: error: the L1 did not finish within 5 s; QEMU killed";
        assert_eq!(
            outcome(&finished("NESTED-START\n", hung)),
            format!("did not finish its script: {hung}")
        );
    }

    #[test]
    fn steps_are_framed_with_their_status() {
        // The script as the L1 runs it, with busybox sh, here.
        let nested = Nested::new("framing")
            .step("hello", "echo hi; echo 'RESULT hello ok=1' >&2; exit 3")
            .step("waits", "wait_until 'a file' test -e /; echo waited")
            .step("file", "printf 'pv\\000stack' | base64");
        let output = Command::new("/bin/busybox")
            .args(["sh", "-c", &nested.script])
            .output()
            .expect("busybox sh runs");
        let run = NestedRun {
            run: GuestRun {
                console: String::from_utf8_lossy(&output.stdout).into_owned(),
                script_status: Some(0),
            },
        };
        assert_eq!(run.output("hello"), "hi\nRESULT hello ok=1");
        assert_eq!(run.status("hello"), 3);
        assert_eq!(run.result("hello", "hello")["ok"], "1");
        assert_eq!(run.line_after("hello", "RESULT "), "hello ok=1");
        assert_eq!(run.output("waits"), "waited");
        run.assert_status("waits", 0);
        assert_eq!(run.bytes("file"), b"pv\0stack");
    }
}
