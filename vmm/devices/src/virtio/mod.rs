//! Virtio devices as the transport sees them: what a device offers
//! ([`VirtioDevice`]), what the driver programmed ([`QueueConfig`]) and the
//! eventfds that carry notifications past the VMM ([`DeviceEvents`]).

pub mod mmio;

use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};

/// One virtqueue as the driver programmed it through the transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueConfig {
    /// Largest size the device accepts (QueueNumMax).
    pub max_size: u16,
    /// Size the driver chose (QueueNum).
    pub size: u16,
    /// The driver enabled the queue (QueueReady).
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the driver (available) ring.
    pub avail_ring: u64,
    /// Guest physical address of the device (used) ring.
    pub used_ring: u64,
}

impl QueueConfig {
    /// A queue that is not set up yet and accepts up to `max_size` entries.
    pub fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }

    /// Checks what the split-ring layout requires of a ready queue: a size
    /// that is a power of two within the maximum, and aligned rings.
    pub fn validate(&self, index: u16) -> Result<()> {
        let invalid = |reason: String| {
            Err(Error::InvalidQueue {
                queue: index,
                reason,
            })
        };
        if self.size == 0 || self.size > self.max_size || !self.size.is_power_of_two() {
            return invalid(format!(
                "size {} is not a power of two in 1..={}",
                self.size, self.max_size
            ));
        }
        for (name, addr, align) in [
            ("descriptor table", self.desc_table, 16),
            ("available ring", self.avail_ring, 2),
            ("used ring", self.used_ring, 4),
        ] {
            if addr % align != 0 {
                return invalid(format!("{name} at {addr:#x} is not {align}-byte aligned"));
            }
        }
        Ok(())
    }

    /// The virtio-queue [`Queue`] for a device the VMM serves itself:
    /// this queue (number `index`) as the driver programmed it, with event
    /// index suppression if negotiated, checked against guest `memory`.
    pub fn build_queue(
        &self,
        index: u16,
        event_idx: bool,
        memory: &GuestMemoryMmap,
    ) -> Result<Queue> {
        let invalid = |reason: String| Error::InvalidQueue {
            queue: index,
            reason,
        };
        let mut queue = Queue::new(self.max_size).map_err(|e| invalid(e.to_string()))?;
        let halves = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        queue.set_size(self.size);
        let (low, high) = halves(self.desc_table);
        queue.set_desc_table_address(low, high);
        let (low, high) = halves(self.avail_ring);
        queue.set_avail_ring_address(low, high);
        let (low, high) = halves(self.used_ring);
        queue.set_used_ring_address(low, high);
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(memory) {
            return Err(invalid("its rings do not lie in guest memory".to_string()));
        }
        Ok(queue)
    }

    /// Bytes of the descriptor table, available ring and used ring
    /// (including the event index fields, which are harmless to count).
    pub fn ring_sizes(&self) -> [u64; 3] {
        let size = u64::from(self.size);
        [16 * size, 6 + 2 * size, 6 + 8 * size]
    }
}

/// The eventfds of one device: one kick per queue, bound by KVM to writes
/// of the queue index to QueueNotify, and one call, bound by KVM to the
/// device's interrupt line. Whoever serves the queues (a backend process or
/// a thread of the VMM) waits on the kicks and writes the call.
#[derive(Debug)]
pub struct DeviceEvents {
    /// Signalled when the driver notifies queue `i`.
    pub kicks: Vec<EventFd>,
    /// Writing it raises the device's interrupt.
    pub call: EventFd,
}

