//! Hypercalls from a hostile guest: each doorbell names a block anywhere
//! (or nowhere) in the VMM's own guest memory (`pvstack::memory::create`,
//! a memfd), filled with any call number and arguments, and
//! `pvstack::hypercall::handle_doorbell` performs it on a machine built
//! without KVM (a `Machine` is memory, buses, console and lifecycle).
//! Beyond not crashing: every answer carries a status of the ABI, EXIT
//! and only EXIT stops the vCPU, and the console gets exactly the bytes
//! the successful CONSOLE_WRITEs report.
#![no_main]

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use pvstack::console::Console;
use pvstack::counters::ExitCounters;
use pvstack::guest_structs::Abi;
use pvstack::hypercall::{handle_doorbell, Outcome};
use pvstack::lifecycle::Lifecycle;
use pvstack::machine::Machine;
use pvstack::memory::GuestMemory;
use pvstack_devices::bus::Bus;
use pvstack_fuzz::input::Reader;
use pvstack_fuzz::memory::load;
use pvstack_fuzz::targets::hypercall::Input;
use pvstack_protocols::boot::{BootInfo, BOOT_INFO_MAGIC};
use pvstack_protocols::hypercall::{nr, status, HypercallBlock, ABI_VERSION};
use pvstack_protocols::layout::MIN_MEMORY;
use vm_memory::{Bytes, GuestAddress};

fn memory() -> &'static GuestMemory {
    static MEMORY: OnceLock<GuestMemory> = OnceLock::new();
    MEMORY.get_or_init(|| pvstack::memory::create(MIN_MEMORY).expect("guest memory"))
}

/// The console: counts what the guest wrote.
struct Counted(Arc<AtomicU64>);

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const STATUSES: [i64; 6] = [
    status::OK,
    status::UNKNOWN_CALL,
    status::BAD_ADDRESS,
    status::INVALID_ARGUMENT,
    status::BUFFER_TOO_SMALL,
    status::BUSY,
];

fuzz_target!(|data: &[u8]| {
    let input = Input::read(&mut Reader::new(data));
    let memory = memory();
    load(memory, input.image);
    let written = Arc::new(AtomicU64::new(0));
    let mut boot_info = BootInfo::EMPTY;
    boot_info.magic = BOOT_INFO_MAGIC;
    boot_info.abi_version = ABI_VERSION;
    boot_info.cpu_count = input.cpu_count();
    boot_info.mem_size = MIN_MEMORY;
    let machine = Machine {
        memory: memory.clone(),
        bus: Bus::new(),
        pio: Bus::new(),
        linux: input.linux(),
        boot_info,
        console: Console::from_writer(Box::new(Counted(Arc::clone(&written)))),
        counters: ExitCounters::default(),
        lifecycle: Arc::new(if input.linux() {
            Lifecycle::all_running(input.cpu_count())
        } else {
            Lifecycle::new(input.cpu_count())
        }),
        created: Instant::now(),
        time_base_ns: 0,
    };
    for call in &input.calls {
        let at = GuestAddress(call.addr);
        // The block as the guest leaves it (a short one keeps what the
        // memory held after it).
        let _ = memory.write_slice(call.block, at);
        let asked = memory.read_obj::<Abi<HypercallBlock>>(at).ok();
        let console_before = written.load(Ordering::Relaxed);
        let outcome = handle_doorbell(&machine, call.addr);
        let console_grew = written.load(Ordering::Relaxed) - console_before;
        let Some(Abi(asked)) = asked else {
            assert_eq!(outcome, Outcome::Resume, "a block outside RAM is ignored");
            assert_eq!(console_grew, 0);
            continue;
        };
        assert_eq!(outcome == Outcome::Stop, asked.nr == nr::EXIT);
        if asked.nr == nr::EXIT {
            continue;
        }
        let Abi(answer) = memory
            .read_obj::<Abi<HypercallBlock>>(at)
            .expect("the block is still in RAM");
        assert!(
            STATUSES.contains(&answer.status),
            "call {} answered with status {}",
            asked.nr,
            answer.status
        );
        if asked.nr == nr::ABI_VERSION {
            assert_eq!(answer.results[0], u64::from(ABI_VERSION));
        }
        if asked.nr == nr::CONSOLE_WRITE && answer.status == status::OK {
            assert_eq!(answer.results[0], asked.args[1]);
            assert_eq!(console_grew, asked.args[1], "console bytes of one write");
        } else {
            assert_eq!(console_grew, 0, "console output without a successful write");
        }
    }
});
