//! Hypercall wrappers (the ABI is `pvstack_protocols::hypercall`).
//!
//! A [`Hypercall`] owns one argument block; a call fills it, stores its
//! address to the doorbell (which exits to the VMM; the VMM answers in the
//! block before the store retires) and reads the answer back. Each vCPU
//! uses its own `Hypercall`, so no locking is needed.

use core::fmt;
use core::mem::{size_of, MaybeUninit};
use core::ptr;
use pvstack_protocols::boot::{BootInfo, Counters};
use pvstack_protocols::hypercall::{status, HypercallBlock, DOORBELL_OFFSET};
use pvstack_protocols::{hypercall::nr, layout::HYPERCALL_ADDR};

/// A call that the VMM answered with an error status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// `UNKNOWN_CALL`.
    UnknownCall,
    /// `BAD_ADDRESS`.
    BadAddress,
    /// `INVALID_ARGUMENT`.
    InvalidArgument,
    /// `BUFFER_TOO_SMALL`, with the size needed.
    BufferTooSmall { needed: u64 },
    /// `BUSY`.
    Busy,
    /// A status this ABI version does not define.
    Other(i64),
}

impl Error {
    fn from_answer(status: i64, results: [u64; 2]) -> Self {
        match status {
            status::UNKNOWN_CALL => Error::UnknownCall,
            status::BAD_ADDRESS => Error::BadAddress,
            status::INVALID_ARGUMENT => Error::InvalidArgument,
            status::BUFFER_TOO_SMALL => Error::BufferTooSmall { needed: results[0] },
            status::BUSY => Error::Busy,
            other => Error::Other(other),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownCall => write!(f, "unknown call"),
            Error::BadAddress => write!(f, "bad address"),
            Error::InvalidArgument => write!(f, "invalid argument"),
            Error::BufferTooSmall { needed } => {
                write!(f, "buffer too small ({needed} bytes needed)")
            }
            Error::Busy => write!(f, "busy"),
            Error::Other(status) => write!(f, "status {status}"),
        }
    }
}

/// One vCPU's hypercall channel.
pub struct Hypercall {
    block: HypercallBlock,
}

impl Hypercall {
    /// A channel with its own argument block.
    ///
    /// # Safety
    /// Only inside the pvstack guest, where memory is identity mapped and
    /// the hypercall doorbell is at `layout::HYPERCALL_ADDR`; on any other
    /// machine the doorbell store hits whatever lives at that address.
    pub const unsafe fn new() -> Self {
        Hypercall {
            block: HypercallBlock {
                nr: 0,
                args: [0; 4],
                status: 0,
                results: [0; 2],
            },
        }
    }

    /// Performs call `nr` with `args`; `Ok(results)` or the error status.
    ///
    /// # Safety
    /// Calls that write guest memory (`BOOT_INFO`, `COUNTERS`) must be given
    /// a buffer the caller owns (or one outside guest RAM, to provoke
    /// `BAD_ADDRESS`); `CPU_START` needs what [`Hypercall::cpu_start`] states.
    pub unsafe fn call(&mut self, nr: u64, args: [u64; 4]) -> Result<[u64; 2], Error> {
        let block = &raw mut self.block;
        let request = HypercallBlock {
            nr,
            args,
            status: status::OK,
            results: [0; 2],
        };
        // SAFETY: `block` is our own block, in guest RAM (identity mapped, so
        // its address is its guest physical address). The doorbell address
        // is the VMM's MMIO window (`new`'s contract). Volatile accesses keep
        // the compiler from moving the block's accesses across the store,
        // during which the VMM reads and rewrites the block.
        let answer = unsafe {
            ptr::write_volatile(block, request);
            ptr::write_volatile((HYPERCALL_ADDR + DOORBELL_OFFSET) as *mut u64, block as u64);
            ptr::read_volatile(block)
        };
        if answer.status == status::OK {
            Ok(answer.results)
        } else {
            Err(Error::from_answer(answer.status, answer.results))
        }
    }

