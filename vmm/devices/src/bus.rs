//! A bus: address ranges mapped to the devices that emulate them. The VM
//! has two, one for MMIO and one for port I/O (ports are addresses too,
//! only 16 bits wide).
//!
//! A vCPU thread that gets an MMIO or port exit looks the address up on
//! the matching bus and calls the device with the offset inside its
//! window. Devices sit behind a mutex because several vCPUs may touch the
//! same device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers register accesses in one window of the bus.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` in the window.
    /// Whatever the device leaves in `data` is what the guest sees.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` in the window.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else holds it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new window is empty or wraps around the address space.
    #[error("bus window at {base:#x} of {len:#x} bytes is empty or wraps")]
    InvalidRange { base: u64, len: u64 },
    /// The new window overlaps one already on the bus.
    #[error("bus window at {base:#x} of {len:#x} bytes overlaps the one at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

struct Window {
    len: u64,
    device: SharedDevice,
}

/// Non-overlapping windows keyed by their base address.
#[derive(Default)]
pub struct Bus {
    windows: BTreeMap<u64, Window>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        // Only the nearest windows on either side can overlap.
        let below = self.windows.range(..end).next_back();
        if let Some((&other, window)) = below {
            if other + window.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.windows.insert(base, Window { len, device });
        Ok(())
    }

    /// The device whose window holds `addr`, and the offset of `addr` in it.
    fn resolve(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let (&base, window) = self.windows.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < window.len).then_some((&window.device, offset))
    }

    /// Dispatches a read; `false` if no device is mapped at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; `false` if no device is mapped at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if a thread panicked while holding it: the device
/// state is still the best there is, and one vCPU's panic must not wedge
/// the others.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access so tests can see offsets and data.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_with_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x100, dev.clone()).unwrap();
        let mut buf = [0u8; 4];
        assert!(bus.read(0x1010, &mut buf));
        assert_eq!(buf, [0x10; 4]);
        assert!(bus.write(0x10ff, &[1, 2]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0xff, vec![1, 2])));
        assert!(!bus.read(0x1100, &mut buf));
        assert!(!bus.write(0xfff, &[0]));
    }

    #[test]
    fn refuses_overlaps_and_empty_windows() {
        let dev: SharedDevice = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x1000, dev.clone()).unwrap();
        assert_eq!(
            bus.insert(0x1800, 0x1000, dev.clone()),
            Err(BusError::Overlap {
                base: 0x1800,
                len: 0x1000,
                other: 0x1000
            })
        );
        assert_eq!(
            bus.insert(0x800, 0x1000, dev.clone()),
            Err(BusError::Overlap {
                base: 0x800,
                len: 0x1000,
                other: 0x1000
            })
        );
        assert!(bus.insert(0x2000, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        bus.insert(0x2000, 0x1000, dev).unwrap();
    }
}
