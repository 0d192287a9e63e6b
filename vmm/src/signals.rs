//! SIGTERM and SIGINT end the VM cleanly: they are blocked in every thread
//! and a dedicated thread waits for them with `sigwait`, so no work happens
//! in a signal handler.

use std::io;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::lifecycle::VmEnd;
use crate::machine::Machine;

const TERMINATION_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; sigaddset only adds
    // valid signal numbers to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in TERMINATION_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread and in every thread it
/// creates from now on. Call it first thing in `main`, before any thread.
pub fn block_termination() -> Result<()> {
    let set = termination_set();
    // SAFETY: a valid set, no old set wanted; the return value is checked.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Error::Os {
            what: "block SIGTERM and SIGINT",
            cause: io::Error::from_raw_os_error(rc),
        });
    }
    Ok(())
}

/// Waits until SIGTERM or SIGINT arrives (they must be blocked, see
/// [`block_termination`]) and returns it. Should sigwait itself fail, it
/// reports SIGTERM: the caller then stops as if asked to.
pub fn wait_for_termination() -> libc::c_int {
    let set = termination_set();
    let mut signal: libc::c_int = 0;
    // SAFETY: a valid set and a valid place for the signal number.
    let rc = unsafe { libc::sigwait(&set, &mut signal) };
    if rc == 0 {
        signal
    } else {
        log::error!("sigwait failed: {}", io::Error::from_raw_os_error(rc));
        libc::SIGTERM
    }
}

/// The VM that SIGTERM and SIGINT end, once it runs.
static RUNNING_VM: Mutex<Option<Arc<Machine>>> = Mutex::new(None);

/// Starts the thread that handles SIGTERM and SIGINT for `pvstack run`
/// (they must be blocked, see [`block_termination`]). Once
/// [`forward_termination`] has named the running VM, a signal ends it
/// cleanly with [`VmEnd::Signal`]. Before that, while devices are set up
/// (which can wait on a slow or hung backend), there is nothing to stop
/// cleanly: the process exits at once with 128+N, and the backend
/// processes it started follow it (they run with PR_SET_PDEATHSIG).
pub fn handle_termination() -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let signal = wait_for_termination();
            let running = running_vm().clone();
            match running {
                Some(machine) => {
                    log::info!("got signal {signal}; stopping the VM");
                    machine.lifecycle.end(VmEnd::Signal(signal));
                }
                None => {
                    log::info!("got signal {signal} before the VM ran; exiting");
                    std::process::exit(128 + signal);
                }
            }
        })
        .map(drop)
        .map_err(|source| Error::Os {
            what: "spawn the signal thread",
            cause: source,
        })
}

/// Makes SIGTERM and SIGINT end `machine`'s VM (see [`handle_termination`])
/// until the returned guard is dropped. The guard must go once the VM has
/// ended: while it lives, the machine (and every device with its backend
/// connection and child process) cannot be dropped.
#[must_use = "signals go to the VM only while the guard lives"]
pub fn forward_termination(machine: Arc<Machine>) -> ForwardingGuard {
    *running_vm() = Some(machine);
    ForwardingGuard
}

/// Stops forwarding signals to the running VM when dropped.
pub struct ForwardingGuard;

impl Drop for ForwardingGuard {
    fn drop(&mut self) {
        *running_vm() = None;
    }
}

fn running_vm() -> std::sync::MutexGuard<'static, Option<Arc<Machine>>> {
    RUNNING_VM
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
