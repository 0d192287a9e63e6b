//! The virtio-mmio transport (virtio 1.x, register layout version 2, no
//! legacy interface): one 4 KiB window of 32-bit registers, followed by the
//! device's configuration space at 0x100.
//!
//! The transport keeps what the driver negotiates and programs (features,
//! status, queue sizes and addresses) and hands it to the device on
//! DRIVER_OK. Queue notifications and interrupts do not pass through here:
//! KVM delivers QueueNotify writes to the kick eventfds and the call
//! eventfd raises the interrupt line (see [`DeviceEvents`]).

use log::{debug, trace};
use pvstack_logging::{error_limited, warn_limited};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;

use serde::{Deserialize, Serialize};

use super::{Activation, DeviceEvents, QueueConfig, VirtioDevice};
use crate::bus::BusDevice;
use crate::error::Result;

/// "virt", little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
const MMIO_VERSION: u32 = 2;
/// "PVST", little endian: the vendor id pvstack's devices report.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"PVST");

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport<D: VirtioDevice> {
    /// Names the device in log lines.
    name: String,
    device: D,
    events: DeviceEvents,
    status: u32,
    /// The status when the driver last reset the device: what the status
    /// register reads while that reset is still under way.
    status_at_reset: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device`, whose notifications travel on `events`
    /// (one kick per queue of the device).
    pub fn new(name: impl Into<String>, device: D, events: DeviceEvents) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueConfig::new(max))
            .collect();
        MmioTransport {
            name: name.into(),
            device,
            events,
            status: 0,
            status_at_reset: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device behind the transport, for control operations.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status the driver has set (plus NEEDS_RESET if the
    /// device failed to start).
    pub fn status(&self) -> u32 {
        self.status
    }

    fn is_live(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue, if the driver may still program it.
    fn programmable_queue(&mut self, register: u32) -> Option<&mut QueueConfig> {
        let live = self.is_live();
        let Some(queue) = self.queues.get_mut(self.queue_sel as usize) else {
            warn_limited!(
                "{}: write to register {register:#x} for queue {} that does not exist; ignored",
                self.name,
                self.queue_sel
            );
            return None;
        };
        if live || (queue.ready && register != VIRTIO_MMIO_QUEUE_READY) {
            warn_limited!(
                "{}: write to register {register:#x} of queue {} while it is in use; ignored",
                self.name,
                self.queue_sel
            );
            return None;
        }
        Some(queue)
    }

    fn read_register(&self, register: u32) -> u32 {
        match register {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_id(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let features = self.device.features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .selected_queue()
                .map_or(0, |queue| u32::from(queue.max_size)),
            VIRTIO_MMIO_QUEUE_READY => self
                .selected_queue()
                .map_or(0, |queue| u32::from(queue.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.device.interrupt_status(),
            VIRTIO_MMIO_STATUS if self.device.reset_pending() => self.status_at_reset,
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: their length reads as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            // The configuration space never changes.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                debug!(
                    "{}: read of write-only or unknown register {register:#x}",
                    self.name
                );
                0
            }
        }
    }

    fn write_register(&mut self, register: u32, value: u32) {
        match register {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => {
                    if let Some(queue) = self.programmable_queue(register) {
                        queue.size = size;
                    }
                }
                Err(_) => warn_limited!("{}: queue size {value} out of range; ignored", self.name),
            },
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(queue) = self.programmable_queue(register) {
                    queue.ready = value == 1;
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                if let Some(queue) = self.programmable_queue(register) {
                    let (addr, high) = match register {
                        VIRTIO_MMIO_QUEUE_DESC_LOW => (&mut queue.desc_table, false),
                        VIRTIO_MMIO_QUEUE_DESC_HIGH => (&mut queue.desc_table, true),
                        VIRTIO_MMIO_QUEUE_AVAIL_LOW => (&mut queue.avail_ring, false),
                        VIRTIO_MMIO_QUEUE_AVAIL_HIGH => (&mut queue.avail_ring, true),
                        VIRTIO_MMIO_QUEUE_USED_LOW => (&mut queue.used_ring, false),
                        _ => (&mut queue.used_ring, true),
                    };
                    set_half(addr, high, value);
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            // Nothing to clear: the devices here keep no interrupt state
            // (see `VirtioDevice::interrupt_status`).
            VIRTIO_MMIO_INTERRUPT_ACK => trace!("{}: interrupt ack {value:#x}", self.name),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => warn_limited!(
                "{}: write of {value:#x} to read-only or unknown register {register:#x}; ignored",
                self.name
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
        if negotiating != 0 {
            warn_limited!(
                "{}: driver features written after FEATURES_OK; ignored",
                self.name
            );
            return;
        }
        match self.driver_features_sel {
            0 => set_half(&mut self.driver_features, false, value),
            1 => set_half(&mut self.driver_features, true, value),
            sel => warn_limited!("{}: driver features word {sel} does not exist", self.name),
        }
    }

    /// A notification that reached the VMM: the device processes it itself
    /// (an in-VMM device, whose notifications are not bound to ioeventfds),
    /// or it missed the queue's ioeventfd (the KVM binding only matches
    /// aligned 32-bit writes of a valid queue index) and is forwarded, so
    /// the queue is kicked either way.
    fn notify(&mut self, value: u32) {
        if let Ok(queue) = u16::try_from(value) {
            if usize::from(queue) < self.queues.len()
                && self.is_live()
                && self.device.process_notification(queue)
            {
                return;
            }
        }
        let kick = usize::try_from(value)
            .ok()
            .and_then(|queue| self.events.kicks.get(queue));
        match kick {
            Some(kick) => {
                if let Err(err) = kick.write(1) {
                    error_limited!("{}: cannot kick queue {value}: {err}", self.name);
                }
            }
            None => warn_limited!(
                "{}: notification for queue {value} that does not exist",
                self.name
            ),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if self.device.reset_pending() {
            warn_limited!(
                "{}: status {value:#x} written before the reset completed (status reads 0 then); ignored",
                self.name
            );
            return;
        }
        let cleared = self.status & !value;
        if cleared != 0 {
            warn_limited!(
                "{}: driver cleared status bits {cleared:#x} without a reset; ignored",
                self.name
            );
            return;
        }
        let added = value & !self.status;
        let mut status = value;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver reads the status back and sees the refusal.
            status &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                warn_limited!("{}: DRIVER_OK without FEATURES_OK; ignored", self.name);
                status &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else if let Err(err) = self.activate() {
                error_limited!("{}: cannot start the device: {err}", self.name);
                status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
        self.status = status;
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        let unknown = self.driver_features & !offered;
        if unknown != 0 {
            warn_limited!(
                "{}: driver accepted features {unknown:#x} that were not offered",
                self.name
            );
            return false;
        }
        if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            warn_limited!(
                "{}: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)",
                self.name
            );
            return false;
        }
        true
    }

    fn activate(&mut self) -> Result<()> {
        for (index, queue) in (0u16..).zip(&self.queues) {
            if queue.ready {
                queue.validate(index)?;
            }
        }
        self.device.activate(Activation {
            features: self.driver_features,
            queues: &self.queues,
            events: &self.events,
        })
    }

    fn reset(&mut self) {
        if self.is_live() {
            self.device.reset();
        }
        debug!("{}: reset", self.name);
        self.status_at_reset = self.status;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for queue in &mut self.queues {
            *queue = QueueConfig::new(queue.max_size);
        }
    }
}

/// What the driver negotiated and programmed through one transport: all
/// a snapshot or a take-over needs to give the device back to the driver
/// as it left it. Ring positions are the device's business (a vhost-user
/// backend reports them, see `VhostUserDevice::stop_rings`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueConfig>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport's registers as the driver left them.
    pub fn save_state(&self) -> TransportState {
        TransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.clone(),
        }
    }

    /// The transport's name in log lines.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's kick and call eventfds.
    pub fn events(&self) -> &DeviceEvents {
        &self.events
    }

    /// Puts back the registers of `state` on a freshly created transport
    /// and, if the driver had started the device, starts it again with
    /// `start` (which decides where its rings resume) instead of the
    /// normal activation. Refuses a state whose queues do not fit this
    /// device (another queue count or size limit).
    pub fn restore_state(
        &mut self,
        state: &TransportState,
        start: impl FnOnce(&mut D, Activation<'_>) -> Result<()>,
    ) -> Result<()> {
        let fits = state.queues.len() == self.queues.len()
            && state
                .queues
                .iter()
                .zip(&self.queues)
                .all(|(saved, ours)| saved.max_size == ours.max_size);
        if !fits {
            return Err(crate::Error::Restore {
                device: self.name.clone(),
                reason: format!(
                    "the saved device has {} queues of at most {:?} entries, this one {} of at most {:?}",
                    state.queues.len(),
                    state.queues.iter().map(|q| q.max_size).collect::<Vec<_>>(),
                    self.queues.len(),
                    self.queues.iter().map(|q| q.max_size).collect::<Vec<_>>()
                ),
            });
        }
        if state.driver_features & !self.device.features() != 0 {
            return Err(crate::Error::Restore {
                device: self.name.clone(),
                reason: format!(
                    "the driver accepted features {:#x} that this backend does not offer",
                    state.driver_features & !self.device.features()
                ),
            });
        }
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.queues.clone_from(&state.queues);
        if state.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && state.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
        {
            start(
                &mut self.device,
                Activation {
                    features: self.driver_features,
                    queues: &self.queues,
                    events: &self.events,
                },
            )?;
        }
        self.status = state.status;
        Ok(())
    }
}

/// Replaces the low or high 32 bits of `target`.
fn set_half(target: &mut u64, high: bool, value: u32) {
    *target = if high {
        (*target & 0xffff_ffff) | (u64::from(value) << 32)
    } else {
        (*target & !0xffff_ffff) | u64::from(value)
    };
}

/// The register at `offset` if the access is the aligned 32-bit one the
/// virtio-mmio specification requires for registers.
fn register_at(offset: u64, len: usize) -> Option<u32> {
    let register = u32::try_from(offset).ok()?;
    (len == 4 && register % 4 == 0 && register < VIRTIO_MMIO_CONFIG).then_some(register)
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        match register_at(offset, data.len()) {
            Some(register) => {
                let value = self.read_register(register);
                data.copy_from_slice(&value.to_le_bytes());
            }
            None => {
                warn_limited!(
                    "{}: {}-byte read at {offset:#x} is not a register access; reads as zero",
                    self.name,
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            warn_limited!(
                "{}: write to the read-only configuration space at {:#x}; ignored",
                self.name,
                offset - u64::from(VIRTIO_MMIO_CONFIG)
            );
            return;
        }
        match (register_at(offset, data.len()), <[u8; 4]>::try_from(data)) {
            (Some(register), Ok(bytes)) => self.write_register(register, u32::from_le_bytes(bytes)),
            _ => warn_limited!(
                "{}: {}-byte write at {offset:#x} is not a register access; ignored",
                self.name,
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::read_config_bytes;
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_FAILED,
    };

    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    const FEATURE_A: u64 = 1 << 5;

    /// A device that records what the transport hands it, so the tests
    /// see the outcome of the driver's register writes.
    struct RecordingDevice {
        max_sizes: Vec<u16>,
        config: Vec<u8>,
        fail_activation: bool,
        activated: Option<(u64, Vec<QueueConfig>)>,
        resets: u32,
    }

    impl VirtioDevice for RecordingDevice {
        fn device_id(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            VERSION_1 | FEATURE_A
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&self.config, offset, data);
        }
        fn activate(&mut self, activation: Activation<'_>) -> Result<()> {
            if self.fail_activation {
                return Err(crate::Error::InvalidQueue {
                    queue: 0,
                    reason: "refused by the test device".into(),
                });
            }
            self.activated = Some((activation.features, activation.queues.to_vec()));
            Ok(())
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
        fn interrupt_status(&self) -> u32 {
            u32::from(self.activated.is_some())
        }
    }

    fn transport() -> MmioTransport<RecordingDevice> {
        let device = RecordingDevice {
            max_sizes: vec![256, 128],
            config: (1..=12).collect(),
            fail_activation: false,
            activated: None,
            resets: 0,
        };
        MmioTransport::new("test", device, DeviceEvents::new(2).unwrap())
    }

    fn read32(t: &mut MmioTransport<RecordingDevice>, offset: u32) -> u32 {
        let mut data = [0xaa; 4];
        t.read(u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(t: &mut MmioTransport<RecordingDevice>, offset: u32, value: u32) {
        t.write(u64::from(offset), &value.to_le_bytes());
    }

    /// What a driver does up to DRIVER_OK, with queue 0 at the given rings.
    fn bring_up(t: &mut MmioTransport<RecordingDevice>, features: u64) {
        write32(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write32(
            t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        write32(t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FEATURES_OK);
        write32(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write32(t, VIRTIO_MMIO_QUEUE_NUM, 64);
        write32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        write32(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x1);
        write32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        write32(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
        write32(t, VIRTIO_MMIO_QUEUE_READY, 1);
        let status = read32(t, VIRTIO_MMIO_STATUS);
        write32(t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    #[test]
    fn identification_registers() {
        let mut t = transport();
        assert_eq!(read32(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        assert_eq!(
            read32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            FEATURE_A as u32
        );
        write32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        write32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 128);
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
    }

    #[test]
    fn config_space_any_width() {
        let mut t = transport();
        let mut byte = [0u8; 1];
        t.read(0x100 + 3, &mut byte);
        assert_eq!(byte, [4]);
        let mut quad = [0u8; 8];
        t.read(0x100 + 8, &mut quad);
        assert_eq!(quad, [9, 10, 11, 12, 0, 0, 0, 0]);
        // Writes to the configuration space change nothing.
        t.write(0x100, &[0xff]);
        t.read(0x100 + 3, &mut byte);
        assert_eq!(byte, [4]);
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let mut t = transport();
        let mut two = [0xaa; 2];
        t.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut two);
        assert_eq!(two, [0, 0]);
        let mut four = [0xaa; 4];
        t.read(0x2, &mut four);
        assert_eq!(four, [0; 4]);
        t.write(u64::from(VIRTIO_MMIO_STATUS), &[1, 0]);
        t.write(u64::from(VIRTIO_MMIO_STATUS) + 1, &[1, 0, 0, 0]);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_STATUS), 0);
        // Read-only and unknown registers.
        write32(&mut t, VIRTIO_MMIO_MAGIC_VALUE, 0);
        write32(&mut t, 0xf0, 1);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read32(&mut t, 0xf0), 0);
        // Offsets beyond any window, and zero-length accesses.
        t.write(u64::MAX, &[1, 2, 3, 4]);
        t.read(u64::MAX - 1, &mut four);
        t.write(u64::from(VIRTIO_MMIO_STATUS), &[]);
        t.read(u64::from(VIRTIO_MMIO_STATUS), &mut []);
        // Programming a queue that does not exist.
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
        write32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        // A notification for a queue that does not exist.
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 9);
        assert!(t.device().activated.is_none());
    }

    #[test]
    fn driver_ok_activates_with_what_the_driver_programmed() {
        let mut t = transport();
        bring_up(&mut t, VERSION_1 | FEATURE_A);
        let status = read32(&mut t, VIRTIO_MMIO_STATUS);
        assert_eq!(
            status & VIRTIO_CONFIG_S_DRIVER_OK,
            VIRTIO_CONFIG_S_DRIVER_OK
        );
        assert_eq!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        let (features, queues) = t.device().activated.clone().unwrap();
        assert_eq!(features, VERSION_1 | FEATURE_A);
        assert_eq!(
            queues[0],
            QueueConfig {
                max_size: 256,
                size: 64,
                ready: true,
                desc_table: 0x1_0000_1000,
                avail_ring: 0x2000,
                used_ring: 0x3000,
            }
        );
        assert!(!queues[1].ready);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        // The queue can no longer be reprogrammed, nor the features.
        write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
        write32(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    }

    #[test]
    fn notify_that_reached_the_vmm_kicks_the_queue() {
        let mut t = transport();
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(t.events.kicks[1].read().unwrap(), 2);
        assert!(t.events.kicks[0].read().is_err(), "queue 0 was not kicked");
    }

    #[test]
    fn features_not_offered_or_legacy_are_refused() {
        for features in [FEATURE_A, VERSION_1 | 1 << 40] {
            let mut t = transport();
            bring_up(&mut t, features);
            let status = read32(&mut t, VIRTIO_MMIO_STATUS);
            assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0, "{features:#x}");
            assert_eq!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0, "{features:#x}");
            assert!(t.device().activated.is_none());
        }
    }

    #[test]
    fn invalid_queue_or_failed_activation_needs_reset() {
        let mut t = transport();
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 100);
        write32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        bring_up_without_queue_setup(&mut t);
        assert_ne!(
            read32(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        assert!(t.device().activated.is_none());

        let mut t = transport();
        t.device_mut().fail_activation = true;
        bring_up(&mut t, VERSION_1);
        assert_ne!(
            read32(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        assert_eq!(read32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    fn bring_up_without_queue_setup(t: &mut MmioTransport<RecordingDevice>) {
        let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        write32(t, VIRTIO_MMIO_STATUS, status);
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write32(t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FEATURES_OK);
        let status = status | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
        write32(t, VIRTIO_MMIO_STATUS, status);
    }

    #[test]
    fn status_zero_resets_and_allows_a_second_bring_up() {
        let mut t = transport();
        bring_up(&mut t, VERSION_1);
        // Clearing bits without writing zero is not a reset.
        write32(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert!(t.device().activated.is_some());
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.device().resets, 1);
        assert!(t.device().activated.is_none());
        assert_eq!(read32(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        bring_up(&mut t, VERSION_1 | FEATURE_A);
        assert_eq!(
            t.device().activated.as_ref().unwrap().0,
            VERSION_1 | FEATURE_A
        );
        // FAILED after DRIVER_OK is only recorded; a reset still works.
        let status = read32(&mut t, VIRTIO_MMIO_STATUS);
        write32(&mut t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FAILED);
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.device().resets, 2);
    }

    #[test]
    fn reset_before_driver_ok_does_not_reach_the_device() {
        let mut t = transport();
        write32(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.device().resets, 0);
    }
}
