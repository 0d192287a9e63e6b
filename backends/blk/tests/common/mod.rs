//! The test as pvstack-blk's vhost-user frontend: a real pvstack-blk
//! process on a scratch image, guest memory in a memfd, one queue whose
//! rings and requests the test lays out by hand.
//!
//! Each test binary uses part of this module.
#![allow(dead_code)]

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

/// The size the test's frontend sets for the queue.
pub const QUEUE_SIZE: u16 = 16;
pub const DESC_TABLE: u64 = 0x1000;
pub const AVAIL_RING: u64 = 0x2000;
pub const USED_RING: u64 = 0x3000;
pub const SECTOR: u64 = 512;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
/// Only keeps a broken backend from hanging the test for ever.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

pub struct Backend {
    child: Child,
    pub dir: PathBuf,
    log: PathBuf,
    /// Its --queue-size.
    queue_size: u16,
    /// Its other arguments.
    extra: Vec<String>,
}

impl Backend {
    /// A pvstack-blk allowing queues of `queue_size` on a fresh
    /// `image_size`-byte image in a scratch directory of its own (removed
    /// when the last backend on it drops). Returns its socket and image.
    pub fn start(name: &str, image_size: u64, queue_size: u16) -> (Backend, PathBuf, PathBuf) {
        Self::start_with(name, image_size, queue_size, &[])
    }

    /// As [`Self::start`], with more pvstack-blk arguments (kept for
    /// [`Self::respawn`]).
    pub fn start_with(
        name: &str,
        image_size: u64,
        queue_size: u16,
        extra: &[&str],
    ) -> (Backend, PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "pvstack-blk-frontend-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        File::create(&image).unwrap().set_len(image_size).unwrap();
        let socket = dir.join("blk.sock");
        let extra = extra.iter().map(|a| a.to_string()).collect();
        (
            Backend::spawn(&dir, "blk.log", queue_size, extra),
            socket,
            image,
        )
    }

    /// A new pvstack-blk in this one's place (after [`Self::kill`]),
    /// logging to `log`.
    pub fn respawn(&self, log: &str) -> Backend {
        Backend::spawn(&self.dir, log, self.queue_size, self.extra.clone())
    }

    fn spawn(dir: &Path, log: &str, queue_size: u16, extra: Vec<String>) -> Backend {
        let socket = dir.join("blk.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(env!("CARGO_BIN_EXE_pvstack-blk"))
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(dir.join("disk.img"))
            .arg("--queue-size")
            .arg(queue_size.to_string())
            .args(&extra)
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
            queue_size,
            extra,
        }
    }

