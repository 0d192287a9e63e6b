//! The paravirtual hypercall ABI.
//!
//! PVM hosts offer no VMCALL path to user space (see vmm/README.md), so a
//! hypercall is a doorbell: the guest fills a [`HypercallBlock`] in its own
//! RAM and writes the block's guest physical address, as one aligned 64-bit
//! store, to [`DOORBELL_OFFSET`] in the hypercall window
//! ([`crate::layout::HYPERCALL_ADDR`]). The store exits to the VMM, which
//! reads the block, performs the call, writes `status` and `results` back
//! and only then resumes the vCPU: when the store retires, the answer is in
//! the block. Each vCPU uses its own block, so calls need no locking.
//!
//! Every call answers with a [`status`] code; a negative one means nothing
//! was done. Calls and their arguments are listed on [`nr`]. The ABI is
//! versioned by [`ABI_VERSION`]; [`nr::ABI_VERSION`] returns it.

/// ABI version: major in the upper 16 bits, minor in the lower 16. A new
/// call or a field appended to a structure raises the minor; any other
/// change raises the major.
pub const ABI_VERSION: u32 = 1 << 16 | 2;

/// Major part of an ABI version.
pub const fn abi_major(version: u32) -> u32 {
    version >> 16
}

/// Offset of the doorbell register within the hypercall window.
pub const DOORBELL_OFFSET: u64 = 0;

/// Longest console write the VMM accepts in one call.
pub const CONSOLE_WRITE_MAX: u64 = 64 * 1024;

/// The argument block of one hypercall, in guest RAM, 8-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HypercallBlock {
    /// Call number, one of [`nr`].
    pub nr: u64,
    /// Arguments, as each call documents; unused ones are ignored.
    pub args: [u64; 4],
    /// Written by the VMM: one of [`status`].
    pub status: i64,
    /// Written by the VMM: results, as each call documents.
    pub results: [u64; 2],
}

/// Call numbers.
pub mod nr {
    /// `ABI_VERSION()`: `results[0]` = [`super::ABI_VERSION`] of the VMM.
    /// Never fails.
    pub const ABI_VERSION: u64 = 0;
    /// `CONSOLE_WRITE(args[0] = buffer address, args[1] = length)`: writes
    /// the bytes to the VMM's console (stdout or `--console-log`), unbuffered.
    /// `results[0]` = bytes written. Errors: `BAD_ADDRESS` if the buffer is
    /// not in guest RAM, `INVALID_ARGUMENT` if the length exceeds
    /// [`super::CONSOLE_WRITE_MAX`].
    pub const CONSOLE_WRITE: u64 = 1;
    /// `BOOT_INFO(args[0] = buffer address, args[1] = buffer length)`:
    /// writes a [`crate::boot::BootInfo`] into the buffer. `results[0]` =
    /// size of `BootInfo`. Errors: `BUFFER_TOO_SMALL` (with `results[0]`
    /// set), `BAD_ADDRESS`.
    pub const BOOT_INFO: u64 = 2;
    /// `EXIT(args[0] = code)`: ends the VM; pvstack exits with `code & 0xff`.
    /// Does not return.
    pub const EXIT: u64 = 3;
    /// `TIME_NS()`: `results[0]` = nanoseconds of the host's monotonic clock
    /// since the VM was created. Never fails. (For cheap timing without an
    /// exit, read the TSC and use `BootInfo::tsc_khz`.)
    pub const TIME_NS: u64 = 4;
    /// `COUNTERS(args[0] = buffer address, args[1] = buffer length)`: writes
    /// the first `min(length, size_of::<Counters>())` bytes of a
    /// [`crate::boot::Counters`], summed over all vCPUs, including this
    /// call's own exit. `results[0]` = bytes written. Errors: `BAD_ADDRESS`.
    pub const COUNTERS: u64 = 5;
    /// `CPU_START(args[0] = vCPU index, args[1] = entry address, args[2] =
    /// stack top, args[3] = value for RDI)`: starts a secondary vCPU, which
    /// until then waits without running. Errors: `INVALID_ARGUMENT` for an
    /// index that is 0 or not below `BootInfo::cpu_count`, `BUSY` if that
    /// vCPU already runs.
    pub const CPU_START: u64 = 6;
}

/// Status codes written to [`HypercallBlock::status`].
pub mod status {
    /// The call succeeded.
    pub const OK: i64 = 0;
    /// No such call number.
    pub const UNKNOWN_CALL: i64 = -1;
    /// An address argument (or the block itself) is not in guest RAM.
    pub const BAD_ADDRESS: i64 = -2;
    /// An argument is out of range.
    pub const INVALID_ARGUMENT: i64 = -3;
    /// The buffer is smaller than the structure; `results[0]` is the size needed.
    pub const BUFFER_TOO_SMALL: i64 = -4;
    /// The resource is already in use.
    pub const BUSY: i64 = -5;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_has_no_padding() {
        assert_eq!(core::mem::size_of::<HypercallBlock>(), 8 * 8);
    }

    #[test]
    fn version_major() {
        assert_eq!(abi_major(ABI_VERSION), 1);
    }
}
