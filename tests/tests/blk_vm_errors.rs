//! `pvstack run --blk` when the disk cannot be had: a missing socket, a
//! backend that hangs up during negotiation, an image that does not exist
//! or that pvstack-blk refuses, a malformed option. Each ends with one
//! clear `pvstack: error:` line and exit status 1 (runtime) or 2 (usage),
//! no hang (run_to_end's timeout), and no backend process left running.

use std::io::{ErrorKind, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use pvstack_tests::blk_vm::{
    assert_no_process_mentions, image_spec, run_with_disks, socket_spec, utf8, zeroed_image,
};
use pvstack_tests::{
    assert_pvstack_error, pvstack, send_signal, wait_or_kill, ScratchDir, HANG_TIMEOUT,
};

const USAGE: i32 = 2;
const RUNTIME: i32 = 1;

#[test]
fn missing_socket() {
    let dir = ScratchDir::new("blk-err-no-socket");
    let socket = dir.path("nobody.sock");
    let run = run_with_disks(&[socket_spec(&socket, &[])], "hello");
    assert_pvstack_error(&run, RUNTIME, &[utf8(&socket), "cannot connect"]);
    run.assert_stderr_one_line();
}

/// How a fake backend treats the one connection it accepts.
#[derive(Clone, Copy)]
enum FakeBackend {
    /// Hangs up at once.
    HangsUp,
    /// Reads the first request, then hangs up.
    HangsUpAfterRequest,
    /// Keeps the connection open and never answers.
    Silent,
}

/// A fake backend on `socket` that accepts one connection and treats it as
/// `behaviour` says; the thread hands back a connection it keeps open. It
/// panics (rather than blocking the test for ever) if nobody connects.
fn fake_backend(socket: &Path, behaviour: FakeBackend) -> thread::JoinHandle<Option<UnixStream>> {
    let listener = UnixListener::bind(socket).expect("bind the test listener");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    thread::spawn(move || {
        let deadline = Instant::now() + HANG_TIMEOUT;
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "pvstack never connected");
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        match behaviour {
            FakeBackend::HangsUp => None,
            FakeBackend::HangsUpAfterRequest => {
                stream.set_nonblocking(false).expect("blocking stream");
                // A vhost-user header is 12 bytes.
                let mut header = [0u8; 12];
                stream
                    .read_exact(&mut header)
                    .expect("pvstack's first request");
                None
            }
            FakeBackend::Silent => Some(stream),
        }
    })
}

#[test]
fn backend_that_hangs_up_during_negotiation() {
    let dir = ScratchDir::new("blk-err-hang-up");
    for (name, behaviour) in [
        ("at-once.sock", FakeBackend::HangsUp),
        ("after-request.sock", FakeBackend::HangsUpAfterRequest),
    ] {
        let socket = dir.path(name);
        let listener = fake_backend(&socket, behaviour);
        let run = run_with_disks(&[socket_spec(&socket, &[])], "hello");
        listener.join().expect("the listener saw pvstack connect");
        assert_pvstack_error(&run, RUNTIME, &[utf8(&socket), "vhost-user"]);
        run.assert_stderr_one_line();
    }
}

/// The vhost crate retries a timed-out receive for ever, so only pvstack's
/// own reply watchdog ends this wait.
#[test]
fn backend_that_never_replies() {
    let dir = ScratchDir::new("blk-err-silent");
    let socket = dir.path("silent.sock");
    let backend = fake_backend(&socket, FakeBackend::Silent);
    let run = run_with_disks(&[socket_spec(&socket, &[])], "hello");
    let connection = backend
        .join()
        .expect("the fake backend saw pvstack connect");
    assert!(connection.is_some());
    assert_pvstack_error(&run, RUNTIME, &[utf8(&socket), "no reply to GET_FEATURES"]);
    run.assert_stderr_one_line();
}

/// SIGTERM while a device is still being set up ends pvstack at once with
/// 128 + 15, rather than after the backend's reply timeout.
#[test]
fn sigterm_while_a_backend_keeps_pvstack_waiting() {
    let dir = ScratchDir::new("blk-err-sigterm-setup");
    let socket = dir.path("silent.sock");
    let backend = fake_backend(&socket, FakeBackend::Silent);
    let mut child = Command::new(pvstack())
        .args(["run", "--blk", &socket_spec(&socket, &[])])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pvstack");
    let connection = backend
        .join()
        .expect("the fake backend saw pvstack connect");
    send_signal(&child, libc::SIGTERM);
    let status = wait_or_kill(&mut child).expect("pvstack ended");
    drop(connection);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
}

#[test]
fn image_that_does_not_exist() {
    let dir = ScratchDir::new("blk-err-no-image");
    let image = dir.path("no-such.img");
    let run = run_with_disks(&[image_spec(&image, &[])], "hello");
    assert_pvstack_error(&run, RUNTIME, &[utf8(&image), "No such file"]);
    run.assert_stderr_one_line();
    assert_no_process_mentions(utf8(&dir.path("")));
}

#[test]
fn second_disk_failing_stops_the_first_disks_backend() {
    let dir = ScratchDir::new("blk-err-second-fails");
    let good = dir.path("good.img");
    zeroed_image(&good, 1 << 20);
    let missing_image = dir.path("missing.img");
    let missing_socket = dir.path("missing.sock");
    // pvstack has started disk 0's pvstack-blk when disk 1 fails.
    for (second, needle) in [
        (image_spec(&missing_image, &[]), utf8(&missing_image)),
        (socket_spec(&missing_socket, &[]), utf8(&missing_socket)),
    ] {
        let run = run_with_disks(&[image_spec(&good, &[]), second], "hello");
        assert_pvstack_error(&run, RUNTIME, &["--blk number 1", needle]);
        run.assert_stderr_one_line();
        assert_no_process_mentions(utf8(&dir.path("")));
    }
}

#[test]
fn image_that_pvstack_blk_refuses() {
    let dir = ScratchDir::new("blk-err-empty-image");
    let image = dir.path("empty.img");
    zeroed_image(&image, 0);
    let run = run_with_disks(&[image_spec(&image, &[])], "hello");
    assert_pvstack_error(&run, RUNTIME, &["--blk number 0", "pvstack-blk"]);
    // pvstack-blk's own error line (its stderr is pvstack's) gives the reason.
    assert!(
        run.stderr
            .contains("empty.img is 0 bytes, smaller than one 512-byte sector"),
        "{run:#?}"
    );
    assert_no_process_mentions(utf8(&dir.path("")));
}

#[test]
fn malformed_blk_options_are_usage_errors() {
    let dir = ScratchDir::new("blk-err-usage");
    let image = dir.path("disk.img");
    zeroed_image(&image, 1 << 20);
    let image = utf8(&image);
    for (spec, needle) in [
        (format!("image={image},bogus=1"), "unknown key \"bogus\""),
        ("disk.img".to_string(), "unknown key"),
        (format!("image={image},num-queues=0"), "num-queues"),
        (format!("image={image},num-queues=x"), "num-queues"),
        (format!("image={image},queue-size=100"), "queue-size"),
        (format!("socket=a.sock,image={image}"), "not both"),
        ("readonly".to_string(), "missing socket=PATH or image=PATH"),
        ("image=".to_string(), "image needs a value"),
        (String::new(), "--blk"),
    ] {
        let run = run_with_disks(std::slice::from_ref(&spec), "hello");
        assert_pvstack_error(&run, USAGE, &["--blk", needle]);
        run.assert_stderr_one_line();
    }
    assert_no_process_mentions(utf8(&dir.path("")));
}
