//! `vmm-evil [count=N]`: what a hostile guest can make the VMM log, N
//! times each: writes and reads of MMIO no device claims, unknown
//! hypercalls, and doorbells whose block lies outside RAM. The VMM must
//! keep serving (every answer is checked) and its log must stay bounded
//! (the test counts the lines).

use core::ptr;

use crate::{Env, Outcome};
use pvstack_guest::args::Args;
use pvstack_guest::hypercall::Error;
use pvstack_guest::println;
use pvstack_protocols::hypercall::DOORBELL_OFFSET;
use pvstack_protocols::layout::{HYPERCALL_ADDR, MMIO_HOLE_END};

/// In the MMIO hole, past every device slot: no device answers here.
const UNCLAIMED_MMIO: u64 = MMIO_HOLE_END - 0x1000;
/// A call number no ABI version defines.
const UNKNOWN_CALL: u64 = 0xdead_beef;

pub fn run<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[&["count"]], 0)?;
    let count = args.number_or("count", 1000)?;
    let mut all_ones = 0u64;
    let mut unknown = 0u64;
    for _ in 0..count {
        // SAFETY: the address is identity mapped MMIO that no device
        // claims: the VMM drops the write and answers the read with ones;
        // nothing in guest memory changes.
        let read = unsafe {
            ptr::write_volatile(UNCLAIMED_MMIO as *mut u32, 0x5a5a_5a5a);
            ptr::read_volatile(UNCLAIMED_MMIO as *const u32)
        };
        all_ones += u64::from(read == u32::MAX);
        // SAFETY: an unknown call writes nothing to guest memory.
        let answer = unsafe { env.hypercall.call(UNKNOWN_CALL, [0; 4]) };
        unknown += u64::from(matches!(answer, Err(Error::UnknownCall)));
        let outside_ram = 1u64 << 46;
        // SAFETY: a doorbell write names a block the VMM reads; this one
        // is outside RAM, so it reads and writes nothing.
        unsafe {
            ptr::write_volatile((HYPERCALL_ADDR + DOORBELL_OFFSET) as *mut u64, outside_ram);
        }
    }
    let served = env.hypercall.abi_version().is_ok();
    println!(
        "RESULT vmm-evil count={count} all_ones={all_ones} unknown_calls={unknown} still_served={}",
        u8::from(served)
    );
    Ok(all_ones == count && unknown == count && served)
}
