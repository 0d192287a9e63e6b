//! Guest memory goes only to a backend run by pvstack's own user, root,
//! or the user `backend-uid=` names: a backend socket squatted by another
//! local user is refused before it is sent anything, at start, on every
//! reconnect and on a swap, with one clear line, and the device keeps
//! waiting for the real backend. The same for disks, NICs and consoles
//! (one check serves them all). The squatter runs as `nobody` (the tests
//! run as root and use setpriv or `CommandExt::uid`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use pvstack_guest::checksum::fnv1a64;
use pvstack_tests::api_vm::{ApiVm, LONG_COMPUTE};
use pvstack_tests::blk_process::BlkProcess;
use pvstack_tests::blk_vm::{pattern_image, run_with_disks, socket_spec, utf8};
use pvstack_tests::process::LoggedProcess;
use pvstack_tests::vhost_frontend::start_backend_as;
use pvstack_tests::{assert_pvstack_error, run_pvstack, Finished, ScratchDir};

/// The user the squatting backend runs as.
const NOBODY: u32 = 65534;
const IMAGE_BYTES: usize = 1 << 20;

/// A directory and a pattern image that both `nobody` and root may use,
/// inside the test's scratch directory; returns the directory and the
/// image's bytes.
fn shared_dir(dir: &ScratchDir) -> (PathBuf, Vec<u8>) {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "these tests start a backend as another user, so they run as root"
    );
    let shared = dir.path("shared");
    std::fs::create_dir(&shared).expect("create the shared directory");
    std::fs::set_permissions(dir.path(""), std::fs::Permissions::from_mode(0o755))
        .expect("let nobody into the scratch directory");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777))
        .expect("let nobody create sockets");
    let image = shared.join("disk.img");
    let bytes = pattern_image(&image, 7, IMAGE_BYTES);
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o666))
        .expect("let nobody serve the image");
    (shared, bytes)
}

fn image_args(shared: &Path) -> Vec<String> {
    vec!["--image".into(), utf8(&shared.join("disk.img")).into()]
}

fn start_blk(uid: Option<u32>, socket: &Path, shared: &Path) -> BlkProcess {
    let args = image_args(shared);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match uid {
        Some(uid) => BlkProcess::start_as(uid, socket, &args),
        None => BlkProcess::start(socket, &args),
    }
}

/// What pvstack logs when it refuses a backend on a reconnect.
const REFUSAL: &str = "refused: the backend";

/// Asserts that pvstack refused, at start, the backend `squatter` runs
/// (as `nobody`), naming its uid and the option that would let it in,
/// and sent it no memory.
fn assert_refused_before_memory(refused: &Finished, squatter: &LoggedProcess) {
    assert_pvstack_error(
        refused,
        1,
        &["refused", "runs as uid 65534", "backend-uid=65534"],
    );
    assert!(!squatter.log().contains("memory"), "{}", squatter.log());
}

/// Asserts that pvstack's log holds one refusal line, however often it
/// tried the squatter, naming the squatter's uid.
fn assert_refused_in_one_line(vm: &ApiVm) {
    let log = vm.log();
    assert_eq!(log.matches(REFUSAL).count(), 1, "one line:\n{log}");
    assert!(log.contains("runs as uid 65534"), "{log}");
}

/// Asks to swap `device` to the squatter's socket `squatted`: refused,
/// naming the squatter's uid, and the device stays connected to `kept`.
fn assert_swap_to_squatter_refused(vm: &ApiVm, device: &str, squatted: &Path, kept: &Path) {
    let swap = vm.ctl(&["device", "swap", device, "--socket", utf8(squatted)]);
    assert_ne!(swap.code(), 0, "{swap:#?}");
    assert!(
        swap.stdout.contains("runs as uid 65534") || swap.stderr.contains("runs as uid 65534"),
        "{swap:#?}"
    );
    let device = vm.first_device();
    assert_eq!(device["backend_state"], "connected", "{device:#}");
    assert_eq!(device["socket"], utf8(kept), "{device:#}");
    assert_eq!(device["refused_swaps"], 1, "{device:#}");
}

#[test]
fn a_backend_of_another_user_is_refused_at_start_unless_named() {
    let dir = ScratchDir::new("peer-start");
    let (shared, bytes) = shared_dir(&dir);
    let socket = shared.join("blk.sock");
    let squatter = start_blk(Some(NOBODY), &socket, &shared);
    let len = 64 * 1024;
    let guest = format!("blk-checksum 0 {len}");

    let refused = run_with_disks(&[socket_spec(&socket, &[])], &guest);
    assert_refused_before_memory(&refused, &squatter);

    let uid = format!("backend-uid={NOBODY}");
    let trusted = run_with_disks(&[socket_spec(&socket, &[&uid])], &guest);
    assert_eq!(trusted.code(), 0, "{trusted:#?}");
    assert_eq!(
        trusted.result_u64("blk-checksum", "fnv"),
        fnv1a64(&bytes[..len]),
        "{trusted:#?}"
    );
}