impl DeviceEvents {
    /// Eventfds that nothing is bound to yet.
    pub fn new(queues: u16) -> Result<Self> {
        let eventfd = |what: String| {
            EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
                what,
                cause: source,
            })
        };
        let kicks = (0..queues)
            .map(|queue| eventfd(format!("queue {queue} notifications")))
            .collect::<Result<_>>()?;
        let call = eventfd("device interrupts".to_string())?;
        Ok(DeviceEvents { kicks, call })
    }

    /// Eventfds bound in KVM: kick `i` to a 32-bit write of `i` to
    /// QueueNotify of the window at `mmio_base` (so a notification never
    /// exits to the VMM), the call to interrupt line `gsi` through an irqfd.
    pub fn register(vm: &VmFd, mmio_base: u64, gsi: u32, queues: u16) -> Result<Self> {
        let events = Self::new(queues)?;
        events.bind(vm, mmio_base, gsi)?;
        Ok(events)
    }

    /// The eventfds of the device `ctx` describes, bound in KVM as
    /// [`Self::register`] binds them: new ones, or those the device
    /// inherits from the pvstack that ran the VM before (whose backend
    /// waits on and signals them). An inherited call is not bound: KVM
    /// binds an eventfd to one irqfd at a time, across VMs, so the process
    /// taking over binds it once the old VM has let go of it.
    pub fn for_context(ctx: &crate::DeviceContext<'_>, queues: u16) -> Result<Self> {
        let Some(inherited) = ctx.inherited else {
            return Self::register(ctx.vm, ctx.mmio_base, ctx.gsi, queues);
        };
        if inherited.kicks.len() != usize::from(queues) {
            return Err(Error::Restore {
                device: format!("device at MMIO {:#x}", ctx.mmio_base),
                reason: format!(
                    "{} queue eventfds were handed over for {queues} queues",
                    inherited.kicks.len()
                ),
            });
        }
        let events = DeviceEvents {
            kicks: inherited
                .kicks
                .iter()
                .map(|k| clone_eventfd(k, "an inherited kick".into()))
                .collect::<Result<_>>()?,
            call: clone_eventfd(&inherited.call, "the inherited call".into())?,
        };
        events.bind_kicks(ctx.vm, ctx.mmio_base)?;
        Ok(events)
    }

    /// Binds the call to `gsi` and each kick to QueueNotify at `mmio_base`.
    fn bind(&self, vm: &VmFd, mmio_base: u64, gsi: u32) -> Result<()> {
        vm.register_irqfd(&self.call, gsi)
            .map_err(|source| Error::IrqFd { gsi, cause: source })?;
        self.bind_kicks(vm, mmio_base)
    }

    /// Binds each kick to QueueNotify at `mmio_base`.
    fn bind_kicks(&self, vm: &VmFd, mmio_base: u64) -> Result<()> {
        let addr = mmio_base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY);
        for (queue, kick) in (0u16..).zip(&self.kicks) {
            vm.register_ioevent(kick, &IoEventAddress::Mmio(addr), u32::from(queue))
                .map_err(|source| Error::IoEvent {
                    queue,
                    addr,
                    cause: source,
                })?;
        }
        Ok(())
    }

    /// Eventfds with only the call bound in KVM (to `gsi`, through an
    /// irqfd): for a device the VMM serves itself, whose QueueNotify
    /// writes must exit to the VMM (see
    /// [`VirtioDevice::process_notification`]).
    pub fn register_call(vm: &VmFd, gsi: u32, queues: u16) -> Result<Self> {
        let events = Self::new(queues)?;
        vm.register_irqfd(&events.call, gsi)
            .map_err(|source| Error::IrqFd { gsi, cause: source })?;
        Ok(events)
    }
}

/// A second handle on `fd` (for whoever serves a device's queues);
/// `what` names the eventfd in the error.
pub fn clone_eventfd(fd: &EventFd, what: String) -> Result<EventFd> {
    fd.try_clone().map_err(|source| Error::EventFd {
        what,
        cause: source,
    })
}

/// What the transport hands a device when the driver sets DRIVER_OK.
pub struct Activation<'a> {
    /// Features the driver accepted.
    pub features: u64,
    /// Every queue of the device, by index; only ready ones are to be served.
    pub queues: &'a [QueueConfig],
    /// The device's kick and call eventfds.
    pub events: &'a DeviceEvents,
}

/// A virtio device behind a transport. The transport handles the feature,
/// status and queue registers; the device says what it offers, serves its
/// configuration space and runs its queues once activated.
pub trait VirtioDevice: Send {
    /// Virtio device id (1 net, 2 block, 3 console).
    fn device_id(&self) -> u32;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads `data.len()` bytes of the configuration space at `offset`;
    /// bytes beyond its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Starts serving the queues; an error leaves the device inactive.
    fn activate(&mut self, activation: Activation<'_>) -> Result<()>;
    /// Stops serving the queues (the driver reset the device).
    fn reset(&mut self);
    /// Whether the last reset is still under way (a device that stops its
    /// queues without holding up the vCPU): until it is done the status
    /// register does not read 0, which virtio drivers wait for.
    fn reset_pending(&self) -> bool {
        false
    }
    /// The InterruptStatus register's value.
    fn interrupt_status(&self) -> u32;
    /// The driver's write of `queue` to QueueNotify exited to the VMM. A
    /// device that serves its queues inside the VMM processes the queue
    /// here and returns `true`; by default the notification is forwarded
    /// to the queue's kick eventfd, where its server waits.
    fn process_notification(&mut self, _queue: u16) -> bool {
        false
    }
}

/// Copies the part of `config` at `offset` into `data`, zero beyond its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(available) = config.get(start..) {
        let len = available.len().min(data.len());
        data[..len].copy_from_slice(&available[..len]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_validation() {
        let mut queue = QueueConfig::new(256);
        queue.desc_table = 0x1000;
        queue.avail_ring = 0x2002;
        queue.used_ring = 0x3004;
        queue.validate(0).unwrap();
        queue.size = 100;
        assert!(queue.validate(0).is_err());
        queue.size = 512;
        assert!(queue.validate(0).is_err());
        queue.size = 0;
        assert!(queue.validate(0).is_err());
        queue.size = 8;
        queue.desc_table = 0x1008;
        assert!(queue.validate(0).is_err());
        queue.desc_table = 0x1000;
        queue.used_ring = 0x3002;
        let err = queue.validate(3).unwrap_err().to_string();
        assert!(
            err.contains("queue 3") && err.contains("used ring"),
            "{err}"
        );
    }

    #[test]
    fn config_reads_are_bounded() {
        let config = [1, 2, 3, 4];
        let mut data = [0xff; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 9, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
