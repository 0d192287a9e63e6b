//! `selftest`: calls every hypercall, checks each answer (including the
//! error paths) and starts a secondary vCPU.

use crate::{Env, Outcome};
use core::mem::size_of;
use core::sync::atomic::{AtomicU64, Ordering};
use pvstack_guest::args::Args;
use pvstack_guest::clock::rdtsc;
use pvstack_guest::hypercall::Error;
use pvstack_guest::println;
use pvstack_protocols::boot::{BootInfo, Counters, BOOT_INFO_MAGIC};
use pvstack_protocols::hypercall::{abi_major, nr, ABI_VERSION, CONSOLE_WRITE_MAX};
use pvstack_protocols::layout;

/// Where the secondary vCPU reports that it ran: it stores the value the
/// primary passed it in RDI.
static SECONDARY_FLAG: AtomicU64 = AtomicU64::new(0);
/// What the primary passes the secondary (and expects back in the flag).
const SECONDARY_TOKEN: u64 = 0x0005_ec0d_c0de;
/// How long to wait for the secondary vCPU.
const SECONDARY_TIMEOUT_US: u64 = 5_000_000;

/// Entry of a secondary vCPU started by the selftest: reports in and spins
/// (it must not `hlt`; the VM ends when the primary exits).
pub extern "C" fn secondary_main(arg: u64) -> ! {
    SECONDARY_FLAG.store(arg, Ordering::Release);
    loop {
        core::hint::spin_loop();
    }
}

struct Tally {
    passed: u32,
    failed: u32,
}

impl Tally {
    fn check(&mut self, name: &str, ok: bool, detail: core::fmt::Arguments<'_>) {
        if ok {
            self.passed += 1;
            println!("check {name}: ok ({detail})");
        } else {
            self.failed += 1;
            println!("check {name}: FAILED ({detail})");
        }
    }
}

/// An address that is certainly not guest RAM: past everything the page
/// tables map.
const NOT_RAM: u64 = layout::MAPPED_GIB << 30;

