//! One vCPU thread: waits for its start (pvstack's own guest: vCPU 0 at
//! once, the others on CPU_START; a Linux guest: all at once, the
//! secondary ones then waiting in KVM for INIT/SIPI), then runs the guest
//! and dispatches its exits: hypercall doorbells, device MMIO and port
//! I/O on the buses; everything else ends the VM.
//!
//! Stopping: whoever ends the VM sets the lifecycle's stop flag, then sends
//! [`kick_signal`] to every vCPU thread. Its handler sets `immediate_exit`
//! in the thread's `kvm_run`, so `KVM_RUN` returns EINTR whether the
//! signal lands inside it or just before it is entered.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::ptr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use pvstack_protocols::hypercall::DOORBELL_OFFSET;
use pvstack_protocols::layout;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::counters::ExitKind;
use crate::crash_report;
use crate::error::{Error, Result};
use crate::hypercall::{self, Outcome};
use crate::lifecycle::{CpuStart, VmEnd};
use crate::machine::Machine;
use crate::x86::cpu;

const DOORBELL_ADDR: u64 = layout::HYPERCALL_ADDR + DOORBELL_OFFSET;

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// The real-time signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own vCPU's kvm_run mapping,
        // set while the VcpuFd is alive and cleared before it is dropped.
        // The kernel reads immediate_exit on the next KVM_RUN entry.
        unsafe { ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler (once per process, before vCPU threads run).
pub fn install_kick_handler() -> Result<()> {
    register_signal_handler(kick_signal(), kick_handler).map_err(|e| Error::Os {
        what: "install the vCPU kick signal handler",
        cause: std::io::Error::from_raw_os_error(e.errno()),
    })
}

/// A vCPU, ready to run once started.
pub struct Vcpu {
    pub index: u32,
    pub fd: VcpuFd,
}

/// How a vCPU thread begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// Start at this entry right away (pvstack's own guest's vCPU 0).
    At(CpuStart),
    /// Wait for the guest's CPU_START (its other vCPUs).
    OnCpuStart,
    /// Run as the boot path configured it (a Linux guest's vCPUs: the
    /// first at the kernel's entry, the others waiting for INIT/SIPI).
    Configured,
}

/// Spawns the thread of `vcpu`, which begins as `launch` says.
pub fn spawn(vcpu: Vcpu, machine: Arc<Machine>, launch: Launch) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{}", vcpu.index))
        .spawn(move || run_thread(vcpu, &machine, launch))
        .map_err(|source| Error::Os {
            what: "spawn a vCPU thread",
            cause: source,
        })
}

fn run_thread(mut vcpu: Vcpu, machine: &Machine, launch: Launch) {
    if let Err(e) = crate::sandbox::confine_vcpu_thread() {
        machine.lifecycle.end(VmEnd::Failed(e));
        return;
    }
    let start = match launch {
        Launch::At(start) => Some(start),
        Launch::OnCpuStart => match machine.lifecycle.wait_for_start(vcpu.index) {
            Some(start) => Some(start),
            None => return,
        },
        Launch::Configured => None,
    };
    if let Some(start) = start {
        if let Err(e) = cpu::set_entry(&vcpu.fd, start.entry, start.stack_top, start.arg) {
            machine.lifecycle.end(VmEnd::Failed(e));
            return;
        }
    }
    KVM_RUN.with(|run| run.set(vcpu.fd.get_kvm_run()));
    if let Some(end) = run_loop(&mut vcpu, machine) {
        machine.lifecycle.end(end);
    }
    KVM_RUN.with(|run| run.set(ptr::null_mut()));
}

/// What one exit asks of the run loop.
enum Step {
    Continue,
    Stop,
    Crash(String),
    /// A triple fault of a Linux guest: what resets a PC.
    Reset(String),
    Fail(Error),
}

