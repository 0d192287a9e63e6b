//! [`VhostUserDevice`]: a virtio device whose queues a backend process
//! serves. The device is the same for every device type; what differs
//! (features, queue sizes, configuration space) is worked out by the
//! device-specific constructor (see `crate::blk`) and passed in a
//! [`DeviceShape`].

use log::{error, info};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::handle::{ActiveQueue, RingSetup, VhostUserHandle};
use super::process::BackendProcess;
use crate::error::{Error, Result};
use crate::virtio::{read_config_bytes, Activation, VirtioDevice};

/// What the driver sees of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceShape {
    /// Virtio device id.
    pub device_id: u32,
    /// Feature bits offered to the driver.
    pub features: u64,
    /// Largest size of each queue.
    pub queue_max_sizes: Vec<u16>,
    /// The configuration space.
    pub config: Vec<u8>,
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    /// Names the device in log lines.
    name: String,
    shape: DeviceShape,
    memory: GuestMemoryMmap,
    handle: VhostUserHandle,
    /// What the backend was set up with, while the driver runs the device.
    rings: Option<RingSetup>,
    /// The backend process, if pvstack started it. Declared after the
    /// handle so the connection closes before the process is stopped.
    process: Option<BackendProcess>,
}

impl VhostUserDevice {
    /// A device that `handle`'s backend serves in `memory`; `process` is
    /// the backend if pvstack started it (stopped when the device drops).
    pub fn new(
        name: impl Into<String>,
        shape: DeviceShape,
        memory: GuestMemoryMmap,
        handle: VhostUserHandle,
        process: Option<BackendProcess>,
    ) -> Self {
        VhostUserDevice {
            name: name.into(),
            shape,
            memory,
            handle,
            rings: None,
            process,
        }
    }

    /// The device's name in logs and in the control API.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the driver sees of the device.
    pub fn shape(&self) -> &DeviceShape {
        &self.shape
    }

    /// The connection to the backend.
    pub fn handle(&self) -> &VhostUserHandle {
        &self.handle
    }

    /// The backend process, if pvstack started it.
    pub fn process(&self) -> Option<&BackendProcess> {
        self.process.as_ref()
    }

    /// Whether the backend is serving the driver's queues.
    pub fn is_active(&self) -> bool {
        self.rings.is_some()
    }
}

fn clone_eventfd(fd: &EventFd, what: String) -> Result<EventFd> {
    fd.try_clone()
        .map_err(|source| Error::EventFd { what, source })
}

impl VirtioDevice for VhostUserDevice {
    fn device_id(&self) -> u32 {
        self.shape.device_id
    }

    fn features(&self) -> u64 {
        self.shape.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.shape.queue_max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.shape.config, offset, data);
    }

    fn activate(&mut self, activation: Activation<'_>) -> Result<()> {
        let mut queues = Vec::new();
        for (index, (config, kick)) in
            (0u16..).zip(activation.queues.iter().zip(&activation.events.kicks))
        {
            if config.ready {
                queues.push(ActiveQueue {
                    index,
                    config: *config,
                    next_avail: 0,
                    kick: clone_eventfd(kick, format!("{} queue {index} kicks", self.name))?,
                });
            }
        }
        let setup = RingSetup {
            features: activation.features,
            memory: self.memory.clone(),
            queues,
            call: clone_eventfd(&activation.events.call, format!("{} interrupts", self.name))?,
        };
        self.handle.start(&setup)?;
        info!(
            "{}: driver started {} queues on {}",
            self.name,
            setup.queues.len(),
            self.handle.socket().display()
        );
        self.rings = Some(setup);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut rings) = self.rings.take() {
            match self.handle.stop(&mut rings) {
                Ok(()) => info!("{}: driver reset the device; rings stopped", self.name),
                Err(err) => error!("{}: cannot stop the rings on reset: {err}", self.name),
            }
        }
    }

    /// The backend raises the interrupt itself, through the irqfd, so the
    /// VMM never learns why an interrupt came. Linux's virtio-mmio handler
    /// reads InterruptStatus first and ignores an interrupt that shows no
    /// reason (and eventually disables a line that keeps doing that), so
    /// while the backend serves the queues, report "used buffers" always:
    /// a driver that then finds nothing new in its used rings loses only
    /// the look. Configuration changes never happen here.
    fn interrupt_status(&self) -> u32 {
        if self.rings.is_some() {
            VIRTIO_MMIO_INT_VRING
        } else {
            0
        }
    }
}
