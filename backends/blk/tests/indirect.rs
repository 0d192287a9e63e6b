//! Indirect descriptor tables (VIRTIO_RING_F_INDIRECT_DESC) served by a
//! real pvstack-blk process, with the test as the frontend: requests of
//! seg_max segments in one table on a queue smaller than the table (as
//! Linux sends them when QEMU sets 128 entries and the device allows
//! more), a table longer than any request may be, broken tables, and the
//! same chains served again from the inflight log after a restart.

mod common;

use common::*;
use vhost::vhost_user::VhostUserFrontend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEMORY: usize = 8 << 20;
const IMAGE: u64 = 4 << 20;
/// pvstack-blk's --queue-size: it advertises seg_max 126.
const BACKEND_QUEUE_SIZE: u16 = 256;
const SEG_MAX: usize = 126;
/// Each data segment: one page, every other page from the area's start.
const SEGMENT: usize = 4096;
const WRITE_DATA: u64 = 0x10_0000;
const READ_DATA: u64 = 0x20_0000;
const SMALL_READ_DATA: u64 = 0x40_0000;
/// Where the too-long write would land: untouched if it is refused.
const TOO_LONG_SECTOR: u64 = (2 << 20) / SECTOR;
const IOERR: u8 = 1;
const UNTOUCHED: u8 = 0xff;

/// Indirect table of request `k`.
fn table(k: u16) -> u64 {
    0x1_0000 + 0x1000 * u64::from(k)
}

/// Header of request `k`; its status byte is at `status(k)`.
fn header(k: u16) -> u64 {
    0x8_0000 + 0x100 * u64::from(k)
}

fn status(k: u16) -> u64 {
    header(k) + 0x80
}

fn status_of(memory: &GuestMemoryMmap, k: u16) -> u8 {
    memory.read_obj(GuestAddress(status(k))).unwrap()
}

fn segment(area: u64, index: usize) -> u64 {
    area + 2 * SEGMENT as u64 * index as u64
}

/// Writes `entries` as the indirect table of request `k`, each linked to
/// the next, and makes queue descriptor `k` refer to it.
fn put_indirect_request(memory: &GuestMemoryMmap, k: u16, entries: &[(u64, u32, u16)]) {
    for (index, &(addr, len, flags)) in (0u16..).zip(entries) {
        let last = usize::from(index) + 1 == entries.len();
        let (flags, next) = if last {
            (flags, 0)
        } else {
            (flags | DESC_F_NEXT, index + 1)
        };
        put_descriptor_in(memory, table(k), index, (addr, len, flags, next));
    }
    let len = 16 * entries.len() as u32;
    put_descriptor(memory, k, table(k), len, DESC_F_INDIRECT, 0);
}

/// Header, `segments` pages from `area` (device-writable for a read) and
/// status, as table entries of request `k`.
fn request_entries(
    memory: &GuestMemoryMmap,
    k: u16,
    request_type: u32,
    sector: u64,
    area: u64,
    segments: usize,
) -> Vec<(u64, u32, u16)> {
    put_header(memory, header(k), request_type, sector);
    memory
        .write_obj(UNTOUCHED, GuestAddress(status(k)))
        .unwrap();
    let data_flags = if request_type == VIRTIO_BLK_T_IN {
        DESC_F_WRITE
    } else {
        0
    };
    let mut entries = vec![(header(k), 16, 0)];
    entries.extend((0..segments).map(|i| (segment(area, i), SEGMENT as u32, data_flags)));
    entries.push((status(k), 1, DESC_F_WRITE));
    entries
}

/// The data of `segments` pages of `area`, end to end.
fn area_bytes(memory: &GuestMemoryMmap, area: u64, segments: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; segments * SEGMENT];
    for (i, page) in bytes.chunks_mut(SEGMENT).enumerate() {
        memory
            .read_slice(page, GuestAddress(segment(area, i)))
            .unwrap();
    }
    bytes
}

