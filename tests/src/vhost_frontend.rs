//! The test as a vhost-user frontend of a real backend process: guest RAM
//! in a memfd, split rings laid out by hand, negotiation with vhost's own
//! `Frontend`, and raw messages for what that `Frontend` would not send.
//! Used to play a hostile (or an honest) frontend and a hostile guest
//! against pvstack-blk, pvstack-net and pvstack-console.

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::process::LoggedProcess;
use crate::{binary, HANG_TIMEOUT};

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
/// vhost-user request codes the raw helpers send.
pub mod request {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const ADD_MEM_REG: u32 = 37;
}
/// Header flags: version 1, a reply, a reply wanted.
pub const FLAG_VERSION: u32 = 0x1;
pub const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// Guest RAM at guest address 0 in a memfd, mapped here too.
pub struct Ram {
    pub memory: GuestMemoryMmap,
}

impl Ram {
    /// `size` bytes (sparse: untouched pages cost nothing).
    pub fn new(size: usize) -> Ram {
        let file = memfd::MemfdOptions::default()
            .create("vhost-frontend-test")
            .expect("memfd_create")
            .into_file();
        file.set_len(size as u64).expect("size the memfd");
        let memory = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("map guest RAM");
        Ram { memory }
    }

    /// The memory table an honest frontend sends.
    pub fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.memory
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).expect("region info"))
            .collect()
    }

    /// The memfd behind the RAM.
    pub fn fd(&self) -> RawFd {
        self.regions()[0].mmap_handle
    }

    /// Where guest address `gpa` is mapped in this process (what the
    /// vhost-user ring addresses are given as).
    pub fn host(&self, gpa: u64) -> u64 {
        self.memory
            .get_host_address(GuestAddress(gpa))
            .expect("address inside guest RAM") as u64
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.memory
            .write_slice(bytes, GuestAddress(gpa))
            .expect("write guest RAM");
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.memory
            .read_slice(&mut bytes, GuestAddress(gpa))
            .expect("read guest RAM");
        bytes
    }
}

/// A split ring laid out from guest address `base`: the descriptor table,
/// then the available ring at +0x1000, the used ring at +0x2000 (room for
/// queues of up to 256 entries).
pub struct Ring {
    pub index: u32,
    pub size: u16,
    base: u64,
    /// The available index the driver has reached.
    avail_idx: u16,
}

impl Ring {
    pub fn new(index: u32, size: u16, base: u64) -> Ring {
        assert!(size <= 256, "the layout has room for 256 entries");
        Ring {
            index,
            size,
            base,
            avail_idx: 0,
        }
    }

    pub fn desc_table(&self) -> u64 {
        self.base
    }

    pub fn avail_ring(&self) -> u64 {
        self.base + 0x1000
    }

    pub fn used_ring(&self) -> u64 {
        self.base + 0x2000
    }

    /// Writes descriptor `slot`.
    pub fn put(&self, ram: &Ram, slot: u16, (addr, len, flags, next): (u64, u32, u16, u16)) {
        put_descriptor(
            ram,
            self.desc_table() + 16 * u64::from(slot),
            addr,
            len,
            flags,
            next,
        );
    }

