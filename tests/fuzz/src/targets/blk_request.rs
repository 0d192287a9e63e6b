//! `blk_request`: a virtio-blk queue in guest memory, every chain the
//! driver made available answered by `pvstack_block::chain` against a
//! real image file. Input: flags, the queue's rings, then a guest memory
//! image from address 0 (descriptor tables, rings, headers, data).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

use super::rings::{Image, Rings, INDIRECT, NEXT, WRITE};
use super::Seed;
use crate::input::{Reader, Writer};

/// Guest memory size.
pub const MEMORY: usize = 128 << 10;
/// Image size in sectors.
pub const SECTORS: u64 = 128;
/// Largest queue the device offers (pvstack-blk's default).
pub const MAX_QUEUE: u16 = 256;

pub struct Input<'a> {
    /// Bit 0: EVENT_IDX negotiated; bit 1: a read-only disk.
    pub flags: u8,
    pub rings: Rings,
    pub image: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn read(r: &mut Reader<'a>) -> Self {
        Input {
            flags: r.u8(),
            rings: Rings::read(r),
            image: r.rest(),
        }
    }

    fn write(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.flags);
        self.rings.write(&mut w);
        w.bytes(self.image);
        w.into_bytes()
    }

    pub fn event_idx(&self) -> bool {
        self.flags & 1 != 0
    }

    pub fn readonly(&self) -> bool {
        self.flags & 2 != 0
    }
}

const RINGS: Rings = Rings {
    size_log2: 4,
    desc: 0x0,
    avail: 0x100,
    used: 0x200,
};
const HEADERS: u64 = 0x400;
const DATA: u64 = 0x800;
const STATUS: u64 = 0x700;
const TABLE: u64 = 0x300;

fn header(image: &mut Image, at: u64, request: u32, sector: u64) {
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&request.to_le_bytes());
    raw[8..16].copy_from_slice(&sector.to_le_bytes());
    image.put(at, &raw);
}

fn seed(flags: u8, image: &Image) -> Vec<u8> {
    Input {
        flags,
        rings: RINGS,
        image: &image.bytes,
    }
    .write()
}

pub fn seeds() -> Vec<Seed> {
    let table = RINGS.desc.into();
    // A read: header, two data buffers, status.
    let mut read = Image::default();
    header(&mut read, HEADERS, VIRTIO_BLK_T_IN, 4);
    read.desc(table, 0, HEADERS, 16, NEXT, 1)
        .desc(table, 1, DATA, 512, WRITE | NEXT, 2)
        .desc(table, 2, DATA + 0x200, 1024, WRITE | NEXT, 3)
        .desc(table, 3, STATUS, 1, WRITE, 0)
        .avail(RINGS.avail.into(), &[0]);
    // A write with the data in the header's descriptor, and a flush.
    let mut write = Image::default();
    header(&mut write, HEADERS, VIRTIO_BLK_T_OUT, 100);
    header(&mut write, HEADERS + 0x240, VIRTIO_BLK_T_FLUSH, 0);
    write
        .put(HEADERS + 16, &[0xa5; 512])
        .desc(table, 0, HEADERS, 16 + 512, NEXT, 1)
        .desc(table, 1, STATUS, 1, WRITE, 0)
        .desc(table, 2, HEADERS + 0x240, 16, NEXT, 3)
        .desc(table, 3, STATUS + 1, 1, WRITE, 0)
        .avail(RINGS.avail.into(), &[0, 2]);
    // GET_ID, then a write-zeroes and a discard of two ranges each.
    let mut ranges = Image::default();
    header(&mut ranges, HEADERS, VIRTIO_BLK_T_GET_ID, 0);
    header(&mut ranges, HEADERS + 0x10, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    header(&mut ranges, HEADERS + 0x20, VIRTIO_BLK_T_DISCARD, 0);
    let list = |unmap: u32| {
        let mut list = Vec::new();
        for (sector, count, flags) in [(8u64, 4u32, unmap), (64, 8, 0)] {
            list.extend_from_slice(&sector.to_le_bytes());
            list.extend_from_slice(&count.to_le_bytes());
            list.extend_from_slice(&flags.to_le_bytes());
        }
        list
    };
    ranges
        .put(DATA, &list(1))
        .put(DATA + 0x40, &list(0))
        .desc(table, 0, HEADERS, 16, NEXT, 1)
        .desc(table, 1, DATA + 0x100, 20, WRITE | NEXT, 2)
        .desc(table, 2, STATUS, 1, WRITE, 0)
        .desc(table, 3, HEADERS + 0x10, 16, NEXT, 4)
        .desc(table, 4, DATA, 32, NEXT, 5)
        .desc(table, 5, STATUS + 1, 1, WRITE, 0)
        .desc(table, 6, HEADERS + 0x20, 16, NEXT, 7)
        .desc(table, 7, DATA + 0x40, 32, NEXT, 8)
        .desc(table, 8, STATUS + 2, 1, WRITE, 0)
        .avail(RINGS.avail.into(), &[0, 3, 6]);
    // A read in an indirect table, after one direct descriptor.
    let mut indirect = Image::default();
    header(&mut indirect, HEADERS, VIRTIO_BLK_T_IN, 0);
    indirect
        .desc(table, 5, HEADERS, 16, NEXT, 6)
        .desc(table, 6, TABLE, 48, INDIRECT, 0)
        .desc(TABLE, 0, DATA, 512, WRITE | NEXT, 1)
        .desc(TABLE, 1, DATA + 0x200, 512, WRITE | NEXT, 2)
        .desc(TABLE, 2, STATUS, 1, WRITE, 0)
        .avail(RINGS.avail.into(), &[5]);
    vec![
        ("read", seed(0, &read)),
        ("write-flush", seed(1, &write)),
        ("get-id-write-zeroes-discard", seed(0, &ranges)),
        ("indirect-read", seed(1, &indirect)),
        ("write-readonly", seed(2, &write)),
    ]
}
