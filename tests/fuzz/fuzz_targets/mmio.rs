//! The virtio-mmio transport under a hostile driver's register accesses
//! (any offset, any width, any value, in any order), in front of the
//! VMM's emulated virtio-blk disk (`EmulatedVirtioBlk`, built as
//! `--blk mode=emulated-virtio` builds it, on a real image and the VMM's
//! memfd guest memory; no KVM is needed). A QueueNotify the driver writes
//! after DRIVER_OK makes the device serve the queue it programmed, from
//! the rings in the input's guest memory image. Beyond not crashing or
//! hanging: the identification registers always read what the virtio-mmio
//! specification says, and the device never runs (DRIVER_OK) without
//! FEATURES_OK.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use pvstack::memory::GuestMemory;
use pvstack_block::image::DiskImage;
use pvstack_devices::blk::emulated_virtio::{EmulatedVirtioBlk, VirtioBlkShape};
use pvstack_devices::blk::DiskStats;
use pvstack_devices::bus::BusDevice;
use pvstack_devices::virtio::mmio::{MmioTransport, VENDOR_ID};
use pvstack_devices::virtio::DeviceEvents;
use pvstack_fuzz::input::Reader;
use pvstack_fuzz::memory::load;
use pvstack_fuzz::targets::mmio::{Access, Input, SECTORS};
use pvstack_protocols::layout::MIN_MEMORY;
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};

struct Bench {
    memory: GuestMemory,
    image: Arc<DiskImage>,
}

fn bench() -> &'static Bench {
    static BENCH: OnceLock<Bench> = OnceLock::new();
    BENCH.get_or_init(|| {
        let path = pvstack_fuzz::scratch_image("mmio.img", SECTORS);
        Bench {
            memory: pvstack::memory::create(MIN_MEMORY).expect("guest memory"),
            image: Arc::new(DiskImage::open(&path, false, false).expect("open the image")),
        }
    })
}

/// What a 32-bit read of an identification register must return.
fn identification(offset: u64) -> Option<u32> {
    match u32::try_from(offset).ok()? {
        VIRTIO_MMIO_MAGIC_VALUE => Some(u32::from_le_bytes(*b"virt")),
        VIRTIO_MMIO_VERSION => Some(2),
        VIRTIO_MMIO_DEVICE_ID => Some(VIRTIO_ID_BLOCK),
        VIRTIO_MMIO_VENDOR_ID => Some(VENDOR_ID),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let bench = bench();
    let input = Input::read(&mut Reader::new(data));
    load(&bench.memory, input.image);
    let (queues, queue_max) = (input.queue_count(), input.queue_max());
    let shape = VirtioBlkShape::new("fuzz-blk", &bench.image, queues, queue_max);
    let device = EmulatedVirtioBlk::new(
        "fuzz-blk",
        shape,
        Arc::clone(&bench.image),
        bench.memory.clone(),
        Arc::new(DiskStats::default()),
    );
    let events = DeviceEvents::new(queues).expect("eventfds");
    let mut transport = MmioTransport::new("fuzz-blk", device, events);
    for access in input.accesses {
        match access {
            Access::Read { offset, len } => {
                let mut value = [0u8; 8];
                transport.read(offset, &mut value[..len]);
                if let (4, Some(expected)) = (len, identification(offset)) {
                    let read = u32::from_le_bytes([value[0], value[1], value[2], value[3]]);
                    assert_eq!(read, expected, "register {offset:#x}");
                }
            }
            Access::Write { offset, len, value } => {
                transport.write(offset, &value.to_le_bytes()[..len]);
            }
        }
        let status = transport.status();
        if status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            assert_ne!(
                status & VIRTIO_CONFIG_S_FEATURES_OK,
                0,
                "DRIVER_OK without FEATURES_OK: {status:#x}"
            );
        }
    }
});
