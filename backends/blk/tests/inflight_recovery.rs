//! pvstack-blk picking up after a crashed backend through the inflight
//! log (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), with the test as the
//! frontend: a real pvstack-blk process, guest memory in a memfd, rings
//! and requests laid out by hand, and an inflight log written byte by byte
//! in the layout of the vhost-user specification as a backend that died
//! mid-batch would have left it.
//!
//! The state is one an in-order restart cannot get right: the previous
//! backend took requests A, B and C and completed only B, out of order.
//! Resuming at the used index (1) without the log would redo B and lose A.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEMORY: usize = 1 << 20;
const IMAGE: u64 = 1 << 20;
/// For the crash test: a write big enough (tens of milliseconds or more)
/// that a 1 ms step of the stopped backend does not see it through.
const BIG_WRITE: u64 = 128 << 20;
const BIG_MEMORY: usize = 192 << 20;
const BIG_DATA: u64 = 32 << 20;
const BUFFERS: u64 = 0x1_0000;

/// The four write requests: (head descriptor, sector, fill byte).
const A: (u16, u64, u8) = (0, 8, 0xaa);
const B: (u16, u64, u8) = (3, 16, 0xbb);
const C: (u16, u64, u8) = (6, 24, 0xcc);
const D: (u16, u64, u8) = (9, 32, 0xdd);

fn guest_memory() -> GuestMemoryMmap {
    guest_memory_of(MEMORY)
}

/// A one-sector write of `fill` bytes at `sector`: header, data, status.
fn put_write_request(memory: &GuestMemoryMmap, (head, sector, fill): (u16, u64, u8)) {
    let base = BUFFERS + u64::from(head) * 0x1000;
    put_header(memory, base, VIRTIO_BLK_T_OUT, sector);
    memory
        .write_slice(&[fill; SECTOR as usize], GuestAddress(base + 0x100))
        .unwrap();
    memory
        .write_obj(0xffu8, GuestAddress(base + 0x400))
        .unwrap();
    put_descriptor(memory, head, base, 16, DESC_F_NEXT, head + 1);
    put_descriptor(
        memory,
        head + 1,
        base + 0x100,
        SECTOR as u32,
        DESC_F_NEXT,
        head + 2,
    );
    put_descriptor(memory, head + 2, base + 0x400, 1, DESC_F_WRITE, 0);
}

fn status_of(memory: &GuestMemoryMmap, head: u16) -> u8 {
    memory
        .read_obj(GuestAddress(BUFFERS + u64::from(head) * 0x1000 + 0x400))
        .unwrap()
}

#[test]
fn a_restarted_backend_serves_what_its_predecessor_left_and_nothing_twice() {
    let (mut backend, socket, image) = Backend::start("recover", IMAGE, QUEUE_SIZE);
    let memory = guest_memory();
    for request in [A, B, C, D] {
        put_write_request(&memory, request);
    }
    // The driver made A, B, C and then D available.
    make_available(&memory, &[A.0, B.0, C.0, D.0]);
    // The previous backend returned B only.
    memory
        .write_obj(u32::from(B.0), GuestAddress(USED_RING + 4))
        .unwrap();
    memory.write_obj(1u32, GuestAddress(USED_RING + 8)).unwrap();
    memory.write_obj(1u16, GuestAddress(USED_RING + 2)).unwrap();

    let mut frontend = negotiate(&socket, VIRTIO_F_VERSION_1);
    let (shape, log) = new_log(&mut frontend);
    let size = shape.mmap_size;
    assert!(size >= 16 + 16 * u64::from(QUEUE_SIZE), "a {size}-byte log");
    assert_eq!(log.metadata().unwrap().len(), size);
    // What the previous backend left: it took A (counter 10), B (11) and
    // C (12), returned B and marked it done.
    put_inflight(&log, 1, B.0, &[(A.0, 10), (C.0, 12)]);
    log.write_all_at(&11u64.to_le_bytes(), desc_state_at(B.0) + 8)
        .unwrap();

    frontend
        .set_inflight_fd(&shape, std::os::fd::AsRawFd::as_raw_fd(&log))
        .expect("SET_INFLIGHT_FD");
    // Restart at the used index, as pvstack and QEMU do after a crash.
    let _events = start_queue(&mut frontend, &memory, 1);
    wait_for_used(&memory, 4, &mut backend);

    // A and C again (started oldest first, returned as they complete),
    // and the new D; B not again.
    let mut served = used_ids(&memory, 1..4);
    served.sort_unstable();
    assert_eq!(served, [A.0, C.0, D.0]);
    for (head, sector, fill) in [A, C, D] {
        assert_eq!(status_of(&memory, head), 0, "status of request {head}");
        assert_eq!(sector_of(&image, sector), vec![fill; SECTOR as usize]);
    }
    assert_eq!(status_of(&memory, B.0), 0xff, "B was served again");
    assert_eq!(
        sector_of(&image, B.1),
        vec![0; SECTOR as usize],
        "B was written again"
    );
    // The log now says nothing is in flight and where the used ring is.
    let mut byte = [0u8];
    for head in 0..QUEUE_SIZE {
        log.read_exact_at(&mut byte, desc_state_at(head)).unwrap();
        assert_eq!(byte[0], 0, "descriptor {head} still logged in flight");
    }
    let mut used = [0u8; 2];
    log.read_exact_at(&mut used, USED_IDX_AT).unwrap();
    assert_eq!(u16::from_le_bytes(used), 4);
    let log = backend.log();
    assert!(
        log.contains("serving 2 requests a previous backend took and did not complete"),
        "{log}"
    );
}

