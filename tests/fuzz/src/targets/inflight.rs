//! `inflight`: an inflight region as a frontend hands it over
//! (SET_INFLIGHT_FD: a file, an offset, a size, queue count and size), in
//! whatever state a previous backend or a hostile frontend left it; the
//! recovery of each queue, the chains it names walked in guest memory,
//! then logging on the recovered region and recovering again. Input:
//! region parameters, the served ring, used indexes, the region's bytes,
//! the operations logged, then a guest memory image.

use super::rings::{Image, INDIRECT, NEXT, WRITE};
use super::Seed;
use crate::input::{Reader, Writer};

/// Guest memory size.
pub const MEMORY: usize = 64 << 10;
/// Where the target puts the one-entry available ring (and the used ring)
/// that makes virtio-queue walk a chain, above any table it reads.
pub const AVAIL: u64 = MEMORY as u64 - 0x2000;
pub const USED: u64 = MEMORY as u64 - 0x1000;
/// Queues the frontend may ask for.
pub const MAX_QUEUES: u16 = 4;

pub struct Input<'a> {
    /// 1 + this % MAX_QUEUES queues.
    pub num_queues: u8,
    /// 1 + this % 256 descriptors a queue's log has room for.
    pub capacity: u16,
    /// The region starts at (this % 3) pages into the file; bit 7: the
    /// file is not sealed against shrinking (which must be refused).
    pub offset_pages: u8,
    /// The size the frontend claims beyond what the queues need.
    pub extra: u8,
    /// How much shorter the file is than offset + claimed size.
    pub short: u16,
    /// The served ring: 1 << (this % 9) entries ...
    pub ring_size_log2: u8,
    /// ... with its descriptor table here.
    pub table: u32,
    /// The used index of each queue's ring.
    pub used_idx: [u16; MAX_QUEUES as usize],
    /// The region's bytes from its start.
    pub region: &'a [u8],
    /// (u8 kind: even takes, odd returns; u16 head modulo the log's
    /// descriptor count) pairs, logged on each queue after recovery.
    pub ops: &'a [u8],
    pub image: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn read(r: &mut Reader<'a>) -> Self {
        Input {
            num_queues: r.u8(),
            capacity: r.u16(),
            offset_pages: r.u8(),
            extra: r.u8(),
            short: r.u16(),
            ring_size_log2: r.u8(),
            table: r.u32(),
            used_idx: [r.u16(), r.u16(), r.u16(), r.u16()],
            region: r.sized(),
            ops: r.sized(),
            image: r.rest(),
        }
    }

    fn write(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.num_queues)
            .u16(self.capacity)
            .u8(self.offset_pages)
            .u8(self.extra)
            .u16(self.short)
            .u8(self.ring_size_log2)
            .u32(self.table);
        for used in self.used_idx {
            w.u16(used);
        }
        w.sized(self.region).sized(self.ops).bytes(self.image);
        w.into_bytes()
    }

    pub fn queues(&self) -> u16 {
        1 + u16::from(self.num_queues) % MAX_QUEUES
    }

    pub fn queue_size(&self) -> u16 {
        1 + self.capacity % 256
    }

    pub fn offset(&self) -> u64 {
        4096 * (u64::from(self.offset_pages & 0x7f) % 3)
    }

    pub fn sealed(&self) -> bool {
        self.offset_pages & 0x80 == 0
    }

    pub fn ring_size(&self) -> u16 {
        1 << (self.ring_size_log2 % 9)
    }

    /// The operations: (take, head) with head below `desc_num`.
    pub fn ops(&self, desc_num: u16) -> Vec<(bool, u16)> {
        let mut r = Reader::new(self.ops);
        let mut ops = Vec::new();
        while !r.is_empty() {
            let take = r.u8() % 2 == 0;
            ops.push((take, r.u16() % desc_num.max(1)));
        }
        ops
    }
}

/// A queue log's header, in the layout of the vhost-user specification.
fn log_header(version: u16, desc_num: u16, last_batch_head: u16, used_idx: u16) -> Vec<u8> {
    let mut raw = vec![0u8; 8];
    for field in [version, desc_num, last_batch_head, used_idx] {
        raw.extend_from_slice(&field.to_le_bytes());
    }
    raw
}

/// One descriptor's state: inflight, and its order stamp.
fn desc_state(inflight: bool, counter: u64) -> Vec<u8> {
    let mut raw = vec![0u8; 16];
    raw[0] = u8::from(inflight);
    raw[8..].copy_from_slice(&counter.to_le_bytes());
    raw
}

/// A log of 8 descriptors where 2 and 6 were taken (6 first) and not
/// returned, and 4 is the last chain returned, at used index 10.
fn left_behind(version: u16) -> Vec<u8> {
    let mut region = log_header(version, 8, 4, 10);
    for head in 0..8u16 {
        let state = match head {
            2 => desc_state(true, 5),
            6 => desc_state(true, 3),
            4 => desc_state(true, 4),
            _ => desc_state(false, 0),
        };
        region.extend_from_slice(&state);
    }
    region
}

/// Guest memory with chains at heads 2 (direct) and 6 (an indirect table).
fn chains() -> Vec<u8> {
    let mut image = Image::default();
    image
        .desc(0, 2, 0x1000, 16, NEXT, 3)
        .desc(0, 3, 0x1100, 512, WRITE | NEXT, 7)
        .desc(0, 7, 0x1300, 1, WRITE, 0)
        .desc(0, 6, 0x800, 32, INDIRECT, 0)
        .desc(0x800, 0, 0x1400, 16, NEXT, 1)
        .desc(0x800, 1, 0x1500, 1, WRITE, 0);
    image.bytes
}

fn seed(region: &[u8], used_idx: u16, ops: &[(u8, u16)], image: &[u8]) -> Vec<u8> {
    let mut op_bytes = Writer::default();
    for &(kind, head) in ops {
        op_bytes.u8(kind).u16(head);
    }
    let op_bytes = op_bytes.into_bytes();
    Input {
        num_queues: 0,
        capacity: 7,
        offset_pages: 0,
        extra: 0,
        short: 0,
        ring_size_log2: 3,
        table: 0,
        used_idx: [used_idx; MAX_QUEUES as usize],
        region,
        ops: &op_bytes,
        image,
    }
    .write()
}

pub fn seeds() -> Vec<Seed> {
    let fresh = log_header(0, 8, 0, 0);
    let ops = [(0, 3), (0, 5), (0, 1), (1, 3), (0, 3)];
    vec![
        ("fresh-then-logged", seed(&fresh, 0, &ops, &[])),
        ("left-behind", seed(&left_behind(1), 10, &ops, &chains())),
        (
            "left-behind-used-moved",
            seed(&left_behind(1), 11, &[], &chains()),
        ),
        ("unknown-version", seed(&left_behind(7), 10, &[], &chains())),
    ]
}
