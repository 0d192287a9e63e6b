//! How a VM ends, and how secondary vCPUs wait for CPU_START: the state the
//! vCPU threads and the main thread coordinate on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use kvm_ioctls::VcpuFd;

use pvstack_protocols::hypercall::status;

use crate::error::Error;

/// Why the VM stopped.
#[derive(Debug)]
pub enum VmEnd {
    /// The guest called EXIT with this code (already masked to 8 bits).
    GuestExit(u8),
    /// A vCPU died: triple fault, internal error, unhandled exit. The text
    /// is the multi-line report with the exit reason and registers.
    Crash(String),
    /// pvstack got SIGTERM or SIGINT (the signal number).
    Signal(i32),
    /// The control API asked the VM to shut down.
    Shutdown,
    /// A Linux guest powered the machine off (ACPI S5).
    PowerOff,
    /// A Linux guest reset the machine; pvstack does not restart guests,
    /// so the VM ends. `how` names the register (or the triple fault);
    /// `report` is the crash report of a triple fault.
    Reset { how: String, report: Option<String> },
    /// The VMM itself failed while the VM ran.
    Failed(Error),
}

/// Where a secondary vCPU starts once CPU_START asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuStart {
    pub entry: u64,
    pub stack_top: u64,
    pub arg: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CpuState {
    Waiting,
    StartRequested(CpuStart),
    Running,
}

/// How often [`Lifecycle::pause_until_parked`] kicks vCPUs that have not
/// parked yet.
const KICK_INTERVAL: std::time::Duration = std::time::Duration::from_micros(200);

/// Work for a parked vCPU's thread, done with its vCPU (KVM wants a
/// vCPU's state read by the thread that runs it): see [`Lifecycle::park`].
pub type VcpuJob = Box<dyn FnOnce(&mut VcpuFd) + Send>;

struct State {
    end: Option<VmEnd>,
    ended: bool,
    cpus: Vec<CpuState>,
    /// Which vCPU threads wait in [`Lifecycle::park`].
    parked: Vec<bool>,
    /// A job posted for each parked vCPU.
    jobs: Vec<Option<VcpuJob>>,
}

/// The end of the VM (first reason wins) and the vCPU start requests.
pub struct Lifecycle {
    state: Mutex<State>,
    changed: Condvar,
    /// Mirrors `state.ended` for the vCPU loop's lock-free check.
    stopping: AtomicBool,
    /// The control API paused the vCPUs; they wait in [`Self::wait_while_paused`].
    paused: AtomicBool,
}

impl Lifecycle {
    /// A VM of `cpus` vCPUs where vCPU 0 runs and the others wait.
    pub fn new(cpus: u32) -> Lifecycle {
        let mut states = vec![CpuState::Waiting; cpus as usize];
        if let Some(boot_cpu) = states.first_mut() {
            *boot_cpu = CpuState::Running;
        }
        Lifecycle {
            state: Mutex::new(State {
                end: None,
                ended: false,
                parked: vec![false; states.len()],
                jobs: (0..states.len()).map(|_| None).collect(),
                cpus: states,
            }),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            paused: AtomicBool::new(false),
        }
    }

    /// A VM of `cpus` vCPUs that all run from the start (a Linux guest:
    /// the secondary ones wait in KVM for INIT/SIPI), so CPU_START has
    /// nothing to start.
    pub fn all_running(cpus: u32) -> Lifecycle {
        let lifecycle = Lifecycle::new(cpus);
        lifecycle.lock().cpus.fill(CpuState::Running);
        lifecycle
    }

