//! A local user other than the VM's gets nothing from pvstack's sockets:
//! every socket pvstack and its backends make (the control API, each
//! backend's vhost-user socket and its daemon's, pvstack-console's
//! console server, pvstack-net's peer socket, the sockets of backends
//! pvstack starts) refuses that user's connect(2), whatever the umask
//! they were made under. And a backend whose socket is shared on purpose
//! (`--socket-mode`) still serves only frontends of its own user, root or
//! `--frontend-uid`: another one is refused with one log line, and the
//! next honest frontend is served. The other user is a uid none of
//! them runs as (`other_user::STRANGER`), in processes started with `CommandExt::uid` (the tests run as root).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use pvstack_tests::api_vm::{ApiVm, LONG_COMPUTE};
use pvstack_tests::blk_vm::{image_spec, socket_spec, utf8, zeroed_image};
use pvstack_tests::other_user::{
    assert_root, connect_as, open_dir, vhost_user_frontend_as, FrontendOutcome, Kind, STRANGER,
};
use pvstack_tests::process::LoggedProcess;
use pvstack_tests::vhost_frontend::start_backend;
use pvstack_tests::ScratchDir;
use serde_json::Value;

const IMAGE_BYTES: usize = 1 << 20;
const ROOT: u32 = 0;

/// The daemon's socket behind a backend's public socket.
fn daemon_socket(socket: &Path) -> PathBuf {
    let mut dir = socket.as_os_str().to_owned();
    dir.push(".daemon");
    PathBuf::from(dir).join("socket")
}

/// The `info` response's device `index`.
fn device(vm: &ApiVm, index: usize) -> Value {
    let info = vm.ctl(&["info"]);
    assert_eq!(info.code(), 0, "{info:#?}");
    let response: Value = serde_json::from_str(&info.stdout).expect("JSON");
    response["result"]["devices"][index].clone()
}

#[test]
fn another_user_cannot_connect_to_any_socket_whatever_the_umask() {
    assert_root();
    // Made under the most permissive umask: only the sockets' own modes
    // keep the other user out.
    // SAFETY: umask(2) cannot fail; every process this test starts
    // inherits it.
    unsafe { libc::umask(0) };
    let dir = ScratchDir::new("local-user-sockets");
    open_dir(&dir.path(""), false);
    let image = dir.path("disk.img");
    zeroed_image(&image, IMAGE_BYTES);
    let started_image = dir.path("started.img");
    zeroed_image(&started_image, IMAGE_BYTES);

    let blk_socket = dir.path("blk.sock");
    let _blk = start_backend("pvstack-blk", &blk_socket, &["--image", utf8(&image)]);
    let net_socket = dir.path("net.sock");
    let wire = dir.path("net.wire");
    let _net = start_backend(
        "pvstack-net",
        &net_socket,
        &[
            "--peer-bind",
            utf8(&wire),
            "--peer-connect",
            utf8(&dir.path("other.wire")),
        ],
    );
    let console_socket = dir.path("console.sock");
    let console_server = dir.path("console-server.sock");
    let _console = start_backend(
        "pvstack-console",
        &console_socket,
        &["--listen", utf8(&console_server)],
    );
    let vm_console_server = dir.path("vm-console.sock");
    let vm = ApiVm::start(
        &dir,
        &[
            "--blk",
            &socket_spec(&blk_socket, &[]),
            "--blk",
            &image_spec(&started_image, &[]),
            "--console",
            &format!("unix={}", utf8(&vm_console_server)),
            "--guest-args",
            LONG_COMPUTE,
        ],
        "",
    );
    // The pvstack-blk that pvstack started for the second disk.
    let started_socket = PathBuf::from(
        device(&vm, 1)["socket"]
            .as_str()
            .expect("the started backend's socket"),
    );

    let sockets: Vec<(Kind, &Path)> = vec![
        (Kind::Stream, vm.api()),
        (Kind::Stream, &blk_socket),
        (Kind::Stream, &net_socket),
        (Kind::Datagram, &wire),
        (Kind::Stream, &console_socket),
        (Kind::Stream, &console_server),
        (Kind::Stream, &vm_console_server),
        (Kind::Stream, &started_socket),
    ];
    let daemons: Vec<PathBuf> = [&blk_socket, &net_socket, &console_socket]
        .iter()
        .map(|socket| daemon_socket(socket))
        .collect();
    let all: Vec<(Kind, &Path)> = sockets
        .iter()
        .copied()
        .chain(daemons.iter().map(|d| (Kind::Stream, d.as_path())))
        .collect();

    let as_stranger = connect_as(STRANGER, &all);
    for ((_, socket), answer) in all.iter().zip(&as_stranger) {
        assert_eq!(
            *answer,
            Some(libc::EACCES),
            "uid {STRANGER} reached {} (mode {:o})",
            socket.display(),
            mode_of(socket)
        );
    }
    // The sockets are there and live: their own user gets through (the
    // daemons' sockets are only looked at: a connection there would go
    // around the filter).
    let as_root = connect_as(ROOT, &sockets);
    assert!(as_root.iter().all(Option::is_none), "{as_root:?}");
    for daemon in &daemons {
        let file = std::fs::symlink_metadata(daemon).expect("the daemon's socket exists");
        assert!(file.file_type().is_socket(), "{}", daemon.display());
    }
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0)
}

