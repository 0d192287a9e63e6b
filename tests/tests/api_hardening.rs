//! The control API against hostile peers: a client that trickles a
//! request one byte at a time must not hold the single-threaded server,
//! and `pvstack ctl` must not read a response without end.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::thread;
use std::time::Duration;

use pvstack_tests::api_vm::{ApiVm, LONG_COMPUTE};
use pvstack_tests::{pvstack, run_to_end, ScratchDir};
use serde_json::Value;

/// Bytes the trickling client sends at most, one every [`TRICKLE_PAUSE`]:
/// far longer than the server's 5 s for a request line. Only bounds a
/// server that never drops it.
const TRICKLE_BYTES: usize = 120;
const TRICKLE_PAUSE: Duration = Duration::from_millis(500);

/// What the trickling client saw: how many bytes it sent before the
/// server closed the connection (`None`: it never did), and what the
/// server said.
struct Trickled {
    sent_before_close: Option<usize>,
    said: String,
}

/// Connects to `api` and sends spaces (leading whitespace of a JSON
/// request that never comes), one per pause, each well within any
/// per-read timeout, until the server closes the connection.
fn trickle(api: &std::path::Path) -> thread::JoinHandle<Trickled> {
    let stream = UnixStream::connect(api).expect("connect to the API");
    thread::spawn(move || {
        let mut sent_before_close = None;
        for sent in 0..TRICKLE_BYTES {
            if (&stream).write_all(b" ").is_err() {
                sent_before_close = Some(sent);
                break;
            }
            thread::sleep(TRICKLE_PAUSE);
        }
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let mut said = String::new();
        let _ = BufReader::new(&stream).read_line(&mut said);
        Trickled {
            sent_before_close,
            said,
        }
    })
}

#[test]
fn a_client_trickling_a_request_is_dropped_and_the_next_one_is_served() {
    let dir = ScratchDir::new("api-trickle");
    let mut vm = ApiVm::start(&dir, &["--guest-args", LONG_COMPUTE], "");
    let trickler = trickle(vm.api());
    // Let the server take the trickler's connection first.
    thread::sleep(4 * TRICKLE_PAUSE);
    let info = vm.ctl(&["info"]);
    assert_eq!(info.code(), 0, "{info:#?}\nlog:\n{}", vm.log());
    let response: Value = serde_json::from_str(&info.stdout).expect("JSON");
    assert_eq!(response["result"]["state"], "running", "{response:#}");
    let trickled = trickler.join().expect("trickler");
    let sent = trickled.sent_before_close.unwrap_or_else(|| {
        panic!(
            "the server kept a client that trickled {TRICKLE_BYTES} bytes over {:?}",
            TRICKLE_PAUSE * TRICKLE_BYTES as u32
        )
    });
    assert!(sent > 1, "it was dropped before it trickled: {sent} bytes");
    let said: Value =
        serde_json::from_str(&trickled.said).unwrap_or_else(|e| panic!("{e}: {:?}", trickled.said));
    assert_eq!(said["ok"], false, "{said:#}");
    let error = said["error"].as_str().expect("an error message");
    assert!(error.contains("no complete request line"), "{error}");
    // The API still serves, and the VM ends on request.
    let shutdown = vm.ctl(&["shutdown"]);
    assert_eq!(shutdown.code(), 0, "{shutdown:#?}");
    let status = vm.wait();
    assert!(status.success(), "{status}\n{}", vm.log());
}

/// A fake API server that answers one request with bytes and no end of
/// line, until the client hangs up; returns how much it wrote.
fn endless_server(socket: &std::path::Path) -> thread::JoinHandle<usize> {
    let listener = UnixListener::bind(socket).expect("bind the fake API");
    thread::spawn(move || {
        let (mut client, _) = listener.accept().expect("accept");
        let mut request = [0u8; 64];
        let _ = client.read(&mut request);
        let chunk = [b'x'; 64 * 1024];
        let mut written = 0;
        // A bound only for a client that never stops reading: 1 GiB.
        while written < 1 << 30 {
            match client.write(&chunk) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        written
    })
}

#[test]
fn ctl_refuses_a_response_that_never_ends_with_one_line() {
    let dir = ScratchDir::new("api-endless-reply");
    let socket = dir.path("fake-api.sock");
    let server = endless_server(&socket);
    let ctl = run_to_end(
        Command::new(pvstack())
            .arg("ctl")
            .arg("--api-socket")
            .arg(&socket)
            .arg("info"),
    );
    ctl.assert_error("pvstack", 1, &["longer than 1048576 bytes"]);
    ctl.assert_stderr_one_line();
    assert!(ctl.stdout.is_empty(), "{ctl:#?}");
    assert!(ctl.stderr.len() < 512, "a short line: {}", ctl.stderr);
    let written = server.join().expect("server");
    assert!(written < 1 << 30, "ctl read {written} bytes");
}

#[test]
fn ctl_quotes_only_the_start_of_an_unreadable_response() {
    let dir = ScratchDir::new("api-garbage-reply");
    let socket = dir.path("fake-api.sock");
    let listener = UnixListener::bind(&socket).expect("bind the fake API");
    let server = thread::spawn(move || {
        let (mut client, _) = listener.accept().expect("accept");
        let mut request = [0u8; 64];
        let _ = client.read(&mut request);
        // Not JSON, with a terminal escape in it, 100 KiB long.
        let mut reply = b"\x1b]0;owned\x07".to_vec();
        reply.extend_from_slice(&[b'y'; 100 * 1024]);
        reply.push(b'\n');
        let _ = client.write_all(&reply);
    });
    let ctl = run_to_end(
        Command::new(pvstack())
            .arg("ctl")
            .arg("--api-socket")
            .arg(&socket)
            .arg("info"),
    );
    server.join().expect("server");
    ctl.assert_error("pvstack", 1, &["unreadable response"]);
    ctl.assert_stderr_one_line();
    assert!(ctl.stderr.len() < 512, "a short line: {}", ctl.stderr);
    assert!(
        !ctl.stderr.contains('\x1b'),
        "escape passed: {:?}",
        ctl.stderr
    );
}
