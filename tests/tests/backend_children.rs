//! The backends pvstack starts itself (`--blk image=...`) are its
//! children: they must answer SIGTERM like any backend run by hand,
//! although pvstack blocks SIGTERM in all its own threads.

use pvstack_tests::api_vm::{ApiVm, LONG_COMPUTE};
use pvstack_tests::blk_vm::{image_spec, zeroed_image};
use pvstack_tests::ScratchDir;

/// Whether `pid` is gone or a zombie (dead, not yet reaped).
fn dead(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

#[test]
fn a_started_backend_dies_on_sigterm_and_is_started_again() {
    let dir = ScratchDir::new("backend-sigterm");
    let image = dir.path("disk.img");
    zeroed_image(&image, 1 << 20);
    let spec = image_spec(&image, &[]);
    let mut vm = ApiVm::start(&dir, &["--blk", &spec, "--guest-args", LONG_COMPUTE], "");
    let first = vm.first_device()["backend_pid"]
        .as_u64()
        .expect("pvstack started the backend");
    // SAFETY: kill(2) with a pid pvstack reports for its own child.
    let rc = unsafe { libc::kill(first as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    vm.wait_until("the backend dies of SIGTERM", |_| dead(first));
    vm.wait_until("pvstack starts another backend", |vm| {
        let device = vm.first_device();
        device["backend_state"] == "connected"
            && device["backend_pid"]
                .as_u64()
                .is_some_and(|pid| pid != first)
    });
    let second = vm.first_device()["backend_pid"].as_u64().expect("a pid");
    let status = vm.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", vm.log());
    assert!(dead(second), "backend {second} outlived pvstack");
}
