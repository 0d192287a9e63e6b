//! Split virtqueues in fuzz input: where the driver put a queue's rings
//! (read like the transport's registers), and, for the seeds, a guest
//! memory image holding descriptors and available rings.

use pvstack_devices::virtio::QueueConfig;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use crate::input::{Reader, Writer};

pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// One queue as the driver programmed it: the size as log2 (any byte:
/// taken modulo 16, so sizes up to 32768) and the guest addresses of its
/// three parts.
#[derive(Clone, Copy, Debug)]
pub struct Rings {
    pub size_log2: u8,
    pub desc: u32,
    pub avail: u32,
    pub used: u32,
}

impl Rings {
    pub fn read(r: &mut Reader<'_>) -> Rings {
        Rings {
            size_log2: r.u8(),
            desc: r.u32(),
            avail: r.u32(),
            used: r.u32(),
        }
    }

    pub fn write(&self, w: &mut Writer) {
        w.u8(self.size_log2)
            .u32(self.desc)
            .u32(self.avail)
            .u32(self.used);
    }

    pub fn size(&self) -> u16 {
        1 << (self.size_log2 % 16)
    }

    /// The queue as the VMM's transport records it, for
    /// [`QueueConfig::build_queue`], which checks it against guest memory.
    pub fn config(&self, max_size: u16) -> QueueConfig {
        QueueConfig {
            max_size,
            size: self.size(),
            ready: true,
            desc_table: u64::from(self.desc),
            avail_ring: u64::from(self.avail),
            used_ring: u64::from(self.used),
        }
    }
}

/// A guest memory image from address 0, grown as things are put in it.
#[derive(Default)]
pub struct Image {
    pub bytes: Vec<u8>,
}

impl Image {
    pub fn put(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        let at = addr as usize;
        if self.bytes.len() < at + bytes.len() {
            self.bytes.resize(at + bytes.len(), 0);
        }
        self.bytes[at..at + bytes.len()].copy_from_slice(bytes);
        self
    }

    /// Descriptor `index` of the table at `table`.
    pub fn desc(
        &mut self,
        table: u64,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.put(table + 16 * u64::from(index), &raw)
    }

    /// Makes the chains at `heads` available in the ring at `avail`.
    pub fn avail(&mut self, avail: u64, heads: &[u16]) -> &mut Self {
        let idx = heads.len() as u16;
        self.put(avail + 2, &idx.to_le_bytes());
        for (slot, head) in heads.iter().enumerate() {
            self.put(avail + 4 + 2 * slot as u64, &head.to_le_bytes());
        }
        self
    }
}
