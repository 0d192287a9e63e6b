//! Operations on a running vhost-user device that talk to backends: a
//! swap, a requested reconnect, and the supervisor's reconnect attempts.
//! Each connects, negotiates (and starts a child backend) without the
//! device's lock, waits for a stopped backend's requests without it, and
//! takes it only to install the new connection and replay the ring setup,
//! so vCPUs touching the device, the control API and the VM's shutdown
//! wait for a backend only as long as that replay takes.

use std::path::Path;
use std::sync::{Arc, MutexGuard, Weak};
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::device::{BackendState, Reconnected, VhostUserDevice};
use super::supervisor::SharedVhostUserDevice;
use crate::error::Result;
use crate::virtio::mmio::MmioTransport;

/// How long a swap or a requested reconnect waits for the old backend to
/// complete the requests it had taken (without the device's lock).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for a new backend's first completion, so the stall
/// recorded is the one the guest sees.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(1);

/// Takes the guest's vCPUs off their CPUs during a swap, when the caller
/// asks for it (see [`swap`]).
pub trait ParkVcpus {
    /// Returns once no vCPU runs guest code.
    fn park(&self);
    /// Lets them run again.
    fn unpark(&self);
}

/// Parked vCPUs, let go when dropped (on every way out of a swap).
struct Parked<'a>(&'a dyn ParkVcpus);

impl<'a> Parked<'a> {
    fn new(vcpus: &'a dyn ParkVcpus) -> Self {
        vcpus.park();
        Parked(vcpus)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.unpark();
    }
}

/// The device behind its transport, a weak reference as the supervisor
/// holds it.
pub type WeakVhostUserDevice = Weak<std::sync::Mutex<MmioTransport<VhostUserDevice>>>;

/// Locks the device even if a thread panicked while holding it.
pub fn lock(device: &SharedVhostUserDevice) -> MutexGuard<'_, MmioTransport<VhostUserDevice>> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// Moves the device to the backend listening on `socket`: connects and
/// checks it first (a backend that cannot take over is refused and the
/// old one keeps serving), then stops the rings on the old backend once
/// the requests it took are complete, replays the ring setup to the new
/// one, and resumes. Returns the stall: how long no backend served the
/// rings.
///
/// With `park`, the vCPUs are off their CPUs from when the new backend is
/// connected until it has served (they are parked before the device's
/// lock is taken to prepare it: a vCPU may be waiting for that lock in an
/// MMIO exit, and could never park): the guest's requests on this device
/// wait through the stall anyway, and a guest that polls (pvstack's own
/// on a PVM host, which cannot halt) otherwise keeps a CPU busy that the
/// backends' and the VMM's threads need for the stall's round trips. On a
/// 2-core host that is the whole tail of the stall: p99 0.6-1.4 ms with
/// the vCPUs parked against 3.1-3.9 ms without (scripts/bench-swap).
pub fn swap(
    device: &SharedVhostUserDevice,
    socket: &Path,
    park: Option<&dyn ParkVcpus>,
) -> Result<Duration> {
    let result = try_swap(device, socket, park);
    lock(device).device_mut().record_swap(socket, &result);
    result
}

fn try_swap(
    device: &SharedVhostUserDevice,
    socket: &Path,
    park: Option<&dyn ParkVcpus>,
) -> Result<Duration> {
    let attempt = lock(device).device().swap_attempt(socket)?;
    let new = attempt.connect()?;
    let parked = park.map(Parked::new);
    let progress = lock(device).device_mut().stop_for_swap(attempt, new)?;
    let began = progress.began();
    let stopped = began.elapsed();
    let drained = progress
        .drain()
        .map_or(Ok(()), |rings| rings.drain(DRAIN_TIMEOUT));
    let drained_at = began.elapsed();
    let (watch, retired) = lock(device).device_mut().finish_swap(progress, drained)?;
    let resumed = began.elapsed();
    if let Some(rings) = watch {
        rings.wait_for_service(SERVICE_TIMEOUT);
    }
    let stall = began.elapsed();
    drop(parked);
    drop(retired);
    debug!(
        "{}: swap stall {} us: old backend stopped at {} us, drained at {} us, \
         new backend resumed at {} us",
        lock(device).device().name(),
        stall.as_micros(),
        stopped.as_micros(),
        drained_at.as_micros(),
        resumed.as_micros()
    );
    Ok(stall)
}

/// Ends the device's connection on request and reconnects at once (the
/// `device reconnect` command): the rings are stopped cleanly first, so
/// nothing is served twice. If the attempt fails, the supervisor keeps
/// trying.
pub fn reconnect(device: &SharedVhostUserDevice) -> Result<Duration> {
    let began = Instant::now();
    let drain = lock(device).device_mut().stop_for_reconnect();
    if let Some(rings) = drain {
        if let Err(err) = rings.drain(DRAIN_TIMEOUT) {
            let name = lock(device).device().name().to_string();
            warn!("{name}: {err}; reconnecting anyway, from the used rings");
        }
    }
    lock(device).device_mut().drop_connection();
    reconnect_once(&Arc::downgrade(device), began)?;
    Ok(began.elapsed())
}

/// One attempt to reach the backend of a device that lost its connection
/// at `began`, and to resume its rings there. Nothing to do if the device
/// is gone or another attempt got there first.
pub fn reconnect_once(device: &WeakVhostUserDevice, began: Instant) -> Result<()> {
    let Some(shared) = device.upgrade() else {
        return Ok(());
    };
    let attempt = lock(&shared).device().reconnect_attempt();
    // No strong reference while connecting: the VM may end meanwhile.
    drop(shared);
    let mut turn = attempt.turn();
    let Some(shared) = device.upgrade() else {
        return Ok(());
    };
    if lock(&shared).device().status().state == BackendState::Connected {
        // Another attempt reconnected it while this one waited its turn.
        return Ok(());
    }
    drop(shared);
    let connected = attempt.connect(&mut turn)?;
    let Some(shared) = device.upgrade() else {
        return Ok(());
    };
    let installed = lock(&shared).device_mut().finish_reconnect(connected)?;
    drop(turn);
    if let Reconnected::Installed(watch, retired) = installed {
        if let Some(rings) = watch {
            rings.wait_for_service(SERVICE_TIMEOUT);
        }
        let stall = began.elapsed();
        drop(retired);
        lock(&shared).device_mut().record_reconnect(stall);
    }
    Ok(())
}
