use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vhost_user_backend::ShutdownHandle;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Error;

/// A request to stop serving, raised by SIGTERM or SIGINT.
///
/// `install` blocks both signals in the calling thread (and so in every
/// thread it spawns later) and starts a thread that waits for them with
/// `sigwait`. On a signal that thread marks the stop as requested, wakes
/// whoever waits on `wake_fd`, and shuts down the current frontend
/// connection so the serving loop returns. Call `install` before any other
/// thread exists, or those threads may receive the signal themselves.
#[derive(Clone)]
pub struct StopSignal {
    inner: Arc<Inner>,
}

struct Inner {
    requested: AtomicBool,
    wake: EventFd,
    connection: Mutex<Option<ShutdownHandle>>,
}

impl StopSignal {
    pub fn install() -> Result<Self, Error> {
        let inner = Arc::new(Inner {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK).map_err(Error::Signals)?,
            connection: Mutex::new(None),
        });
        block_stop_signals()?;
        let set = stop_signal_set();
        let waiter = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || wait_for_signals(&waiter, &set))
            .map_err(Error::Signals)?;
        Ok(StopSignal { inner })
    }

    /// Whether a stop has been requested.
    pub fn requested(&self) -> bool {
        self.inner.requested.load(Ordering::Acquire)
    }

    /// An eventfd that becomes readable once a stop is requested.
    pub fn wake_fd(&self) -> &EventFd {
        &self.inner.wake
    }

    /// Registers the connection a stop must shut down (None once it ended).
    pub fn set_connection(&self, handle: Option<ShutdownHandle>) {
        *self
            .inner
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = handle;
    }
}

impl Inner {
    fn request(&self) {
        self.requested.store(true, Ordering::Release);
        if let Err(e) = self.wake.write(1) {
            log::warn!("cannot wake the serving loop: {e}");
        }
        if let Some(handle) = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            handle.shutdown();
        }
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread, and so in every thread
/// it spawns later. [`StopSignal::install`] does it; a backend that starts
/// threads of its own before serving calls it first, so that only the
/// signal thread receives them.
pub fn block_stop_signals() -> Result<(), Error> {
    let set = stop_signal_set();
    // SAFETY: `set` is a valid, initialised sigset_t; a null old-set
    // pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Error::Signals(io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use
    // and sigaddset only adds valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

fn wait_for_signals(inner: &Inner, set: &libc::sigset_t) {
    loop {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` is initialised and `signal` is a valid out pointer.
        let rc = unsafe { libc::sigwait(set, &mut signal) };
        if rc != 0 {
            log::error!(
                "sigwait failed: {}; SIGTERM/SIGINT will not stop the backend cleanly",
                io::Error::from_raw_os_error(rc)
            );
            return;
        }
        let name = if signal == libc::SIGTERM {
            "SIGTERM"
        } else {
            "SIGINT"
        };
        log::info!("received {name}, shutting down");
        inner.request();
    }
}
