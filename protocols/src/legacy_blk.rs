//! Registers of the emulated register-level disk controller: the classic
//! full-virtualization baseline that pvstack's paravirtual devices are
//! measured against.
//!
//! Every register access traps to the VMM, and the data moves through one
//! 32-bit data register, one word per access, as with programmed I/O on an
//! IDE controller. All registers are 32 bits wide and must be accessed with
//! aligned 4-byte loads and stores; other accesses are ignored (reads see
//! all ones).
//!
//! A transfer: write `LBA_LO`, `LBA_HI` and `COUNT` (sectors of
//! [`SECTOR_SIZE`] bytes, at most [`MAX_COUNT`]), then `COMMAND`. For
//! [`command::READ`] the device reads the sectors and sets
//! [`status::DATA_READY`]; the guest then reads `DATA` `COUNT * 128` times.
//! For [`command::WRITE`] the device sets `DATA_READY` at once; the guest
//! writes `DATA` `COUNT * 128` times, and the last word makes the device
//! write the sectors to the image. `DATA_READY` clears when the transfer's
//! last word has moved. A bad request (past the end of the disk, a count of
//! 0 or above `MAX_COUNT`, a write to a readonly disk, an I/O error) sets
//! [`status::ERROR`] instead; the next command clears it.

/// `ID` reads this: "PVLB" in little endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PVLB");
/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// Most sectors one command moves.
pub const MAX_COUNT: u32 = 256;

/// Register offsets in the device's MMIO window.
pub mod reg {
    /// Read only: [`super::MAGIC`].
    pub const ID: u64 = 0x00;
    /// Read only: disk size in sectors, low 32 bits.
    pub const CAPACITY_LO: u64 = 0x04;
    /// Read only: disk size in sectors, high 32 bits.
    pub const CAPACITY_HI: u64 = 0x08;
    /// First sector of the next command, low 32 bits.
    pub const LBA_LO: u64 = 0x0c;
    /// First sector of the next command, high 32 bits.
    pub const LBA_HI: u64 = 0x10;
    /// Sectors the next command moves.
    pub const COUNT: u64 = 0x14;
    /// Write only: starts a command, one of [`super::command`].
    pub const COMMAND: u64 = 0x18;
    /// Read only: bits of [`super::status`].
    pub const STATUS: u64 = 0x1c;
    /// The data register: one 32-bit word of the transfer per access.
    pub const DATA: u64 = 0x20;
}

/// Values written to `COMMAND`.
pub mod command {
    /// Read `COUNT` sectors from `LBA`.
    pub const READ: u32 = 1;
    /// Write `COUNT` sectors at `LBA`.
    pub const WRITE: u32 = 2;
    /// Flush the image to stable storage.
    pub const FLUSH: u32 = 3;
}

/// Bits of `STATUS`.
pub mod status {
    /// The data register has words to read, or expects words to be written.
    pub const DATA_READY: u32 = 1 << 0;
    /// The last command failed.
    pub const ERROR: u32 = 1 << 1;
    /// The disk is readonly.
    pub const READONLY: u32 = 1 << 2;
}

/// 32-bit words in one sector.
pub const WORDS_PER_SECTOR: u64 = SECTOR_SIZE / 4;