    /// Asks the vCPUs to stop running the guest until [`Self::resume`]; a
    /// vCPU inside `KVM_RUN` must also be kicked out of it.
    pub fn pause(&self) {
        let _state = self.lock();
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        let _state = self.lock();
        self.paused.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// True while the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Blocks a vCPU thread while the VM is paused and not ending.
    pub fn wait_while_paused(&self) {
        let mut state = self.lock();
        while self.is_paused() && !state.ended {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks vCPU `index`'s thread while the VM is paused and not ending,
    /// as [`Self::wait_while_paused`], and meanwhile runs the jobs posted
    /// for it with its vCPU `fd` ([`Self::run_on_parked`]).
    pub fn park(&self, index: u32, fd: &mut VcpuFd) {
        let slot = index as usize;
        let mut state = self.lock();
        if let Some(parked) = state.parked.get_mut(slot) {
            *parked = true;
        }
        self.changed.notify_all();
        loop {
            if let Some(job) = state.jobs.get_mut(slot).and_then(Option::take) {
                drop(state);
                job(fd);
                state = self.lock();
                continue;
            }
            if !self.is_paused() || state.ended {
                break;
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(parked) = state.parked.get_mut(slot) {
            *parked = false;
        }
    }

    /// Pauses the VM and waits until every vCPU that has been started
    /// sits in [`Self::park`], calling `kick` (which must kick every vCPU
    /// thread out of `KVM_RUN`) at once and again every [`KICK_INTERVAL`]
    /// meanwhile: a vCPU that had to finish an instruction first may have
    /// re-entered the guest. Returns which vCPUs had been started, or
    /// `None` if the VM is ending.
    pub fn pause_until_parked(&self, kick: &dyn Fn()) -> Option<Vec<bool>> {
        self.pause();
        let mut state = self.lock();
        loop {
            if state.ended {
                return None;
            }
            let all_parked = state
                .cpus
                .iter()
                .zip(&state.parked)
                .all(|(cpu, &parked)| *cpu == CpuState::Waiting || parked);
            if all_parked {
                return Some(state.cpus.iter().map(|c| *c != CpuState::Waiting).collect());
            }
            kick();
            state = self
                .changed
                .wait_timeout(state, KICK_INTERVAL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Posts `job` for parked vCPU `index`; its thread runs it before it
    /// leaves [`Self::park`]. The job reports back through whatever it
    /// captured (dropped unrun if the VM ends first).
    pub fn run_on_parked(&self, index: u32, job: VcpuJob) {
        let mut state = self.lock();
        if let Some(slot) = state.jobs.get_mut(index as usize) {
            *slot = Some(job);
        }
        self.changed.notify_all();
    }

    /// Marks the vCPUs of a restored VM as the snapshot had them: those
    /// in `started` run, the others wait for CPU_START.
    pub fn set_started(&self, started: &[bool]) {
        let mut state = self.lock();
        for (cpu, &running) in state.cpus.iter_mut().zip(started) {
            *cpu = if running {
                CpuState::Running
            } else {
                CpuState::Waiting
            };
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the VM for `reason`, unless it has ended already.
    pub fn end(&self, reason: VmEnd) {
        let mut state = self.lock();
        if state.ended {
            log::debug!("VM already ending; also: {reason:?}");
            return;
        }
        state.ended = true;
        state.end = Some(reason);
        self.stopping.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// True once the VM is ending: vCPUs must leave their run loops.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Blocks until the VM ends and returns why.
    pub fn wait_for_end(&self) -> VmEnd {
        let mut state = self.lock();
        loop {
            if let Some(end) = state.end.take() {
                return end;
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// CPU_START: asks vCPU `index` to start. Returns a hypercall status.
    pub fn start_cpu(&self, index: u64, start: CpuStart) -> i64 {
        let mut state = self.lock();
        let Some(cpu) = usize::try_from(index)
            .ok()
            .filter(|&i| i != 0)
            .and_then(|i| state.cpus.get_mut(i))
        else {
            return status::INVALID_ARGUMENT;
        };
        if *cpu != CpuState::Waiting {
            return status::BUSY;
        }
        *cpu = CpuState::StartRequested(start);
        self.changed.notify_all();
        status::OK
    }

    /// Blocks a secondary vCPU's thread until CPU_START asks for it
    /// (`Some`) or the VM ends first (`None`).
    pub fn wait_for_start(&self, index: u32) -> Option<CpuStart> {
        let mut state = self.lock();
        loop {
            if state.ended {
                return None;
            }
            if let Some(cpu) = state.cpus.get_mut(index as usize) {
                if let CpuState::StartRequested(start) = *cpu {
                    *cpu = CpuState::Running;
                    return Some(start);
                }
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const START: CpuStart = CpuStart {
        entry: 0x20_0000,
        stack_top: 0x1f_c000,
        arg: 1,
    };

    #[test]
    fn cpu_start_checks_index_and_busy() {
        let life = Lifecycle::new(2);
        assert_eq!(life.start_cpu(0, START), status::INVALID_ARGUMENT);
        assert_eq!(life.start_cpu(2, START), status::INVALID_ARGUMENT);
        assert_eq!(life.start_cpu(u64::MAX, START), status::INVALID_ARGUMENT);
        assert_eq!(life.start_cpu(1, START), status::OK);
        assert_eq!(life.start_cpu(1, START), status::BUSY);
        assert_eq!(life.wait_for_start(1), Some(START));
        assert_eq!(life.start_cpu(1, START), status::BUSY);
    }

    #[test]
    fn all_running_has_nothing_to_start() {
        let life = Lifecycle::all_running(2);
        assert_eq!(life.start_cpu(1, START), status::BUSY);
    }

    #[test]
    fn pause_holds_vcpus_until_resume_or_end() {
        let life = Arc::new(Lifecycle::new(1));
        life.pause();
        let waiter = {
            let life = life.clone();
            std::thread::spawn(move || life.wait_while_paused())
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished());
        life.resume();
        waiter.join().unwrap();
        life.pause();
        life.end(VmEnd::Shutdown);
        life.wait_while_paused();
    }

    #[test]
    fn first_end_wins_and_releases_waiting_cpus() {
        let life = Arc::new(Lifecycle::new(2));
        let waiter = {
            let life = life.clone();
            std::thread::spawn(move || life.wait_for_start(1))
        };
        life.end(VmEnd::GuestExit(7));
        life.end(VmEnd::Signal(15));
        assert!(life.is_stopping());
        assert_eq!(waiter.join().unwrap(), None);
        assert!(matches!(life.wait_for_end(), VmEnd::GuestExit(7)));
    }
}
