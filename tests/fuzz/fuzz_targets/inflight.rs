//! Inflight-log recovery from arbitrary bytes: the region is mapped as
//! pvstack-blk maps what SET_INFLIGHT_FD hands it (the file, offset and
//! size all come from the frontend; the file is a memfd sealed against
//! shrinking, or not, and may be shorter than claimed: such files must be
//! refused, never mapped), every queue's log is recovered and
//! each chain it names is walked with `chain_at` and, side by side, by
//! virtio-queue's own iterator: `chain_at` must yield exactly the chain
//! the first backend was given, or refuse one the iterator breaks off.
//! Then chains are logged as taken and returned on the recovered log,
//! and a second recovery (a restart) must name exactly the chains still
//! taken, in the order they were taken.
#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pvstack_backend_common::inflight::{chain_at, queue_stride, region_size, InflightRegion};
use pvstack_devices::virtio::QueueConfig;
use pvstack_fuzz::input::Reader;
use pvstack_fuzz::memory::{load, memfd_memory};
use pvstack_fuzz::targets::inflight::{Input, AVAIL, MEMORY as MEMORY_SIZE, USED};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn memory() -> &'static GuestMemoryMmap {
    static MEMORY: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEMORY.get_or_init(|| memfd_memory(MEMORY_SIZE))
}

/// The region's file as a frontend hands it over: `len` bytes holding
/// `bytes` from `offset`, sealed against resizing when `sealed` (a fresh
/// memfd each run: a sealed one cannot be emptied for the next).
fn region_file(len: u64, offset: u64, bytes: &[u8], sealed: bool) -> File {
    let memfd = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create("pvstack-fuzz-inflight")
        .expect("memfd_create");
    let file = memfd.as_file();
    file.set_len(len).expect("size the region file");
    let room = usize::try_from(len.saturating_sub(offset)).unwrap_or(usize::MAX);
    file.write_all_at(&bytes[..bytes.len().min(room)], offset)
        .expect("write the region");
    if sealed {
        memfd
            .add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
            .expect("seal the region file");
    }
    memfd.into_file()
}

fn fields(chain: &[Descriptor]) -> Vec<(u64, u32, u16, u16)> {
    chain
        .iter()
        .map(|d| (d.addr().0, d.len(), d.flags(), d.next()))
        .collect()
}

/// The chain at `head` as virtio-queue yields it to a backend serving a
/// ring of `size` entries at `table` (None: the queue refuses the ring).
fn iterated(mem: &GuestMemoryMmap, table: u64, size: u16, head: u16) -> Option<Vec<Descriptor>> {
    mem.write_slice(&[0, 0, 1, 0], GuestAddress(AVAIL)).ok()?;
    mem.write_obj(head, GuestAddress(AVAIL + 4)).ok()?;
    let config = QueueConfig {
        max_size: size,
        size,
        ready: true,
        desc_table: table,
        avail_ring: AVAIL,
        used_ring: USED,
    };
    let mut queue = config.build_queue(0, false, mem).ok()?;
    let mut chains = queue.iter(mem).ok()?;
    Some(
        chains
            .next()
            .map(|chain| chain.collect())
            .unwrap_or_default(),
    )
}

/// `chain_at` and virtio-queue agree on the chain at `head`.
fn walk_both(mem: &GuestMemoryMmap, table: u64, size: u16, head: u16) {
    // Written first: both walks read the same memory.
    let Some(iterated) = iterated(mem, table, size, head) else {
        return;
    };
    match chain_at(mem, GuestAddress(table), size, head) {
        Ok(chain) => assert_eq!(
            fields(&chain),
            fields(&iterated),
            "chain_at and virtio-queue differ on chain {head}"
        ),
        Err(why) => assert!(
            iterated.last().is_none_or(Descriptor::has_next),
            "chain_at refused chain {head} ({why}), which virtio-queue yields whole: {:?}",
            fields(&iterated)
        ),
    }
}

/// The descriptor count queue `index`'s log claims (its header's
/// desc_num, at byte 10).
fn desc_num(file: &File, offset: u64, queue_size: u16, index: u16) -> u16 {
    let at = offset + (usize::from(index) * queue_stride(queue_size)) as u64 + 10;
    let mut raw = [0u8; 2];
    file.read_exact_at(&mut raw, at).expect("read desc_num");
    u16::from_le_bytes(raw)
}

fuzz_target!(|data: &[u8]| {
    let input = Input::read(&mut Reader::new(data));
    let mem = memory();
    load(mem, input.image);
    let (queues, queue_size) = (input.queues(), input.queue_size());
    let needed = region_size(queues, queue_size) as u64;
    let offset = input.offset();
    let claimed = needed + u64::from(input.extra);
    let file_len = (offset + claimed).saturating_sub(u64::from(input.short));
    let file = &region_file(file_len, offset, input.region, input.sealed());
    let map = || {
        let file = file.try_clone().expect("dup the region file");
        InflightRegion::map(file, offset, claimed, queues, queue_size)
    };
    let Ok(region) = map() else {
        return;
    };
    assert!(
        input.sealed() && file_len >= offset + region_size(queues, queue_size) as u64,
        "mapped an unsealed or short region file"
    );
    let (table, ring_size) = (u64::from(input.table) & !15, input.ring_size());
    // Per queue: the chains still taken (in the order they were taken
    // when that is known), and the used index.
    let mut expected: Vec<Option<(Vec<u16>, bool, u16)>> = Vec::new();
    for index in 0..queues {
        let log = region.queue(usize::from(index)).expect("a log per queue");
        assert!(log.recovery_due());
        assert!(!log.recovery_due());
        let mut used = input.used_idx[usize::from(index)];
        if let Ok(heads) = log.recover(used) {
            for head in heads {
                walk_both(mem, table, ring_size, head);
            }
        }
        // A second recovery finds the log as the first left it.
        let Ok(mut taken) = log.recover(used) else {
            expected.push(None);
            continue;
        };
        // Chains a previous backend left keep the order stamps it gave
        // them, which may be anything; only a log that had none left has
        // a known order.
        let ordered = taken.is_empty();
        for (take, head) in input.ops(desc_num(file, offset, queue_size, index)) {
            taken.retain(|&h| h != head);
            if take {
                log.taken(head);
                taken.push(head);
            } else {
                log.returning(head);
                used = used.wrapping_add(1);
                log.returned(head, used);
            }
        }
        expected.push(Some((taken, ordered, used)));
    }
    drop(region);
    let again = map().expect("the same region maps again");
    for (index, expected) in expected.into_iter().enumerate() {
        let Some((mut taken, ordered, used)) = expected else {
            continue;
        };
        let log = again.queue(index).expect("a log per queue");
        let mut recovered = log
            .recover(used)
            .expect("a log that was recovered recovers again");
        if !ordered {
            taken.sort_unstable();
            recovered.sort_unstable();
        }
        assert_eq!(recovered, taken, "queue {index}: the chains still taken");
    }
});
