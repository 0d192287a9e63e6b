//! pvstack-blk's engines with the test as the frontend: a real pvstack-blk
//! process on a scratch image on the host's disk (the temp dir), guest
//! memory in a memfd, requests laid out by hand on a queue of 128 entries.
//!
//! What the io_uring engine promises and these tests check: many requests
//! in flight per queue and completed out of order; a FLUSH covering every
//! write given to the engine before it; crash recovery through the inflight
//! log exact with 32 requests in flight; O_DIRECT with guest buffers it
//! cannot take as they are, through bounce buffers of bounded size; a clear
//! refusal where io_uring is not allowed; and an idle queue costing nothing.

mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
/// The queue the frontend sets (and pvstack-blk's --queue-size).
const QUEUE: u16 = 128;
/// Header (at +0) and status byte (at +0x80) of the request at head H
/// are at HEADERS + H * 0x100.
const HEADERS: u64 = 0x1_0000;
/// Data buffers from here on.
const DATA: u64 = 16 * MIB;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const UNTOUCHED: u8 = 0xff;

fn status_addr(head: u16) -> u64 {
    HEADERS + u64::from(head) * 0x100 + 0x80
}

/// Lays out a request at descriptor `head` and those after it: header,
/// the data segments `(address, length)`, status. Returns the next free
/// descriptor.
fn put_request(
    memory: &GuestMemoryMmap,
    head: u16,
    request_type: u32,
    sector: u64,
    data: &[(u64, u32)],
) -> u16 {
    let header = HEADERS + u64::from(head) * 0x100;
    put_header(memory, header, request_type, sector);
    memory
        .write_obj(UNTOUCHED, GuestAddress(status_addr(head)))
        .unwrap();
    put_descriptor(memory, head, header, 16, DESC_F_NEXT, head + 1);
    let data_flags = if request_type == VIRTIO_BLK_T_IN {
        DESC_F_WRITE | DESC_F_NEXT
    } else {
        DESC_F_NEXT
    };
    let mut index = head + 1;
    for &(addr, len) in data {
        put_descriptor(memory, index, addr, len, data_flags, index + 1);
        index += 1;
    }
    put_descriptor(memory, index, status_addr(head), 1, DESC_F_WRITE, 0);
    index + 1
}

fn status_of(memory: &GuestMemoryMmap, head: u16) -> u8 {
    memory.read_obj(GuestAddress(status_addr(head))).unwrap()
}

/// The driver adds `heads` to the available ring after the `already`
/// entries it made available before.
fn make_more_available(memory: &GuestMemoryMmap, already: u16, heads: &[u16]) {
    for (i, &head) in heads.iter().enumerate() {
        let slot = (usize::from(already) + i) % usize::from(QUEUE);
        memory
            .write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * slot as u64))
            .unwrap();
    }
    let idx = already.wrapping_add(heads.len() as u16);
    memory.write_obj(idx, GuestAddress(AVAIL_RING + 2)).unwrap();
}

/// The heads in the used ring from entry `from` to the used index.
fn used_since(memory: &GuestMemoryMmap, from: u16) -> Vec<u16> {
    let to = used_idx(memory);
    (0..to.wrapping_sub(from))
        .map(|i| {
            let slot = from.wrapping_add(i) % QUEUE;
            let id: u32 = memory
                .read_obj(GuestAddress(USED_RING + 4 + 8 * u64::from(slot)))
                .unwrap();
            id as u16
        })
        .collect()
}

fn fill(memory: &GuestMemoryMmap, addr: u64, len: u64, seed: u8) {
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 ^ seed).collect();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(MIB) as usize;
        memory
            .write_slice(&chunk[..n], GuestAddress(addr + done))
            .unwrap();
        done += n as u64;
    }
}

