//! [`ReplyWatchdog`]: bounds how long one vhost-user request may wait for
//! the backend's reply.
//!
//! A socket read timeout cannot do this: the vhost crate treats the EAGAIN
//! of a timed-out receive as "try again" and waits for ever, so a backend
//! that accepts requests and never answers would hang pvstack. Instead a
//! watchdog thread shuts the socket down when an armed request outlives its
//! deadline; the blocked receive then sees end-of-file and the request
//! fails, and the handle reports it as a backend that did not reply.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    /// When the armed request times out; `None` while nothing is armed.
    deadline: Option<Instant>,
    /// The watchdog shut the socket down.
    fired: bool,
    /// The watchdog is being dropped.
    closing: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent whatever a panicking holder did.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Shuts a socket down when a request armed on it takes too long.
pub struct ReplyWatchdog {
    shared: Arc<Shared>,
    timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

/// A request in progress; dropping it disarms the watchdog.
pub struct Armed<'a> {
    watchdog: &'a ReplyWatchdog,
}

impl ReplyWatchdog {
    /// Watches `socket` (a duplicate of the connection: shutting it down
    /// ends the connection for every descriptor of the socket).
    pub fn new(socket: UnixStream, timeout: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let thread = std::thread::Builder::new()
            .name("vhost-user-watchdog".into())
            .spawn({
                let shared = shared.clone();
                move || watch(&shared, &socket)
            })?;
        Ok(ReplyWatchdog {
            shared,
            timeout,
            thread: Some(thread),
        })
    }

    /// Starts the clock for one request.
    pub fn arm(&self) -> Armed<'_> {
        self.shared.lock().deadline = Some(Instant::now() + self.timeout);
        self.shared.changed.notify_one();
        Armed { watchdog: self }
    }

    /// Whether the watchdog has shut the socket down.
    pub fn fired(&self) -> bool {
        self.shared.lock().fired
    }

    /// How long a request may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        // No notify: the watchdog wakes at the old deadline and finds
        // nothing armed, which is cheaper than waking it on every request.
        self.watchdog.shared.lock().deadline = None;
    }
}

impl Drop for ReplyWatchdog {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_one();
        if let Some(thread) = self.thread.take() {
            // The thread only waits on the condition variable; it cannot panic.
            let _ = thread.join();
        }
    }
}

fn watch(shared: &Shared, socket: &UnixStream) {
    let mut state = shared.lock();
    while !state.closing {
        state = match state.deadline {
            None => shared
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    // Fails only if the peer already closed it, which ends
                    // the request just as well.
                    let _ = socket.shutdown(Shutdown::Both);
                    state.fired = true;
                    state.deadline = None;
                    continue;
                }
                shared
                    .changed
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_late_reply_ends_the_connection() {
        let (mut ours, _backend) = UnixStream::pair().unwrap();
        let watchdog =
            ReplyWatchdog::new(ours.try_clone().unwrap(), Duration::from_millis(20)).unwrap();
        let armed = watchdog.arm();
        let mut byte = [0u8; 1];
        // The silent peer never writes: only the watchdog ends this read.
        assert_eq!(ours.read(&mut byte).unwrap(), 0);
        drop(armed);
        assert!(watchdog.fired());
    }

    #[test]
    fn a_disarmed_request_leaves_the_socket_alone() {
        let (ours, mut backend) = UnixStream::pair().unwrap();
        let watchdog =
            ReplyWatchdog::new(ours.try_clone().unwrap(), Duration::from_millis(5)).unwrap();
        drop(watchdog.arm());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!watchdog.fired());
        drop(watchdog);
        // The connection still works both ways.
        use std::io::Write;
        (&ours).write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        backend.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }
}