pub fn run<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[], 0)?;
    let mut t = Tally {
        passed: 0,
        failed: 0,
    };
    let hc = &mut env.hypercall;

    let version = hc.abi_version();
    t.check(
        "abi_version",
        version.is_ok_and(|v| abi_major(v) == abi_major(ABI_VERSION)),
        format_args!("{version:x?}, guest speaks {ABI_VERSION:#x}"),
    );

    let boot = hc.boot_info();
    match &boot {
        Ok(boot) => check_boot_info(&mut t, boot),
        Err(error) => t.check("boot_info", false, format_args!("{error}")),
    }
    let cpu_count = boot.map_or(1, |b| b.cpu_count);

    let line = b"selftest: console write\n";
    let written = hc.console_write(line);
    t.check(
        "console_write",
        written == Ok(line.len() as u64),
        format_args!("{written:?}"),
    );

    let (t1, t2) = (hc.time_ns(), hc.time_ns());
    t.check(
        "time_ns monotonic",
        matches!((t1, t2), (Ok(a), Ok(b)) if b > a),
        format_args!("{t1:?} then {t2:?}"),
    );

    let (c1, c2) = (hc.counters(), hc.counters());
    t.check(
        "counters grow",
        matches!((c1, c2), (Ok(a), Ok(b)) if b.hypercall_exits == a.hypercall_exits + 1 && b.exits > a.exits),
        format_args!(
            "hypercall exits {:?} then {:?}",
            c1.map(|c| c.hypercall_exits),
            c2.map(|c| c.hypercall_exits)
        ),
    );

    // Error paths.
    let mut small = [0u8; 16];
    let answer = hc.boot_info_bytes(&mut small);
    t.check(
        "boot_info BUFFER_TOO_SMALL",
        answer
            == Err(Error::BufferTooSmall {
                needed: size_of::<BootInfo>() as u64,
            }),
        format_args!("{answer:?}"),
    );
    // SAFETY: the buffer address is outside guest RAM: nothing is written.
    let answer = unsafe { hc.call(nr::BOOT_INFO, [NOT_RAM, size_of::<BootInfo>() as u64, 0, 0]) };
    t.check(
        "boot_info BAD_ADDRESS",
        answer == Err(Error::BadAddress),
        format_args!("{answer:?}"),
    );
    // SAFETY: CONSOLE_WRITE only reads.
    let answer = unsafe { hc.call(nr::CONSOLE_WRITE, [NOT_RAM, 16, 0, 0]) };
    t.check(
        "console_write BAD_ADDRESS",
        answer == Err(Error::BadAddress),
        format_args!("{answer:?}"),
    );
    // SAFETY: CONSOLE_WRITE only reads; the VMM refuses the length first.
    let answer = unsafe {
        hc.call(
            nr::CONSOLE_WRITE,
            [line.as_ptr() as u64, CONSOLE_WRITE_MAX + 1, 0, 0],
        )
    };
    t.check(
        "console_write INVALID_ARGUMENT",
        answer == Err(Error::InvalidArgument),
        format_args!("{answer:?}"),
    );
    // SAFETY: the buffer address is outside guest RAM: nothing is written.
    let answer = unsafe { hc.call(nr::COUNTERS, [NOT_RAM, size_of::<Counters>() as u64, 0, 0]) };
    t.check(
        "counters BAD_ADDRESS",
        answer == Err(Error::BadAddress),
        format_args!("{answer:?}"),
    );
    // SAFETY: an unknown call does nothing.
    let answer = unsafe { hc.call(0xdead, [0; 4]) };
    t.check(
        "UNKNOWN_CALL",
        answer == Err(Error::UnknownCall),
        format_args!("{answer:?}"),
    );

    let entry = crate::secondary_entry();
    // SAFETY: vCPU 0 is never startable; the VMM refuses before using the stack.
    let answer = unsafe { hc.cpu_start(0, entry, layout::stack_top(0), 0) };
    t.check(
        "cpu_start vCPU 0 INVALID_ARGUMENT",
        answer == Err(Error::InvalidArgument),
        format_args!("{answer:?}"),
    );
    // SAFETY: the index is out of range; the VMM refuses it.
    let answer = unsafe { hc.cpu_start(cpu_count, entry, layout::stack_top(0), 0) };
    t.check(
        "cpu_start out of range INVALID_ARGUMENT",
        answer == Err(Error::InvalidArgument),
        format_args!("vCPU {cpu_count}: {answer:?}"),
    );

    if cpu_count > 1 {
        // SAFETY: vCPU 1's stack (below vCPU 0's) is unused, and the entry
        // only stores to an atomic and spins.
        let started = unsafe { hc.cpu_start(1, entry, layout::stack_top(1), SECONDARY_TOKEN) };
        t.check(
            "cpu_start vCPU 1",
            started.is_ok(),
            format_args!("{started:?}"),
        );
        let deadline = rdtsc() + env.clock.us_to_ticks(SECONDARY_TIMEOUT_US);
        let mut seen = SECONDARY_FLAG.load(Ordering::Acquire);
        while seen != SECONDARY_TOKEN && rdtsc() < deadline {
            core::hint::spin_loop();
            seen = SECONDARY_FLAG.load(Ordering::Acquire);
        }
        t.check(
            "vCPU 1 runs",
            seen == SECONDARY_TOKEN,
            format_args!("flag {seen:#x}"),
        );
        // SAFETY: vCPU 1 already runs; the VMM refuses before using the stack.
        let again = unsafe { hc.cpu_start(1, entry, layout::stack_top(1), 0) };
        t.check(
            "cpu_start vCPU 1 again BUSY",
            again == Err(Error::Busy),
            format_args!("{again:?}"),
        );
    } else {
        println!("check cpu_start vCPU 1: skipped (1 vCPU; run with --cpus 2)");
    }

    println!("RESULT selftest passed={} failed={}", t.passed, t.failed);
    Ok(t.failed == 0)
}

fn check_boot_info(t: &mut Tally, boot: &BootInfo) {
    t.check(
        "boot_info magic",
        boot.magic == BOOT_INFO_MAGIC,
        format_args!("{:#x}", boot.magic),
    );
    t.check(
        "boot_info abi_version",
        abi_major(boot.abi_version) == abi_major(ABI_VERSION),
        format_args!("{:#x}", boot.abi_version),
    );
    let cmdline = boot.cmdline();
    t.check(
        "boot_info cmdline",
        cmdline.is_some_and(|c| c.split_whitespace().next() == Some("selftest")),
        format_args!("{cmdline:?}"),
    );
    t.check(
        "boot_info mem_size",
        boot.mem_size >= layout::MIN_MEMORY && boot.mem_size <= layout::MAX_MEMORY,
        format_args!("{} MiB", boot.mem_size >> 20),
    );
    t.check(
        "boot_info cpu_count",
        (1..=layout::MAX_VCPUS).contains(&boot.cpu_count),
        format_args!("{}", boot.cpu_count),
    );
    t.check(
        "boot_info devices",
        boot.device_count as usize <= boot.devices.len(),
        format_args!("{} devices", boot.device_count),
    );
}
