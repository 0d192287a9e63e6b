//! The foundation workloads: hello, exit, fault, compute.

use crate::{Env, Outcome, Rate};
use pvstack_guest::args::{ArgError, Args};
use pvstack_guest::clock::rdtsc;
use pvstack_guest::println;
use pvstack_protocols::boot::flavour;

/// `hello`: one greeting line that shows what the guest knows.
pub fn hello<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[], 0)?;
    let boot = &env.boot;
    let flavour = match boot.flavour {
        flavour::VMX => "VMX",
        flavour::SVM => "SVM",
        flavour::PVM => "PVM",
        _ => "unknown KVM",
    };
    println!(
        "Hello from the pvstack guest (vCPU 0 of {}, {} MiB, {}, CPL{})",
        boot.cpu_count,
        boot.mem_size >> 20,
        flavour,
        boot.privilege
    );
    println!("RESULT hello ok=1");
    Ok(true)
}

/// `exit N`: ends the VM with exit code N.
pub fn exit<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[], 1)?;
    let code = args.positional_number(0, "code")?;
    let code = u8::try_from(code).map_err(|_| ArgError::OutOfRange {
        name: "code",
        value: code,
    })?;
    env.hypercall.exit(code)
}

/// `fault`: writes to the unmapped first page, which the CPU turns into a
/// fault the guest cannot handle: the VMM must report a crash.
pub fn fault<'a>(args: Args<'a>) -> Outcome<'a> {
    args.check(&[], 0)?;
    const UNMAPPED: usize = 0x8;
    println!("fault: writing to unmapped address {UNMAPPED:#x}");
    // SAFETY: deliberately not safe: this faults, ending the VM, which is
    // this workload's whole purpose. Nothing runs after it.
    unsafe { core::ptr::write_volatile(UNMAPPED as *mut u64, 0xdead) };
    println!("fault: the write did not fault");
    Ok(false)
}

/// Default iterations of `compute`: about a tenth of a second natively.
const COMPUTE_ITERATIONS: u64 = 50_000_000;

/// `compute [iterations=N]`: times the shared compute loop.
pub fn compute<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[&["iterations"]], 0)?;
    let iterations = args.number_or("iterations", COMPUTE_ITERATIONS)?;
    let start = rdtsc();
    let value = pvstack_guest::compute::compute(iterations);
    let ticks = rdtsc().wrapping_sub(start);
    let usecs = env.clock.ticks_to_us(ticks).max(1);
    println!(
        "RESULT compute iterations={iterations} usecs={usecs} iter_per_us={} value={value:#018x}",
        Rate(iterations, usecs)
    );
    Ok(true)
}
