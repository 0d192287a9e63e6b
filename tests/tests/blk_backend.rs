//! pvstack-blk as a process: clear errors for bad input, surviving frontends
//! that break the vhost-user protocol, reconnects, and clean SIGTERM.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;

use pvstack_tests::blk_process::BlkProcess;
use pvstack_tests::{binary, run_to_end, Finished, ScratchDir};

/// vhost-user GET_FEATURES request code.
const GET_FEATURES: u32 = 1;
/// Header flags: protocol version 1.
const VERSION_1: u32 = 0x1;
/// Header flags: this message is a reply.
const REPLY: u32 = 0x4;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

fn image(dir: &ScratchDir, len: usize) -> String {
    let path = dir.path("disk.img");
    std::fs::write(&path, vec![0x5a; len]).expect("write image");
    path.to_str().expect("utf-8 path").to_owned()
}

/// Runs pvstack-blk to completion (it is expected to fail fast), logging off
/// so stderr holds only the error.
fn run_blk(args: &[&str]) -> Finished {
    run_to_end(
        Command::new(binary("pvstack-blk"))
            .args(args)
            .env("RUST_LOG", "off"),
    )
}

/// Asserts exit status 1 and exactly one stderr line: `pvstack-blk: error: ...`
/// containing every one of `needles`.
fn assert_runtime_error(output: &Finished, needles: &[&str]) {
    output.assert_error("pvstack-blk", 1, needles);
    output.assert_stderr_one_line();
}

/// Sends GET_FEATURES and returns the feature bits from the reply.
fn get_features(stream: &mut UnixStream) -> u64 {
    let mut request = Vec::new();
    for word in [GET_FEATURES, VERSION_1, 0] {
        request.extend_from_slice(&word.to_le_bytes());
    }
    stream.write_all(&request).expect("send GET_FEATURES");
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply).expect("GET_FEATURES reply");
    let word = |i: usize| u32::from_le_bytes(reply[i..i + 4].try_into().expect("4 bytes"));
    assert_eq!(word(0), GET_FEATURES, "reply request code");
    assert_eq!(word(4), VERSION_1 | REPLY, "reply flags");
    assert_eq!(word(8), 8, "reply size");
    u64::from_le_bytes(reply[12..20].try_into().expect("8 bytes"))
}

fn assert_serves_a_frontend(socket: &Path) {
    let mut frontend = UnixStream::connect(socket).expect("connect");
    let features = get_features(&mut frontend);
    assert_ne!(features & VIRTIO_F_VERSION_1, 0, "features {features:#x}");
    assert_ne!(
        features & VHOST_USER_F_PROTOCOL_FEATURES,
        0,
        "features {features:#x}"
    );
}

#[test]
fn missing_image_is_a_clear_error() {
    let dir = ScratchDir::new("blk-missing-image");
    let socket = dir.path("blk.sock");
    let missing = dir.path("no-such.img");
    let output = run_blk(&[
        "--socket",
        socket.to_str().expect("utf-8"),
        "--image",
        missing.to_str().expect("utf-8"),
    ]);
    assert_runtime_error(
        &output,
        &["cannot open image", "no-such.img", "No such file"],
    );
    assert!(!socket.exists());
}

#[test]
fn unusable_images_are_clear_errors() {
    let dir = ScratchDir::new("blk-unusable-image");
    let socket = dir.path("blk.sock");
    let socket = socket.to_str().expect("utf-8");
    // A directory cannot be read as a disk (and root ignores mode bits, so
    // permissions cannot make a file unreadable here).
    let subdir = dir.path("a-directory");
    std::fs::create_dir(&subdir).expect("create directory");
    let output = run_blk(&[
        "--socket",
        socket,
        "--image",
        subdir.to_str().expect("utf-8"),
        "--readonly",
    ]);
    assert_runtime_error(&output, &["not a regular file or block device"]);
    let empty = dir.path("empty.img");
    std::fs::write(&empty, b"").expect("write empty image");
    let output = run_blk(&[
        "--socket",
        socket,
        "--image",
        empty.to_str().expect("utf-8"),
    ]);
    assert_runtime_error(&output, &["empty.img", "smaller than one 512-byte sector"]);
}

#[test]
fn socket_path_that_is_a_regular_file_is_refused_and_kept() {
    let dir = ScratchDir::new("blk-socket-file");
    let image = image(&dir, 1 << 20);
    let socket = dir.path("blk.sock");
    std::fs::write(&socket, b"not a socket").expect("write file");
    let output = run_blk(&[
        "--socket",
        socket.to_str().expect("utf-8"),
        "--image",
        &image,
    ]);
    assert_runtime_error(&output, &["blk.sock", "not a socket"]);
    assert_eq!(std::fs::read(&socket).expect("file kept"), b"not a socket");
}

#[test]
fn malformed_command_lines_exit_with_status_2() {
    let dir = ScratchDir::new("blk-usage");
    let image = image(&dir, 1 << 20);
    let socket = dir.path("blk.sock");
    let socket = socket.to_str().expect("utf-8");
    for args in [
        vec!["--socket", socket],
        vec!["--image", image.as_str()],
        vec!["--socket", socket, "--image", &image, "--num-queues", "0"],
        vec!["--socket", socket, "--image", &image, "--num-queues", "65"],
        vec!["--socket", socket, "--image", &image, "--queue-size", "100"],
        vec![
            "--socket",
            socket,
            "--image",
            &image,
            "--serial",
            "a-serial-longer-than-20",
        ],
        vec!["--socket", socket, "--image", &image, "--no-such-flag"],
    ] {
        let output = run_blk(&args);
        let stderr = &output.stderr;
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(!Path::new(socket).exists(), "{args:?} left a socket");
    }
}

