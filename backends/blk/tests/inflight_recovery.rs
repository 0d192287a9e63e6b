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

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEMORY: usize = 1 << 20;
const IMAGE: u64 = 1 << 20;
/// For the crash test: a write big enough (tens of milliseconds) to be
/// caught in the middle.
const BIG_WRITE: u64 = 128 << 20;
const BIG_MEMORY: usize = 192 << 20;
const BIG_DATA: u64 = 32 << 20;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const BUFFERS: u64 = 0x1_0000;
const SECTOR: u64 = 512;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_T_OUT: u32 = 1;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// Only keeps a broken backend from hanging the test for ever.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// The four write requests: (head descriptor, sector, fill byte).
const A: (u16, u64, u8) = (0, 8, 0xaa);
const B: (u16, u64, u8) = (3, 16, 0xbb);
const C: (u16, u64, u8) = (6, 24, 0xcc);
const D: (u16, u64, u8) = (9, 32, 0xdd);

struct Backend {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl Backend {
    /// A pvstack-blk on a fresh `image_size`-byte image in a scratch
    /// directory of its own (removed when the last backend on it drops).
    fn start(name: &str, image_size: u64) -> (Backend, PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "pvstack-blk-inflight-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        File::create(&image).unwrap().set_len(image_size).unwrap();
        let socket = dir.join("blk.sock");
        (Backend::spawn(&dir, "blk.log"), socket, image)
    }

    /// A pvstack-blk serving `dir`'s image on `dir`'s socket, logging to
    /// `log` there.
    fn spawn(dir: &Path, log: &str) -> Backend {
        let socket = dir.join("blk.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(env!("CARGO_BIN_EXE_pvstack-blk"))
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(dir.join("disk.img"))
            .arg("--queue-size")
            .arg(QUEUE_SIZE.to_string())
            .env("RUST_LOG", "info")
            .stderr(File::create(dir.join(log)).unwrap())
            .spawn()
            .expect("start pvstack-blk");
        let started = Instant::now();
        while !socket.exists() {
            assert!(started.elapsed() < HANG_GUARD, "pvstack-blk never listened");
            std::thread::sleep(Duration::from_millis(5));
        }
        Backend {
            child,
            dir: dir.to_path_buf(),
            log: dir.join(log),
        }
    }

    /// SIGKILL: a crash.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn guest_memory() -> GuestMemoryMmap {
    guest_memory_of(MEMORY)
}

/// Guest RAM of `size` bytes in a memfd (sparse: untouched pages cost nothing).
fn guest_memory_of(size: usize) -> GuestMemoryMmap {
    let file = memfd::MemfdOptions::default()
        .create("inflight-test")
        .expect("memfd_create")
        .into_file();
    file.set_len(size as u64).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

fn put_descriptor(
    memory: &GuestMemoryMmap,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let at = GuestAddress(DESC_TABLE + 16 * u64::from(index));
    memory.write_obj(addr.to_le(), at).unwrap();
    memory.write_obj(len.to_le(), at.unchecked_add(8)).unwrap();
    memory
        .write_obj(flags.to_le(), at.unchecked_add(12))
        .unwrap();
    memory
        .write_obj(next.to_le(), at.unchecked_add(14))
        .unwrap();
}

/// A one-sector write of `fill` bytes at `sector`: header, data, status.
fn put_write_request(memory: &GuestMemoryMmap, (head, sector, fill): (u16, u64, u8)) {
    let base = BUFFERS + u64::from(head) * 0x1000;
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    memory.write_slice(&header, GuestAddress(base)).unwrap();
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

/// The driver's available ring: `heads`, in this order, from slot 0.
fn make_available(memory: &GuestMemoryMmap, heads: &[u16]) {
    for (slot, &head) in heads.iter().enumerate() {
        memory
            .write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * slot as u64))
            .unwrap();
    }
    memory
        .write_obj(heads.len() as u16, GuestAddress(AVAIL_RING + 2))
        .unwrap();
}

fn status_of(memory: &GuestMemoryMmap, head: u16) -> u8 {
    memory
        .read_obj(GuestAddress(BUFFERS + u64::from(head) * 0x1000 + 0x400))
        .unwrap()
}

fn used_idx(memory: &GuestMemoryMmap) -> u16 {
    memory.read_obj(GuestAddress(USED_RING + 2)).unwrap()
}

fn used_ids(memory: &GuestMemoryMmap, range: std::ops::Range<u16>) -> Vec<u16> {
    range
        .map(|i| {
            let id: u32 = memory
                .read_obj(GuestAddress(USED_RING + 4 + 8 * u64::from(i)))
                .unwrap();
            id as u16
        })
        .collect()
}

fn sector_of(image: &Path, sector: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; SECTOR as usize];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut bytes, sector * SECTOR)
        .unwrap();
    bytes
}