    /// Makes the chain at `head` available.
    pub fn offer(&mut self, ram: &Ram, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        ram.write(self.avail_ring() + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        ram.write(self.avail_ring() + 2, &self.avail_idx.to_le_bytes());
    }

    pub fn used_idx(&self, ram: &Ram) -> u16 {
        u16::from_le_bytes(
            ram.read(self.used_ring() + 2, 2)
                .try_into()
                .expect("2 bytes"),
        )
    }

    /// Used element `n`: (chain head, length written).
    pub fn used(&self, ram: &Ram, n: u16) -> (u32, u32) {
        let at = self.used_ring() + 4 + 8 * u64::from(n % self.size);
        let element = ram.read(at, 8);
        let word = |i: usize| u32::from_le_bytes(element[i..i + 4].try_into().expect("4 bytes"));
        (word(0), word(4))
    }

    /// Waits until the used index reaches `idx`; panics with the log if
    /// `backend` dies first or it never does.
    pub fn wait_used(&self, ram: &Ram, idx: u16, backend: &mut LoggedProcess) {
        let started = Instant::now();
        while self.used_idx(ram) != idx {
            assert!(backend.is_running(), "the backend died:\n{}", backend.log());
            assert!(
                started.elapsed() < HANG_TIMEOUT,
                "used index of queue {} stuck at {}, expected {idx}:\n{}",
                self.index,
                self.used_idx(ram),
                backend.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The ring's addresses as SET_VRING_ADDR gives them.
    pub fn config(&self, ram: &Ram) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: ram.host(self.desc_table()),
            used_ring_addr: ram.host(self.used_ring()),
            avail_ring_addr: ram.host(self.avail_ring()),
            log_addr: None,
        }
    }
}

/// Writes a descriptor (addr, len, flags, next) at guest address `at`.
pub fn put_descriptor(ram: &Ram, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&addr.to_le_bytes());
    bytes[8..12].copy_from_slice(&len.to_le_bytes());
    bytes[12..14].copy_from_slice(&flags.to_le_bytes());
    bytes[14..].copy_from_slice(&next.to_le_bytes());
    ram.write(at, &bytes);
}

/// Connects and negotiates as pvstack does: SET_OWNER, the virtio
/// features in `wanted` that are offered (and PROTOCOL_FEATURES), and of
/// the protocol features MQ, CONFIG, REPLY_ACK and those in `protocol`
/// that are offered, with every request asking for an answer.
pub fn negotiate(socket: &Path, wanted: u64, protocol: VhostUserProtocolFeatures) -> Frontend {
    let mut frontend = Frontend::connect(socket, 8).expect("connect to the backend");
    frontend.set_owner().expect("SET_OWNER");
    let offered = frontend.get_features().expect("GET_FEATURES");
    assert_ne!(offered & PROTOCOL_FEATURES, 0, "features {offered:#x}");
    let offered_protocol = frontend
        .get_protocol_features()
        .expect("GET_PROTOCOL_FEATURES");
    let acked = offered_protocol
        & (protocol
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK);
    assert!(acked.contains(VhostUserProtocolFeatures::REPLY_ACK));
    frontend
        .set_protocol_features(acked)
        .expect("SET_PROTOCOL_FEATURES");
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    frontend
        .set_features(offered & (wanted | PROTOCOL_FEATURES))
        .expect("SET_FEATURES");
    frontend
}

/// Sends `ram`'s memory table.
pub fn share(frontend: &mut Frontend, ram: &Ram) {
    frontend
        .set_mem_table(&ram.regions())
        .expect("SET_MEM_TABLE");
}

/// How a test as frontend begins: connected and negotiated as pvstack
/// does (virtio 1, no protocol features beyond pvstack's own), with
/// `ram_size` bytes of guest RAM shared with the backend.
pub fn shared(socket: &Path, ram_size: usize) -> (Frontend, Ram) {
    let mut frontend = negotiate(
        socket,
        VIRTIO_F_VERSION_1,
        VhostUserProtocolFeatures::empty(),
    );
    let ram = Ram::new(ram_size);
    share(&mut frontend, &ram);
    (frontend, ram)
}

/// A started ring's eventfds.
pub struct Started {
    pub call: EventFd,
    pub kick: EventFd,
}

impl Started {
    pub fn kick(&self) {
        self.kick.write(1).expect("kick");
    }
}

/// Gives the backend `ring` and starts it.
pub fn start_ring(frontend: &mut Frontend, ram: &Ram, ring: &Ring) -> Started {
    let index = ring.index as usize;
    frontend
        .set_vring_num(index, ring.size)
        .expect("SET_VRING_NUM");
    let started = Started {
        call: EventFd::new(0).expect("eventfd"),
        kick: EventFd::new(0).expect("eventfd"),
    };
    frontend
        .set_vring_call(index, &started.call)
        .expect("SET_VRING_CALL");
    frontend.set_vring_base(index, 0).expect("SET_VRING_BASE");
    frontend
        .set_vring_addr(index, &ring.config(ram))
        .expect("SET_VRING_ADDR");
    frontend
        .set_vring_kick(index, &started.kick)
        .expect("SET_VRING_KICK");
    frontend
        .set_vring_enable(index, true)
        .expect("SET_VRING_ENABLE");
    started
}

/// Sends one vhost-user message as bytes: what vhost's `Frontend` would
/// refuse to send.
pub fn send_raw(stream: &UnixStream, code: u32, flags: u32, payload: &[u8], fds: &[RawFd]) {
    let mut bytes = Vec::with_capacity(12 + payload.len());
    for word in [code, flags, payload.len() as u32] {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    bytes.extend_from_slice(payload);
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let sent = stream
        .send_with_fds(&[&bytes[..]], fds)
        .expect("send a raw message");
    (&*stream).write_all(&bytes[sent..]).expect("send the rest");
}

/// Reads one reply: (request code, payload), or None if the backend
/// closed the connection instead.
pub fn recv_raw(stream: &UnixStream) -> Option<(u32, Vec<u8>)> {
    let mut header = [0u8; 12];
    (&*stream).read_exact(&mut header).ok()?;
    let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
    assert_ne!(word(4) & FLAG_REPLY, 0, "not a reply: {header:?}");
    let mut payload = vec![0u8; word(8) as usize];
    (&*stream).read_exact(&mut payload).ok()?;
    Some((word(0), payload))
}

/// The u64 answer of a REPLY_ACK or a GET_* request: Some(0) is success;
/// None means the backend closed the connection.
pub fn recv_u64(stream: &UnixStream) -> Option<u64> {
    let (_, payload) = recv_raw(stream)?;
    Some(u64::from_le_bytes(
        payload.get(..8)?.try_into().expect("8 bytes"),
    ))
}

/// A raw connection that has sent SET_OWNER and negotiated the protocol
/// features MQ and REPLY_ACK (which the backend honours only once it was
/// asked for its features).
pub fn raw_negotiated(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(HANG_TIMEOUT))
        .expect("read timeout");
    send_raw(&stream, request::SET_OWNER, FLAG_VERSION, &[], &[]);
    send_raw(&stream, request::GET_FEATURES, FLAG_VERSION, &[], &[]);
    let features = recv_u64(&stream).expect("features");
    assert_ne!(features & PROTOCOL_FEATURES, 0, "features {features:#x}");
    send_raw(
        &stream,
        request::GET_PROTOCOL_FEATURES,
        FLAG_VERSION,
        &[],
        &[],
    );
    let protocol = recv_u64(&stream).expect("protocol features");
    let acked =
        protocol & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK).bits();
    send_raw(
        &stream,
        request::SET_PROTOCOL_FEATURES,
        FLAG_VERSION | FLAG_NEED_REPLY,
        &acked.to_le_bytes(),
        &[],
    );
    assert_eq!(recv_u64(&stream), Some(0), "SET_PROTOCOL_FEATURES");
    stream
}

