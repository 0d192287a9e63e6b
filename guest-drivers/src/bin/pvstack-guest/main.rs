//! The pvstack guest image: a bare-metal program that the VMM starts at
//! `_start` on vCPU 0 (at CPL3 on PVM hosts, with no exception handling: it
//! must never fault, `hlt`, `int` or `cpuid`). It reads the boot info,
//! runs the workload named by the first word of the command line and exits
//! through the EXIT hypercall: 0 when the workload passed, 1 when it
//! failed, 2 for a bad command line. Workloads are described in
//! guest-drivers/README.md.
#![no_std]
#![no_main]

mod aside;
mod basic;
mod bench;
mod console_bench;
mod disk;
mod evil;
mod mem;
mod net;
mod pipeline;
mod selftest;
mod shell;
mod swapverify;
mod term;
mod vmm_evil;

use core::fmt;
use pvstack_guest::args::{self, ArgError, Args};
use pvstack_guest::bump::Bump;
use pvstack_guest::clock::Clock;
use pvstack_guest::hypercall::{self, Hypercall};
use pvstack_guest::virtio::VirtioError;
use pvstack_guest::{console, println};
use pvstack_protocols::boot::{BootInfo, BOOT_INFO_MAGIC};
use pvstack_protocols::layout;

// The entry points. The VMM (or CPU_START) jumps here with RSP 16-byte
// aligned; `call` pushes the return address so the Rust function sees the
// alignment the ABI promises at a function's first instruction.
core::arch::global_asm!(
    ".pushsection .text._start, \"ax\", @progbits",
    ".globl _start",
    "_start:",
    "    call {primary}",
    ".globl secondary_start",
    "secondary_start:",
    "    call {secondary}",
    ".popsection",
    primary = sym primary_main,
    secondary = sym selftest::secondary_main,
);

unsafe extern "C" {
    /// Entry stub for secondary vCPUs (defined above).
    fn secondary_start(arg: u64) -> !;
    /// End of the loaded image (guest.ld); free RAM starts here.
    static __image_end: u8;
}

/// What every workload gets.
pub struct Env {
    /// vCPU 0's hypercall channel.
    pub hypercall: Hypercall,
    /// The machine's description.
    pub boot: BootInfo,
    /// TSC timing.
    pub clock: Clock,
    /// Free RAM after the image.
    pub memory: Bump<'static>,
}

/// Why a workload stopped without a verdict.
pub enum Failure<'a> {
    /// The command line is wrong (exit status 2).
    Usage(ArgError<'a>),
    /// No such workload (exit status 2).
    UnknownWorkload(&'a str),
    /// A device could not be used.
    Device(VirtioError),
    /// A hypercall failed.
    Hypercall(hypercall::Error),
    /// The guest ran out of free RAM.
    OutOfMemory,
}

impl<'a> From<ArgError<'a>> for Failure<'a> {
    fn from(error: ArgError<'a>) -> Self {
        Failure::Usage(error)
    }
}

impl From<VirtioError> for Failure<'_> {
    fn from(error: VirtioError) -> Self {
        Failure::Device(error)
    }
}

impl From<hypercall::Error> for Failure<'_> {
    fn from(error: hypercall::Error) -> Self {
        Failure::Hypercall(error)
    }
}

impl fmt::Display for Failure<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(error) => write!(f, "{error}"),
            Failure::UnknownWorkload(name) => write!(
                f,
                "unknown workload `{name}` (hello, exit, selftest, fault, compute, blk-verify, \
                 blk-checksum, blk-zero, blk-bench, blk-evil, blk-swap-verify, vmm-evil, \
                 shell, console-bench, net-serve, net-ping, net-bench)"
            ),
            Failure::Device(error) => write!(f, "device: {error}"),
            Failure::Hypercall(error) => write!(f, "hypercall: {error}"),
            Failure::OutOfMemory => write!(f, "out of guest memory"),
        }
    }
}

/// A workload's verdict: `Ok(true)` passed, `Ok(false)` failed.
pub type Outcome<'a> = Result<bool, Failure<'a>>;

