//! virtio-blk requests from a hostile driver: virtio-queue walks whatever
//! descriptor tables (direct and indirect) and rings the input puts in
//! guest memory, and every chain is parsed, checked and carried out by
//! `pvstack_block::chain` against a real image file, as pvstack-blk and
//! the VMM's emulated disk do (the writable image in memory, through its
//! mapping; the read-only one through the file). Beyond not crashing: a
//! request that passed the checks must not fail on a healthy image, and a
//! chain without a status byte is returned with nothing written.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pvstack_block::chain::{answer, Disk, Outcome};
use pvstack_block::config::{seg_max, DiskLimits, ID_BYTES};
use pvstack_block::image::DiskImage;
use pvstack_fuzz::input::Reader;
use pvstack_fuzz::memory::{load, memfd_memory};
use pvstack_fuzz::targets::blk_request::{Input, MAX_QUEUE, MEMORY, SECTORS};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

struct Bench {
    mem: GuestMemoryMmap,
    writable: DiskImage,
    readonly: DiskImage,
}

fn bench() -> &'static Bench {
    static BENCH: OnceLock<Bench> = OnceLock::new();
    BENCH.get_or_init(|| {
        // The writable disk is in memory and served through its mapping,
        // as pvstack-blk serves an image on tmpfs; the read-only one
        // through the file.
        let in_memory = pvstack_fuzz::memory_image("disk.img", SECTORS);
        let mut writable = DiskImage::open(&in_memory, false, false).expect("open the image");
        writable.map().expect("map the image in memory");
        std::fs::remove_file(&in_memory).expect("remove the image in memory");
        let path = pvstack_fuzz::scratch_image("disk.img", SECTORS);
        Bench {
            mem: memfd_memory(MEMORY),
            writable,
            readonly: DiskImage::open(&path, true, false).expect("open the image"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let bench = bench();
    let input = Input::read(&mut Reader::new(data));
    let mem = &bench.mem;
    load(mem, input.image);
    let image = if input.readonly() {
        &bench.readonly
    } else {
        &bench.writable
    };
    let config = input.rings.config(MAX_QUEUE);
    if config.validate(0).is_err() {
        return;
    }
    let Ok(mut queue) = config.build_queue(0, input.event_idx(), mem) else {
        return;
    };
    let limits = DiskLimits {
        capacity_sectors: image.capacity_sectors(),
        readonly: input.readonly(),
        max_segments: seg_max(MAX_QUEUE),
    };
    let serial: [u8; ID_BYTES] = *b"pvstack-fuzz-serial!";
    let disk = Disk {
        image,
        limits: &limits,
        serial: &serial,
    };
    let size = queue.size();
    let _ = queue.disable_notification(mem);
    let Ok(chains) = queue.iter(mem).map(|iter| iter.collect::<Vec<_>>()) else {
        return;
    };
    for chain in chains {
        let head = chain.head_index();
        let answered = answer(chain, mem, disk, size);
        match &answered.outcome {
            Outcome::Failed { operation, error } => {
                panic!("a checked request failed on a healthy image: {operation:?}: {error}")
            }
            Outcome::Unanswerable(_) => assert_eq!(answered.used_len, 0),
            Outcome::Done | Outcome::Rejected(_) => assert!(answered.used_len >= 1),
        }
        let _ = queue.add_used(mem, head, answered.used_len);
    }
    let _ = queue.needs_notification(mem);
    let _ = queue.enable_notification(mem);
});
