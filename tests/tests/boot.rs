//! The pvstack VMM boots the real guest under real KVM: the built-in guest
//! and the same image given with --kernel, exit codes, the hypercall
//! selftest on two vCPUs, crash reports, native-speed execution, console
//! log files, SIGTERM, and `pvstack check`.

use std::process::Command;
use std::time::Duration;

use pvstack_tests::process::LoggedProcess;
use pvstack_tests::{guest_image, pvstack, run_pvstack, run_to_end_counting_cpu, ScratchDir};

#[test]
fn builtin_guest_says_hello_and_exits_0() {
    let run = run_pvstack(&["run", "--guest-args", "hello"]);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(
        run.stdout.contains("Hello from the pvstack guest"),
        "{run:#?}"
    );
    assert_eq!(run.result("hello")["ok"], "1");
}

#[test]
fn guest_exit_code_becomes_pvstacks() {
    let run = run_pvstack(&["run", "--guest-args", "exit 7"]);
    assert_eq!(run.code(), 7, "{run:#?}");
}

#[test]
fn selftest_passes_on_two_vcpus() {
    let run = run_pvstack(&["run", "--cpus", "2", "--guest-args", "selftest"]);
    assert_eq!(run.code(), 0, "{run:#?}");
    let result = run.result("selftest");
    assert_eq!(result["failed"], "0", "{run:#?}");
    assert!(run.result_u64("selftest", "passed") > 0);
}

#[test]
fn guest_elf_given_with_kernel_runs() {
    let image = guest_image();
    let image = image.to_str().expect("UTF-8 target path");
    let run = run_pvstack(&[
        "run",
        "--kernel",
        image,
        "--guest-args",
        "hello",
        "--memory",
        "64M",
    ]);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(
        run.stdout.contains("64 MiB"),
        "boot info reaches the guest: {run:#?}"
    );
    assert_eq!(run.result("hello")["ok"], "1");
}

#[test]
fn fault_is_reported_with_registers() {
    let run = run_pvstack(&["run", "--guest-args", "fault"]);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(run.stderr.contains("triple fault"), "{run:#?}");
    assert!(run.stderr.contains("RIP 0x"), "{run:#?}");
    assert!(run.stderr.contains("CR3 0x2000"), "{run:#?}");
}

