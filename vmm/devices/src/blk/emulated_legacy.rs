//! `mode=emulated-legacy`: the register-level disk controller of
//! [`pvstack_protocols::legacy_blk`], emulated in the VMM. Every register
//! access traps, and the data moves one 32-bit word per access: the classic
//! full-virtualization baseline.

use std::sync::{Arc, Mutex};

use log::{debug, info};
use pvstack_block::image::DiskImage;
use pvstack_logging::warn_limited;
use pvstack_protocols::boot::device_kind;
use pvstack_protocols::legacy_blk::{command, reg, status, MAGIC, MAX_COUNT, SECTOR_SIZE};

use super::stats::DiskStats;
use super::{BlkConfig, BlkDevice, BlkSpec};
use crate::bus::BusDevice;
use crate::context::DeviceContext;
use crate::error::Result;

/// Which way the transfer in progress moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// The guest reads words the device read from the image.
    Read,
    /// The guest writes words the device then writes to the image.
    Write { sector: u64 },
}

/// A transfer in progress: `len` bytes of `buffer`, `pos` of them moved.
#[derive(Clone, Copy, Debug)]
struct Transfer {
    direction: Direction,
    len: usize,
    pos: usize,
}

/// The emulated legacy disk controller.
pub struct LegacyBlk {
    name: String,
    image: Arc<DiskImage>,
    lba_lo: u32,
    lba_hi: u32,
    count: u32,
    error: bool,
    transfer: Option<Transfer>,
    /// Room for the largest command's sectors.
    buffer: Vec<u8>,
    stats: Arc<DiskStats>,
}

impl LegacyBlk {
    /// A controller for `image`, counting into `stats`.
    pub fn new(name: impl Into<String>, image: Arc<DiskImage>, stats: Arc<DiskStats>) -> Self {
        LegacyBlk {
            name: name.into(),
            image,
            lba_lo: 0,
            lba_hi: 0,
            count: 0,
            error: false,
            transfer: None,
            buffer: vec![0; (u64::from(MAX_COUNT) * SECTOR_SIZE) as usize],
            stats,
        }
    }

    fn status(&self) -> u32 {
        let mut bits = 0;
        if self.transfer.is_some() {
            bits |= status::DATA_READY;
        }
        if self.error {
            bits |= status::ERROR;
        }
        if self.image.is_readonly() {
            bits |= status::READONLY;
        }
        bits
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let capacity = self.image.capacity_sectors();
        match offset {
            reg::ID => MAGIC,
            reg::CAPACITY_LO => capacity as u32,
            reg::CAPACITY_HI => (capacity >> 32) as u32,
            reg::LBA_LO => self.lba_lo,
            reg::LBA_HI => self.lba_hi,
            reg::COUNT => self.count,
            reg::STATUS => self.status(),
            reg::DATA => self.read_data(),
            _ => {
                debug!("{}: read of unknown register {offset:#x}", self.name);
                u32::MAX
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::LBA_LO => self.lba_lo = value,
            reg::LBA_HI => self.lba_hi = value,
            reg::COUNT => self.count = value,
            reg::COMMAND => self.command(value),
            reg::DATA => self.write_data(value),
            _ => warn_limited!(
                "{}: write of {value:#x} to read-only or unknown register {offset:#x}; ignored",
                self.name
            ),
        }
    }

    /// Starts a command; a transfer still in progress is abandoned.
    fn command(&mut self, value: u32) {
        self.error = false;
        if self.transfer.take().is_some() {
            warn_limited!("{}: new command before the last transfer ended", self.name);
        }
        let result = match value {
            command::READ => self.start(false),
            command::WRITE => self.start(true),
            command::FLUSH => {
                self.stats.request();
                self.image
                    .flush()
                    .map_err(|e| format!("flush of {} failed: {e}", self.image.path().display()))
            }
            other => Err(format!("unknown command {other}")),
        };
        if let Err(why) = result {
            warn_limited!("{}: {why}", self.name);
            self.error = true;
        }
    }

    /// Checks LBA and COUNT and sets up a read (filling the buffer from the
    /// image) or a write.
    fn start(&mut self, write: bool) -> std::result::Result<(), String> {
        let sector = u64::from(self.lba_hi) << 32 | u64::from(self.lba_lo);
        let count = self.count;
        if count == 0 || count > MAX_COUNT {
            return Err(format!("count {count} is not in 1..={MAX_COUNT}"));
        }
        let capacity = self.image.capacity_sectors();
        if sector
            .checked_add(u64::from(count))
            .is_none_or(|end| end > capacity)
        {
            return Err(format!(
                "sectors {sector}+{count} lie beyond the disk's {capacity}"
            ));
        }
        if write && self.image.is_readonly() {
            return Err("write to a readonly disk".to_string());
        }
        let len = (u64::from(count) * SECTOR_SIZE) as usize;
        let direction = if write {
            Direction::Write { sector }
        } else {
            self.transfer_image(false, sector, len)?;
            Direction::Read
        };
        self.transfer = Some(Transfer {
            direction,
            len,
            pos: 0,
        });
        Ok(())
    }

    /// Reads (or writes) the first `len` bytes of the buffer from (to) the
    /// image at `sector`.
    fn transfer_image(
        &mut self,
        write: bool,
        sector: u64,
        len: usize,
    ) -> std::result::Result<(), String> {
        let mut iovec = [libc::iovec {
            iov_base: self.buffer.as_mut_ptr().cast(),
            iov_len: len,
        }];
        let offset = sector * SECTOR_SIZE;
        // SAFETY: the iovec covers the first `len` bytes of `self.buffer`
        // (len is at most MAX_COUNT sectors, the buffer's size), which this
        // method borrows mutably for the whole call.
        let result = unsafe {
            if write {
                self.image.write_vectored_at(offset, &mut iovec)
            } else {
                self.image.read_vectored_at(offset, &mut iovec)
            }
        };
        result.map_err(|e| {
            format!(
                "{} of {len} bytes at sector {sector} of {} failed: {e}",
                if write { "write" } else { "read" },
                self.image.path().display()
            )
        })
    }

    fn read_data(&mut self) -> u32 {
        let Some(transfer) = self.transfer.as_mut() else {
            debug!("{}: DATA read with no transfer in progress", self.name);
            return u32::MAX;
        };
        if transfer.direction != Direction::Read {
            debug!("{}: DATA read during a write transfer", self.name);
            return u32::MAX;
        }
        let pos = transfer.pos;
        let word = word_at(&self.buffer, pos);
        transfer.pos += 4;
        if transfer.pos == transfer.len {
            self.transfer = None;
            self.stats.request();
        }
        word
    }

    fn write_data(&mut self, value: u32) {
        let Some(transfer) = self.transfer.as_mut() else {
            debug!("{}: DATA write with no transfer in progress", self.name);
            return;
        };
        let Direction::Write { sector } = transfer.direction else {
            debug!("{}: DATA write during a read transfer", self.name);
            return;
        };
        let pos = transfer.pos;
        self.buffer[pos..pos + 4].copy_from_slice(&value.to_le_bytes());
        transfer.pos += 4;
        if transfer.pos == transfer.len {
            let len = transfer.len;
            self.transfer = None;
            self.stats.request();
            if let Err(why) = self.transfer_image(true, sector, len) {
                warn_limited!("{}: {why}", self.name);
                self.error = true;
            }
        }
    }
}

/// The little-endian word at `pos` of `buffer` (in bounds: transfers are
/// whole sectors of the buffer).
fn word_at(buffer: &[u8], pos: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buffer[pos..pos + 4]);
    u32::from_le_bytes(bytes)
}