#[test]
fn inflight_messages_pvstack_blk_cannot_honour_are_refused_and_it_serves_on() {
    let (mut backend, socket, _image) = Backend::start("refuse", IMAGE, QUEUE_SIZE);
    let mut frontend = negotiate(&socket, VIRTIO_F_VERSION_1);
    // More queues than the device has: a zero-sized answer without a file.
    let too_many = VhostUserInflight {
        num_queues: 2,
        queue_size: QUEUE_SIZE,
        ..Default::default()
    };
    assert!(frontend.get_inflight_fd(&too_many).is_err());
    // A log too small for the queue it claims to describe.
    let (mut shape, log) = new_log(&mut frontend);
    shape.mmap_size = 64;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&log);
    assert!(frontend.set_inflight_fd(&shape, fd).is_err());
    // The connection and the backend are fine: a good log is taken, and a
    // request is served.
    shape.mmap_size = log.metadata().unwrap().len();
    frontend.set_inflight_fd(&shape, fd).expect("a good log");
    let memory = guest_memory();
    put_write_request(&memory, A);
    make_available(&memory, &[A.0]);
    let (_call, kick) = start_queue(&mut frontend, &memory, 0);
    kick.write(1).unwrap();
    wait_for_used(&memory, 1, &mut backend);
    assert_eq!(status_of(&memory, A.0), 0);
    assert!(backend.is_running());
}

/// The crash test's state after the kill.
struct MidWriteCrash {
    /// The killed backend, whose scratch directory (image, socket) the
    /// next one uses.
    killed: Backend,
    socket: PathBuf,
    image: PathBuf,
    memory: GuestMemoryMmap,
    shape: VhostUserInflight,
    log: File,
}

/// Whether the log marks the chain at `head` in flight.
fn logged_in_flight(log: &File, head: u16) -> bool {
    let mut state = [0u8];
    log.read_exact_at(&mut state, desc_state_at(head)).unwrap();
    state[0] == 1
}

