//! Driver for the emulated register-level disk controller
//! ([`pvstack_protocols::legacy_blk`]): the full-virtualization baseline.
//!
//! Every register access, including each 32-bit data word, traps to the
//! VMM. The controller runs one command at a time, so the driver carries
//! out each request completely when it is submitted and keeps its
//! completion until [`LegacyBlk::poll`] takes it: queue depth 1, whatever
//! depth the workload asks for.

use core::ptr;

use pvstack_protocols::boot::{device_kind, BootInfo};
use pvstack_protocols::legacy_blk::{
    command, reg, status as reg_status, MAGIC, MAX_COUNT, SECTOR_SIZE,
};

use crate::virtio::blk::{request, status, Completion};
use crate::virtio::queue::{Buffer, QueueError};
use crate::virtio::VirtioError;

/// Completions the driver holds before they are polled.
pub const MAX_PENDING: usize = 64;

/// The legacy disk controller.
pub struct LegacyBlk {
    base: usize,
    capacity: u64,
    readonly: bool,
    /// Commands issued (the closest thing this device has to a kick).
    commands: u64,
    /// Finished requests not yet polled, oldest first from `head`.
    pending: [Completion; MAX_PENDING],
    head: usize,
    len: usize,
    next_token: u16,
}

/// The register window of the `index`-th disk if it is a legacy controller.
pub fn find(boot: &BootInfo, index: u32) -> Option<u64> {
    boot.devices()
        .iter()
        .find(|d| d.kind == device_kind::LEGACY_BLOCK && d.index == index)
        .map(|d| d.mmio_addr)
}

impl LegacyBlk {
    /// The controller whose registers start at `base`; `None` if the
    /// window does not identify as one.
    ///
    /// # Safety
    /// `base` must be a legacy controller window mapped into the guest
    /// (from the boot info's device list), used by nothing else.
    pub unsafe fn new(base: u64) -> Option<Self> {
        let mut disk = LegacyBlk {
            base: base as usize,
            capacity: 0,
            readonly: false,
            commands: 0,
            pending: [Completion {
                token: 0,
                status: 0,
                len: 0,
            }; MAX_PENDING],
            head: 0,
            len: 0,
            next_token: 0,
        };
        if disk.read(reg::ID) != MAGIC {
            return None;
        }
        disk.capacity =
            u64::from(disk.read(reg::CAPACITY_HI)) << 32 | u64::from(disk.read(reg::CAPACITY_LO));
        disk.readonly = disk.read(reg::STATUS) & reg_status::READONLY != 0;
        Some(disk)
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.readonly
    }

    /// Commands issued so far.
    pub fn commands(&self) -> u64 {
        self.commands
    }

    fn read(&self, offset: u64) -> u32 {
        // SAFETY: the window is the controller's (see `new`); its registers
        // are aligned 32-bit words.
        unsafe { ptr::read_volatile((self.base + offset as usize) as *const u32) }
    }

    fn write(&self, offset: u64, value: u32) {
        // SAFETY: as in `read`.
        unsafe { ptr::write_volatile((self.base + offset as usize) as *mut u32, value) }
    }

    /// Issues `cmd` for `count` sectors at `sector`; whether the device
    /// accepted it.
    fn command(&mut self, cmd: u32, sector: u64, count: u32) -> bool {
        self.write(reg::LBA_LO, sector as u32);
        self.write(reg::LBA_HI, (sector >> 32) as u32);
        self.write(reg::COUNT, count);
        self.write(reg::COMMAND, cmd);
        self.commands += 1;
        self.read(reg::STATUS) & reg_status::ERROR == 0
    }

    /// Moves `data` to or from the disk at `sector`, at most `MAX_COUNT`
    /// sectors per command; the request's status.
    ///
    /// # Safety
    /// `data` must be memory nothing else uses during the call.
    unsafe fn transfer(&mut self, write: bool, sector: u64, data: Buffer) -> u8 {
        let len = u64::from(data.len);
        if len == 0 || len % SECTOR_SIZE != 0 || data.device_writes == write {
            return status::IOERR;
        }
        let mut done = 0u64;
        while done < len {
            let count = ((len - done) / SECTOR_SIZE).min(u64::from(MAX_COUNT));
            let cmd = if write { command::WRITE } else { command::READ };
            if !self.command(cmd, sector + done / SECTOR_SIZE, count as u32) {
                return status::IOERR;
            }
            let words = (data.addr + done) as *mut u32;
            for i in 0..(count * SECTOR_SIZE / 4) as usize {
                // SAFETY: within `data` (count sectors from `done`), which the
                // caller hands over; unaligned access is allowed.
                unsafe {
                    if write {
                        self.write(reg::DATA, ptr::read_unaligned(words.add(i)));
                    } else {
                        ptr::write_unaligned(words.add(i), self.read(reg::DATA));
                    }
                }
            }
            done += count * SECTOR_SIZE;
        }
        if write && self.read(reg::STATUS) & reg_status::ERROR != 0 {
            return status::IOERR;
        }
        status::OK
    }

    /// Carries out a request of type `kind` ([`request`]) at `sector` with
    /// `data`, and keeps its completion for [`poll`](Self::poll). Reads,
    /// writes and flushes are supported; other types complete with UNSUPP.
    ///
    /// # Safety
    /// `data` must be memory nothing else uses during the call.
    pub unsafe fn submit(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<Buffer>,
    ) -> Result<u16, VirtioError> {
        if self.len == MAX_PENDING {
            return Err(QueueError::Full.into());
        }
        let answer = match (kind, data) {
            // SAFETY: passed on from our caller.
            (request::IN, Some(data)) => unsafe { self.transfer(false, sector, data) },
            // SAFETY: passed on from our caller.
            (request::OUT, Some(data)) => unsafe { self.transfer(true, sector, data) },
            (request::IN | request::OUT, None) => status::IOERR,
            (request::FLUSH, _) => {
                if self.command(command::FLUSH, 0, 0) {
                    status::OK
                } else {
                    status::IOERR
                }
            }
            _ => status::UNSUPP,
        };
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        self.pending[(self.head + self.len) % MAX_PENDING] = Completion {
            token,
            status: answer,
            len: 0,
        };
        self.len += 1;
        Ok(token)
    }

    /// The oldest finished request not yet taken.
    pub fn poll(&mut self) -> Option<Completion> {
        if self.len == 0 {
            return None;
        }
        let done = self.pending[self.head];
        self.head = (self.head + 1) % MAX_PENDING;
        self.len -= 1;
        Some(done)
    }
}