#[test]
fn console_log_goes_to_the_file() {
    let dir = ScratchDir::new("console-log");
    let log = dir.path("console.txt");
    let run = run_pvstack(&[
        "run",
        "--console-log",
        log.to_str().expect("UTF-8 temp path"),
        "--guest-args",
        "hello",
    ]);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(!run.stdout.contains("RESULT"), "{run:#?}");
    let text = std::fs::read_to_string(&log).expect("console log exists");
    assert!(text.contains("RESULT hello ok=1"), "{text}");
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `now` is.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// The guest's compute loop runs natively. Compared in CPU time, not wall
/// time, so that a loaded host (the guest's vCPU waiting for a CPU) does
/// not count: all the CPU time of `pvstack run` (VM setup included, a few
/// milliseconds) against this thread's for the very same function. Native
/// execution makes the ratio about 1; emulation, or an exit per
/// instruction, makes it thousands of times smaller. Requiring a tenth
/// leaves a factor 10 for SMT siblings, clock frequency and caches, and a
/// factor 100 before emulation could pass.
#[test]
fn compute_runs_natively() {
    let iterations: u64 = 50_000_000;
    let args = format!("compute iterations={iterations}");
    let (run, vm_cpu) = run_to_end_counting_cpu(
        Command::new(pvstack())
            .args(["run", "--guest-args", &args])
            .env("RUST_LOG", "warn"),
    );
    assert_eq!(run.code(), 0, "{run:#?}");

    let started = thread_cpu_time();
    let value = pvstack_guest::compute::compute(iterations);
    let host_cpu = thread_cpu_time() - started;
    let guest_value = run.result("compute")["value"].clone();
    assert_eq!(
        guest_value,
        format!("{value:#018x}"),
        "same loop, same result"
    );

    let ratio = host_cpu.as_secs_f64() / vm_cpu.as_secs_f64();
    eprintln!(
        "compute: pvstack {vm_cpu:?} of CPU, the host {host_cpu:?}, ratio {ratio:.2} \
         (the guest's own clock: {} iter/us)",
        run.result_number("compute", "iter_per_us")
    );
    assert!(
        ratio >= 0.1,
        "guest runs emulated? CPU time ratio {ratio:.3}: {run:#?}"
    );
}

/// SIGTERM while the guest computes (for minutes, were it left alone):
/// pvstack stops the running VM cleanly and exits with 128 + 15. Before
/// the VM runs, a signal also ends pvstack with 143, but without stopping
/// a VM; so the test waits for pvstack's record of the guest's first exit
/// (the guest is running: it asked for its boot info) and then requires
/// the log of the clean stop and no RESULT line (the guest never finished).
#[test]
fn sigterm_stops_a_running_vm_with_status_143() {
    let dir = ScratchDir::new("sigterm");
    let mut command = Command::new(pvstack());
    command
        .args([
            "run",
            "--cpus",
            "2",
            "--guest-args",
            "compute iterations=100000000000",
        ])
        .env("RUST_LOG", "info");
    let mut vm = LoggedProcess::spawn("pvstack", &mut command, dir.path("pvstack.log"))
        .expect("pvstack starts");
    vm.wait_for_output("boot: first guest exit");
    let status = vm.terminate();
    let log = vm.log();
    assert_eq!(
        status.code(),
        Some(143),
        "128 + SIGTERM, like a shell:\n{log}"
    );
    assert!(
        log.contains("got signal 15; stopping the VM"),
        "not the running VM's stop:\n{log}"
    );
    assert!(!log.contains("RESULT"), "the guest finished first:\n{log}");
}

#[test]
fn check_reports_pvm_and_passes() {
    let run = run_pvstack(&["check"]);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(run.stdout.contains("KVM flavour"), "{run:#?}");
    assert!(
        run.stdout.contains("PVM"),
        "this project's hosts are PVM: {run:#?}"
    );
    assert!(run.stdout.contains("KVM ioeventfd"), "{run:#?}");
    assert!(
        run.stdout.contains("pvstack can run on this host"),
        "{run:#?}"
    );
}

#[test]
fn check_reports_the_hosts_shmem_huge_page_setting() {
    // The setting in force for 2 MiB shmem pages, read here on its own: the
    // per-size file (kernels from 6.11) unless it inherits the global one.
    let bracketed = |path: &str| {
        let text = std::fs::read_to_string(path).ok()?;
        text.split_whitespace()
            .find_map(|w| Some(w.strip_prefix('[')?.strip_suffix(']')?.to_string()))
    };
    let global = bracketed("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .expect("this host's kernel has shmem THP settings");
    let setting =
        match bracketed("/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled") {
            Some(own) if own != "inherit" => own,
            _ => global,
        };
    let run = run_pvstack(&["check"]);
    assert_eq!(run.code(), 0, "{run:#?}");
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("shmem huge pages"))
        .unwrap_or_else(|| panic!("no shmem huge pages line: {run:#?}"));
    assert!(line.contains(&format!(" {setting} (")), "{setting}: {line}");
    if ["advise", "always", "within_size", "force"].contains(&setting.as_str()) {
        assert!(
            line.starts_with("ok") && line.ends_with("gets 2 MiB pages"),
            "{line}"
        );
    } else {
        assert!(line.starts_with("WARN"), "{line}");
        assert!(
            line.contains(
                "set advise (echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled)"
            ),
            "{line}"
        );
    }
}

#[test]
fn check_fails_without_kvm() {
    let run = run_pvstack(&["check", "--kvm-device", "/nonexistent/kvm"]);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(
        run.stdout.contains("MISSING KVM device /nonexistent/kvm"),
        "{run:#?}"
    );
}