    /// SIGSTOP, and waits until every thread has stopped: its memory and
    /// the log then stay as they are until it continues or dies.
    pub fn stop(&mut self) {
        self.signal(libc::SIGSTOP);
        let started = Instant::now();
        while !self.all_threads_stopped() {
            assert!(started.elapsed() < HANG_GUARD, "pvstack-blk never stopped");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets a stopped backend run for about `time`, then stops it again.
    pub fn step(&mut self, time: Duration) {
        self.signal(libc::SIGCONT);
        std::thread::sleep(time);
        self.stop();
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our child, not yet reaped; no memory is passed.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    fn all_threads_stopped(&self) -> bool {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).unwrap();
        tasks.flatten().all(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            stat.rsplit(") ")
                .next()
                .is_some_and(|rest| rest.starts_with('T'))
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log(&self) -> String {
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

/// Guest RAM of `size` bytes in a memfd (sparse: untouched pages cost nothing).
pub fn guest_memory_of(size: usize) -> GuestMemoryMmap {
    let file = memfd::MemfdOptions::default()
        .create("frontend-test")
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

/// Writes descriptor `index` of the table at `table` (the queue's, or an
/// indirect one).
pub fn put_descriptor_in(
    memory: &GuestMemoryMmap,
    table: u64,
    index: u16,
    (addr, len, flags, next): (u64, u32, u16, u16),
) {
    let at = GuestAddress(table + 16 * u64::from(index));
    memory.write_obj(addr.to_le(), at).unwrap();
    memory.write_obj(len.to_le(), at.unchecked_add(8)).unwrap();
    memory
        .write_obj(flags.to_le(), at.unchecked_add(12))
        .unwrap();
    memory
        .write_obj(next.to_le(), at.unchecked_add(14))
        .unwrap();
}

/// Writes descriptor `index` of the queue's table.
pub fn put_descriptor(
    memory: &GuestMemoryMmap,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    put_descriptor_in(memory, DESC_TABLE, index, (addr, len, flags, next));
}

/// Writes a `struct virtio_blk_outhdr` at `addr`.
pub fn put_header(memory: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&request_type.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    memory.write_slice(&header, GuestAddress(addr)).unwrap();
}

/// The driver's available ring: `heads`, in this order, from slot 0.
pub fn make_available(memory: &GuestMemoryMmap, heads: &[u16]) {
    for (slot, &head) in heads.iter().enumerate() {
        memory
            .write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * slot as u64))
            .unwrap();
    }
    memory
        .write_obj(heads.len() as u16, GuestAddress(AVAIL_RING + 2))
        .unwrap();
}

pub fn used_idx(memory: &GuestMemoryMmap) -> u16 {
    memory.read_obj(GuestAddress(USED_RING + 2)).unwrap()
}

/// The used ring's elements in `range`: (chain head, used length).
pub fn used_elements(memory: &GuestMemoryMmap, range: std::ops::Range<u16>) -> Vec<(u16, u32)> {
    range
        .map(|i| {
            let at = USED_RING + 4 + 8 * u64::from(i);
            let id: u32 = memory.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = memory.read_obj(GuestAddress(at + 4)).unwrap();
            (id as u16, len)
        })
        .collect()
}

/// The used ring's elements in `range`, sorted by head: what was
/// returned, whatever the order requests completed in (the io_uring engine
/// returns them as they complete).
pub fn used_elements_sorted(
    memory: &GuestMemoryMmap,
    range: std::ops::Range<u16>,
) -> Vec<(u16, u32)> {
    let mut elements = used_elements(memory, range);
    elements.sort_unstable();
    elements
}

pub fn used_ids(memory: &GuestMemoryMmap, range: std::ops::Range<u16>) -> Vec<u16> {
    used_elements(memory, range)
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// `len` bytes of the image from `offset`.
pub fn image_bytes(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut bytes, offset)
        .unwrap();
    bytes
}

pub fn sector_of(image: &Path, sector: u64) -> Vec<u8> {
    image_bytes(image, sector * SECTOR, SECTOR as usize)
}

/// Negotiates as pvstack's frontend does, with INFLIGHT_SHMFD and
/// REPLY_ACK, accepting the virtio `features` (which pvstack-blk must offer).
pub fn negotiate(socket: &Path, features: u64) -> Frontend {
    let mut frontend = Frontend::connect(socket, 1).expect("connect");
    frontend.set_owner().unwrap();
    let offered = frontend.get_features().unwrap();
    assert_eq!(
        features & !offered,
        0,
        "pvstack-blk does not offer {features:#x}: {offered:#x}"
    );
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
        .set_features(features | (offered & (1 << 30)))
        .unwrap();
    frontend
}

/// A new inflight log for the one queue (GET_INFLIGHT_FD).
pub fn new_log(frontend: &mut Frontend) -> (VhostUserInflight, File) {
    new_log_of(frontend, QUEUE_SIZE)
}

/// A new inflight log for the one queue of `queue_size` entries.
pub fn new_log_of(frontend: &mut Frontend, queue_size: u16) -> (VhostUserInflight, File) {
    let wanted = VhostUserInflight {
        num_queues: 1,
        queue_size,
        ..Default::default()
    };
    frontend.get_inflight_fd(&wanted).expect("GET_INFLIGHT_FD")
}

/// Memory table, ring and eventfds for queue 0, starting at `base`. The
/// test never writes the kick: the backend must look at the ring by itself
/// once it has a log to recover (QEMU sends no kick after a restart).
pub fn start_queue(
    frontend: &mut Frontend,
    memory: &GuestMemoryMmap,
    base: u16,
) -> (EventFd, EventFd) {
    start_queue_of(frontend, memory, base, QUEUE_SIZE)
}

/// As [`start_queue`], for a queue of `queue_size` entries (at most 128:
/// the rings' places leave room for no more).
pub fn start_queue_of(
    frontend: &mut Frontend,
    memory: &GuestMemoryMmap,
    base: u16,
    queue_size: u16,
) -> (EventFd, EventFd) {
    assert!(queue_size <= 128, "no room for a queue of {queue_size}");
    let regions: Vec<_> = memory
        .iter()
        .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
        .collect();
    frontend.set_mem_table(&regions).unwrap();
    frontend.set_vring_num(0, queue_size).unwrap();
    let call = EventFd::new(0).unwrap();
    let kick = EventFd::new(0).unwrap();
    frontend.set_vring_call(0, &call).unwrap();
    frontend.set_vring_base(0, base).unwrap();
    let host = |gpa| memory.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: queue_size,
                queue_size,
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

pub fn wait_for_used(memory: &GuestMemoryMmap, idx: u16, backend: &mut Backend) {
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
pub const VERSION_AT: u64 = 8;
pub const DESC_NUM_AT: u64 = 10;
pub const LAST_BATCH_HEAD_AT: u64 = 12;
pub const USED_IDX_AT: u64 = 14;
pub fn desc_state_at(head: u16) -> u64 {
    16 + 16 * u64::from(head)
}

/// Writes what a backend that took the chains at `heads` (with these
/// counters) and returned none would have left in `log`: the queue's
/// header with the used index `used_idx`, and each head in flight.
pub fn put_inflight(log: &File, used_idx: u16, last_batch_head: u16, heads: &[(u16, u64)]) {
    let put = |at: u64, bytes: &[u8]| log.write_all_at(bytes, at).unwrap();
    put(VERSION_AT, &1u16.to_le_bytes());
    put(DESC_NUM_AT, &QUEUE_SIZE.to_le_bytes());
    put(LAST_BATCH_HEAD_AT, &last_batch_head.to_le_bytes());
    put(USED_IDX_AT, &used_idx.to_le_bytes());
    for &(head, counter) in heads {
        put(desc_state_at(head), &[1]);
        put(desc_state_at(head) + 8, &counter.to_le_bytes());
    }
}
