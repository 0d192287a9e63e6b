//! The virtio-mmio transport, version 2 (virtio 1.x section 4.2): device
//! initialisation, feature negotiation, queue setup and notification.
//!
//! Every register access here exits to the VMM except QueueNotify writes,
//! which the VMM binds to an ioeventfd; so registers are used only to set
//! the device up, and the data path is the shared rings plus the kick.

use super::queue::SplitQueue;
use super::{feature, status, VirtioError};
use core::ptr;

/// "virt", little endian.
const MAGIC: u32 = 0x7472_6976;

/// Register offsets.
mod reg {
    pub const MAGIC_VALUE: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    pub const CONFIG_GENERATION: usize = 0x0fc;
    pub const CONFIG: usize = 0x100;
}

/// One virtio-mmio register window.
pub struct MmioTransport {
    base: usize,
}

impl MmioTransport {
    /// The transport whose registers start at `base`.
    ///
    /// # Safety
    /// `base` must be a virtio-mmio window mapped into the guest (from the
    /// boot info's device list), used by no other transport.
    pub unsafe fn new(base: u64) -> Self {
        MmioTransport {
            base: base as usize,
        }
    }

    /// Checks the magic value and version 2, and returns the device id.
    pub fn device_id(&self) -> Result<u32, VirtioError> {
        let magic = self.read(reg::MAGIC_VALUE);
        if magic != MAGIC {
            return Err(VirtioError::BadMagic(magic));
        }
        match self.read(reg::VERSION) {
            2 => Ok(self.read(reg::DEVICE_ID)),
            version => Err(VirtioError::UnsupportedVersion(version)),
        }
    }

    /// Resets the device and negotiates features: of those the device
    /// offers, accepts the ones in `wanted` (VIRTIO_F_VERSION_1 always).
    /// Returns the accepted set. The device is then at FEATURES_OK, ready
    /// for queue setup and [`driver_ok`](Self::driver_ok).
    pub fn negotiate(&self, wanted: u64) -> Result<u64, VirtioError> {
        self.write(reg::STATUS, 0);
        // A reset is complete when the status reads back as 0.
        while self.read(reg::STATUS) != 0 {
            core::hint::spin_loop();
        }
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let offered = self.features_word(0) | (self.features_word(1) << 32);
        if offered & feature::VERSION_1 == 0 {
            self.fail();
            return Err(VirtioError::NotModern);
        }
        let accepted = offered & (wanted | feature::VERSION_1);
        for word in 0..2 {
            self.write(reg::DRIVER_FEATURES_SEL, word);
            self.write(reg::DRIVER_FEATURES, (accepted >> (32 * word)) as u32);
        }
        let step = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(reg::STATUS, step);
        if self.read(reg::STATUS) & status::FEATURES_OK == 0 {
            self.fail();
            return Err(VirtioError::FeaturesRejected);
        }
        Ok(accepted)
    }

    fn features_word(&self, word: u32) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, word);
        u64::from(self.read(reg::DEVICE_FEATURES))
    }

    /// The largest size queue `index` supports.
    pub fn queue_max_size(&self, index: u16) -> Result<u16, VirtioError> {
        self.write(reg::QUEUE_SEL, u32::from(index));
        if self.read(reg::QUEUE_READY) != 0 {
            return Err(VirtioError::QueueUnavailable(index));
        }
        match self.read(reg::QUEUE_NUM_MAX) {
            0 => Err(VirtioError::QueueUnavailable(index)),
            max => Ok(max.min(32768) as u16),
        }
    }

    /// Gives the device queue `index`'s rings and enables it.
    pub fn enable_queue(&self, index: u16, queue: &SplitQueue<'_>) {
        self.write(reg::QUEUE_SEL, u32::from(index));
        self.write(reg::QUEUE_NUM, u32::from(queue.size()));
        self.write_addr(reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, queue.desc_addr());
        self.write_addr(
            reg::QUEUE_DRIVER_LOW,
            reg::QUEUE_DRIVER_HIGH,
            queue.avail_addr(),
        );
        self.write_addr(
            reg::QUEUE_DEVICE_LOW,
            reg::QUEUE_DEVICE_HIGH,
            queue.used_addr(),
        );
        self.write(reg::QUEUE_READY, 1);
    }

    /// Tells the device the driver is ready (after queue setup).
    pub fn driver_ok(&self) {
        let ready = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.write(reg::STATUS, ready);
    }

    /// Tells the device the driver gave up on it.
    pub fn fail(&self) {
        self.write(reg::STATUS, self.read(reg::STATUS) | status::FAILED);
    }

    /// Kicks queue `index` (an ioeventfd write, not an exit, when the VMM
    /// has bound one).
    pub fn notify(&self, index: u16) {
        self.write(reg::QUEUE_NOTIFY, u32::from(index));
    }

    /// Configuration space accessors, at natural width (virtio 1.x 4.2.2.2).
    pub fn config_u8(&self, offset: usize) -> u8 {
        // SAFETY: a byte inside this device's window (`new`'s contract).
        unsafe { ptr::read_volatile((self.base + reg::CONFIG + offset) as *const u8) }
    }

    /// See [`config_u8`](Self::config_u8).
    pub fn config_u16(&self, offset: usize) -> u16 {
        // SAFETY: as in `config_u8`; configuration fields are naturally aligned.
        unsafe { ptr::read_volatile((self.base + reg::CONFIG + offset) as *const u16) }
    }

    /// See [`config_u8`](Self::config_u8).
    pub fn config_u32(&self, offset: usize) -> u32 {
        self.read(reg::CONFIG + offset)
    }

    /// A 64-bit field, read as two 32-bit halves until the configuration
    /// generation shows no change happened in between.
    pub fn config_u64(&self, offset: usize) -> u64 {
        loop {
            let generation = self.read(reg::CONFIG_GENERATION);
            let low = u64::from(self.config_u32(offset));
            let high = u64::from(self.config_u32(offset + 4));
            if self.read(reg::CONFIG_GENERATION) == generation {
                return low | (high << 32);
            }
        }
    }

    fn write_addr(&self, low: usize, high: usize, addr: u64) {
        self.write(low, addr as u32);
        self.write(high, (addr >> 32) as u32);
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: a 4-byte aligned register inside this device's window.
        unsafe { ptr::read_volatile((self.base + offset) as *const u32) }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe { ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }
}
