//! Device interrupts of the old VM during a take-over, without irqfds.
//!
//! KVM binds an eventfd to one irqfd at a time, across VMs, so the new
//! process can bind a device's call eventfd only once the old VM has let
//! go of it. Letting go (KVM_IRQFD deassign) is slow: KVM waits for an
//! SRCU grace period and for the host-wide irqfd clean-up work, several
//! milliseconds per device on a busy host. So the old process lets go
//! before it pauses the guest, while the guest runs on, and meanwhile
//! relays each call to the VM's interrupt line itself (KVM_IRQ_LINE, an
//! edge: the lines of virtio-mmio devices are edge-triggered). Stopping
//! the relay at the pause is quick, and whatever a backend signals after
//! that stays counted in its eventfd, which KVM turns into an interrupt
//! when the new VM binds it.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};

/// A thread that raises line `gsi` each time its `call` is signalled.
pub struct InterruptRelay {
    /// Set once the relay must take no more calls. The thread takes and
    /// raises each call holding this lock, so setting it under the lock
    /// stops the relay at once, without waiting for the thread to be
    /// scheduled (which on a loaded host can take many milliseconds).
    stopped: Arc<Mutex<bool>>,
    /// Wakes the thread so that it ends.
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl InterruptRelay {
    /// Starts relaying each `(call, gsi)` to `vm`.
    pub fn start(vm: Arc<VmFd>, calls: Vec<(EventFd, u32)>) -> Result<InterruptRelay> {
        let wake = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| Error::Takeover(format!("cannot create the relay's stop eventfd: {e}")))?;
        let wake_copy = wake
            .try_clone()
            .map_err(|e| Error::Takeover(format!("cannot duplicate an eventfd: {e}")))?;
        let stopped = Arc::new(Mutex::new(false));
        let relay_stopped = stopped.clone();
        let thread = std::thread::Builder::new()
            .name("irq-relay".into())
            .spawn(move || relay(&vm, &calls, &wake_copy, &relay_stopped))
            .map_err(|e| Error::Takeover(format!("cannot start the interrupt relay: {e}")))?;
        Ok(InterruptRelay {
            stopped,
            wake,
            thread: Some(thread),
        })
    }

    /// Stops relaying: from now on the calls stay counted in their
    /// eventfds. The thread ends when it next runs ([`Drop`] waits).
    pub fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        if let Err(e) = self.wake.write(1) {
            log::error!("cannot wake the interrupt relay to end it: {e}");
        }
    }
}

impl Drop for InterruptRelay {
    fn drop(&mut self) {
        self.stop();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the interrupt relay panicked");
            }
        }
    }
}

/// The relay thread: waits for `wake` or any call; raises the line of
/// each call signalled, until `stopped`.
fn relay(vm: &VmFd, calls: &[(EventFd, u32)], wake: &EventFd, stopped: &Mutex<bool>) {
    let mut polled: Vec<libc::pollfd> = std::iter::once(wake.as_raw_fd())
        .chain(calls.iter().map(|(call, _)| call.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `polled` is a live array of as many pollfds as passed,
        // naming descriptors this thread's caller keeps open until the
        // thread is joined.
        let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("interrupt relay: poll failed: {error}");
            return;
        }
        let stopped = stopped.lock().unwrap_or_else(PoisonError::into_inner);
        if *stopped {
            return;
        }
        for (entry, (call, gsi)) in polled[1..].iter().zip(calls) {
            if entry.revents & libc::POLLIN == 0 {
                continue;
            }
            // Non-blocking: another reader cannot have taken it, but a
            // spurious wake-up must not block the relay.
            if call.read().is_err() {
                continue;
            }
            let raised = vm
                .set_irq_line(*gsi, true)
                .and_then(|()| vm.set_irq_line(*gsi, false));
            if let Err(e) = raised {
                log::error!("interrupt relay: cannot raise GSI {gsi}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    #[test]
    fn relays_calls_until_stopped_then_leaves_them_counted() {
        let kvm = Kvm::new().expect("this host has KVM");
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let relay =
            InterruptRelay::start(vm.clone(), vec![(call.try_clone().unwrap(), 5)]).expect("relay");
        call.write(1).unwrap();
        // The relay consumes the call (it raised the line).
        let consumed = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            let mut fds = [libc::pollfd {
                fd: call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one live pollfd on an open eventfd; zero timeout.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
            ready == 0
        });
        assert!(consumed, "the relay never took the call");
        relay.stop();
        call.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(call.read().unwrap(), 1, "a stopped relay takes nothing");
    }
}
