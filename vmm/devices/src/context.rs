//! [`DeviceContext`]: what the VMM lends a device while creating it.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use kvm_ioctls::VmFd;
use pvstack_protocols::boot::DeviceInfo;
use pvstack_protocols::layout::{self, DEVICE_MMIO_SIZE};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::vhost_user::VhostUserHandle;

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
    /// What the device takes over from the pvstack that ran the VM before
    /// (a live replacement); `None` for a new device.
    pub inherited: Option<&'a InheritedDevice>,
}

/// What a device of a VM handed over by another pvstack process keeps:
/// the eventfds its backend waits on and signals, and the connection to
/// its backend, so the backend goes on serving as if nothing happened.
#[derive(Debug)]
pub struct InheritedDevice {
    /// One per queue, signalled on QueueNotify.
    pub kicks: Vec<EventFd>,
    /// Raises the device's interrupt.
    pub call: EventFd,
    /// The vhost-user connection and the socket it was made to.
    pub connection: Option<(UnixStream, PathBuf)>,
}

impl InheritedDevice {
    /// The inherited backend connection, adopted (see
    /// [`VhostUserHandle::adopt`]).
    pub fn adopt(&self, name: &str) -> Result<VhostUserHandle> {
        let Some((stream, socket)) = &self.connection else {
            return Err(Error::Restore {
                device: name.to_string(),
                reason: "no backend connection was handed over".into(),
            });
        };
        let stream = stream.try_clone().map_err(|source| Error::Socket {
            socket: socket.clone(),
            what: "cannot duplicate the handed-over connection",
            cause: source,
        })?;
        VhostUserHandle::adopt(stream, socket)
    }
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
            inherited: None,
        }
    }

    /// The same context for a device that takes over `inherited`.
    pub fn inheriting(self, inherited: &'a InheritedDevice) -> Self {
        DeviceContext {
            inherited: Some(inherited),
            ..self
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
