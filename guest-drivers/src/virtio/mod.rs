//! Virtio 1.x drivers (modern only): discovery from the boot info, the
//! virtio-mmio transport, the split virtqueue shared by every device, and
//! the block and console devices.

pub mod blk;
pub mod console;
pub mod mmio;
pub mod net;
pub mod queue;

use core::fmt;
use pvstack_protocols::boot::{device_kind, BootInfo, DeviceInfo};

/// Virtio device ids (`DeviceInfo::subtype` of a virtio-mmio device).
pub mod device_id {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
}

/// Feature bits common to all devices (virtio 1.x section 6).
pub mod feature {
    /// The device can be told not to notify before a given used index.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x (modern) device.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (virtio 1.x section 2.1).
pub mod status {
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Why a device could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioError {
    /// No device of that type and index in the boot info.
    NotFound { device_id: u32, index: u32 },
    /// The window does not hold the virtio-mmio magic value.
    BadMagic(u32),
    /// Not a version 2 (modern) virtio-mmio window.
    UnsupportedVersion(u32),
    /// The window holds another kind of device.
    WrongDevice { expected: u32, found: u32 },
    /// The device does not offer VIRTIO_F_VERSION_1.
    NotModern,
    /// The device did not accept the features (FEATURES_OK did not stick).
    FeaturesRejected,
    /// The queue does not exist (QueueNumMax 0) or is already live.
    QueueUnavailable(u16),
    /// The bump allocator ran out of memory.
    OutOfMemory,
    /// The driver has no queue with that index.
    NoSuchQueue(u16),
    /// A request's data needs more segments than the device accepts.
    TooManySegments,
    /// The split virtqueue refused (full) or the device broke the protocol.
    Queue(queue::QueueError),
}

impl From<queue::QueueError> for VirtioError {
    fn from(error: queue::QueueError) -> Self {
        VirtioError::Queue(error)
    }
}

impl fmt::Display for VirtioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VirtioError::NotFound { device_id, index } => {
                write!(f, "no virtio device of type {device_id} with index {index}")
            }
            VirtioError::BadMagic(magic) => write!(f, "bad virtio-mmio magic {magic:#x}"),
            VirtioError::UnsupportedVersion(v) => write!(f, "virtio-mmio version {v}, want 2"),
            VirtioError::WrongDevice { expected, found } => {
                write!(f, "virtio device id {found}, want {expected}")
            }
            VirtioError::NotModern => write!(f, "device does not offer VIRTIO_F_VERSION_1"),
            VirtioError::FeaturesRejected => write!(f, "device rejected the features"),
            VirtioError::QueueUnavailable(q) => write!(f, "queue {q} is unavailable"),
            VirtioError::OutOfMemory => write!(f, "out of guest memory for the rings"),
            VirtioError::NoSuchQueue(q) => write!(f, "no queue {q}"),
            VirtioError::TooManySegments => write!(f, "request needs too many segments"),
            VirtioError::Queue(error) => write!(f, "{error}"),
        }
    }
}

/// The `index`-th virtio-mmio device with virtio id `device_id`.
pub fn find_device(boot: &BootInfo, device_id: u32, index: u32) -> Result<DeviceInfo, VirtioError> {
    boot.devices()
        .iter()
        .find(|d| d.kind == device_kind::VIRTIO_MMIO && d.subtype == device_id && d.index == index)
        .copied()
        .ok_or(VirtioError::NotFound { device_id, index })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_devices_by_type_and_index() {
        let mut boot = BootInfo::EMPTY;
        let dev = |subtype, index, addr| DeviceInfo {
            kind: device_kind::VIRTIO_MMIO,
            subtype,
            mmio_addr: addr,
            mmio_size: 0x1000,
            irq: 5,
            index,
        };
        boot.devices[0] = dev(device_id::NET, 0, 0x1000);
        boot.devices[1] = dev(device_id::BLOCK, 0, 0x2000);
        boot.devices[2] = dev(device_id::BLOCK, 1, 0x3000);
        boot.devices[3] = dev(device_id::BLOCK, 2, 0x4000);
        boot.device_count = 3;
        assert_eq!(
            find_device(&boot, device_id::BLOCK, 1).map(|d| d.mmio_addr),
            Ok(0x3000)
        );
        assert_eq!(
            find_device(&boot, device_id::BLOCK, 0).map(|d| d.mmio_addr),
            Ok(0x2000)
        );
        // Entries past device_count do not count.
        assert!(find_device(&boot, device_id::BLOCK, 2).is_err());
    }
}