/// A memory table payload: the region count, padding, and each region
/// (guest address, size, frontend address, offset).
pub fn mem_table_payload(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    for &(gpa, size, user, offset) in regions {
        for value in [gpa, size, user, offset] {
            payload.extend_from_slice(&value.to_le_bytes());
        }
    }
    payload
}

/// A backend process of this workspace, started on `socket` with `args`
/// (logging at info to SOCKET.log), once it listens.
pub fn start_backend(program: &str, socket: &Path, args: &[&str]) -> LoggedProcess {
    start_backend_as(None, program, socket, args)
}

/// As [`start_backend`], run as the user and group `uid` if given (the
/// test must then run as root).
pub fn start_backend_as(
    uid: Option<u32>,
    program: &str,
    socket: &Path,
    args: &[&str],
) -> LoggedProcess {
    let mut command = Command::new(binary(program));
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    command
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env("RUST_LOG", "info");
    let mut process = LoggedProcess::spawn(program, &mut command, socket.with_extension("log"))
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    process.wait_until_listening(socket, |p| {
        p.log().contains("listening for a vhost-user frontend")
    });
    process
}

/// What a running process holds, from /proc.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub fds: usize,
    pub threads: usize,
    /// Resident memory now and at its peak, in KiB.
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
    /// CPU time used so far, in clock ticks.
    pub cpu_ticks: u64,
}

impl Held {
    pub fn of(pid: u32) -> Held {
        let proc = Path::new("/proc").join(pid.to_string());
        let count = |dir: &str| {
            std::fs::read_dir(proc.join(dir))
                .unwrap_or_else(|e| panic!("read /proc/{pid}/{dir}: {e}"))
                .count()
        };
        let status = std::fs::read_to_string(proc.join("status")).expect("read status");
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        };
        let stat = std::fs::read_to_string(proc.join("stat")).expect("read stat");
        // Fields after the parenthesised command name; utime and stime
        // are fields 14 and 15 of the whole line.
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| fields[i - 3].parse::<u64>().expect("a tick count");
        Held {
            fds: count("fd"),
            threads: count("task"),
            rss_kib: kib("VmRSS:"),
            peak_rss_kib: kib("VmHWM:"),
            cpu_ticks: ticks(14) + ticks(15),
        }
    }
}

/// Whether the peer has closed `stream` (reads give end of file or an
/// error), waiting up to the hang timeout for it.
pub fn closed_by_peer(stream: &UnixStream) -> bool {
    stream
        .set_read_timeout(Some(HANG_TIMEOUT))
        .expect("read timeout");
    let mut byte = [0u8; 64];
    loop {
        match (&*stream).read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}
