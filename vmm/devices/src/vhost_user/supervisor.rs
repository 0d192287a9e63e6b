//! The supervisor thread of a vhost-user device: watches the backend's
//! socket for hang-up and, when it comes, reconnects with backoff inside
//! the configured window and replays the ring setup
//! ([`control::reconnect_once`], which holds the device's lock only to
//! install the new connection). The guest's requests meanwhile wait in
//! the rings; nothing fails.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::control::{self, lock, WeakVhostUserDevice};
use super::device::{BackendState, VhostUserDevice};
use crate::error::{Error, Result};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::DeviceEvents;

/// The device as the bus and the control API share it.
pub type SharedVhostUserDevice = Arc<Mutex<MmioTransport<VhostUserDevice>>>;

/// How often the watcher looks whether the device is gone or has moved
/// to another connection while its backend stays quiet.
const WATCH_INTERVAL_MS: i32 = 100;
/// First and largest pause between reconnect attempts.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// When to give up reconnecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// How long after a hang-up to keep trying; `None`: forever.
    pub window: Option<Duration>,
}

/// Starts the supervisor of `device`. The thread holds only a weak
/// reference and ends soon after the device is dropped; it also starts
/// any replacement backend child, which lives as long as this thread.
pub fn spawn(
    name: &str,
    device: &SharedVhostUserDevice,
    policy: ReconnectPolicy,
) -> std::io::Result<JoinHandle<()>> {
    let device = Arc::downgrade(device);
    std::thread::Builder::new()
        .name(format!("{name}-supervisor"))
        .spawn(move || supervise(&device, policy))
}

/// Puts `device` behind a virtio-mmio transport with `events` and starts
/// its supervisor: the last step of creating any vhost-user device.
pub fn supervised(
    device: VhostUserDevice,
    events: DeviceEvents,
    policy: ReconnectPolicy,
) -> Result<SharedVhostUserDevice> {
    let id = device.name().to_string();
    let transport = behind_transport(device, events);
    spawn(&id, &transport, policy).map_err(|source| Error::Thread {
        what: format!("{id} supervisor"),
        cause: source,
    })?;
    Ok(transport)
}

/// Puts `device` behind a virtio-mmio transport with `events`, and tells
/// it where it lives (so a driver's reset can finish from its own thread).
pub fn behind_transport(device: VhostUserDevice, events: DeviceEvents) -> SharedVhostUserDevice {
    let id = device.name().to_string();
    let transport = Arc::new(Mutex::new(MmioTransport::new(id, device, events)));
    lock(&transport)
        .device_mut()
        .attach(Arc::downgrade(&transport));
    transport
}

fn supervise(device: &WeakVhostUserDevice, policy: ReconnectPolicy) {
    let mut lost_at: Option<Instant> = None;
    let mut backoff = FIRST_BACKOFF;
    // The last attempt's error, logged once rather than at every attempt.
    let mut last_error = String::new();
    loop {
        let Some(shared) = device.upgrade() else {
            return;
        };
        let mut transport = lock(&shared);
        let dev = transport.device_mut();
        let name = dev.name().to_string();
        match dev.status().state {
            BackendState::Connected => {
                lost_at = None;
                backoff = FIRST_BACKOFF;
                last_error.clear();
                let watched = dev.watch();
                drop(transport);
                drop(shared);
                match watched {
                    Ok(Some((connection, fd))) => {
                        if wait_for_hangup(device, connection, &fd) {
                            if let Some(shared) = device.upgrade() {
                                let mut transport = lock(&shared);
                                let dev = transport.device_mut();
                                if dev.connection() == connection {
                                    dev.mark_lost();
                                    lost_at = Some(Instant::now());
                                }
                            }
                        }
                    }
                    // A driver's reset has the connection for a moment.
                    Ok(None) => std::thread::sleep(FIRST_BACKOFF),
                    Err(err) => {
                        warn!("cannot watch a backend connection: {err}");
                        std::thread::sleep(MAX_BACKOFF);
                    }
                }
            }
            BackendState::Reconnecting => {
                drop(transport);
                drop(shared);
                let began = *lost_at.get_or_insert_with(Instant::now);
                match control::reconnect_once(device, began) {
                    Ok(()) => continue,
                    Err(err) => {
                        let message = err.to_string();
                        if message != last_error {
                            warn!("{name}: reconnect attempt failed: {message}; retrying");
                        } else {
                            debug!("{name}: reconnect attempt failed: {message}");
                        }
                        last_error = message;
                    }
                }
                if policy.window.is_some_and(|window| began.elapsed() > window) {
                    if let Some(shared) = device.upgrade() {
                        lock(&shared).device_mut().mark_failed();
                    }
                    continue;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            BackendState::Failed => {
                drop(transport);
                drop(shared);
                std::thread::sleep(MAX_BACKOFF);
            }
        }
    }
}

/// Blocks until the connection `fd` hangs up (true), or the device is
/// gone or has moved to another connection (false).
fn wait_for_hangup(device: &WeakVhostUserDevice, connection: u64, fd: &OwnedFd) -> bool {
    loop {
        let mut pollfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            // Only hang-up: replies to the frontend's own requests make the
            // socket readable, and they are not this thread's business.
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, WATCH_INTERVAL_MS) };
        if ready > 0 && pollfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return true;
        }
        let Some(shared) = device.upgrade() else {
            return false;
        };
        if lock(&shared).device().connection() != connection {
            return false;
        }
    }
}
