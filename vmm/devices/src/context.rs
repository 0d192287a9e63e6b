//! [`DeviceContext`]: what the VMM lends a device while creating it.

use kvm_ioctls::VmFd;
use pvstack_protocols::boot::DeviceInfo;
use pvstack_protocols::layout::{self, DEVICE_MMIO_SIZE};
use vm_memory::GuestMemoryMmap;

/// The VM a device is created for, and the slot it gets in it.
pub struct DeviceContext<'a> {
    /// The VM, for binding the device's ioeventfds and irqfd.
    pub vm: &'a VmFd,
    /// Guest RAM; every region must carry the file descriptor that backs
    /// it (`FileOffset`) so backend processes can map it.
    pub memory: &'a GuestMemoryMmap,
    /// Guest physical address of the device's register window.
    pub mmio_base: u64,
    /// The device's interrupt line (IOAPIC GSI).
    pub gsi: u32,
    /// The device's index among devices of its kind (`--blk` number).
    pub index: u32,
}

impl<'a> DeviceContext<'a> {
    /// The context for device slot `slot` of the memory map
    /// ([`layout::device_mmio_addr`], [`layout::device_irq`]).
    pub fn for_slot(vm: &'a VmFd, memory: &'a GuestMemoryMmap, slot: u32, index: u32) -> Self {
        DeviceContext {
            vm,
            memory,
            mmio_base: layout::device_mmio_addr(slot),
            gsi: layout::device_irq(slot),
            index,
        }
    }

    /// The boot info entry of a device of `kind`
    /// (`pvstack_protocols::boot::device_kind`; `subtype` is the virtio
    /// device id for virtio-mmio, 0 otherwise) in this slot.
    pub fn device_info(&self, kind: u32, subtype: u32) -> DeviceInfo {
        DeviceInfo {
            kind,
            subtype,
            mmio_addr: self.mmio_base,
            mmio_size: DEVICE_MMIO_SIZE,
            irq: self.gsi,
            index: self.index,
        }
    }
}