/// Negotiates as pvstack's frontend does, with INFLIGHT_SHMFD and REPLY_ACK.
fn negotiate(socket: &Path) -> Frontend {
    let mut frontend = Frontend::connect(socket, 1).expect("connect");
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    assert!(
        protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        "pvstack-blk does not offer INFLIGHT_SHMFD: {protocol:?}"
    );
    frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::INFLIGHT_SHMFD | VhostUserProtocolFeatures::REPLY_ACK,
        )
        .unwrap();
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    frontend
        .set_features(VIRTIO_F_VERSION_1 | (features & (1 << 30)))
        .unwrap();
    frontend
}

/// A new inflight log for the one queue (GET_INFLIGHT_FD).
fn new_log(frontend: &mut Frontend) -> (VhostUserInflight, File) {
    let wanted = VhostUserInflight {
        num_queues: 1,
        queue_size: QUEUE_SIZE,
        ..Default::default()
    };
    frontend.get_inflight_fd(&wanted).expect("GET_INFLIGHT_FD")
}

/// Memory table, ring and eventfds for queue 0, starting at `base`. The
/// test never writes the kick: the backend must look at the ring by itself
/// once it has a log to recover (QEMU sends no kick after a restart).
fn start_queue(frontend: &mut Frontend, memory: &GuestMemoryMmap, base: u16) -> (EventFd, EventFd) {
    let regions: Vec<_> = memory
        .iter()
        .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
        .collect();
    frontend.set_mem_table(&regions).unwrap();
    frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
    let call = EventFd::new(0).unwrap();
    let kick = EventFd::new(0).unwrap();
    frontend.set_vring_call(0, &call).unwrap();
    frontend.set_vring_base(0, base).unwrap();
    let host = |gpa| memory.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: host(DESC_TABLE),
                used_ring_addr: host(USED_RING),
                avail_ring_addr: host(AVAIL_RING),
                log_addr: None,
            },
        )
        .unwrap();
    frontend.set_vring_kick(0, &kick).unwrap();
    frontend.set_vring_enable(0, true).unwrap();
    (call, kick)
}

