//! SIGTERM and SIGINT end the VM cleanly: they are blocked in every thread
//! and a dedicated thread waits for them with `sigwait`, so no work happens
//! in a signal handler.

use std::io;
use std::sync::Arc;

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
            source: io::Error::from_raw_os_error(rc),
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

/// Ends `machine`'s VM with [`VmEnd::Signal`] when SIGTERM or SIGINT
/// arrives.
pub fn forward_termination(machine: Arc<Machine>) -> Result<()> {
    block_termination()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let signal = wait_for_termination();
            log::info!("got signal {signal}; stopping the VM");
            machine.lifecycle.end(VmEnd::Signal(signal));
        })
        .map(drop)
        .map_err(|source| Error::Os {
            what: "spawn the signal thread",
            source,
        })
}