impl BusDevice for LegacyBlk {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 4 && offset % 4 == 0 {
            let value = self.read_register(offset);
            data.copy_from_slice(&value.to_le_bytes());
        } else {
            // Not an aligned 4-byte access: reads as all ones.
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset % 4 == 0 => self.write_register(offset, u32::from_le_bytes(word)),
            _ => warn_limited!(
                "{}: {}-byte write at {offset:#x} is not a register access; ignored",
                self.name,
                data.len()
            ),
        }
    }
}

/// Creates the legacy controller `spec` describes in `ctx`'s slot.
pub(super) fn create(id: String, spec: &BlkSpec, ctx: &DeviceContext<'_>) -> Result<BlkDevice> {
    let image = super::open_image(spec)?;
    let capacity = image.capacity_sectors();
    info!(
        "{id}: emulated legacy controller, {capacity} sectors, {}, MMIO {:#x}",
        if image.is_readonly() {
            "read-only"
        } else {
            "writable"
        },
        ctx.mmio_base
    );
    let stats = Arc::new(DiskStats::default());
    let device = LegacyBlk::new(id.clone(), image, stats.clone());
    Ok(BlkDevice {
        mode: spec.mode,
        bus_device: Arc::new(Mutex::new(device)),
        transport: None,
        stats: Some(stats),
        info: ctx.device_info(device_kind::LEGACY_BLOCK, 0),
        config: BlkConfig {
            capacity,
            blk_size: SECTOR_SIZE as u32,
            num_queues: 0,
        },
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A scratch image whose byte at X is `(X * 7 + X / 512) as u8`.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str, sectors: u64) -> Self {
            let path = std::env::temp_dir()
                .join(format!("pvstack-legacy-{name}-{}.img", std::process::id()));
            let bytes: Vec<u8> = (0..sectors * SECTOR_SIZE)
                .map(|x| (x * 7 + x / 512) as u8)
                .collect();
            std::fs::write(&path, bytes).unwrap();
            Scratch(path)
        }

        fn device(&self, readonly: bool) -> (LegacyBlk, Arc<DiskStats>) {
            let image = Arc::new(DiskImage::open(&self.0, readonly, false).unwrap());
            let stats = Arc::new(DiskStats::default());
            (LegacyBlk::new("legacy", image, stats.clone()), stats)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn read32(dev: &mut LegacyBlk, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        dev.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(dev: &mut LegacyBlk, offset: u64, value: u32) {
        dev.write(offset, &value.to_le_bytes());
    }

    fn command(dev: &mut LegacyBlk, cmd: u32, lba: u64, count: u32) {
        write32(dev, reg::LBA_LO, lba as u32);
        write32(dev, reg::LBA_HI, (lba >> 32) as u32);
        write32(dev, reg::COUNT, count);
        write32(dev, reg::COMMAND, cmd);
    }

    #[test]
    fn identity_and_capacity() {
        let scratch = Scratch::new("id", 40);
        let (mut dev, _) = scratch.device(true);
        assert_eq!(read32(&mut dev, reg::ID), MAGIC);
        assert_eq!(read32(&mut dev, reg::CAPACITY_LO), 40);
        assert_eq!(read32(&mut dev, reg::CAPACITY_HI), 0);
        assert_eq!(read32(&mut dev, reg::STATUS), status::READONLY);
        // Unaligned or narrow accesses read as all ones.
        let mut narrow = [0u8; 2];
        dev.read(reg::ID, &mut narrow);
        assert_eq!(narrow, [0xff; 2]);
        let mut word = [0u8; 4];
        dev.read(reg::ID + 1, &mut word);
        assert_eq!(word, [0xff; 4]);
    }

    #[test]
    fn read_moves_the_sectors_word_by_word() {
        let scratch = Scratch::new("read", 16);
        let file = std::fs::read(&scratch.0).unwrap();
        let (mut dev, stats) = scratch.device(false);
        command(&mut dev, command::READ, 3, 2);
        assert_eq!(read32(&mut dev, reg::STATUS), status::DATA_READY);
        let mut got = Vec::new();
        for _ in 0..2 * 128 {
            got.extend_from_slice(&read32(&mut dev, reg::DATA).to_le_bytes());
        }
        assert_eq!(got, &file[3 * 512..5 * 512]);
        assert_eq!(read32(&mut dev, reg::STATUS), 0, "DATA_READY clears");
        assert_eq!(read32(&mut dev, reg::DATA), u32::MAX, "no transfer left");
        assert_eq!(stats.requests(), 1);
        assert_eq!(stats.interrupts(), 0);
    }

    #[test]
    fn write_lands_in_the_image_after_the_last_word() {
        let scratch = Scratch::new("write", 16);
        let before = std::fs::read(&scratch.0).unwrap();
        let (mut dev, stats) = scratch.device(false);
        command(&mut dev, command::WRITE, 5, 1);
        assert_eq!(read32(&mut dev, reg::STATUS), status::DATA_READY);
        for i in 0..127u32 {
            write32(&mut dev, reg::DATA, 0xa5a5_0000 | i);
        }
        // One word short: nothing written yet.
        assert_eq!(std::fs::read(&scratch.0).unwrap(), before);
        write32(&mut dev, reg::DATA, 0xa5a5_007f);
        assert_eq!(read32(&mut dev, reg::STATUS), 0);
        command(&mut dev, command::FLUSH, 0, 0);
        assert_eq!(read32(&mut dev, reg::STATUS), 0);
        let after = std::fs::read(&scratch.0).unwrap();
        let expected: Vec<u8> = (0..128u32)
            .flat_map(|i| (0xa5a5_0000 | i).to_le_bytes())
            .collect();
        assert_eq!(&after[5 * 512..6 * 512], &expected[..]);
        assert_eq!(&after[..5 * 512], &before[..5 * 512]);
        assert_eq!(&after[6 * 512..], &before[6 * 512..]);
        assert_eq!(stats.requests(), 2, "the write and the flush");
    }

    #[test]
    fn bad_commands_set_error_until_the_next_command() {
        let scratch = Scratch::new("bad", 16);
        let (mut dev, _) = scratch.device(false);
        for (cmd, lba, count) in [
            (command::READ, 15, 2),
            (command::READ, u64::MAX, 1),
            (command::WRITE, 0, 0),
            (command::READ, 0, MAX_COUNT + 1),
            (99, 0, 1),
        ] {
            command(&mut dev, cmd, lba, count);
            assert_eq!(
                read32(&mut dev, reg::STATUS),
                status::ERROR,
                "{cmd} {lba} {count}"
            );
        }
        command(&mut dev, command::READ, 15, 1);
        assert_eq!(read32(&mut dev, reg::STATUS), status::DATA_READY);
        // A new command abandons the transfer in progress.
        command(&mut dev, command::FLUSH, 0, 0);
        assert_eq!(read32(&mut dev, reg::STATUS), 0);
    }

    #[test]
    fn readonly_disk_refuses_writes_and_keeps_the_file() {
        let scratch = Scratch::new("ro", 8);
        let before = std::fs::read(&scratch.0).unwrap();
        let (mut dev, _) = scratch.device(true);
        command(&mut dev, command::WRITE, 0, 1);
        assert_eq!(
            read32(&mut dev, reg::STATUS),
            status::ERROR | status::READONLY
        );
        write32(&mut dev, reg::DATA, 0);
        assert_eq!(std::fs::read(&scratch.0).unwrap(), before);
    }
}
