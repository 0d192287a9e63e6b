//! `pvstack run --blk` when the disk cannot be had: a missing socket, a
//! backend that hangs up during negotiation, an image that does not exist
//! or that pvstack-blk refuses, a malformed option. Each ends with one
//! clear `pvstack: error:` line and exit status 1 (runtime) or 2 (usage),
//! no hang (run_to_end's timeout), and no backend process left running.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use pvstack_tests::blk_vm::{
    assert_no_process_mentions, image_spec, run_with_disks, socket_spec, utf8, zeroed_image,
};
use pvstack_tests::{Finished, ScratchDir, HANG_TIMEOUT};

const USAGE: i32 = 2;
const RUNTIME: i32 = 1;

/// Asserts exit status `code`, stderr ending in exactly one
/// `pvstack: error:` line that contains every needle, and a guest that
/// never ran.
fn assert_pvstack_error(run: &Finished, code: i32, needles: &[&str]) {
    assert_eq!(run.code(), code, "{run:#?}");
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("pvstack: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "one pvstack error line: {run:#?}");
    assert_eq!(run.stderr.lines().last(), Some(errors[0]), "{run:#?}");
    for needle in needles {
        assert!(errors[0].contains(needle), "{needle:?} missing: {run:#?}");
    }
    assert!(run.stdout.is_empty(), "the guest never ran: {run:#?}");
}

/// Asserts that stderr holds nothing but the error line.
fn assert_only_line(run: &Finished) {
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
}

#[test]
fn missing_socket() {
    let dir = ScratchDir::new("blk-err-no-socket");
    let socket = dir.path("nobody.sock");
    let run = run_with_disks(&[socket_spec(&socket, &[])], "hello");
    assert_pvstack_error(&run, RUNTIME, &[utf8(&socket), "cannot connect"]);
    assert_only_line(&run);
}

/// A "backend" that accepts one connection and hangs up on it, after
/// reading the first request when `read_first` is set. The thread panics
/// (rather than blocking the test for ever) if nobody connects.
fn hang_up_listener(socket: &Path, read_first: bool) -> thread::JoinHandle<()> {
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
        if read_first {
            stream.set_nonblocking(false).expect("blocking stream");
            // A vhost-user header is 12 bytes.
            let mut header = [0u8; 12];
            stream
                .read_exact(&mut header)
                .expect("pvstack's first request");
        }
    })
}

#[test]
fn backend_that_hangs_up_during_negotiation() {
    let dir = ScratchDir::new("blk-err-hang-up");
    for (name, read_first) in [("at-once.sock", false), ("after-request.sock", true)] {
        let socket = dir.path(name);
        let listener = hang_up_listener(&socket, read_first);
        let run = run_with_disks(&[socket_spec(&socket, &[])], "hello");
        listener.join().expect("the listener saw pvstack connect");
        assert_pvstack_error(&run, RUNTIME, &[utf8(&socket), "vhost-user"]);
        assert_only_line(&run);
    }
}

#[test]
fn image_that_does_not_exist() {
    let dir = ScratchDir::new("blk-err-no-image");
    let image = dir.path("no-such.img");
    let run = run_with_disks(&[image_spec(&image, &[])], "hello");
    assert_pvstack_error(&run, RUNTIME, &[utf8(&image), "No such file"]);
    assert_only_line(&run);
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
        assert_only_line(&run);
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
        assert_only_line(&run);
    }
    assert_no_process_mentions(utf8(&dir.path("")));
}
