//! The sandbox on the real binaries: a system call outside a process's
//! seccomp allow-list kills it (or is logged with `--seccomp log`); a
//! vCPU thread's list is narrower than the rest of pvstack's; backends
//! that pvstack starts run as 65534:65534 with no capabilities, and Landlock
//! keeps them from files other than their own; pvstack runs without root
//! on a KVM node its user may open. Each test makes the forbidden thing
//! happen inside the running process (pvstack_tests::inject) and checks
//! the outcome, against a control where it is allowed.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use pvstack_tests::blk_process::BlkProcess;
use pvstack_tests::inject::{inject_syscall, threads_named, Injected};
use pvstack_tests::process::Background;
use pvstack_tests::{pvstack, run_to_end};

/// personality(0xffffffff) only reads the persona: harmless, and in no
/// allow-list.
const SYS_PERSONALITY: i64 = libc::SYS_personality;
const QUERY: u64 = 0xffff_ffff;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvstack-sandbox-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    let file = std::fs::File::create(&path).expect("image");
    file.set_len(16 << 20).expect("image size");
    path
}

/// The line a process's SIGSYS handler writes when its filter refuses
/// system call `name` (`number`) made by thread `thread`.
fn refusal_line(thread: &str, name: &str, number: i64) -> String {
    format!("seccomp: thread {thread} made system call {name} ({number}), outside its allow-list")
}

