//! What the guest writes to its hypercall console cannot harm the host:
//! on a terminal, escape sequences that make it answer or retitle itself
//! are dropped; into `--console-log`, it never takes more than the limit.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use pvstack_tests::{pvstack, run_pvstack, run_to_end, wait_or_kill, ScratchDir};

/// A guest "workload" whose name is a title-setting escape sequence (OSC
/// 0) and a cursor-position request (CSI 6n): the guest prints it back in
/// its "unknown workload" error.
const HOSTILE_NAME: &str = "\x1b]0;owned\x07\x1b[6n";

/// A pseudo-terminal: (master, slave).
fn pty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into the locals; no name, termios or
    // window size is asked for.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

#[test]
fn escape_sequences_the_guest_prints_do_not_reach_a_terminal() {
    let (master, slave) = pty();
    let mut child = Command::new(pvstack())
        .args(["run", "--guest-args", HOSTILE_NAME])
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pvstack");
    let status = wait_or_kill(&mut child).expect("pvstack ends");
    assert_eq!(status.code(), Some(2), "an unknown workload");
    // Our copy of the slave went to the child and closed with it, so the
    // master reads what is buffered, then EIO.
    let mut shown = Vec::new();
    let _ = File::from(master).read_to_end(&mut shown);
    let shown = String::from_utf8_lossy(&shown);
    assert!(shown.contains("unknown workload"), "{shown:?}");
    assert!(!shown.contains("\x1b]"), "OSC passed: {shown:?}");
    assert!(!shown.contains("[6n"), "CSI 6n passed: {shown:?}");
    // The OSC's text went with it, whole.
    assert!(!shown.contains("owned"), "{shown:?}");
}

#[test]
fn into_a_pipe_the_guest_output_is_unchanged() {
    let run = run_pvstack(&["run", "--guest-args", HOSTILE_NAME]);
    assert_eq!(run.code(), 2, "{run:#?}");
    assert!(run.stdout.contains(HOSTILE_NAME), "{run:#?}");
}

#[test]
fn the_console_log_stays_within_its_limit() {
    let dir = ScratchDir::new("console-log-cap");
    let log = dir.path("console.log");
    let limit = 256;
    let run = run_to_end(
        Command::new(pvstack())
            .args(["run", "--guest-args", "selftest", "--console-log"])
            .arg(&log)
            .args(["--console-log-max-bytes", &limit.to_string()])
            .env("RUST_LOG", "warn"),
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    let current = std::fs::read_to_string(&log).expect("the log");
    let older = std::fs::read_to_string(dir.path("console.log.1")).expect("the rotated log");
    assert!(current.len() <= limit, "{} bytes", current.len());
    assert!(older.len() <= limit, "{} bytes", older.len());
    assert!(
        current.contains("RESULT selftest"),
        "the latest output: {current}"
    );
    let zero = run_pvstack(&["run", "--console-log", "x", "--console-log-max-bytes", "0"]);
    zero.assert_error("pvstack", 2, &["at least 1 byte"]);
}
