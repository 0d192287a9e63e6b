//! [`GuestMemorySlot`]: the guest memory a backend serves from.

use std::sync::{PoisonError, RwLock};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// The guest memory the frontend last sent (SET_MEM_TABLE, handed to the
/// backend by vhost-user-backend's `update_memory`); empty until then, so
/// a queue kicked before the memory table is known can be refused.
#[derive(Default)]
pub struct GuestMemorySlot(RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>);

impl GuestMemorySlot {
    /// Replaces the memory (a new memory table).
    pub fn set(&self, memory: GuestMemoryAtomic<GuestMemoryMmap>) {
        // The slot holds a complete value whatever a panicking writer did.
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some(memory);
    }

    /// The memory, if the frontend has sent a memory table.
    pub fn get(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestAddressSpace};

    #[test]
    fn empty_until_set_then_the_latest() {
        let slot = GuestMemorySlot::default();
        assert!(slot.get().is_none());
        for size in [0x1000, 0x2000] {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
            slot.set(GuestMemoryAtomic::new(mem));
        }
        let memory = slot.get().expect("set");
        assert_eq!(
            vm_memory::GuestMemoryBackend::num_regions(&*memory.memory()),
            1
        );
        assert_eq!(
            vm_memory::GuestMemoryBackend::last_addr(&*memory.memory()),
            GuestAddress(0x1fff)
        );
    }
}
