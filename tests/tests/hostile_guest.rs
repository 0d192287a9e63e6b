//! A hostile guest flooding real backends with what they log: bad block
//! requests to pvstack-blk, output that claims lost lines to
//! pvstack-console, malformed frames to pvstack-net. Each is answered (or
//! shown, or dropped and counted) every time, but the log grows by a
//! bounded number of lines, not one per request, and the backend serves
//! on.

use pvstack_tests::process::LoggedProcess;
use pvstack_tests::vhost_frontend::{
    shared, start_backend, start_ring, Ring, DESC_F_NEXT, DESC_F_WRITE,
};
use pvstack_tests::ScratchDir;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

const RAM: usize = 1 << 20;
/// Lines one call site may write per 10 s (pvstack-logging's BURST), and
/// the line that says how many were held back.
const BURST: usize = 10;

/// Lines of `process`'s log that contain `needle`.
fn lines_with(process: &LoggedProcess, needle: &str) -> usize {
    process
        .log()
        .lines()
        .filter(|line| line.contains(needle))
        .count()
}

/// pvstack-console serving `dir`/console.sock and writing the guest's
/// output to `dir`/console.out, with `more` arguments: the backend, its
/// socket and the output file.
fn console_logging(dir: &ScratchDir, more: &[&str]) -> (LoggedProcess, PathBuf, PathBuf) {
    let socket = dir.path("console.sock");
    let output = dir.path("console.out");
    let server = dir.path("server.sock");
    let mut args = vec![
        "--listen",
        server.to_str().expect("UTF-8 path"),
        "--log",
        output.to_str().expect("UTF-8 path"),
    ];
    args.extend_from_slice(more);
    let backend = start_backend("pvstack-console", &socket, &args);
    (backend, socket, output)
}

/// 320 requests of an unknown type: each gets UNSUPP, the log a few
/// lines. Before the fix each wrote a warning.
#[test]
fn a_flood_of_bad_block_requests_keeps_the_log_bounded() {
    let dir = ScratchDir::new("hostile-guest-blk");
    let image = dir.path("disk.img");
    std::fs::write(&image, vec![0u8; 64 << 10]).expect("write the image");
    let socket = dir.path("blk.sock");
    let mut backend = start_backend(
        "pvstack-blk",
        &socket,
        &["--image", image.to_str().expect("UTF-8 path")],
    );
    let (mut frontend, ram) = shared(&socket, RAM);
    let mut queue = Ring::new(0, 16, 0x1000);
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&0xdeadu32.to_le_bytes());
    ram.write(0x8000, &header);
    queue.put(&ram, 0, (0x8000, 16, DESC_F_NEXT, 1));
    queue.put(&ram, 1, (0x9000, 1, DESC_F_WRITE, 0));
    let started = start_ring(&mut frontend, &ram, &queue);
    let mut used = 0u16;
    for _ in 0..320 {
        ram.write(0x9000, &[0xff]);
        queue.offer(&ram, 0);
        started.kick();
        used += 1;
        queue.wait_used(&ram, used, &mut backend);
        // VIRTIO_BLK_S_UNSUPP, every time.
        assert_eq!(ram.read(0x9000, 1), [2], "status of request {used}");
    }
    // The connection's totals count every one.
    drop(frontend);
    backend.wait_for_output("rejected 320 requests, returned 0 chains unanswered");
    let rejected = lines_with(&backend, "rejected a request");
    assert!(
        rejected <= BURST,
        "{rejected} log lines for 320 bad requests:\n{}",
        backend.log()
    );
    assert!(backend.is_running());
}

/// 200 lines whose stamps each skip a sequence number: each loss is
/// shown in the output, the log gets a few lines. Before the fix each
/// wrote a warning.
#[test]
fn a_flood_of_lost_line_stamps_keeps_the_log_bounded() {
    let dir = ScratchDir::new("hostile-guest-console");
    let (mut backend, socket, output) = console_logging(&dir, &[]);
    let (mut frontend, ram) = shared(&socket, RAM);
    let mut tx = Ring::new(1, 16, 0x1000);
    let text: String = (0..200)
        .map(|n| format!("\x1b_pvs;{};0\x1b\\line {n}\n", 2 * n))
        .collect();
    ram.write(0x10000, text.as_bytes());
    tx.put(&ram, 0, (0x10000, text.len() as u32, 0, 0));
    tx.offer(&ram, 0);
    start_ring(&mut frontend, &ram, &tx).kick();
    tx.wait_used(&ram, 1, &mut backend);
    backend.terminate_cleanly();
    let shown = std::fs::read_to_string(&output).expect("read the console log");
    assert_eq!(
        shown.matches("[pvstack-console: 1 lines lost]").count(),
        199,
        "{shown}"
    );
    let warned = lines_with(&backend, "lines of guest output lost");
    assert!(
        warned <= BURST,
        "{warned} log lines for 199 losses:\n{}",
        backend.log()
    );
}

