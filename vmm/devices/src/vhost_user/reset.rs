//! A driver's reset of a vhost-user device, done without holding up the
//! vCPU that asked for it or anyone else who needs the device's lock.
//!
//! A reset must stop the backend's rings (SET_VRING_ENABLE 0 and
//! GET_VRING_BASE per queue, each answered only when the backend has
//! stopped) and let the requests it took complete; a slow or hostile
//! backend may take its whole reply timeout over each. The vCPU's MMIO
//! write arrives with the device's lock held, so that exchange runs on a
//! thread of its own ([`spawn_stop`]) with the connection, while the
//! device keeps a [`StandIn`] that answers what the control API asks and
//! refuses to talk to the backend. Until the thread is done, the status
//! register does not read 0 (virtio asks drivers to wait for that before
//! they set the device up again) and status writes are ignored.
//!
//! Not every driver waits: Linux's virtio-mmio writes 0 and goes straight
//! on (a driver unbound and bound again then reads the old status, ORs
//! its own bit into it, and has that write ignored). So the vCPU waits
//! for the thread a short while ([`RESET_VCPU_WAIT`]) and, if the rings
//! stopped by then, gives the connection back itself: with a backend that
//! answers promptly, the reset is done when the driver's write returns.
//! Otherwise the thread gives it back under the lock
//! (`VhostUserDevice::finish_reset`).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::connection::BackendConnection;
use super::control::{lock, WeakVhostUserDevice};
use super::handle::RingSetup;
use super::watch::RingWatch;
use crate::error::{Error, Result};

/// How long a driver's reset waits for the backend to complete the
/// requests it had taken. A backend that is slower loses its connection,
/// so that nothing it completes later is mistaken for a completion on the
/// rings the driver sets up next.
pub const RESET_DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

/// How long the vCPU that resets the device waits, holding the device's
/// lock, for the backend to stop its rings. Long enough for a backend
/// that answers at once (a reset takes about a millisecond here, tens of
/// milliseconds under nested emulation), short enough that a slow one
/// holds up the control API and SIGTERM only that long.
pub const RESET_VCPU_WAIT: Duration = Duration::from_millis(200);

/// The connection, and whether its rings stopped, once a reset's thread
/// is done with it.
pub struct Stopped {
    pub connection: Box<dyn BackendConnection>,
    pub outcome: Result<()>,
}

/// Who finishes a reset: the vCPU, if its thread is done while the vCPU
/// still waits in [`Handoff::wait`]; the thread, under the device's lock,
/// otherwise. The thread then never touches the device, so it keeps the
/// device alive no longer than the vCPU's write.
pub struct Handoff {
    state: Mutex<HandoffState>,
    ready: Condvar,
}

enum HandoffState {
    VcpuWaiting,
    Left(Stopped),
    VcpuGone,
}

impl Handoff {
    fn new() -> Self {
        Handoff {
            state: Mutex::new(HandoffState::VcpuWaiting),
            ready: Condvar::new(),
        }
    }

    /// The thread is done: leaves `stopped` to the vCPU if it still
    /// waits, else gives it back for the thread to finish with.
    fn leave(&self, stopped: Stopped) -> Option<Stopped> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match *state {
            HandoffState::VcpuWaiting => {
                *state = HandoffState::Left(stopped);
                self.ready.notify_all();
                None
            }
            HandoffState::Left(_) | HandoffState::VcpuGone => Some(stopped),
        }
    }

    /// Waits up to `timeout` for the thread to be done and takes what it
    /// left; after this, the thread finishes the reset itself.
    pub fn wait(&self, timeout: Duration) -> Option<Stopped> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut state, _) = self
            .ready
            .wait_timeout_while(state, timeout, |state| {
                matches!(state, HandoffState::VcpuWaiting)
            })
            .unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut *state, HandoffState::VcpuGone) {
            HandoffState::Left(stopped) => Some(stopped),
            HandoffState::VcpuWaiting | HandoffState::VcpuGone => None,
        }
    }
}

/// What a reset asks of the backend: stop taking requests, then complete
/// those taken within [`RESET_DRAIN_TIMEOUT`].
fn stop_and_drain(connection: &mut dyn BackendConnection, rings: &mut RingSetup) -> Result<()> {
    connection.stop(rings)?;
    RingWatch::of(rings).drain(RESET_DRAIN_TIMEOUT)
}

/// Stops `rings` on `connection` on a thread named after `device_name`,
/// then leaves the connection and the outcome to the caller's
/// [`Handoff::wait`]; once the caller has stopped waiting, the thread
/// hands them back to the device itself (`VhostUserDevice::finish_reset`,
/// with `number`, the device's connection number when the reset began).
/// If the thread cannot start, the connection is dropped (closed) and the
/// error returned.
pub fn spawn_stop(
    device_name: &str,
    device: WeakVhostUserDevice,
    mut connection: Box<dyn BackendConnection>,
    mut rings: RingSetup,
    number: u64,
) -> std::io::Result<Arc<Handoff>> {
    let handoff = Arc::new(Handoff::new());
    let vcpu = handoff.clone();
    std::thread::Builder::new()
        .name(format!("{device_name}-reset"))
        .spawn(move || {
            let outcome = stop_and_drain(connection.as_mut(), &mut rings);
            let Some(stopped) = handoff.leave(Stopped {
                connection,
                outcome,
            }) else {
                return;
            };
            match device.upgrade() {
                Some(device) => lock(&device).device_mut().finish_reset(stopped, number),
                None => stopped.connection.shut_down(),
            }
        })?;
    Ok(vcpu)
}

/// Holds the place of a connection that a reset's thread is using: says
/// what the connection said of itself, and refuses every request.
pub struct StandIn {
    socket: PathBuf,
    backend_features: u64,
    queue_num: u64,
    keeps_inflight_log: bool,
}

impl StandIn {
    /// A stand-in for `connection`.
    pub fn of(connection: &dyn BackendConnection) -> Self {
        StandIn {
            socket: connection.socket().to_path_buf(),
            backend_features: connection.backend_features(),
            queue_num: connection.queue_num(),
            keeps_inflight_log: connection.keeps_inflight_log(),
        }
    }

    fn busy(&self) -> Error {
        Error::Incompatible {
            socket: self.socket.clone(),
            reason: "the backend is still stopping its rings after the driver's reset".into(),
        }
    }
}

impl BackendConnection for StandIn {
    fn socket(&self) -> &Path {
        &self.socket
    }

    fn backend_features(&self) -> u64 {
        self.backend_features
    }

    fn queue_num(&self) -> u64 {
        self.queue_num
    }

    fn keeps_inflight_log(&self) -> bool {
        self.keeps_inflight_log
    }

    fn get_config(&mut self, _len: u32) -> Result<Vec<u8>> {
        Err(self.busy())
    }

    fn prepare(&mut self, _setup: &mut RingSetup) -> Result<()> {
        Err(self.busy())
    }

    fn resume(&mut self, _setup: &RingSetup) -> Result<()> {
        Err(self.busy())
    }

    fn stop(&mut self, _setup: &mut RingSetup) -> Result<()> {
        Err(self.busy())
    }

    fn watch_fd(&self) -> Result<OwnedFd> {
        Err(self.busy())
    }

    /// The reset's thread holds the connection; it ends it if need be.
    fn shut_down(&self) {}
}