#[test]
fn a_shared_socket_mode_is_what_the_operator_asked_for() {
    assert_root();
    let dir = ScratchDir::new("local-user-shared");
    open_dir(&dir.path(""), false);
    let image = dir.path("disk.img");
    zeroed_image(&image, IMAGE_BYTES);
    let socket = dir.path("blk.sock");
    let _blk = start_backend(
        "pvstack-blk",
        &socket,
        &["--image", utf8(&image), "--socket-mode", "666"],
    );
    assert_eq!(mode_of(&socket), 0o666);
    assert_eq!(connect_as(STRANGER, &[(Kind::Stream, &socket)]), [None]);
}

/// A backend on a socket anyone may connect to (`--socket-mode 666`).
fn shared_backend(dir: &ScratchDir, program: &str, extra: &[&str]) -> (PathBuf, LoggedProcess) {
    let socket = dir.path(&format!("{program}.sock"));
    let mut args = vec!["--socket-mode", "666"];
    let image = dir.path("disk.img");
    let wire = dir.path("net.wire");
    let other = dir.path("other.wire");
    let listen = dir.path("console-server.sock");
    match program {
        "pvstack-blk" => {
            zeroed_image(&image, IMAGE_BYTES);
            args.extend(["--image", utf8(&image)]);
        }
        "pvstack-net" => args.extend(["--peer-bind", utf8(&wire), "--peer-connect", utf8(&other)]),
        _ => args.extend(["--listen", utf8(&listen)]),
    }
    args.extend(extra);
    let backend = start_backend(program, &socket, &args);
    (socket, backend)
}

/// The line a backend logs when it refuses a frontend of another user.
const REFUSAL: &str = "refused a frontend: pid";

fn another_users_frontend_is_refused_and_the_next_honest_one_served(program: &str) {
    assert_root();
    let dir = ScratchDir::new(&format!("local-user-frontend-{program}"));
    open_dir(&dir.path(""), false);
    let (socket, mut backend) = shared_backend(&dir, program, &[]);

    assert_eq!(
        vhost_user_frontend_as(STRANGER, &socket),
        FrontendOutcome::Refused,
        "{}",
        backend.log()
    );
    backend.wait_for_output(REFUSAL);
    let log = backend.log();
    assert_eq!(log.matches(REFUSAL).count(), 1, "one line:\n{log}");
    assert!(log.contains(&format!("runs as uid {STRANGER}")), "{log}");
    assert!(log.contains(&format!("--frontend-uid {STRANGER}")), "{log}");

    // The backend goes on listening and serves its own user.
    assert_eq!(
        vhost_user_frontend_as(ROOT, &socket),
        FrontendOutcome::Served,
        "{}",
        backend.log()
    );
    backend.wait_for_output("frontend connected");
    assert!(backend.is_running(), "{}", backend.log());
    backend.terminate_cleanly();
}

#[test]
fn pvstack_blk_refuses_another_users_frontend_and_serves_the_next() {
    another_users_frontend_is_refused_and_the_next_honest_one_served("pvstack-blk");
}

#[test]
fn pvstack_net_refuses_another_users_frontend_and_serves_the_next() {
    another_users_frontend_is_refused_and_the_next_honest_one_served("pvstack-net");
}

#[test]
fn pvstack_console_refuses_another_users_frontend_and_serves_the_next() {
    another_users_frontend_is_refused_and_the_next_honest_one_served("pvstack-console");
}

#[test]
fn a_frontend_of_the_user_frontend_uid_names_is_served() {
    assert_root();
    let dir = ScratchDir::new("local-user-frontend-uid");
    open_dir(&dir.path(""), false);
    let uid = STRANGER.to_string();
    let (socket, backend) = shared_backend(&dir, "pvstack-blk", &["--frontend-uid", &uid]);
    assert_eq!(
        vhost_user_frontend_as(STRANGER, &socket),
        FrontendOutcome::Served,
        "{}",
        backend.log()
    );
    assert!(!backend.log().contains(REFUSAL), "{}", backend.log());
}

/// The unprivileged user a backend started as root switches to (`--user`,
/// nobody by default for the backends pvstack starts) is shared with
/// other processes; a frontend of that user is not the one that started
/// the backend and is refused.
#[test]
fn a_frontend_of_the_user_the_backend_switched_to_is_refused() {
    assert_root();
    let dir = ScratchDir::new("local-user-switched");
    open_dir(&dir.path(""), false);
    const NOBODY: u32 = 65534;
    let (socket, mut backend) =
        shared_backend(&dir, "pvstack-blk", &["--user", &NOBODY.to_string()]);
    backend.wait_for_output("running as");

    assert_eq!(
        vhost_user_frontend_as(NOBODY, &socket),
        FrontendOutcome::Refused,
        "{}",
        backend.log()
    );
    backend.wait_for_output(REFUSAL);
    assert!(
        backend
            .log()
            .contains(&format!("runs as uid {NOBODY}, not as uid {ROOT}")),
        "{}",
        backend.log()
    );
    assert_eq!(
        vhost_user_frontend_as(ROOT, &socket),
        FrontendOutcome::Served,
        "{}",
        backend.log()
    );
}