/// 64 KiB of guest output with `--log-max-bytes 4096`: the log and its
/// one rotated copy stay within the limit and hold the newest output.
/// Before the fix the log grew with everything the guest wrote.
#[test]
fn the_console_log_stays_within_its_limit() {
    let dir = ScratchDir::new("hostile-guest-console-log");
    let (mut backend, socket, output) = console_logging(&dir, &["--log-max-bytes", "4096"]);
    let (mut frontend, ram) = shared(&socket, RAM);
    let mut tx = Ring::new(1, 16, 0x1000);
    let started = start_ring(&mut frontend, &ram, &tx);
    let mut last = String::new();
    for chunk in 0..64u16 {
        let text: String = (0..128).map(|n| format!("{chunk:03}:{n:03}\n")).collect();
        ram.write(0x10000, text.as_bytes());
        tx.put(&ram, 0, (0x10000, text.len() as u32, 0, 0));
        tx.offer(&ram, 0);
        started.kick();
        tx.wait_used(&ram, chunk + 1, &mut backend);
        last = text;
    }
    backend.terminate_cleanly();
    let current = std::fs::read(&output).expect("read the log");
    let rotated = std::fs::read(dir.path("console.out.1")).expect("read the rotated log");
    assert!(
        current.len() <= 4096 && rotated.len() <= 4096,
        "{} and {} bytes",
        current.len(),
        rotated.len()
    );
    assert!(
        current.ends_with(last.as_bytes()),
        "the newest output is not in the log"
    );
    assert!(lines_with(&backend, "rotated to") <= BURST + 1);
}

/// Bad transmit chains to pvstack-net in peer mode: descriptors outside
/// guest memory, a chain longer than any frame, one that loops, a
/// device-writable buffer, then 300 frames shorter than an Ethernet
/// header. Each chain is returned, none reaches the peer, the log holds a
/// bounded number of lines, and a good frame afterwards is delivered
/// byte for byte.
#[test]
fn bad_frames_from_the_guest_are_dropped_and_the_log_stays_bounded() {
    let dir = ScratchDir::new("hostile-guest-net");
    let socket = dir.path("net.sock");
    let peer_path = dir.path("peer.wire");
    let peer = UnixDatagram::bind(&peer_path).expect("bind the peer's socket");
    let utf8 = |path: &std::path::Path| path.to_str().expect("UTF-8 path").to_string();
    let mut backend = start_backend(
        "pvstack-net",
        &socket,
        &[
            "--peer-bind",
            &utf8(&dir.path("net.wire")),
            "--peer-connect",
            &utf8(&peer_path),
        ],
    );
    let (mut frontend, ram) = shared(&socket, RAM);
    let mut tx = Ring::new(1, 16, 0x1000);
    let started = start_ring(&mut frontend, &ram, &tx);
    let mut used = 0u16;
    let mut send = |tx: &mut Ring, backend: &mut LoggedProcess| {
        tx.offer(&ram, 0);
        started.kick();
        used += 1;
        tx.wait_used(&ram, used, backend);
    };
    let frame_at = 0x10000u64;
    let bad: [&[(u64, u32, u16, u16)]; 5] = [
        // A buffer far outside the 1 MiB of guest memory.
        &[(1 << 40, 64, 0, 0)],
        // A buffer running past the end of guest memory.
        &[(RAM as u64 - 32, 64, 0, 0)],
        // 128 KiB: more than a header and the largest frame.
        &[(frame_at, 128 << 10, 0, 0)],
        // A chain that loops on itself.
        &[(frame_at, 64, DESC_F_NEXT, 0)],
        // A buffer only the device may write.
        &[(frame_at, 64, DESC_F_WRITE, 0)],
    ];
    for chain in bad {
        for (slot, &descriptor) in (0u16..).zip(chain) {
            tx.put(&ram, slot, descriptor);
        }
        send(&mut tx, &mut backend);
    }
    // A flood: header and 4 bytes, less than an Ethernet header.
    tx.put(&ram, 0, (frame_at, 16, 0, 0));
    for _ in 0..300 {
        send(&mut tx, &mut backend);
    }
    peer.set_nonblocking(true).expect("non-blocking");
    let mut buf = [0u8; 2048];
    assert!(peer.recv(&mut buf).is_err(), "a bad frame reached the peer");

    // A good frame: a zeroed virtio-net header, then 60 bytes.
    let frame: Vec<u8> = (0..60u8).collect();
    let mut chain = vec![0u8; 12];
    chain.extend_from_slice(&frame);
    ram.write(frame_at, &chain);
    tx.put(&ram, 0, (frame_at, chain.len() as u32, 0, 0));
    send(&mut tx, &mut backend);
    peer.set_nonblocking(false).expect("blocking");
    peer.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let got = peer
        .recv(&mut buf)
        .expect("the good frame reaches the peer");
    assert_eq!(&buf[..got], &frame[..]);

    let dropped = lines_with(&backend, "dropped a frame from the guest");
    assert!(
        (1..=BURST).contains(&dropped),
        "{dropped} log lines for 305 bad frames:\n{}",
        backend.log()
    );
    assert!(backend.is_running());
    drop(frontend);
    backend.terminate_cleanly();
    assert!(backend.log().contains("tx_bad=305"), "{}", backend.log());
}
