//! Descriptor chains laid out in guest memory the way a driver lays them
//! out, for the engine's unit tests.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// A device-readable descriptor.
pub fn readable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

/// A device-writable descriptor.
pub fn writable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, WRITE, 0))
}

/// Writes a `struct virtio_blk_outhdr` at `addr`.
pub fn write_header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&request_type.to_le_bytes());
    raw[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(addr))
        .expect("write header");
}

/// Writes `entries` at `table` as an indirect table, each linked to the one
/// after it, and returns the descriptor that refers to the table.
pub fn indirect_table(
    mem: &GuestMemoryMmap,
    table: u64,
    entries: &[RawDescriptor],
) -> RawDescriptor {
    for (index, entry) in entries.iter().enumerate() {
        let entry = SplitDescriptor::from(*entry);
        let (flags, next) = if index + 1 < entries.len() {
            (entry.flags() | NEXT, index as u16 + 1)
        } else {
            (entry.flags() & !NEXT, 0)
        };
        let linked = SplitDescriptor::new(entry.addr().0, entry.len(), flags, next);
        mem.write_obj(linked, GuestAddress(table + 16 * index as u64))
            .expect("write indirect entry");
    }
    let len = 16 * entries.len() as u32;
    RawDescriptor::from(SplitDescriptor::new(table, len, INDIRECT, 0))
}