/// Fills the pages of `area` with bytes that differ by page and offset.
fn fill_area(memory: &GuestMemoryMmap, area: u64, segments: usize) {
    for i in 0..segments {
        let page: Vec<u8> = (0..SEGMENT).map(|j| (i * 37 + j / 7) as u8).collect();
        memory
            .write_slice(&page, GuestAddress(segment(area, i)))
            .unwrap();
    }
}

/// Request 0: a write of seg_max pages at sector 0, in one table.
fn put_big_write(memory: &GuestMemoryMmap) {
    fill_area(memory, WRITE_DATA, SEG_MAX);
    let entries = request_entries(memory, 0, VIRTIO_BLK_T_OUT, 0, WRITE_DATA, SEG_MAX);
    put_indirect_request(memory, 0, &entries);
}

/// Request 3: a table whose second entry refers to another table.
fn put_nested_tables(memory: &GuestMemoryMmap) {
    let mut entries = request_entries(memory, 3, VIRTIO_BLK_T_IN, 0, READ_DATA, 1);
    entries.truncate(1);
    entries.push((table(9), 32, DESC_F_INDIRECT));
    put_indirect_request(memory, 3, &entries);
}

#[test]
fn requests_in_indirect_tables_are_served_and_broken_tables_refused() {
    let (mut backend, socket, image) = Backend::start("indirect", IMAGE, BACKEND_QUEUE_SIZE);
    let memory = guest_memory_of(MEMORY);
    put_big_write(&memory);
    // 1: a read of seg_max pages of what request 0 wrote.
    let entries = request_entries(&memory, 1, VIRTIO_BLK_T_IN, 0, READ_DATA, SEG_MAX);
    put_indirect_request(&memory, 1, &entries);
    // 2: one page more than seg_max, a table longer than any request.
    let entries = request_entries(
        &memory,
        2,
        VIRTIO_BLK_T_OUT,
        TOO_LONG_SECTOR,
        WRITE_DATA,
        SEG_MAX + 1,
    );
    put_indirect_request(&memory, 2, &entries);
    put_nested_tables(&memory);
    // 4: a table outside guest memory.
    put_descriptor(&memory, 4, MEMORY as u64 + 0x1000, 48, DESC_F_INDIRECT, 0);
    // 5: a table whose entries loop.
    let mut entries = request_entries(&memory, 5, VIRTIO_BLK_T_IN, 0, READ_DATA, 1);
    entries.truncate(2);
    put_indirect_request(&memory, 5, &entries);
    put_descriptor_in(
        &memory,
        table(5),
        1,
        (
            segment(READ_DATA, 0),
            SEGMENT as u32,
            DESC_F_WRITE | DESC_F_NEXT,
            0,
        ),
    );
    // 6 and 7: a header in the queue's table, then a table with two pages
    // and the status (virtio 1.x 2.7.5.3.2).
    let mut entries = request_entries(&memory, 6, VIRTIO_BLK_T_IN, 8, SMALL_READ_DATA, 2);
    let (header_addr, header_len, _) = entries.remove(0);
    put_descriptor(&memory, 6, header_addr, header_len, DESC_F_NEXT, 7);
    for (index, &(addr, len, flags)) in (0u16..).zip(&entries) {
        let next = if usize::from(index) + 1 < entries.len() {
            (flags | DESC_F_NEXT, index + 1)
        } else {
            (flags, 0)
        };
        put_descriptor_in(&memory, table(7), index, (addr, len, next.0, next.1));
    }
    put_descriptor(&memory, 7, table(7), 16 * 3, DESC_F_INDIRECT, 0);
    // 8, 9, 10: a plain one-sector read, after all the broken ones.
    put_header(&memory, header(8), VIRTIO_BLK_T_IN, 0);
    memory
        .write_obj(UNTOUCHED, GuestAddress(status(8)))
        .unwrap();
    put_descriptor(&memory, 8, header(8), 16, DESC_F_NEXT, 9);
    put_descriptor(
        &memory,
        9,
        READ_DATA + (3 << 20),
        512,
        DESC_F_WRITE | DESC_F_NEXT,
        10,
    );
    put_descriptor(&memory, 10, status(8), 1, DESC_F_WRITE, 0);
    let heads = [0, 1, 2, 3, 4, 5, 6, 8];

    let mut frontend = negotiate(&socket, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC);
    let (_call, kick) = start_queue(&mut frontend, &memory, 0);
    // The write first: requests in flight together may complete in any
    // order, and the reads check what it wrote.
    make_available(&memory, &heads[..1]);
    kick.write(1).unwrap();
    wait_for_used(&memory, 1, &mut backend);
    make_available(&memory, &heads);
    kick.write(1).unwrap();
    wait_for_used(&memory, heads.len() as u16, &mut backend);

    let served = (SEG_MAX * SEGMENT) as u32 + 1;
    assert_eq!(
        used_elements_sorted(&memory, 0..heads.len() as u16),
        [
            (0, 1),
            (1, served),
            (2, 1),
            (3, 0),
            (4, 0),
            (5, 0),
            (6, 2 * SEGMENT as u32 + 1),
            (8, 513)
        ],
        "(head, used length) in the used ring; log:\n{}",
        backend.log()
    );
    let written = area_bytes(&memory, WRITE_DATA, SEG_MAX);
    assert!(
        image_bytes(&image, 0, SEG_MAX * SEGMENT) == written,
        "the indirect write did not land byte for byte"
    );
    assert!(
        area_bytes(&memory, READ_DATA, SEG_MAX) == written,
        "the indirect read did not return the disk's bytes"
    );
    assert_eq!(
        area_bytes(&memory, SMALL_READ_DATA, 2),
        image_bytes(&image, 8 * SECTOR, 2 * SEGMENT)
    );
    let statuses: Vec<u8> = [0, 1, 2, 3, 5, 6, 8]
        .into_iter()
        .map(|k| status_of(&memory, k))
        .collect();
    assert_eq!(statuses, [0, 0, IOERR, UNTOUCHED, UNTOUCHED, 0, 0]);
    assert!(
        image_bytes(&image, TOO_LONG_SECTOR * SECTOR, (SEG_MAX + 1) * SEGMENT)
            .iter()
            .all(|&b| b == 0),
        "the refused write changed the disk"
    );
    let log = backend.log();
    assert!(log.contains("seg_max 126"), "{log}");
    assert!(log.contains("rejected a request (1 so far)"), "{log}");
    assert!(
        log.contains("returned a chain unanswered (3 so far)"),
        "{log}"
    );
    assert!(backend.is_running());
}

