//! A hostile guest and frontend against a real pvstack-console, with the
//! test as its vhost-user frontend laying out the rings by hand: chains
//! that claim gigabytes or point outside memory, and input that arrives
//! before the guest has set up its receive queue.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pvstack_tests::process::LoggedProcess;
use pvstack_tests::vhost_frontend::{
    negotiate, share, shared, start_backend, start_ring, Held, Ram, Ring, DESC_F_NEXT,
    DESC_F_WRITE, VIRTIO_F_VERSION_1,
};
use pvstack_tests::{ScratchDir, HANG_TIMEOUT};
use vhost::vhost_user::message::VhostUserProtocolFeatures;

const RX: u32 = 0;
const TX: u32 = 1;
const RAM: usize = 1 << 20;
/// The most one transmit chain may put out (README, pvstack-console).
const MAX_CHAIN_OUTPUT: usize = 64 << 10;

/// A client of the console server, collecting what it receives.
struct Client {
    stream: UnixStream,
    received: Arc<Mutex<Vec<u8>>>,
}

impl Client {
    fn attach(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("attach to the console server");
        let mut reader = stream.try_clone().expect("clone");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Client { stream, received }
    }

    /// Waits until `len` bytes have arrived; returns them.
    fn wait_for_len(&self, len: usize, backend: &mut LoggedProcess) -> Vec<u8> {
        let started = Instant::now();
        loop {
            let got = self.received.lock().unwrap().clone();
            if got.len() >= len {
                return got;
            }
            assert!(
                backend.is_running(),
                "pvstack-console died:\n{}",
                backend.log()
            );
            assert!(
                started.elapsed() < HANG_TIMEOUT,
                "{} of {len} bytes arrived:\n{}",
                got.len(),
                backend.log()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

fn console(dir: &ScratchDir) -> (LoggedProcess, std::path::PathBuf, std::path::PathBuf) {
    let socket = dir.path("console.sock");
    let server = dir.path("server.sock");
    let backend = start_backend(
        "pvstack-console",
        &socket,
        &["--listen", server.to_str().expect("UTF-8 path")],
    );
    (backend, socket, server)
}

/// A transmit chain with one descriptor that claims almost 4 GiB (the
/// most a chain may hold) outside guest memory between two good ones:
/// before the fix pvstack-console made room for it (and zeroed it) before
/// looking at the address.
#[test]
fn a_transmit_chain_outside_memory_costs_no_memory() {
    let dir = ScratchDir::new("hostile-console-outside");
    let (mut backend, socket, server) = console(&dir);
    let client = Client::attach(&server);
    let (mut frontend, ram) = shared(&socket, RAM);
    let mut tx = Ring::new(TX, 16, 0x1000);
    let started = start_ring(&mut frontend, &ram, &tx);

    ram.write(0x8000, b"hello ");
    ram.write(0x9000, b"world\n");
    tx.put(&ram, 0, (0x8000, 6, DESC_F_NEXT, 1));
    tx.put(&ram, 1, (1 << 40, 0xffff_0000, DESC_F_NEXT, 2));
    tx.put(&ram, 2, (0x9000, 6, 0, 0));
    tx.offer(&ram, 0);
    started.kick();
    tx.wait_used(&ram, 1, &mut backend);
    assert_eq!(client.wait_for_len(12, &mut backend), b"hello world\n");
    let held = Held::of(backend.pid());
    assert!(
        held.peak_rss_kib < 64 << 10,
        "pvstack-console peaked at {} KiB for a 12-byte chain",
        held.peak_rss_kib
    );
    assert!(backend.is_running());
}

/// A chain of 256 KiB inside memory: the first 64 KiB are shown, the rest
/// dropped and counted, and the next chain is shown whole.
#[test]
fn a_transmit_chain_beyond_the_limit_is_cut_and_counted() {
    let dir = ScratchDir::new("hostile-console-oversize");
    let (mut backend, socket, server) = console(&dir);
    let client = Client::attach(&server);
    let (mut frontend, ram) = shared(&socket, RAM);
    let mut tx = Ring::new(TX, 16, 0x1000);
    let started = start_ring(&mut frontend, &ram, &tx);

    let pattern: Vec<u8> = (0..64 << 10).map(|i| b'a' + (i % 26) as u8).collect();
    ram.write(0x10000, &pattern);
    for slot in 0..4 {
        let (flags, next) = if slot < 3 {
            (DESC_F_NEXT, slot + 1)
        } else {
            (0, 0)
        };
        tx.put(&ram, slot, (0x10000, 64 << 10, flags, next));
    }
    tx.offer(&ram, 0);
    ram.write(0x30000, b"after\n");
    tx.put(&ram, 4, (0x30000, 6, 0, 0));
    tx.offer(&ram, 4);
    started.kick();
    tx.wait_used(&ram, 2, &mut backend);
    let shown = client.wait_for_len(MAX_CHAIN_OUTPUT + 6, &mut backend);
    // Nothing more comes: the used ring moved only after the output left.
    assert_eq!(shown.len(), MAX_CHAIN_OUTPUT + 6);
    assert!(
        shown[..MAX_CHAIN_OUTPUT] == pattern[..],
        "the first 64 KiB differ"
    );
    assert_eq!(&shown[MAX_CHAIN_OUTPUT..], b"after\n");
    drop(client.stream);
    backend.terminate_cleanly();
    let log = backend.log();
    assert!(
        log.contains(&format!("{} bytes beyond", 3 * (64 << 10))),
        "no count of the dropped bytes:\n{log}"
    );
}

/// Input typed after the frontend connected but before the guest set up
/// its receive queue: pvstack-console must neither spin on it (before the
/// fix its level-triggered input eventfd stayed readable and the worker
/// woke in a loop) nor lose it once the queue is there.
#[test]
fn input_before_the_receive_queue_neither_spins_nor_is_lost() {
    let dir = ScratchDir::new("hostile-console-early-input");
    let (mut backend, socket, server) = console(&dir);
    let mut frontend = negotiate(
        &socket,
        VIRTIO_F_VERSION_1,
        VhostUserProtocolFeatures::empty(),
    );
    let mut client = Client::attach(&server);
    client.stream.write_all(b"echo early\n").expect("type");
    // Give a spinning worker time to show itself: an idle process uses
    // no CPU while it waits.
    let before = Held::of(backend.pid());
    thread::sleep(Duration::from_millis(1500));
    let after = Held::of(backend.pid());
    let used = after.cpu_ticks - before.cpu_ticks;
    assert!(
        used < 15,
        "pvstack-console used {used} ticks of CPU in 1.5 s with nothing to do:\n{}",
        backend.log()
    );

    let ram = Ram::new(RAM);
    share(&mut frontend, &ram);
    let mut rx = Ring::new(RX, 16, 0x1000);
    rx.put(&ram, 0, (0x8000, 64, DESC_F_WRITE, 0));
    rx.offer(&ram, 0);
    let _started = start_ring(&mut frontend, &ram, &rx);
    rx.wait_used(&ram, 1, &mut backend);
    let (head, len) = rx.used(&ram, 0);
    assert_eq!((head, len), (0, 11));
    assert_eq!(ram.read(0x8000, 11), b"echo early\n");
    let log = backend.log();
    assert!(
        log.lines().count() < 40,
        "{} log lines for one early input:\n{log}",
        log.lines().count()
    );
}