/// The kernel log's seccomp records (`--seccomp log`) for `pid`.
fn audit_records(pid: u32) -> Vec<String> {
    let text = String::from_utf8_lossy(
        &Command::new("dmesg")
            .output()
            .expect("dmesg runs (as root)")
            .stdout,
    )
    .into_owned();
    text.lines()
        .filter(|line| line.contains("type=1326") && line.contains(&format!(" pid={pid} ")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_syscall_outside_the_backends_list_ends_it_with_a_line_naming_it() {
    let dir = scratch("kill");
    let img = image(&dir);
    let img = img.to_str().unwrap();

    // On (the default): refused, and the backend ends, naming the call.
    let socket = dir.join("on.sock");
    let mut blk = BlkProcess::start(&socket, &["--image", img]);
    let pid = blk.pid();
    let outcome = inject_syscall(pid as i32, SYS_PERSONALITY, [QUERY, 0, 0, 0, 0, 0], None);
    // The kernel skipped the call; SIGSYS arrives once the thread runs on.
    assert!(
        !matches!(outcome, Injected::Returned(v) if v >= 0 && v != SYS_PERSONALITY),
        "{outcome:?}"
    );
    let status = blk.wait();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{}", blk.log());
    let line = refusal_line("pvstack-blk", "personality", SYS_PERSONALITY);
    assert!(blk.log().contains(&line), "no {line:?} in:\n{}", blk.log());
    drop(blk);

    // Log: allowed, recorded by the kernel, and the backend goes on serving.
    let socket = dir.join("log.sock");
    let mut blk = BlkProcess::start(&socket, &["--image", img, "--seccomp", "log"]);
    let pid = blk.pid();
    let outcome = inject_syscall(pid as i32, SYS_PERSONALITY, [QUERY, 0, 0, 0, 0, 0], None);
    assert!(
        matches!(outcome, Injected::Returned(v) if v >= 0),
        "{outcome:?}"
    );
    let records = audit_records(pid);
    assert!(
        records
            .iter()
            .any(|r| r.contains(&format!("syscall={SYS_PERSONALITY} "))
                && r.contains("code=0x7ffc0000")),
        "no log record for pid {pid}: {records:?}"
    );
    let run = run_to_end(Command::new(pvstack()).args([
        "run",
        "--blk",
        &format!("socket={}", socket.display()),
        "--guest-args",
        "blk-verify len=1M",
    ]));
    assert_eq!(run.result_u64("blk-verify", "mismatches"), 0, "{run:#?}");
    assert!(blk.is_running());
    blk.terminate_cleanly();

    // Off: no filter at all.
    let socket = dir.join("off.sock");
    let blk = BlkProcess::start(&socket, &["--image", img, "--seccomp", "off"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", blk.pid())).unwrap();
    assert!(status.contains("Seccomp:\t0"), "{status}");
    drop(blk);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn vcpu_threads_have_a_narrower_list_than_the_rest_of_pvstack() {
    let dir = scratch("vcpu");
    let mut vm = Background::start(
        "pvstack",
        {
            let mut command = Command::new(pvstack());
            command.args(["run", "--guest-args", "compute iterations=1000000000000"]);
            command
        },
        &dir.join("vm.log"),
    );
    vm.wait_for("seccomp on: the vCPU filter");
    // socket(AF_UNIX, SOCK_STREAM): pvstack's list has it (reconnecting
    // to backends), a vCPU's does not.
    let socket_args = [libc::AF_UNIX as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
    let pid = vm.pid();
    let main = inject_syscall(pid as i32, libc::SYS_socket, socket_args, None);
    assert!(
        matches!(main, Injected::Returned(fd) if fd >= 0),
        "{main:?}"
    );
    let vcpus = threads_named(pid, "vcpu");
    assert_eq!(vcpus.len(), 1, "{vcpus:?}");
    inject_syscall(vcpus[0], libc::SYS_socket, socket_args, None);
    let finished = vm.finish();
    assert_eq!(
        finished.status.signal(),
        Some(libc::SIGSYS),
        "{finished:#?}"
    );
    let line = refusal_line("vcpu0", "socket", libc::SYS_socket);
    assert!(
        finished.stdout.contains(&line),
        "no {line:?} in {finished:#?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The status lines of every thread of `pid`.
fn thread_status(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("status")).ok())
        .collect()
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

/// The children of process `pid` (of all its threads).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|pid| pid.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The child of `vm` that is not `old`, once there is one (a hang
/// becomes a failure after a generous bound).
fn wait_for_child_other_than(vm: &Background, old: u32) -> u32 {
    for _ in 0..6000 {
        if let Some(&child) = children_of(vm.pid()).iter().find(|&&c| c != old) {
            // Past its set-up once its own filter is on top of the one
            // it inherited from pvstack.
            let confined = thread_status(child)
                .iter()
                .all(|status| field(status, "Seccomp_filters") == "2");
            if confined {
                return child;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("no new child of pvstack after 120 s:\n{}", vm.output());
}

/// Every thread of `pid` runs as 65534:65534 with no groups, no
/// capabilities, no_new_privs and a seccomp filter.
fn assert_dropped(pid: u32) {
    for status in thread_status(pid) {
        assert_eq!(
            field(&status, "Uid"),
            "65534\t65534\t65534\t65534",
            "{status}"
        );
        assert_eq!(
            field(&status, "Gid"),
            "65534\t65534\t65534\t65534",
            "{status}"
        );
        assert_eq!(field(&status, "Groups"), "", "{status}");
        for cap in ["CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(field(&status, cap), "0000000000000000", "{status}");
        }
        assert_eq!(field(&status, "NoNewPrivs"), "1", "{status}");
        assert_eq!(field(&status, "Seccomp"), "2", "{status}");
    }
}

#[test]
fn backends_pvstack_starts_run_as_nobody_and_reach_only_their_files() {
    let dir = scratch("drop");
    let img = image(&dir);
    // World-readable: only Landlock keeps the backend from it.
    let secret = dir.join("secret");
    std::fs::write(&secret, b"not for backends").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut vm = Background::start(
        "pvstack",
        {
            let mut command = Command::new(pvstack());
            command.env("RUST_LOG", "info").args([
                "run",
                "--blk",
                &format!("image={}", img.display()),
                "--guest-args",
                "compute iterations=1000000000000",
            ]);
            command
        },
        &dir.join("vm.log"),
    );
    vm.wait_for("seccomp on: the vCPU filter");
    let children = children_of(vm.pid());
    assert_eq!(children.len(), 1, "{children:?}");
    let blk = children[0];
    assert_dropped(blk);
    // openat(AT_FDCWD, path, O_RDONLY) inside the backend: its image
    // opens, the world-readable file beside it does not.
    let open = |path: &Path| {
        let mut bytes = path.to_str().unwrap().as_bytes().to_vec();
        bytes.push(0);
        inject_syscall(
            blk as i32,
            libc::SYS_openat,
            [libc::AT_FDCWD as u64, 0, libc::O_RDONLY as u64, 0, 0, 0],
            Some((&bytes, 1)),
        )
    };
    let image_fd = open(&img);
    assert!(
        matches!(image_fd, Injected::Returned(fd) if fd >= 0),
        "{image_fd:?}"
    );
    assert_eq!(open(&secret), Injected::Returned(-i64::from(libc::EACCES)));

    // A call outside the child's list ends it with its line; pvstack says
    // which child it was and starts another, under pvstack's own filter
    // (inherited through execve), which confines itself the same way.
    inject_syscall(blk as i32, SYS_PERSONALITY, [QUERY, 0, 0, 0, 0, 0], None);
    vm.wait_for("died of SIGSYS");
    let line = refusal_line("pvstack-blk", "personality", SYS_PERSONALITY);
    assert!(
        vm.output().contains(&line),
        "no {line:?} in:\n{}",
        vm.output()
    );
    let replacement = wait_for_child_other_than(&vm, blk);
    assert_dropped(replacement);
    let finished = vm.terminate();
    assert_eq!(finished.status.code(), Some(143), "{finished:#?}");
    assert!(
        finished
            .stdout
            .contains("running as 65534:65534 (uid 65534, gid 65534)"),
        "{}",
        finished.stdout
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pvstack_runs_as_an_unprivileged_user_on_its_own_kvm_node() {
    let dir = scratch("nonroot");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let node = dir.join("kvm");
    let made = Command::new("mknod")
        .arg(&node)
        .args(["c", "10", "232"])
        .status()
        .expect("mknod runs");
    assert!(made.success(), "mknod {}", node.display());
    let uid = "65534";
    let chown = Command::new("chown").arg(uid).arg(&node).status().unwrap();
    assert!(chown.success());
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o600)).unwrap();
    let as_nobody = |kvm: &Path| {
        run_to_end(
            Command::new("setpriv")
                .args(["--reuid", uid, "--regid", uid, "--clear-groups", "--"])
                .arg(pvstack())
                .args(["run", "--kvm-device"])
                .arg(kvm)
                .args(["--guest-args", "exit 7"]),
        )
    };
    // /dev/kvm is root's: refused.
    let refused = as_nobody(Path::new("/dev/kvm"));
    assert_eq!(refused.code(), 1, "{refused:#?}");
    assert!(refused.stderr.contains("/dev/kvm"), "{refused:#?}");
    let ran = as_nobody(&node);
    assert_eq!(ran.code(), 7, "{ran:#?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