/// Formats a rate with three decimals (`12.345`), as RESULT lines want.
pub struct Rate(pub u64, pub u64);

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Rate(amount, per) = *self;
        if per == 0 {
            return write!(f, "0.000");
        }
        let milli = (amount as u128 * 1000) / per as u128;
        write!(f, "{}.{:03}", milli / 1000, milli % 1000)
    }
}

extern "C" fn primary_main(_vcpu: u64) -> ! {
    // SAFETY: this is the pvstack guest; the doorbell is where the ABI says.
    unsafe { console::init() };
    // SAFETY: as above.
    let mut hypercall = unsafe { Hypercall::new() };
    let boot = match hypercall.boot_info() {
        Ok(boot) if boot.magic == BOOT_INFO_MAGIC => boot,
        Ok(_) => fail(
            &mut hypercall,
            format_args!("boot info has a bad magic value"),
        ),
        Err(error) => fail(&mut hypercall, format_args!("BOOT_INFO failed: {error}")),
    };
    let clock = match Clock::new(&boot, &mut hypercall) {
        Ok(clock) => clock,
        Err(error) => fail(&mut hypercall, format_args!("TIME_NS failed: {error}")),
    };
    let mut env = Env {
        hypercall,
        boot,
        clock,
        memory: free_memory(&boot),
    };
    let cmdline = boot.cmdline().unwrap_or("");
    let (workload, args) = args::split(cmdline);
    let code = match run(&mut env, workload, args) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(failure @ (Failure::Usage(_) | Failure::UnknownWorkload(_))) => {
            println!("error: {workload}: {failure}");
            2
        }
        Err(failure) => {
            println!("error: {workload}: {failure}");
            1
        }
    };
    env.hypercall.exit(code)
}

fn fail(hypercall: &mut Hypercall, message: fmt::Arguments<'_>) -> ! {
    println!("error: {message}");
    hypercall.exit(1)
}

fn run<'a>(env: &mut Env, workload: &'a str, args: Args<'a>) -> Outcome<'a> {
    match workload {
        "hello" => basic::hello(env, args),
        "exit" => basic::exit(env, args),
        "fault" => basic::fault(args),
        "compute" => basic::compute(env, args),
        "selftest" => selftest::run(env, args),
        "blk-verify" => disk::verify(env, args),
        "blk-checksum" => disk::checksum(env, args),
        "blk-zero" => disk::zero(env, args),
        "blk-reset" => disk::reset(env, args),
        "blk-bench" => bench::run(env, args),
        "blk-evil" => evil::run(env, args),
        "shell" => shell::run(env, args),
        "console-bench" => console_bench::run(env, args),
        "blk-swap-verify" => swapverify::run(env, args),
        "net-serve" => net::serve(env, args),
        "net-ping" => net::ping(env, args),
        "net-bench" => net::bench(env, args),
        "vmm-evil" => vmm_evil::run(env, args),
        other => Err(Failure::UnknownWorkload(other)),
    }
}

/// The RAM from the end of the image to the end of low RAM.
fn free_memory(boot: &BootInfo) -> Bump<'static> {
    let start = &raw const __image_end as usize;
    let end = (layout::ram_ranges(boot.mem_size)[0].1 as usize).max(start);
    // SAFETY: guest memory is identity mapped; nothing uses the RAM after
    // the image (the VMM keeps its tables and the stacks below the image),
    // and this is the only place that hands it out.
    Bump::new(unsafe { core::slice::from_raw_parts_mut(start as *mut u8, end - start) })
}

/// The address `secondary_start` as an entry point for CPU_START.
pub fn secondary_entry() -> unsafe extern "C" fn(u64) -> ! {
    secondary_start
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // Bypass the shared console: the panic may have happened while it was
    // locked.
    // SAFETY: this is the pvstack guest.
    let mut console = console::Console::new(unsafe { Hypercall::new() });
    let _ = fmt::Write::write_fmt(&mut console, format_args!("PANIC: {info}\n"));
    console.flush();
    // SAFETY: as above.
    unsafe { Hypercall::new() }.exit(1)
}
