//! Performs the paravirtual hypercalls of [`pvstack_protocols::hypercall`]:
//! reads the guest's argument block, acts, writes status and results back.
//! Nothing the guest puts in the block can make the VMM panic; bad
//! addresses and lengths are answered with an error status.

use pvstack_protocols::boot::{BootInfo, Counters};
use pvstack_protocols::hypercall::{nr, status, HypercallBlock, ABI_VERSION, CONSOLE_WRITE_MAX};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::guest_structs::Abi;
use crate::lifecycle::{CpuStart, VmEnd};
use crate::machine::Machine;

/// What the vCPU does after a hypercall.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Resume,
    /// The guest called EXIT: the VM is ending.
    Stop,
}

/// Handles a doorbell write carrying the block address `block_addr`.
pub fn handle_doorbell(machine: &Machine, block_addr: u64) -> Outcome {
    let addr = GuestAddress(block_addr);
    let mut block = match machine.memory.read_obj::<Abi<HypercallBlock>>(addr) {
        Ok(Abi(block)) => block,
        Err(e) => {
            pvstack_logging::warn_limited!(
                "hypercall block at {block_addr:#x} is not in guest RAM ({e}); ignored"
            );
            return Outcome::Resume;
        }
    };
    let outcome = perform(machine, &mut block);
    if let Err(e) = machine.memory.write_obj(Abi(block), addr) {
        pvstack_logging::warn_limited!("cannot write hypercall results to {block_addr:#x}: {e}");
    }
    outcome
}

/// Performs the call in `block`, filling in `status` and `results`.
fn perform(machine: &Machine, block: &mut HypercallBlock) -> Outcome {
    block.results = [0; 2];
    let [a0, a1, a2, a3] = block.args;
    block.status = match block.nr {
        nr::ABI_VERSION => {
            block.results[0] = u64::from(ABI_VERSION);
            status::OK
        }
        nr::CONSOLE_WRITE => console_write(machine, a0, a1, &mut block.results),
        nr::BOOT_INFO => boot_info(machine, a0, a1, &mut block.results),
        nr::EXIT => {
            machine.lifecycle.end(VmEnd::GuestExit((a0 & 0xff) as u8));
            return Outcome::Stop;
        }
        nr::TIME_NS => {
            block.results[0] = machine.time_ns();
            status::OK
        }
        nr::COUNTERS => counters(machine, a0, a1, &mut block.results),
        nr::CPU_START => machine.lifecycle.start_cpu(
            a0,
            CpuStart {
                entry: a1,
                stack_top: a2,
                arg: a3,
            },
        ),
        other => {
            pvstack_logging::warn_limited!("guest made unknown hypercall {other}");
            status::UNKNOWN_CALL
        }
    };
    Outcome::Resume
}

fn console_write(machine: &Machine, addr: u64, len: u64, results: &mut [u64; 2]) -> i64 {
    if len > CONSOLE_WRITE_MAX {
        return status::INVALID_ARGUMENT;
    }
    let mut text = vec![0u8; len as usize];
    if machine
        .memory
        .read_slice(&mut text, GuestAddress(addr))
        .is_err()
    {
        return status::BAD_ADDRESS;
    }
    if let Err(e) = machine.console.write(&text) {
        // The guest cannot fix the host's console; it still gets its answer.
        pvstack_logging::warn_limited!("cannot write guest console output: {e}");
    }
    results[0] = len;
    status::OK
}

fn boot_info(machine: &Machine, addr: u64, len: u64, results: &mut [u64; 2]) -> i64 {
    let size = std::mem::size_of::<BootInfo>() as u64;
    results[0] = size;
    if len < size {
        return status::BUFFER_TOO_SMALL;
    }
    match machine
        .memory
        .write_obj(Abi(machine.boot_info), GuestAddress(addr))
    {
        Ok(()) => status::OK,
        Err(_) => status::BAD_ADDRESS,
    }
}