#[test]
fn a_restarted_backend_serves_the_indirect_tables_its_predecessor_left() {
    let (mut backend, socket, image) =
        Backend::start("indirect-recover", IMAGE, BACKEND_QUEUE_SIZE);
    let memory = guest_memory_of(MEMORY);
    put_big_write(&memory);
    put_nested_tables(&memory);
    make_available(&memory, &[0, 3]);

    // The previous backend took both and returned neither.
    let mut frontend = negotiate(&socket, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC);
    let (shape, log) = new_log(&mut frontend);
    put_inflight(&log, 0, 0, &[(0, 1), (3, 2)]);
    frontend
        .set_inflight_fd(&shape, std::os::fd::AsRawFd::as_raw_fd(&log))
        .expect("SET_INFLIGHT_FD");
    let _events = start_queue(&mut frontend, &memory, 0);
    wait_for_used(&memory, 2, &mut backend);

    assert_eq!(
        used_elements_sorted(&memory, 0..2),
        [(0, 1), (3, 0)],
        "log:\n{}",
        backend.log()
    );
    assert_eq!(status_of(&memory, 0), 0);
    assert_eq!(status_of(&memory, 3), UNTOUCHED);
    assert!(
        image_bytes(&image, 0, SEG_MAX * SEGMENT) == area_bytes(&memory, WRITE_DATA, SEG_MAX),
        "the recovered indirect write did not land byte for byte"
    );
    let log = backend.log();
    assert!(
        log.contains("serving 2 requests a previous backend took and did not complete"),
        "{log}"
    );
    assert!(backend.is_running());
}
