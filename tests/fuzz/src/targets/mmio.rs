//! `mmio`: a driver's register accesses on the virtio-mmio transport in
//! front of the VMM's emulated virtio-blk disk. Input: the device's queue
//! count and largest queue, a guest memory image, then the accesses.

use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::rings::{Image, NEXT, WRITE};
use super::Seed;
use crate::input::{Reader, Writer};

/// Image size in sectors.
pub const SECTORS: u64 = 64;

/// One access to the device's window.
#[derive(Clone, Copy, Debug)]
pub enum Access {
    Read { offset: u64, len: usize },
    Write { offset: u64, len: usize, value: u64 },
}

pub struct Input<'a> {
    /// 1 + this % 4 queues.
    pub queues: u8,
    /// Queues of up to 1 << (this % 11) entries.
    pub queue_max_log2: u8,
    pub image: &'a [u8],
    pub accesses: Vec<Access>,
}

const WIDTHS: [usize; 4] = [4, 1, 2, 8];

impl<'a> Input<'a> {
    pub fn read(r: &mut Reader<'a>) -> Self {
        let queues = r.u8();
        let queue_max_log2 = r.u8();
        let image = r.sized();
        let mut accesses = Vec::new();
        while !r.is_empty() {
            // Bit 0: a write; bits 1-2: the width; bit 3: a 64-bit offset
            // (anywhere) rather than a 16-bit one (the window).
            let op = r.u8();
            let len = WIDTHS[usize::from(op >> 1 & 3)];
            let offset = if op & 8 != 0 {
                r.u64()
            } else {
                u64::from(r.u16())
            };
            accesses.push(if op & 1 != 0 {
                Access::Write {
                    offset,
                    len,
                    value: r.u64(),
                }
            } else {
                Access::Read { offset, len }
            });
        }
        Input {
            queues,
            queue_max_log2,
            image,
            accesses,
        }
    }

    fn write(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.queues).u8(self.queue_max_log2).sized(self.image);
        for access in &self.accesses {
            let (write, offset, len) = match *access {
                Access::Read { offset, len } => (0, offset, len),
                Access::Write { offset, len, .. } => (1, offset, len),
            };
            let width = WIDTHS.iter().position(|&w| w == len).expect("a width") as u8;
            let far = u16::try_from(offset).is_err();
            w.u8(write | width << 1 | u8::from(far) << 3);
            if far {
                w.u64(offset);
            } else {
                w.u16(offset as u16);
            }
            if let Access::Write { value, .. } = *access {
                w.u64(value);
            }
        }
        w.into_bytes()
    }

    pub fn queue_count(&self) -> u16 {
        1 + u16::from(self.queues) % 4
    }

    pub fn queue_max(&self) -> u16 {
        1 << (self.queue_max_log2 % 11)
    }
}

fn write32(register: u32, value: u32) -> Access {
    Access::Write {
        offset: register.into(),
        len: 4,
        value: value.into(),
    }
}

fn read32(register: u32) -> Access {
    Access::Read {
        offset: register.into(),
        len: 4,
    }
}

/// What a driver does up to DRIVER_OK with `features` and queue 0 of
/// eight entries at 0x0/0x100/0x200, then a notification.
fn bring_up(features: u64) -> Vec<Access> {
    let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    vec![
        read32(VIRTIO_MMIO_MAGIC_VALUE),
        read32(VIRTIO_MMIO_VERSION),
        read32(VIRTIO_MMIO_DEVICE_ID),
        write32(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE),
        write32(VIRTIO_MMIO_STATUS, status),
        write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1),
        read32(VIRTIO_MMIO_DEVICE_FEATURES),
        write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0),
        write32(VIRTIO_MMIO_DRIVER_FEATURES, features as u32),
        write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1),
        write32(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32),
        write32(VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FEATURES_OK),
        read32(VIRTIO_MMIO_STATUS),
        write32(VIRTIO_MMIO_QUEUE_SEL, 0),
        read32(VIRTIO_MMIO_QUEUE_NUM_MAX),
        write32(VIRTIO_MMIO_QUEUE_NUM, 8),
        write32(VIRTIO_MMIO_QUEUE_DESC_LOW, 0),
        write32(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0),
        write32(VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x100),
        write32(VIRTIO_MMIO_QUEUE_USED_LOW, 0x200),
        write32(VIRTIO_MMIO_QUEUE_READY, 1),
        write32(
            VIRTIO_MMIO_STATUS,
            status | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
        ),
        write32(VIRTIO_MMIO_QUEUE_NOTIFY, 0),
        read32(VIRTIO_MMIO_INTERRUPT_STATUS),
        write32(VIRTIO_MMIO_INTERRUPT_ACK, 1),
    ]
}

pub fn seeds() -> Vec<Seed> {
    // A read of two sectors from sector 2, on queue 0.
    let mut image = Image::default();
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    header[8..16].copy_from_slice(&2u64.to_le_bytes());
    image
        .put(0x400, &header)
        .desc(0, 0, 0x400, 16, NEXT, 1)
        .desc(0, 1, 0x800, 1024, WRITE | NEXT, 2)
        .desc(0, 2, 0x500, 1, WRITE, 0)
        .avail(0x100, &[0]);
    let version_1 = 1u64 << VIRTIO_F_VERSION_1;
    let seed = |accesses: Vec<Access>| {
        Input {
            queues: 0,
            queue_max_log2: 8,
            image: &image.bytes,
            accesses,
        }
        .write()
    };
    let mut reset = bring_up(version_1);
    reset.extend([
        write32(VIRTIO_MMIO_STATUS, 0),
        read32(VIRTIO_MMIO_QUEUE_READY),
    ]);
    let config = vec![
        Access::Read {
            offset: VIRTIO_MMIO_CONFIG.into(),
            len: 8,
        },
        Access::Read {
            offset: u64::from(VIRTIO_MMIO_CONFIG) + 12,
            len: 4,
        },
        Access::Read {
            offset: u64::from(VIRTIO_MMIO_CONFIG) + 34,
            len: 2,
        },
        Access::Write {
            offset: VIRTIO_MMIO_STATUS.into(),
            len: 2,
            value: 1,
        },
        Access::Read {
            offset: u64::MAX - 3,
            len: 4,
        },
    ];
    vec![
        ("bring-up-read", seed(bring_up(version_1))),
        (
            "bring-up-event-idx",
            seed(bring_up(version_1 | 1 << VIRTIO_RING_F_EVENT_IDX)),
        ),
        ("legacy-driver", seed(bring_up(0))),
        ("reset", seed(reset)),
        ("config-and-odd-accesses", seed(config)),
    ]
}