fn guest_bytes(memory: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    memory.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

/// `len` bytes of `path` from `offset`, read with O_DIRECT (so from the
/// disk, not from a page cache pvstack-blk might have filled).
fn read_direct(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    // An aligned window inside a larger vector.
    let mut raw = vec![0u8; len + 4096];
    let skew = raw.as_ptr().align_offset(4096);
    file.read_exact_at(&mut raw[skew..skew + len], offset)
        .unwrap();
    raw[skew..skew + len].to_vec()
}

/// An image of `len` bytes allocated on the disk (O_DIRECT writes into it
/// then overwrite rather than allocate).
fn allocate(image: &Path, len: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    // SAFETY: fallocate on our own open file.
    let rc = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, len as i64) };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
}

fn wait_until(what: &str, backend: &mut Backend, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(backend.is_running(), "pvstack-blk died:\n{}", backend.log());
        assert!(
            started.elapsed() < HANG_GUARD,
            "{what}: still waiting; log:\n{}",
            backend.log()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Connects, with an inflight log, and starts the queue of QUEUE at `base`.
fn connect(
    socket: &Path,
    memory: &GuestMemoryMmap,
    log: Option<&(vhost::vhost_user::message::VhostUserInflight, File)>,
    base: u16,
) -> (
    Frontend,
    (
        vmm_sys_util::eventfd::EventFd,
        vmm_sys_util::eventfd::EventFd,
    ),
) {
    let mut frontend = negotiate(socket, VIRTIO_F_VERSION_1);
    if let Some((shape, file)) = log {
        frontend
            .set_inflight_fd(shape, std::os::fd::AsRawFd::as_raw_fd(file))
            .expect("SET_INFLIGHT_FD");
    }
    let events = start_queue_of(&mut frontend, memory, base, QUEUE);
    (frontend, events)
}

fn io_uring_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--engine", "io-uring"];
    args.extend_from_slice(extra);
    args
}

/// Writes `len` bytes of data (not zeroes: a hole reads without the
/// disk) at the start of `image`, makes them durable and drops them from
/// the page cache, so reading them back takes the disk.
fn cold_data(image: &Path, len: u64) -> Vec<u8> {
    let data: Vec<u8> = (0..len).map(|i| (i % 249) as u8).collect();
    let file = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    file.write_all_at(&data, 0).unwrap();
    file.sync_all().unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: posix_fadvise on our own open file; it only drops clean
    // cached pages of the range.
    let rc = unsafe { libc::posix_fadvise(fd, 0, len as i64, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
    data
}

/// With the page cache (no --direct): a 64 MiB read of data on the disk,
/// then small writes, a FLUSH among them, more small writes. The small
/// writes go to the page cache at once and complete long before the read
/// (one request at a time would complete them in order); the FLUSH
/// completes after the writes before it, which are on the disk then
/// (read back with O_DIRECT).
#[test]
fn requests_complete_out_of_order_and_a_flush_in_the_middle_makes_the_writes_before_it_durable() {
    let big_len = 64 * MIB;
    let (mut backend, socket, image) =
        Backend::start_with("out-of-order", 128 * MIB, QUEUE, &io_uring_args(&[]));
    let on_disk = cold_data(&image, big_len);
    let memory = guest_memory_of(192 << 20);
    let mut next = put_request(&memory, 0, VIRTIO_BLK_T_IN, 0, &[(DATA, big_len as u32)]);
    let (small_data, small_sector) = (DATA + 80 * MIB, |i: u64| (96 * MIB + 4096 * i) / SECTOR);
    let (mut smalls, mut flush) = (Vec::new(), 0);
    for i in 0..8u64 {
        if i == 4 {
            flush = next;
            next = put_request(&memory, next, VIRTIO_BLK_T_FLUSH, 0, &[]);
        }
        let addr = small_data + 4096 * i;
        fill(&memory, addr, 4096, 0x20 + i as u8);
        smalls.push(next);
        next = put_request(
            &memory,
            next,
            VIRTIO_BLK_T_OUT,
            small_sector(i),
            &[(addr, 4096)],
        );
    }
    let big = 0;
    let mut order = vec![big];
    order.extend_from_slice(&smalls[..4]);
    order.push(flush);
    order.extend_from_slice(&smalls[4..]);
    make_available(&memory, &order);

    let (_frontend, (_call, kick)) = connect(&socket, &memory, None, 0);
    kick.write(1).unwrap();
    wait_until("the flush completes", &mut backend, || {
        used_since(&memory, 0).contains(&flush)
    });
    for (i, &head) in smalls[..4].iter().enumerate() {
        assert_eq!(
            read_direct(&image, small_sector(i as u64) * SECTOR, 4096),
            guest_bytes(&memory, small_data + 4096 * i as u64, 4096),
            "write {head}, before the FLUSH, is not on the disk when the FLUSH completed"
        );
    }
    wait_until("every request completes", &mut backend, || {
        used_idx(&memory) == order.len() as u16
    });
    let used = used_since(&memory, 0);
    let mut sorted = used.clone();
    sorted.sort_unstable();
    let mut expected = order.clone();
    expected.sort_unstable();
    assert_eq!(sorted, expected, "each request once: {used:?}");
    let position = |head: u16| used.iter().position(|&h| h == head).unwrap();
    assert!(
        smalls[..4].iter().all(|&w| position(w) < position(big)),
        "small writes behind the 64 MiB read completed after it: {used:?} (one at a time?)"
    );
    assert!(
        smalls[..4].iter().all(|&w| position(w) < position(flush)),
        "{used:?}"
    );
    for &head in &order {
        assert_eq!(status_of(&memory, head), 0, "status of {head}");
    }
    assert!(
        guest_bytes(&memory, DATA, big_len as usize) == on_disk,
        "the read's bytes"
    );
    assert!(
        backend.log().contains("engine io-uring"),
        "{}",
        backend.log()
    );
}

/// With O_DIRECT: a 64 MiB write still in flight when the FLUSH behind it
/// is taken. The FLUSH waits for it (an fdatasync started earlier would
/// not cover a write still on its way to the disk) and does not complete
/// before it; when it completes, the write is on the disk.
#[test]
fn a_flush_behind_a_write_in_flight_completes_after_it_with_o_direct() {
    let image_len = 128 * MIB;
    let (mut backend, socket, image) =
        Backend::start_with("flush", image_len, QUEUE, &io_uring_args(&["--direct"]));
    allocate(&image, image_len);
    let memory = guest_memory_of(192 << 20);
    let big_len = 64 * MIB;
    fill(&memory, DATA, big_len, 0x11);
    let next = put_request(&memory, 0, VIRTIO_BLK_T_OUT, 0, &[(DATA, big_len as u32)]);
    let flush = next;
    let next = put_request(&memory, next, VIRTIO_BLK_T_FLUSH, 0, &[]);
    let small = next;
    fill(&memory, DATA + 80 * MIB, 4096, 0x33);
    put_request(
        &memory,
        small,
        VIRTIO_BLK_T_OUT,
        96 * MIB / SECTOR,
        &[(DATA + 80 * MIB, 4096)],
    );
    make_available(&memory, &[0, flush, small]);

    let (_frontend, (_call, kick)) = connect(&socket, &memory, None, 0);
    kick.write(1).unwrap();
    wait_until("the flush completes", &mut backend, || {
        used_since(&memory, 0).contains(&flush)
    });
    assert!(
        read_direct(&image, 0, big_len as usize) == guest_bytes(&memory, DATA, big_len as usize),
        "the 64 MiB write before the FLUSH is not on the disk when the FLUSH completed"
    );
    let used = used_since(&memory, 0);
    let position = |head: u16| used.iter().position(|&h| h == head);
    assert!(position(0) < position(flush), "{used:?}");
    wait_until("every request completes", &mut backend, || {
        used_idx(&memory) == 3
    });
    for head in [0, flush, small] {
        assert_eq!(status_of(&memory, head), 0, "status of {head}");
    }
}

/// Signals `pid`.
fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a process ID; no memory is passed.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

fn all_threads_stopped(pid: u32) -> bool {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("threads");
    tasks.flatten().all(|task| {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        stat.rsplit(") ")
            .next()
            .is_some_and(|rest| rest.starts_with('T'))
    })
}

/// Descriptors the queue's log marks in flight.
fn logged_in_flight(log: &File) -> usize {
    let mut states = vec![0u8; 16 * usize::from(QUEUE)];
    log.read_exact_at(&mut states, desc_state_at(0)).unwrap();
    states.chunks(16).filter(|state| state[0] == 1).count()
}

#[test]
fn sigkill_with_32_requests_in_flight_and_the_next_backend_serves_them_exactly() {
    const REQUESTS: u16 = 32;
    const LEN: u64 = 2 * MIB;
    let image_len = u64::from(REQUESTS) * LEN;
    let (mut backend, socket, image) = Backend::start_with(
        "sigkill-32",
        image_len,
        QUEUE,
        &io_uring_args(&["--direct"]),
    );
    allocate(&image, image_len);
    let memory = guest_memory_of(96 << 20);
    // 32 writes of 2 MiB, each its own fill, three descriptors each.
    let heads: Vec<u16> = (0..REQUESTS).map(|i| i * 3).collect();
    for (i, &head) in heads.iter().enumerate() {
        let addr = DATA + LEN * i as u64;
        fill(&memory, addr, LEN, i as u8);
        put_request(
            &memory,
            head,
            VIRTIO_BLK_T_OUT,
            LEN * i as u64 / SECTOR,
            &[(addr, LEN as u32)],
        );
    }
    let mut frontend = negotiate(&socket, VIRTIO_F_VERSION_1);
    let log = new_log_of(&mut frontend, QUEUE);
    frontend
        .set_inflight_fd(&log.0, std::os::fd::AsRawFd::as_raw_fd(&log.1))
        .unwrap();
    let (_call, kick) = start_queue_of(&mut frontend, &memory, 0, QUEUE);
    // Make the 32 available and stop the backend the moment its log shows
    // all of them in flight; if it finished some first, let it finish and
    // offer them again.
    let pid = backend.pid();
    let mut offered = 0u16;
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < HANG_GUARD, "never caught 32 in flight");
        make_more_available(&memory, offered, &heads);
        offered += REQUESTS;
        kick.write(1).unwrap();
        while logged_in_flight(&log.1) < usize::from(REQUESTS) && used_idx(&memory) != offered {
            assert!(started.elapsed() < HANG_GUARD, "{}", backend.log());
            std::hint::spin_loop();
        }
        signal(pid, libc::SIGSTOP);
        wait_until("pvstack-blk stops", &mut backend, || {
            all_threads_stopped(pid)
        });
        if logged_in_flight(&log.1) == usize::from(REQUESTS)
            && used_idx(&memory) == offered - REQUESTS
        {
            break;
        }
        signal(pid, libc::SIGCONT);
        wait_until("the batch completes", &mut backend, || {
            used_idx(&memory) == offered
        });
    }
    let base = used_idx(&memory);
    backend.kill();
    drop(frontend);

    let mut backend = backend.respawn("blk-restarted.log");
    let (_frontend, _events) = connect(&socket, &memory, Some(&log), base);
    wait_until("the new backend serves the 32", &mut backend, || {
        used_idx(&memory) == offered
    });
    let mut served = used_since(&memory, base);
    served.sort_unstable();
    assert_eq!(served, heads, "each of the 32 exactly once");
    for (i, &head) in heads.iter().enumerate() {
        assert_eq!(status_of(&memory, head), 0);
        let offset = LEN * i as u64;
        assert!(
            read_direct(&image, offset, LEN as usize)
                == guest_bytes(&memory, DATA + offset, LEN as usize),
            "write {i} is not on the disk"
        );
    }
    assert_eq!(logged_in_flight(&log.1), 0);
    let restarted = backend.log();
    assert!(
        restarted.contains("serving 32 requests a previous backend took and did not complete"),
        "{restarted}"
    );
}

#[test]
fn misaligned_guest_buffers_under_o_direct_are_moved_byte_exactly() {
    const REQUESTS: u64 = 12;
    // Three bounce chunks each (1 MiB, then the rest): 12 requests want
    // more bounce buffers than a queue may hold, so some wait for one.
    const LEN: u64 = 2 * MIB + 512;
    let image_len = REQUESTS * 4 * MIB;
    let (mut backend, socket, image) = Backend::start_with(
        "misaligned",
        image_len,
        QUEUE,
        &io_uring_args(&["--direct"]),
    );
    allocate(&image, image_len);
    // Each request's buffers within 8 MiB of their own.
    let memory = guest_memory_of((DATA + 2 * REQUESTS * 8 * MIB) as usize);
    let sector = |i: u64| i * 4 * MIB / SECTOR;
    // Two segments per request, at odd addresses, the first not a sector
    // multiple long; request 0 aligned, for contrast.
    let segments = |base: u64, i: u64| -> Vec<(u64, u32)> {
        if i == 0 {
            vec![(base, LEN as u32)]
        } else {
            let first = 1000 + 8 * i;
            vec![
                (base + 3 + i, first as u32),
                (base + 2 * MIB + 1, (LEN - first) as u32),
            ]
        }
    };
    let gather_guest = |segs: &[(u64, u32)]| -> Vec<u8> {
        segs.iter()
            .flat_map(|&(addr, len)| guest_bytes(&memory, addr, len as usize))
            .collect()
    };
    let writes: Vec<Vec<(u64, u32)>> = (0..REQUESTS)
        .map(|i| segments(DATA + i * 8 * MIB, i))
        .collect();
    let mut heads = Vec::new();
    let mut next = 0;
    for (i, segs) in writes.iter().enumerate() {
        for &(addr, len) in segs {
            fill(&memory, addr, u64::from(len), 0x40 + i as u8);
        }
        heads.push(next);
        next = put_request(&memory, next, VIRTIO_BLK_T_OUT, sector(i as u64), segs);
    }
    make_available(&memory, &heads);
    let (_frontend, (_call, kick)) = connect(&socket, &memory, None, 0);
    kick.write(1).unwrap();
    wait_until("the writes complete", &mut backend, || {
        used_idx(&memory) == REQUESTS as u16
    });
    for (i, segs) in writes.iter().enumerate() {
        assert_eq!(status_of(&memory, heads[i]), 0, "write {i}");
        assert!(
            read_direct(&image, sector(i as u64) * SECTOR, LEN as usize) == gather_guest(segs),
            "write {i} did not land byte for byte"
        );
    }

    // Read each back into other misaligned buffers.
    let reads: Vec<Vec<(u64, u32)>> = (0..REQUESTS)
        .map(|i| segments(DATA + (REQUESTS + i) * 8 * MIB + 17, i))
        .collect();
    let mut read_heads = Vec::new();
    let mut next = 0;
    for (i, segs) in reads.iter().enumerate() {
        read_heads.push(next);
        next = put_request(&memory, next, VIRTIO_BLK_T_IN, sector(i as u64), segs);
    }
    make_more_available(&memory, REQUESTS as u16, &read_heads);
    kick.write(1).unwrap();
    wait_until("the reads complete", &mut backend, || {
        used_idx(&memory) == 2 * REQUESTS as u16
    });
    for (i, segs) in reads.iter().enumerate() {
        assert_eq!(status_of(&memory, read_heads[i]), 0, "read {i}");
        assert!(
            gather_guest(segs) == gather_guest(&writes[i]),
            "read {i} did not bring back what was written"
        );
    }
}

/// A kB field of /proc/PID/status.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A 512 MiB write from a misaligned buffer under --direct with `engine`:
/// on the disk byte for byte, and the backend's own (anonymous) memory
/// never near the request's size.
fn huge_misaligned_write_stays_bounded(engine: &str) {
    const LEN: u64 = 512 * MIB;
    const BOUND_KIB: u64 = 64 << 10;
    let (mut backend, socket, image) = Backend::start_with(
        &format!("huge-{engine}"),
        LEN + MIB,
        QUEUE,
        &["--engine", engine, "--direct"],
    );
    allocate(&image, LEN + MIB);
    let memory = guest_memory_of((LEN + 32 * MIB) as usize);
    let addr = DATA + 1;
    fill(&memory, addr, LEN, 0x77);
    put_request(&memory, 0, VIRTIO_BLK_T_OUT, 0, &[(addr, LEN as u32)]);
    make_available(&memory, &[0]);
    let (_frontend, (_call, kick)) = connect(&socket, &memory, None, 0);
    let pid = backend.pid();
    kick.write(1).unwrap();
    let mut peak_anon = 0;
    wait_until("the huge write completes", &mut backend, || {
        peak_anon = peak_anon.max(status_kib(pid, "RssAnon"));
        used_idx(&memory) == 1
    });
    assert_eq!(status_of(&memory, 0), 0, "{}", backend.log());
    // Its peak resident memory less the guest memory it touched (shared)
    // and its mapped files is at least what it allocated at the peak.
    let allocated_kib = status_kib(pid, "VmHWM")
        .saturating_sub(status_kib(pid, "RssShmem") + status_kib(pid, "RssFile"));
    assert!(
        peak_anon < BOUND_KIB && allocated_kib < BOUND_KIB,
        "{engine}: a 512 MiB misaligned write cost {peak_anon} KiB of anonymous memory \
         (peak resident less shared and file memory: {allocated_kib} KiB)"
    );
    for offset in [0, 256 * MIB + 4096, LEN - MIB] {
        assert!(
            read_direct(&image, offset, MIB as usize)
                == guest_bytes(&memory, addr + offset, MIB as usize),
            "{engine}: the huge write did not land at {offset}"
        );
    }
}

#[test]
fn a_request_far_larger_than_the_bounce_bound_costs_no_giant_allocation() {
    huge_misaligned_write_stays_bounded("io-uring");
    huge_misaligned_write_stays_bounded("sync");
}

/// pvstack-blk with `args`, with io_uring_setup refused with `errno` (a
/// seccomp filter, as container runtimes' default profiles install: the
/// way io_uring is disabled for one process without touching the host's
/// `kernel.io_uring_disabled`, which every other process shares).
fn without_io_uring(args: &[&str], errno: i32) -> Command {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
    let filter = SeccompFilter::new(
        [(libc::SYS_io_uring_setup, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        std::env::consts::ARCH
            .try_into()
            .expect("a seccomp architecture"),
    )
    .expect("seccomp filter");
    let program: BpfProgram = filter.try_into().expect("compiled filter");
    let mut command = Command::new(env!("CARGO_BIN_EXE_pvstack-blk"));
    command.args(args).env("RUST_LOG", "info");
    // SAFETY: between fork and exec the closure only makes the prctl and
    // seccomp system calls on a program built before the fork.
    unsafe {
        command
            .pre_exec(move || seccompiler::apply_filter(&program).map_err(std::io::Error::other));
    }
    command
}

#[test]
fn engine_io_uring_where_io_uring_is_refused_is_one_clear_line_and_auto_falls_back() {
    let dir = std::env::temp_dir().join(format!("pvstack-blk-no-uring-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    File::create(&image).unwrap().set_len(MIB).unwrap();
    let socket = dir.join("blk.sock");
    let args = |engine: &'static str| -> Vec<String> {
        vec![
            "--socket".into(),
            socket.display().to_string(),
            "--image".into(),
            image.display().to_string(),
            "--engine".into(),
            engine.into(),
        ]
    };
    for errno in [libc::EPERM, libc::ENOSYS] {
        let io_uring = args("io-uring");
        let io_uring: Vec<&str> = io_uring.iter().map(String::as_str).collect();
        let out = without_io_uring(&io_uring, errno)
            .stdin(Stdio::null())
            .output()
            .expect("run pvstack-blk");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "not one line: {stderr}");
        assert!(
            lines[0].contains("--engine io-uring: io_uring is not available here: io_uring_setup:")
                && lines[0].contains("use --engine sync"),
            "{stderr}"
        );
        assert!(!socket.exists(), "it listened anyway");
    }

    // auto: the sync engine, and it serves.
    let auto = args("auto");
    let auto: Vec<&str> = auto.iter().map(String::as_str).collect();
    let log_path = dir.join("auto.log");
    let mut child = without_io_uring(&auto, libc::EPERM)
        .stderr(File::create(&log_path).unwrap())
        .spawn()
        .expect("start pvstack-blk");
    let started = Instant::now();
    while !socket.exists() {
        assert!(started.elapsed() < HANG_GUARD, "never listened");
        assert!(child.try_wait().unwrap().is_none(), "exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    let memory = guest_memory_of(32 << 20);
    fill(&memory, DATA, 4096, 9);
    put_request(&memory, 0, VIRTIO_BLK_T_OUT, 8, &[(DATA, 4096)]);
    make_available(&memory, &[0]);
    let (_frontend, (_call, kick)) = connect(&socket, &memory, None, 0);
    kick.write(1).unwrap();
    while used_idx(&memory) != 1 {
        assert!(started.elapsed() < HANG_GUARD, "the request was not served");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(status_of(&memory, 0), 0);
    assert_eq!(
        image_bytes(&image, 4096, 4096),
        guest_bytes(&memory, DATA, 4096)
    );
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("io_uring is not available (io_uring_setup:")
            && log.contains("serving with the sync engine")
            && log.contains("engine sync"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// CPU time (user + system) of process `pid` so far, all threads.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the parenthesised command name; utime and stime
    // are the 14th and 15th of the whole line.
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

#[test]
fn an_idle_queue_costs_the_backend_nothing_and_its_stats_show_the_poll_window() {
    // The default --poll-us: adaptive polling on.
    let (mut backend, socket, _image) = Backend::start_with("idle", 8 * MIB, QUEUE, &[]);
    let memory = guest_memory_of(32 << 20);
    let (frontend, (_call, kick)) = connect(&socket, &memory, None, 0);
    // A busy spell: 500 one-sector reads, one at a time, each made
    // available as soon as the previous one completed.
    let mut served = 0u16;
    while served < 500 {
        put_request(
            &memory,
            0,
            VIRTIO_BLK_T_IN,
            u64::from(served % 64),
            &[(DATA, 512)],
        );
        make_more_available(&memory, served, &[0]);
        served += 1;
        kick.write(1).unwrap();
        wait_until("a read completes", &mut backend, || {
            used_idx(&memory) == served
        });
    }
    // Idle for 5 s.
    let pid = backend.pid();
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(5));
    let idle = cpu_time(pid) - before;
    assert!(
        idle < Duration::from_millis(50),
        "an idle queue cost pvstack-blk {idle:?} of CPU in 5 s"
    );
    // The connection's totals, logged when it ends, show the polling.
    drop(frontend);
    wait_until("the connection's totals", &mut backend, || {
        backend_log_has(&socket, "served ")
    });
    let log = backend.log();
    let totals = log
        .lines()
        .find(|line| line.contains("served 500 requests"))
        .unwrap_or_else(|| panic!("no totals line:\n{log}"));
    let (_, poll) = totals
        .split_once("poll window ")
        .unwrap_or_else(|| panic!("no poll window in: {totals}"));
    let numbers: Vec<u64> = poll
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    // window, max, windows that found work, windows polled (none at all
    // on a host with no CPU to spare: pvstack-blk does not poll there)
    assert_eq!(numbers.len(), 4, "{totals}");
    assert_eq!(numbers[1], 50, "the default bound: {totals}");
    assert!(numbers[0] <= numbers[1], "{totals}");
    assert!(numbers[2] <= numbers[3], "{totals}");
}

/// Whether the log next to `socket` has `needle` (the backend writes it
/// from another process; read it fresh).
fn backend_log_has(socket: &Path, needle: &str) -> bool {
    std::fs::read_to_string(socket.with_file_name("blk.log")).is_ok_and(|log| log.contains(needle))
}