    /// `ABI_VERSION`: the VMM's ABI version.
    pub fn abi_version(&mut self) -> Result<u32, Error> {
        // SAFETY: ABI_VERSION touches no memory.
        let results = unsafe { self.call(nr::ABI_VERSION, [0; 4])? };
        Ok(results[0] as u32)
    }

    /// `CONSOLE_WRITE`: writes `bytes` to the console; the count written.
    pub fn console_write(&mut self, bytes: &[u8]) -> Result<u64, Error> {
        let args = [bytes.as_ptr() as u64, bytes.len() as u64, 0, 0];
        // SAFETY: CONSOLE_WRITE only reads the buffer.
        let results = unsafe { self.call(nr::CONSOLE_WRITE, args)? };
        Ok(results[0])
    }

    /// `BOOT_INFO` into a byte buffer; the size of the boot info.
    pub fn boot_info_bytes(&mut self, buf: &mut [u8]) -> Result<u64, Error> {
        let args = [buf.as_mut_ptr() as u64, buf.len() as u64, 0, 0];
        // SAFETY: the VMM writes at most `buf.len()` bytes into our buffer.
        let results = unsafe { self.call(nr::BOOT_INFO, args)? };
        Ok(results[0])
    }

    /// `BOOT_INFO`: the machine's description.
    pub fn boot_info(&mut self) -> Result<BootInfo, Error> {
        let mut info = MaybeUninit::<BootInfo>::zeroed();
        let args = [info.as_mut_ptr() as u64, size_of::<BootInfo>() as u64, 0, 0];
        // SAFETY: the VMM writes at most size_of::<BootInfo>() bytes into `info`.
        unsafe { self.call(nr::BOOT_INFO, args)? };
        // SAFETY: zeroed and then (partly) overwritten with integers: every
        // bit pattern is a valid BootInfo.
        Ok(unsafe { info.assume_init() })
    }

    /// `EXIT`: ends the VM with `code`.
    pub fn exit(&mut self, code: u8) -> ! {
        // SAFETY: EXIT touches no memory.
        let _ = unsafe { self.call(nr::EXIT, [u64::from(code), 0, 0, 0]) };
        // The VMM does not resume a vCPU that called EXIT; spin rather than
        // execute anything that would fault if it ever did.
        loop {
            core::hint::spin_loop();
        }
    }

    /// `TIME_NS`: nanoseconds since the VM was created.
    pub fn time_ns(&mut self) -> Result<u64, Error> {
        // SAFETY: TIME_NS touches no memory.
        let results = unsafe { self.call(nr::TIME_NS, [0; 4])? };
        Ok(results[0])
    }

    /// `COUNTERS`: exits so far, by kind.
    pub fn counters(&mut self) -> Result<Counters, Error> {
        let mut counters = Counters::default();
        let args = [
            (&raw mut counters) as u64,
            size_of::<Counters>() as u64,
            0,
            0,
        ];
        // SAFETY: the VMM writes at most size_of::<Counters>() bytes into `counters`.
        unsafe { self.call(nr::COUNTERS, args)? };
        Ok(counters)
    }

    /// `CPU_START`: starts vCPU `index` at `entry` with `stack_top` as RSP
    /// and `arg` in RDI.
    ///
    /// # Safety
    /// `stack_top` must be the (16-byte aligned) top of memory nothing else
    /// uses, and `entry` must be safe to run concurrently with this vCPU.
    pub unsafe fn cpu_start(
        &mut self,
        index: u32,
        entry: unsafe extern "C" fn(u64) -> !,
        stack_top: u64,
        arg: u64,
    ) -> Result<(), Error> {
        let args = [u64::from(index), entry as usize as u64, stack_top, arg];
        // SAFETY: the caller vouches for the stack and the entry point.
        unsafe { self.call(nr::CPU_START, args)? };
        Ok(())
    }
}