#[test]
fn a_squatter_is_refused_on_reconnect_and_swap_and_the_device_waits_for_the_real_backend() {
    let dir = ScratchDir::new("peer-reconnect");
    let (shared, _) = shared_dir(&dir);
    let socket = shared.join("blk.sock");
    let mut real = start_blk(None, &socket, &shared);
    let spec = socket_spec(&socket, &[]);
    let mut vm = ApiVm::start(&dir, &["--blk", &spec, "--guest-args", LONG_COMPUTE], "");

    // The real backend goes; another user takes its socket path.
    real.terminate_cleanly();
    let mut squatter = start_blk(Some(NOBODY), &socket, &shared);
    squatter.wait_for_output_count("frontend connected", 3);
    vm.wait_until("pvstack reports the refusal", |vm| {
        vm.log().contains(REFUSAL)
    });
    assert_eq!(vm.first_device()["backend_state"], "reconnecting");
    squatter.terminate_cleanly();
    assert_refused_in_one_line(&vm);

    // The real backend comes back and the device is served again.
    let _real = start_blk(None, &socket, &shared);
    vm.wait_until("the device reconnects", |vm| {
        vm.first_device()["backend_state"] == "connected"
    });

    // A swap to a squatter is refused; the device stays where it was.
    let other = shared.join("other.sock");
    let _other_squatter = start_blk(Some(NOBODY), &other, &shared);
    assert_swap_to_squatter_refused(&vm, "blk0", &other, &socket);
    let shutdown = vm.ctl(&["shutdown"]);
    assert_eq!(shutdown.code(), 0, "{shutdown:#?}");
    assert!(vm.wait().success(), "{}", vm.log());
}

/// A pvstack-net in peer mode on `socket`, as `uid` if given; its peer
/// socket is `socket` with the extension `wire`.
fn start_net(uid: Option<u32>, socket: &Path) -> LoggedProcess {
    let wire = socket.with_extension("wire");
    let other = socket.with_extension("other-wire");
    start_backend_as(
        uid,
        "pvstack-net",
        socket,
        &["--peer-bind", utf8(&wire), "--peer-connect", utf8(&other)],
    )
}

/// A pvstack-console on `socket`, as `uid` if given, serving its console
/// on `socket` with the extension `console`.
fn start_console(uid: Option<u32>, socket: &Path) -> LoggedProcess {
    let server = socket.with_extension("console");
    start_backend_as(uid, "pvstack-console", socket, &["--listen", utf8(&server)])
}

#[test]
fn a_nic_backend_of_another_user_is_refused_at_start_and_on_a_swap_unless_named() {
    let dir = ScratchDir::new("peer-net");
    let (shared, _) = shared_dir(&dir);
    let squatted = shared.join("squatted.sock");
    let squatter = start_net(Some(NOBODY), &squatted);

    let spec = socket_spec(&squatted, &[]);
    let refused = run_pvstack(&["run", "--net", &spec, "--guest-args", "hello"]);
    assert_refused_before_memory(&refused, &squatter);
    let trusting = socket_spec(&squatted, &[&format!("backend-uid={NOBODY}")]);
    let trusted = run_pvstack(&["run", "--net", &trusting, "--guest-args", "hello"]);
    assert_eq!(trusted.code(), 0, "{trusted:#?}");

    // A running NIC is not swapped to the squatter either.
    let socket = shared.join("net.sock");
    let _real = start_net(None, &socket);
    let vm = ApiVm::start(
        &dir,
        &[
            "--net",
            &socket_spec(&socket, &[]),
            "--guest-args",
            LONG_COMPUTE,
        ],
        "",
    );
    assert_swap_to_squatter_refused(&vm, "net0", &squatted, &socket);
}

#[test]
fn a_console_backend_squatted_by_another_user_is_refused_on_reconnect_until_the_real_one_returns() {
    let dir = ScratchDir::new("peer-console");
    let (shared, _) = shared_dir(&dir);
    let socket = shared.join("console.sock");
    let mut real = start_console(None, &socket);
    let spec = format!("socket={}", utf8(&socket));
    let mut vm = ApiVm::start(
        &dir,
        &["--console", &spec, "--guest-args", LONG_COMPUTE],
        "",
    );

    real.terminate_cleanly();
    let mut squatter = start_console(Some(NOBODY), &socket);
    vm.wait_until("pvstack refuses the squatter", |vm| {
        vm.log().contains(REFUSAL)
    });
    // pvstack keeps trying while the squatter is there, and sends it
    // nothing each time.
    squatter.wait_for_output_count("frontend connected", 3);
    assert!(!squatter.log().contains("memory"), "{}", squatter.log());
    squatter.terminate_cleanly();
    assert_refused_in_one_line(&vm);
    let log = vm.log();
    assert!(!log.contains("console0: reconnected"), "{log}");

    let _real = start_console(None, &socket);
    vm.wait_until("the console reconnects to the real backend", |vm| {
        vm.log().contains("console0: reconnected")
    });
    let status = vm.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", vm.log());
}

#[test]
fn a_console_backend_of_the_user_backend_uid_names_is_served() {
    let dir = ScratchDir::new("peer-console-named");
    let (shared, _) = shared_dir(&dir);
    let socket = shared.join("console.sock");
    let _theirs = start_console(Some(NOBODY), &socket);
    let plain = format!("socket={}", utf8(&socket));
    let refused = run_pvstack(&["run", "--console", &plain, "--guest-args", "hello"]);
    assert_pvstack_error(&refused, 1, &["refused", "runs as uid 65534"]);
    let named = format!("{plain},backend-uid={NOBODY}");
    let served = run_pvstack(&["run", "--console", &named, "--guest-args", "hello"]);
    assert_eq!(served.code(), 0, "{served:#?}");
}