/// Runs until the VM stops; returns why, if this vCPU is the reason.
fn run_loop(vcpu: &mut Vcpu, machine: &Machine) -> Option<VmEnd> {
    let mut first_exit = vcpu.index == 0;
    let entered = Instant::now();
    // Whether KVM owes the guest nothing: after an MMIO or port exit, KVM
    // finishes the instruction (a read's value, RIP past a port write)
    // only in the next KVM_RUN. A vCPU parks only when settled, so the
    // state a snapshot reads is consistent and nothing is done twice.
    let mut settled = true;
    loop {
        if machine.lifecycle.is_stopping() {
            return None;
        }
        if machine.lifecycle.is_paused() {
            if settled {
                machine.lifecycle.park(vcpu.index, &mut vcpu.fd);
                continue;
            }
            // Complete the instruction and come straight back (or, where
            // KVM enters the guest anyway, at the pauser's next kick).
            vcpu.fd.set_kvm_immediate_exit(1);
        }
        let exit = vcpu.fd.run();
        settled = matches!(&exit, Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN);
        let step = handle_exit(exit, machine);
        if first_exit {
            first_exit = false;
            log_boot_time(machine.created, entered);
        }
        match step {
            Step::Continue => {}
            Step::Stop => return None,
            Step::Crash(reason) => {
                return Some(VmEnd::Crash(crash_report::report(
                    vcpu.index,
                    &reason,
                    &mut vcpu.fd,
                )))
            }
            Step::Reset(reason) => {
                return Some(VmEnd::Reset {
                    how: "triple fault: how Linux resets when its other ways fail, or a crash"
                        .into(),
                    report: Some(crash_report::report(vcpu.index, &reason, &mut vcpu.fd)),
                });
            }
            Step::Fail(e) => return Some(VmEnd::Failed(e)),
        }
        if vcpu.fd.get_kvm_run().immediate_exit != 0 {
            vcpu.fd.set_kvm_immediate_exit(0);
        }
    }
}

fn log_boot_time(created: Instant, entered: Instant) {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    log::info!(
        "boot: first guest exit {:.1} ms after VM creation (vm setup {:.1} ms)",
        ms(created.elapsed()),
        ms(entered.duration_since(created))
    );
}

/// Counts and handles the result of one `KVM_RUN`.
fn handle_exit(exit: std::result::Result<VcpuExit, kvm_ioctls::Error>, machine: &Machine) -> Step {
    let counters = &machine.counters;
    match exit {
        Ok(VcpuExit::MmioWrite(DOORBELL_ADDR, data)) if data.len() == 8 => {
            counters.record(ExitKind::Hypercall);
            let mut addr = [0u8; 8];
            addr.copy_from_slice(data);
            match hypercall::handle_doorbell(machine, u64::from_le_bytes(addr)) {
                Outcome::Resume => Step::Continue,
                Outcome::Stop => Step::Stop,
            }
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            counters.record(ExitKind::Mmio);
            if !machine.bus.write(addr, data) {
                pvstack_logging::warn_limited!(
                    "guest wrote {} bytes to unmapped MMIO {addr:#x}; dropped",
                    data.len()
                );
            }
            Step::Continue
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            counters.record(ExitKind::Mmio);
            if !machine.bus.read(addr, data) {
                pvstack_logging::warn_limited!(
                    "guest read {} bytes of unmapped MMIO {addr:#x}; all ones",
                    data.len()
                );
                data.fill(0xff);
            }
            Step::Continue
        }
        // Linux probes many legacy PC ports pvstack does not emulate (PCI
        // configuration, other serial ports, the POST port 0x80), so
        // unmapped ports are logged at debug level only.
        Ok(VcpuExit::IoOut(port, data)) => {
            counters.record(ExitKind::Pio);
            if !machine.pio.write(u64::from(port), data) {
                log::debug!(
                    "guest wrote {} bytes to unmapped port {port:#x}; dropped",
                    data.len()
                );
            }
            Step::Continue
        }
        Ok(VcpuExit::IoIn(port, data)) => {
            counters.record(ExitKind::Pio);
            if !machine.pio.read(u64::from(port), data) {
                log::debug!(
                    "guest read {} bytes of unmapped port {port:#x}; all ones",
                    data.len()
                );
                data.fill(0xff);
            }
            Step::Continue
        }
        Ok(VcpuExit::Shutdown) if machine.linux => {
            counters.record(ExitKind::Other);
            Step::Reset(describe_fatal_exit(&VcpuExit::Shutdown))
        }
        Ok(other) => {
            counters.record(ExitKind::Other);
            Step::Crash(describe_fatal_exit(&other))
        }
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            counters.record(ExitKind::Other);
            Step::Continue
        }
        Err(source) => {
            counters.record(ExitKind::Other);
            Step::Fail(Error::Kvm {
                what: "run a vCPU",
                cause: source,
            })
        }
    }
}

fn describe_fatal_exit(exit: &VcpuExit) -> String {
    match exit {
        VcpuExit::Shutdown => "triple fault (KVM_EXIT_SHUTDOWN)".into(),
        VcpuExit::InternalError => "KVM internal error (KVM_EXIT_INTERNAL_ERROR)".into(),
        VcpuExit::FailEntry(reason, cpu) => {
            format!("VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on host CPU {cpu})")
        }
        VcpuExit::Hlt => "hlt with no interrupt to wake the vCPU (KVM_EXIT_HLT)".into(),
        other => format!("unhandled exit {other:?}"),
    }
}