fn wait_for_used(memory: &GuestMemoryMmap, idx: u16, backend: &mut Backend) {
    let started = Instant::now();
    while used_idx(memory) != idx {
        assert!(backend.is_running(), "pvstack-blk died:\n{}", backend.log());
        assert!(
            started.elapsed() < HANG_GUARD,
            "used index stuck at {}, expected {idx}; log:\n{}",
            used_idx(memory),
            backend.log()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

// The split-queue log layout of the vhost-user specification.
const VERSION_AT: u64 = 8;
const DESC_NUM_AT: u64 = 10;
const LAST_BATCH_HEAD_AT: u64 = 12;
const USED_IDX_AT: u64 = 14;
fn desc_state_at(head: u16) -> u64 {
    16 + 16 * u64::from(head)
}

#[test]
fn a_restarted_backend_serves_what_its_predecessor_left_and_nothing_twice() {
    let (mut backend, socket, image) = Backend::start("recover", IMAGE);
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

    let mut frontend = negotiate(&socket);
    let (shape, log) = new_log(&mut frontend);
    let size = shape.mmap_size;
    assert!(size >= 16 + 16 * u64::from(QUEUE_SIZE), "a {size}-byte log");
    assert_eq!(log.metadata().unwrap().len(), size);
    // What the previous backend left: it took A (counter 10), B (11) and
    // C (12), returned B and marked it done.
    let put = |at: u64, bytes: &[u8]| log.write_all_at(bytes, at).unwrap();
    put(VERSION_AT, &1u16.to_le_bytes());
    put(DESC_NUM_AT, &QUEUE_SIZE.to_le_bytes());
    put(LAST_BATCH_HEAD_AT, &B.0.to_le_bytes());
    put(USED_IDX_AT, &1u16.to_le_bytes());
    for (head, counter) in [(A.0, 10u64), (C.0, 12)] {
        put(desc_state_at(head), &[1]);
        put(desc_state_at(head) + 8, &counter.to_le_bytes());
    }
    put(desc_state_at(B.0) + 8, &11u64.to_le_bytes());

    frontend
        .set_inflight_fd(&shape, std::os::fd::AsRawFd::as_raw_fd(&log))
        .expect("SET_INFLIGHT_FD");
    // Restart at the used index, as pvstack and QEMU do after a crash.
    let _events = start_queue(&mut frontend, &memory, 1);
    wait_for_used(&memory, 4, &mut backend);

    // A and C again, oldest first, then the new D; B not again.
    assert_eq!(used_ids(&memory, 1..4), [A.0, C.0, D.0]);
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
    let (mut backend, socket, _image) = Backend::start("refuse", IMAGE);
    let mut frontend = negotiate(&socket);
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

#[test]
fn sigkill_in_the_middle_of_a_write_and_the_next_backend_finishes_it() {
    let (mut backend, socket, image) = Backend::start("crash", BIG_WRITE + IMAGE);
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
    let d_sector = BIG_WRITE / SECTOR + 8;
    put_write_request(&memory, (D.0, d_sector, D.2));
    make_available(&memory, &[0, D.0]);

    let mut frontend = negotiate(&socket);
    let (shape, log) = new_log(&mut frontend);
    let log_fd = std::os::fd::AsRawFd::as_raw_fd(&log);
    frontend.set_inflight_fd(&shape, log_fd).unwrap();
    let (_call, kick) = start_queue(&mut frontend, &memory, 0);
    kick.write(1).unwrap();
    // Kill it as soon as its log says it took the big write.
    let started = Instant::now();
    let mut state = [0u8];
    loop {
        log.read_exact_at(&mut state, desc_state_at(0)).unwrap();
        if state[0] == 1 {
            break;
        }
        assert!(
            started.elapsed() < HANG_GUARD,
            "the big write was never taken"
        );
        std::hint::spin_loop();
    }
    backend.kill();
    drop(frontend);
    assert_eq!(
        used_idx(&memory),
        0,
        "the big write finished before the kill"
    );

    // A new pvstack-blk, given the same log, at the used index.
    let mut backend = Backend::spawn(&backend.dir.clone(), "blk-restarted.log");
    let mut frontend = negotiate(&socket);
    frontend.set_inflight_fd(&shape, log_fd).unwrap();
    let _events = start_queue(&mut frontend, &memory, used_idx(&memory));
    wait_for_used(&memory, 2, &mut backend);

    assert_eq!(
        used_ids(&memory, 0..2),
        [0, D.0],
        "each request once, in order"
    );
    assert_eq!(status_of(&memory, 0), 0);
    assert_eq!(status_of(&memory, D.0), 0);
    let mut bytes = vec![0u8; 4096];
    let file = File::open(&image).unwrap();
    file.read_exact_at(&mut bytes, 0).unwrap();
    assert_eq!(bytes, [0x5a; 4096]);
    file.read_exact_at(&mut bytes, BIG_WRITE - 4096).unwrap();
    assert_eq!(bytes, [0xa5; 4096]);
    assert_eq!(sector_of(&image, d_sector), vec![D.2; SECTOR as usize]);
    let restarted = backend.log();
    assert!(
        restarted.contains("serving 2 requests a previous backend took and did not complete"),
        "{restarted}"
    );
}