/// The warning pvstack-blk logs for each frontend connection it drops.
const DROPPED: &str = "dropped the frontend connection: ";

/// What pvstack-blk's connection filter logged as reasons for dropping
/// frontend connections, in order.
fn dropped_connections(log: &str) -> Vec<&str> {
    log.lines()
        .filter_map(|line| line.split_once(DROPPED).map(|(_, why)| why))
        .collect()
}

/// Waits until pvstack-blk is done with its `nth` frontend connection (1
/// is the first): it then listens for the next. The filter logs why it
/// dropped a connection before it hangs up the daemon's side, so by then
/// that warning, if any, is in the log.
fn wait_until_done_with_connection(backend: &mut BlkProcess, nth: usize) {
    backend.wait_for_output_count("listening for the next vhost-user frontend", nth);
}

#[test]
fn garbage_from_a_frontend_drops_that_connection_only() {
    let dir = ScratchDir::new("blk-garbage");
    let image = image(&dir, 1 << 20);
    let socket = dir.path("blk.sock");
    let mut backend = BlkProcess::start(&socket, &["--image", &image]);
    // Why each garbage connection below must be dropped: one warning each.
    let mut reasons = Vec::new();

    // A truncated header, then hang up.
    let mut frontend = UnixStream::connect(&socket).expect("connect");
    frontend.write_all(&[1, 0, 0, 0, 1, 0, 0]).expect("send");
    drop(frontend);
    reasons.push("hung up in the middle of a vhost-user message header".to_string());
    wait_until_done_with_connection(&mut backend, 1);
    assert_eq!(dropped_connections(&backend.log()), reasons);

    // A full header with a bogus request code, flags and size; the backend
    // must hang up on us rather than answer or die.
    let mut frontend = UnixStream::connect(&socket).expect("connect");
    frontend.write_all(&[0xff; 12]).expect("send");
    let mut rest = Vec::new();
    let _ = frontend.read_to_end(&mut rest);
    assert!(rest.is_empty(), "backend answered garbage with {rest:?}");
    reasons.push(format!("a {}-byte vhost-user payload", u32::MAX));
    wait_until_done_with_connection(&mut backend, 2);
    assert_eq!(dropped_connections(&backend.log()), reasons);

    // A header claiming a huge payload, then random bytes.
    let mut frontend = UnixStream::connect(&socket).expect("connect");
    let mut message = Vec::new();
    for word in [GET_FEATURES, VERSION_1, 0x7fff_ffff] {
        message.extend_from_slice(&word.to_le_bytes());
    }
    message.extend_from_slice(&[0xa5; 64]);
    frontend.write_all(&message).expect("send");
    drop(frontend);
    reasons.push(format!("a {}-byte vhost-user payload", 0x7fff_ffff));
    wait_until_done_with_connection(&mut backend, 3);
    assert_eq!(dropped_connections(&backend.log()), reasons);

    assert!(
        backend.is_running(),
        "garbage killed pvstack-blk:\n{}",
        backend.log()
    );
    assert_serves_a_frontend(&socket);
    backend.terminate_cleanly();
    assert!(!socket.exists(), "socket file left behind");
    // No warning for the good frontend.
    let log = backend.log();
    assert_eq!(dropped_connections(&log), reasons, "log:\n{log}");
}

#[test]
fn serves_frontends_one_after_another_and_replaces_a_stale_socket() {
    let dir = ScratchDir::new("blk-reconnect");
    let image = image(&dir, 1 << 20);
    let socket = dir.path("blk.sock");
    // Socket files left behind by a crashed run, the public one and the
    // one its vhost-user daemon listened on behind the message filter:
    // nobody listens on them.
    let daemon_socket = dir.path("blk.sock.daemon");
    drop(UnixListener::bind(&socket).expect("bind stale socket"));
    drop(UnixListener::bind(&daemon_socket).expect("bind stale daemon socket"));
    let mut backend = BlkProcess::start(&socket, &["--image", &image]);
    for _ in 0..3 {
        assert_serves_a_frontend(&socket);
    }
    assert!(backend.is_running());
    backend.terminate_cleanly();
    assert!(
        !socket.exists() && !daemon_socket.exists(),
        "socket files left behind"
    );
}

#[test]
fn sigterm_while_a_frontend_is_connected_exits_cleanly() {
    let dir = ScratchDir::new("blk-sigterm-connected");
    let image = image(&dir, 1 << 20);
    let socket = dir.path("blk.sock");
    let mut backend = BlkProcess::start(&socket, &["--image", &image, "--num-queues", "4"]);
    let mut frontend = UnixStream::connect(&socket).expect("connect");
    get_features(&mut frontend);
    backend.terminate_cleanly();
    assert!(!socket.exists(), "socket file left behind");
}

#[test]
fn exit_on_disconnect_ends_after_the_first_frontend() {
    let dir = ScratchDir::new("blk-exit-on-disconnect");
    let image = image(&dir, 1 << 20);
    let socket = dir.path("blk.sock");
    let mut backend = BlkProcess::start(&socket, &["--image", &image, "--exit-on-disconnect"]);
    assert_serves_a_frontend(&socket);
    assert_eq!(backend.wait().code(), Some(0), "log:\n{}", backend.log());
    assert!(!socket.exists(), "socket file left behind");
}
