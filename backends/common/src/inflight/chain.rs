//! Reading a descriptor chain from its head index, for chains a previous
//! backend took from the available ring (virtio-queue only builds chains
//! from available-ring entries).

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DESC_SIZE: u64 = 16;

/// The descriptors of the chain starting at `head` in the table at
/// `table` with `queue_size` entries, following `next` links and one level
/// of indirect table. A chain that loops, leaves the table or lies outside
/// guest memory is an error (the driver broke the ring).
pub fn chain_at(
    memory: &GuestMemoryMmap,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Vec<Descriptor>, String> {
    let mut chain = Vec::new();
    let (mut table, mut size, mut index) = (table, queue_size, head);
    let mut indirect = false;
    loop {
        if index >= size {
            return Err(format!("descriptor {index} is outside a table of {size}"));
        }
        // A chain has at most one descriptor per table entry.
        if chain.len() >= usize::from(size) {
            return Err(format!("the chain at {head} loops"));
        }
        let at = table.0 + u64::from(index) * DESC_SIZE;
        let descriptor: Descriptor = memory
            .read_obj(GuestAddress(at))
            .map_err(|_| format!("descriptor {index} at {at:#x} is outside guest memory"))?;
        let flags = u32::from(descriptor.flags());
        if flags & VRING_DESC_F_INDIRECT != 0 {
            if indirect || !chain.is_empty() {
                return Err(format!("chain {head} has a misplaced indirect descriptor"));
            }
            let entries = u64::from(descriptor.len()) / DESC_SIZE;
            if entries == 0 || entries > u64::from(u16::MAX) {
                return Err(format!(
                    "chain {head}: an indirect table of {} bytes",
                    descriptor.len()
                ));
            }
            (table, size, index) = (descriptor.addr(), entries as u16, 0);
            indirect = true;
            continue;
        }
        chain.push(descriptor);
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = descriptor.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Address;

    const TABLE: GuestAddress = GuestAddress(0x1000);

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(memory: &GuestMemoryMmap, table: GuestAddress, index: u16, descriptor: Descriptor) {
        let at = table.unchecked_add(u64::from(index) * DESC_SIZE);
        memory.write_obj(descriptor, at).unwrap();
    }

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;

    #[test]
    fn follows_next_links() {
        let memory = memory();
        put(&memory, TABLE, 5, Descriptor::new(0x4000, 16, NEXT, 2));
        put(&memory, TABLE, 2, Descriptor::new(0x5000, 512, NEXT, 7));
        put(&memory, TABLE, 7, Descriptor::new(0x6000, 1, 2, 0));
        let chain = chain_at(&memory, TABLE, 8, 5).unwrap();
        let addrs: Vec<u64> = chain.iter().map(|d| d.addr().0).collect();
        assert_eq!(addrs, [0x4000, 0x5000, 0x6000]);
    }

    #[test]
    fn follows_an_indirect_table() {
        let memory = memory();
        let indirect = GuestAddress(0x3000);
        put(
            &memory,
            TABLE,
            1,
            Descriptor::new(indirect.0, 32, VRING_DESC_F_INDIRECT as u16, 0),
        );
        put(&memory, indirect, 0, Descriptor::new(0x4000, 16, NEXT, 1));
        put(&memory, indirect, 1, Descriptor::new(0x6000, 1, 2, 0));
        assert_eq!(chain_at(&memory, TABLE, 8, 1).unwrap().len(), 2);
    }

    #[test]
    fn broken_chains_are_errors() {
        let memory = memory();
        put(&memory, TABLE, 0, Descriptor::new(0x4000, 16, NEXT, 1));
        put(&memory, TABLE, 1, Descriptor::new(0x4000, 16, NEXT, 0));
        assert!(chain_at(&memory, TABLE, 8, 0)
            .unwrap_err()
            .contains("loops"));
        put(&memory, TABLE, 1, Descriptor::new(0x4000, 16, NEXT, 9));
        assert!(chain_at(&memory, TABLE, 8, 0)
            .unwrap_err()
            .contains("outside a table"));
        assert!(chain_at(&memory, TABLE, 8, 8).is_err());
        let far = GuestAddress(0x20000);
        assert!(chain_at(&memory, far, 8, 0)
            .unwrap_err()
            .contains("outside guest memory"));
        put(
            &memory,
            TABLE,
            3,
            Descriptor::new(0x3000, 0, VRING_DESC_F_INDIRECT as u16, 0),
        );
        assert!(chain_at(&memory, TABLE, 8, 3)
            .unwrap_err()
            .contains("indirect table of 0"));
    }
}