fn counters(machine: &Machine, addr: u64, len: u64, results: &mut [u64; 2]) -> i64 {
    let snapshot = Abi(machine.counters.snapshot());
    let count = (len as usize).min(std::mem::size_of::<Counters>());
    match machine
        .memory
        .write_slice(&snapshot.as_slice()[..count], GuestAddress(addr))
    {
        Ok(()) => {
            results[0] = count as u64;
            status::OK
        }
        Err(_) => status::BAD_ADDRESS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::Console;
    use crate::counters::{ExitCounters, ExitKind};
    use crate::lifecycle::Lifecycle;
    use pvstack_devices::bus::Bus;
    use pvstack_protocols::boot::BOOT_INFO_MAGIC;
    use pvstack_protocols::layout;
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    const BLOCK: u64 = 0x30_0000;
    const BUFFER: u64 = 0x31_0000;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn machine(console: Captured) -> Machine {
        let mut boot_info = BootInfo::EMPTY;
        boot_info.magic = BOOT_INFO_MAGIC;
        boot_info.cpu_count = 2;
        Machine {
            memory: crate::memory::create(layout::MIN_MEMORY).unwrap(),
            bus: Bus::new(),
            pio: Bus::new(),
            linux: false,
            boot_info,
            console: Console::from_writer(Box::new(console)),
            counters: ExitCounters::default(),
            lifecycle: Arc::new(Lifecycle::new(2)),
            created: Instant::now(),
            time_base_ns: 0,
        }
    }

    /// Puts a block in guest memory, rings the doorbell, reads the block back.
    fn call(machine: &Machine, nr: u64, args: [u64; 4]) -> (Outcome, HypercallBlock) {
        let block = HypercallBlock {
            nr,
            args,
            status: 12345,
            results: [99, 99],
        };
        machine
            .memory
            .write_obj(Abi(block), GuestAddress(BLOCK))
            .unwrap();
        let outcome = handle_doorbell(machine, BLOCK);
        (
            outcome,
            machine
                .memory
                .read_obj::<Abi<HypercallBlock>>(GuestAddress(BLOCK))
                .unwrap()
                .0,
        )
    }

    #[test]
    fn abi_version_and_time() {
        let m = machine(Captured::default());
        let (outcome, b) = call(&m, nr::ABI_VERSION, [0; 4]);
        assert_eq!(
            (outcome, b.status, b.results[0]),
            (Outcome::Resume, status::OK, u64::from(ABI_VERSION))
        );
        let (_, b) = call(&m, nr::TIME_NS, [0; 4]);
        let (_, later) = call(&m, nr::TIME_NS, [0; 4]);
        assert_eq!(b.status, status::OK);
        assert!(later.results[0] >= b.results[0]);
        let (_, b) = call(&m, 999, [0; 4]);
        assert_eq!(b.status, status::UNKNOWN_CALL);
    }

    #[test]
    fn console_write_copies_guest_bytes_or_refuses() {
        let out = Captured::default();
        let m = machine(out.clone());
        m.memory
            .write_slice(b"hello\n", GuestAddress(BUFFER))
            .unwrap();
        let (_, b) = call(&m, nr::CONSOLE_WRITE, [BUFFER, 6, 0, 0]);
        assert_eq!((b.status, b.results[0]), (status::OK, 6));
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello\n");
        let (_, b) = call(&m, nr::CONSOLE_WRITE, [layout::MIN_MEMORY - 2, 6, 0, 0]);
        assert_eq!(b.status, status::BAD_ADDRESS);
        let (_, b) = call(&m, nr::CONSOLE_WRITE, [BUFFER, CONSOLE_WRITE_MAX + 1, 0, 0]);
        assert_eq!(b.status, status::INVALID_ARGUMENT);
        assert_eq!(out.0.lock().unwrap().len(), 6);
    }

    #[test]
    fn boot_info_checks_size_and_address() {
        let m = machine(Captured::default());
        let size = std::mem::size_of::<BootInfo>() as u64;
        let (_, b) = call(&m, nr::BOOT_INFO, [BUFFER, size - 1, 0, 0]);
        assert_eq!((b.status, b.results[0]), (status::BUFFER_TOO_SMALL, size));
        let (_, b) = call(&m, nr::BOOT_INFO, [u64::MAX - 8, size, 0, 0]);
        assert_eq!(b.status, status::BAD_ADDRESS);
        let (_, b) = call(&m, nr::BOOT_INFO, [BUFFER, size, 0, 0]);
        assert_eq!(b.status, status::OK);
        let Abi::<BootInfo>(info) = m.memory.read_obj(GuestAddress(BUFFER)).unwrap();
        assert_eq!(info, m.boot_info);
    }

    #[test]
    fn counters_are_truncated_to_the_buffer() {
        let m = machine(Captured::default());
        m.counters.record(ExitKind::Hypercall);
        m.counters.record(ExitKind::Mmio);
        let (_, b) = call(&m, nr::COUNTERS, [BUFFER, 1000, 0, 0]);
        let size = std::mem::size_of::<Counters>() as u64;
        assert_eq!((b.status, b.results[0]), (status::OK, size));
        let Abi::<Counters>(c) = m.memory.read_obj(GuestAddress(BUFFER)).unwrap();
        assert_eq!((c.exits, c.hypercall_exits, c.mmio_exits), (2, 1, 1));
        m.memory.write_obj(0u64, GuestAddress(BUFFER + 8)).unwrap();
        let (_, b) = call(&m, nr::COUNTERS, [BUFFER, 8, 0, 0]);
        assert_eq!(b.results[0], 8);
        let second: u64 = m.memory.read_obj(GuestAddress(BUFFER + 8)).unwrap();
        assert_eq!(second, 0, "nothing written past the buffer");
        let (_, b) = call(&m, nr::COUNTERS, [layout::MMIO_HOLE_START, 8, 0, 0]);
        assert_eq!(b.status, status::BAD_ADDRESS);
    }

    #[test]
    fn cpu_start_and_exit() {
        let m = machine(Captured::default());
        let (_, b) = call(&m, nr::CPU_START, [1, 0x20_0000, 0x1f_c000, 1]);
        assert_eq!(b.status, status::OK);
        let (_, b) = call(&m, nr::CPU_START, [1, 0x20_0000, 0x1f_c000, 1]);
        assert_eq!(b.status, status::BUSY);
        let (_, b) = call(&m, nr::CPU_START, [5, 0, 0, 0]);
        assert_eq!(b.status, status::INVALID_ARGUMENT);
        let (outcome, _) = call(&m, nr::EXIT, [0x107, 0, 0, 0]);
        assert_eq!(outcome, Outcome::Stop);
        assert!(matches!(m.lifecycle.wait_for_end(), VmEnd::GuestExit(7)));
    }

    #[test]
    fn block_outside_ram_is_ignored() {
        let m = machine(Captured::default());
        assert_eq!(
            handle_doorbell(&m, layout::MMIO_HOLE_START),
            Outcome::Resume
        );
        assert_eq!(handle_doorbell(&m, u64::MAX - 4), Outcome::Resume);
    }
}