/// Starts a pvstack-blk, makes the big write (request 0) and D available,
/// and SIGKILLs it at a moment its log shows both taken and its used ring
/// shows nothing done: it is stopped (SIGSTOP) before they are made
/// available and then let run in steps of a millisecond, each ended by a
/// SIGSTOP, and the log and the ring are read while it stands still, so
/// what they show is what the kill hits. `None` if the backend finished
/// the write within one step (the test thread was held up for the whole
/// write); the caller tries again.
fn crash_mid_write() -> Option<MidWriteCrash> {
    let (mut backend, socket, image) = Backend::start("crash", BIG_WRITE + IMAGE, QUEUE_SIZE);
    let memory = guest_memory_of(BIG_MEMORY);
    // Request 0 writes BIG_WRITE bytes at sector 0 from BIG_DATA, marked
    // at both ends; request D (behind it in the ring) writes one sector.
    let big = |offset: u64| GuestAddress(BIG_DATA + offset);
    memory.write_slice(&[0x5a; 4096], big(0)).unwrap();
    memory
        .write_slice(&[0xa5; 4096], big(BIG_WRITE - 4096))
        .unwrap();
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    memory.write_slice(&header, GuestAddress(BUFFERS)).unwrap();
    memory
        .write_obj(0xffu8, GuestAddress(BUFFERS + 0x400))
        .unwrap();
    put_descriptor(&memory, 0, BUFFERS, 16, DESC_F_NEXT, 1);
    put_descriptor(&memory, 1, BIG_DATA, BIG_WRITE as u32, DESC_F_NEXT, 2);
    put_descriptor(&memory, 2, BUFFERS + 0x400, 1, DESC_F_WRITE, 0);
    put_write_request(&memory, (D.0, D_SECTOR, D.2));

    let mut frontend = negotiate(&socket, VIRTIO_F_VERSION_1);
    let (shape, log) = new_log(&mut frontend);
    frontend
        .set_inflight_fd(&shape, std::os::fd::AsRawFd::as_raw_fd(&log))
        .unwrap();
    let (_call, kick) = start_queue(&mut frontend, &memory, 0);
    backend.stop();
    make_available(&memory, &[0, D.0]);
    kick.write(1).unwrap();
    let started = Instant::now();
    while !(logged_in_flight(&log, 0) && logged_in_flight(&log, D.0)) {
        if used_idx(&memory) != 0 {
            eprintln!("pvstack-blk finished the big write within one step; trying again");
            return None;
        }
        assert!(
            started.elapsed() < HANG_GUARD,
            "the big write was never taken:\n{}",
            backend.log()
        );
        backend.step(Duration::from_millis(1));
    }
    // Taken, and neither completed: the kill lands in the middle of them.
    assert_eq!(used_idx(&memory), 0);
    assert_eq!(status_of(&memory, 0), 0xff);
    assert_eq!(status_of(&memory, D.0), 0xff);
    backend.kill();
    drop(frontend);
    Some(MidWriteCrash {
        killed: backend,
        socket,
        image,
        memory,
        shape,
        log,
    })
}

/// Where the crash test's request D writes: past the big write.
const D_SECTOR: u64 = BIG_WRITE / SECTOR + 8;

#[test]
fn sigkill_in_the_middle_of_a_write_and_the_next_backend_finishes_it() {
    let started = Instant::now();
    let crash = loop {
        if let Some(crash) = crash_mid_write() {
            break crash;
        }
        assert!(
            started.elapsed() < HANG_GUARD,
            "never caught the big write in flight"
        );
    };
    let MidWriteCrash {
        killed,
        socket,
        image,
        memory,
        shape,
        log,
    } = crash;

    // A new pvstack-blk, given the same log, at the used index.
    let mut backend = killed.respawn("blk-restarted.log");
    let mut frontend = negotiate(&socket, VIRTIO_F_VERSION_1);
    frontend
        .set_inflight_fd(&shape, std::os::fd::AsRawFd::as_raw_fd(&log))
        .unwrap();
    let _events = start_queue(&mut frontend, &memory, used_idx(&memory));
    wait_for_used(&memory, 2, &mut backend);

    let mut served = used_ids(&memory, 0..2);
    served.sort_unstable();
    assert_eq!(served, [0, D.0], "each request once");
    assert_eq!(status_of(&memory, 0), 0);
    assert_eq!(status_of(&memory, D.0), 0);
    let mut bytes = vec![0u8; 4096];
    let file = File::open(&image).unwrap();
    file.read_exact_at(&mut bytes, 0).unwrap();
    assert_eq!(bytes, [0x5a; 4096]);
    file.read_exact_at(&mut bytes, BIG_WRITE - 4096).unwrap();
    assert_eq!(bytes, [0xa5; 4096]);
    assert_eq!(sector_of(&image, D_SECTOR), vec![D.2; SECTOR as usize]);
    let restarted = backend.log();
    assert!(
        restarted.contains("serving 2 requests a previous backend took and did not complete"),
        "{restarted}"
    );
}
