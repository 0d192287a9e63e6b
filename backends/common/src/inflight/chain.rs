//! Reading a descriptor chain from its head index, for chains a previous
//! backend took from the available ring (virtio-queue only builds chains
//! from available-ring entries).
//!
//! The walk follows the rules of virtio-queue's chain iterator, which
//! yields the chains a backend serves in normal operation, so a chain
//! served again after a restart is the chain the first backend saw: zero
//! or more descriptors in the queue's table followed by at most one
//! indirect table (virtio 1.x 2.7.5.3.2), at most one descriptor per entry
//! of each table, 4 GiB in all.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DESC_SIZE: u64 = 16;

/// The descriptors of the chain starting at `head` in the table at
/// `table` with `queue_size` entries, following `next` links and one
/// indirect table. A chain that loops, leaves its table or guest memory,
/// nests indirect tables or holds more than 4 GiB is an error (the driver
/// broke the ring), as it is to virtio-queue.
pub fn chain_at(
    memory: &GuestMemoryMmap,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Vec<Descriptor>, String> {
    let mut chain = Vec::new();
    let (mut table, mut size, mut index) = (table, queue_size, head);
    // Descriptors taken from the current table: at most one per entry.
    let mut in_table = 0usize;
    let mut indirect = false;
    let mut bytes = 0u64;
    loop {
        if index >= size {
            return Err(format!("descriptor {index} is outside a table of {size}"));
        }
        if in_table >= usize::from(size) {
            return Err(format!("the chain at {head} loops"));
        }
        let descriptor: Descriptor = table
            .0
            .checked_add(u64::from(index) * DESC_SIZE)
            .and_then(|at| memory.read_obj(GuestAddress(at)).ok())
            .ok_or_else(|| {
                format!(
                    "descriptor {index} of the table at {:#x} is outside guest memory",
                    table.0
                )
            })?;
        let flags = u32::from(descriptor.flags());
        if flags & VRING_DESC_F_INDIRECT != 0 {
            if indirect {
                return Err(format!("chain {head} has an indirect table inside another"));
            }
            let len = u64::from(descriptor.len());
            let entries = len / DESC_SIZE;
            if len % DESC_SIZE != 0 || entries == 0 || entries > u64::from(u16::MAX) {
                return Err(format!("chain {head}: an indirect table of {len} bytes"));
            }
            // A NEXT flag beside INDIRECT is ignored: the table ends the chain.
            (table, size, index) = (descriptor.addr(), entries as u16, 0);
            in_table = 0;
            indirect = true;
            continue;
        }
        bytes += u64::from(descriptor.len());
        if bytes > u64::from(u32::MAX) {
            return Err(format!("chain {head} holds more than 4 GiB"));
        }
        chain.push(descriptor);
        in_table += 1;
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = descriptor.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::Address;

    const TABLE: GuestAddress = GuestAddress(0x1000);
    const SIZE: u16 = 8;
    const AVAIL: u64 = 0x8000;
    const USED: u64 = 0x9000;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    const WRITE: u16 = 2;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(memory: &GuestMemoryMmap, table: GuestAddress, index: u16, descriptor: Descriptor) {
        let at = table.unchecked_add(u64::from(index) * DESC_SIZE);
        memory.write_obj(descriptor, at).unwrap();
    }

    fn fields(chain: &[Descriptor]) -> Vec<(u64, u32, u16, u16)> {
        chain
            .iter()
            .map(|d| (d.addr().0, d.len(), d.flags(), d.next()))
            .collect()
    }

    /// The chain at `head` as virtio-queue's iterator yields it to a
    /// backend serving the ring: what the request engine sees.
    fn iterated(memory: &GuestMemoryMmap, head: u16) -> Vec<Descriptor> {
        memory.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        memory.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        memory.write_obj(head, GuestAddress(AVAIL + 4)).unwrap();
        let mut queue = Queue::new(SIZE).unwrap();
        queue.set_desc_table_address(Some(TABLE.0 as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        let mut chains = queue.iter(memory).unwrap();
        chains.next().unwrap().collect()
    }

    /// Walks the chain at `head` both ways and checks they agree: the same
    /// descriptors, or an error where the iterator breaks off (yields
    /// nothing, or a last descriptor that says another follows).
    fn walk_both(memory: &GuestMemoryMmap, head: u16) -> Result<Vec<Descriptor>, String> {
        let walked = chain_at(memory, TABLE, SIZE, head);
        let iterated = iterated(memory, head);
        match &walked {
            Ok(chain) => assert_eq!(fields(chain), fields(&iterated)),
            Err(why) => assert!(
                iterated.last().is_none_or(Descriptor::has_next),
                "chain_at refused ({why}) what the queue yields whole: {:?}",
                fields(&iterated)
            ),
        }
        walked
    }

    #[test]
    fn follows_next_links() {
        let memory = memory();
        put(&memory, TABLE, 5, Descriptor::new(0x4000, 16, NEXT, 2));
        put(&memory, TABLE, 2, Descriptor::new(0x5000, 512, NEXT, 7));
        put(&memory, TABLE, 7, Descriptor::new(0x6000, 1, WRITE, 0));
        let chain = walk_both(&memory, 5).unwrap();
        let addrs: Vec<u64> = chain.iter().map(|d| d.addr().0).collect();
        assert_eq!(addrs, [0x4000, 0x5000, 0x6000]);
    }

    #[test]
    fn a_chain_as_long_as_the_queue_is_whole() {
        let memory = memory();
        for index in 0..SIZE - 1 {
            put(
                &memory,
                TABLE,
                index,
                Descriptor::new(0x4000, 16, NEXT, index + 1),
            );
        }
        put(
            &memory,
            TABLE,
            SIZE - 1,
            Descriptor::new(0x6000, 1, WRITE, 0),
        );
        assert_eq!(walk_both(&memory, 0).unwrap().len(), usize::from(SIZE));
    }

    #[test]
    fn follows_an_indirect_table() {
        let memory = memory();
        let indirect = GuestAddress(0x3000);
        put(
            &memory,
            TABLE,
            1,
            Descriptor::new(indirect.0, 32, INDIRECT, 0),
        );
        put(&memory, indirect, 0, Descriptor::new(0x4000, 16, NEXT, 1));
        put(&memory, indirect, 1, Descriptor::new(0x6000, 1, WRITE, 0));
        assert_eq!(walk_both(&memory, 1).unwrap().len(), 2);
    }

    /// virtio 1.x 2.7.5.3.2: zero or more descriptors, then one indirect
    /// table; the table has entries for its own descriptors whatever came
    /// before it, and may be longer than the queue.
    #[test]
    fn follows_descriptors_then_a_trailing_indirect_table_longer_than_the_queue() {
        let memory = memory();
        let indirect = GuestAddress(0x3000);
        put(&memory, TABLE, 0, Descriptor::new(0x4000, 16, NEXT, 3));
        put(&memory, TABLE, 3, Descriptor::new(0x4100, 512, NEXT, 6));
        put(
            &memory,
            TABLE,
            6,
            Descriptor::new(indirect.0, 16 * 12, INDIRECT, 0),
        );
        for index in 0..11 {
            let data = Descriptor::new(0x5000 + 512 * u64::from(index), 512, NEXT, index + 1);
            put(&memory, indirect, index, data);
        }
        put(&memory, indirect, 11, Descriptor::new(0x6000, 1, WRITE, 0));
        let chain = walk_both(&memory, 0).unwrap();
        assert_eq!(chain.len(), 2 + 12);
        assert!(chain.len() > usize::from(SIZE));
    }

    #[test]
    fn broken_chains_are_errors() {
        let memory = memory();
        put(&memory, TABLE, 0, Descriptor::new(0x4000, 16, NEXT, 1));
        put(&memory, TABLE, 1, Descriptor::new(0x4000, 16, NEXT, 0));
        assert!(walk_both(&memory, 0).unwrap_err().contains("loops"));
        put(&memory, TABLE, 1, Descriptor::new(0x4000, 16, NEXT, 9));
        assert!(walk_both(&memory, 0)
            .unwrap_err()
            .contains("outside a table"));
        assert!(chain_at(&memory, TABLE, SIZE, SIZE).is_err());
        let far = GuestAddress(0x20000);
        assert!(chain_at(&memory, far, SIZE, 0)
            .unwrap_err()
            .contains("outside guest memory"));
        put(&memory, TABLE, 3, Descriptor::new(0x3000, 0, INDIRECT, 0));
        assert!(walk_both(&memory, 3)
            .unwrap_err()
            .contains("indirect table of 0"));
    }

    #[test]
    fn broken_indirect_tables_are_errors() {
        let memory = memory();
        let indirect = GuestAddress(0x3000);
        put(
            &memory,
            TABLE,
            0,
            Descriptor::new(indirect.0, 32, INDIRECT, 0),
        );
        // A table inside the table.
        put(&memory, indirect, 0, Descriptor::new(0x4000, 16, NEXT, 1));
        put(
            &memory,
            indirect,
            1,
            Descriptor::new(0x3800, 32, INDIRECT, 0),
        );
        assert!(walk_both(&memory, 0)
            .unwrap_err()
            .contains("inside another"));
        // Entries that loop, or lead out of the table.
        put(&memory, indirect, 1, Descriptor::new(0x5000, 512, NEXT, 0));
        assert!(walk_both(&memory, 0).unwrap_err().contains("loops"));
        put(&memory, indirect, 1, Descriptor::new(0x5000, 512, NEXT, 2));
        assert!(walk_both(&memory, 0)
            .unwrap_err()
            .contains("outside a table of 2"));
        // A length that is not a whole number of descriptors.
        put(&memory, indirect, 1, Descriptor::new(0x6000, 1, WRITE, 0));
        put(
            &memory,
            TABLE,
            0,
            Descriptor::new(indirect.0, 40, INDIRECT, 0),
        );
        assert!(walk_both(&memory, 0)
            .unwrap_err()
            .contains("indirect table of 40"));
        // A table running out of guest memory.
        put(
            &memory,
            TABLE,
            0,
            Descriptor::new(0x10000 - 16, 32, INDIRECT, 0),
        );
        put(
            &memory,
            GuestAddress(0x10000 - 16),
            0,
            Descriptor::new(0x4000, 16, NEXT, 1),
        );
        assert!(walk_both(&memory, 0)
            .unwrap_err()
            .contains("outside guest memory"));
    }

    #[test]
    fn a_chain_of_more_than_4_gib_is_an_error() {
        let memory = memory();
        put(&memory, TABLE, 0, Descriptor::new(0x4000, 16, NEXT, 1));
        put(
            &memory,
            TABLE,
            1,
            Descriptor::new(0x10_0000, 3 << 30, NEXT, 2),
        );
        put(
            &memory,
            TABLE,
            2,
            Descriptor::new(0x10_0000, 3 << 30, WRITE, 0),
        );
        assert!(walk_both(&memory, 0).unwrap_err().contains("4 GiB"));
    }
}
