//! [`VhostUserDevice`]: a virtio device whose queues a backend process
//! serves. The device is the same for every device type; what differs
//! (features, queue sizes, configuration space) is worked out by the
//! device-specific constructor (see `crate::blk`) and passed in a
//! [`DeviceShape`].

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use vm_memory::GuestMemoryMmap;

use super::handle::{avail_idx, used_idx, ActiveQueue, RingSetup, VhostUserHandle};
use super::process::BackendProcess;
use super::stall::StallStats;
use crate::error::{Error, Result};
use crate::virtio::{clone_eventfd, read_config_bytes, Activation, VirtioDevice};

/// What the driver sees of a device.
#[derive(Clone, Debug)]
pub struct DeviceShape {
    /// Virtio device id.
    pub device_id: u32,
    /// Feature bits offered to the driver.
    pub features: u64,
    /// Largest size of each queue.
    pub queue_max_sizes: Vec<u16>,
    /// The configuration space.
    pub config: Vec<u8>,
    /// Where `config` came from, and so what a new backend must match.
    pub config_source: ConfigSource,
}

/// Who serves a device's configuration space.
#[derive(Clone, Copy, Debug)]
pub enum ConfigSource {
    /// The backend (GET_CONFIG). `takeover_check` says why a backend whose
    /// space is the second argument cannot take over from one whose space
    /// is the first (a different disk capacity, say); `None` if it can.
    Backend {
        takeover_check: fn(&[u8], &[u8]) -> Option<String>,
    },
    /// The VMM (a NIC's MAC and MTU): a new backend is not asked for it,
    /// and need not offer the CONFIG protocol feature.
    Vmm,
}

/// Connects to the device's backend again (starting a new child for a
/// backend pvstack runs itself): what crash recovery and `reconnect` use.
pub type Reconnector = Box<dyn FnMut() -> Result<(VhostUserHandle, Option<BackendProcess>)> + Send>;

/// The connection to the backend as the control API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// A backend is connected (and serving the queues if the driver runs the device).
    Connected,
    /// The backend hung up; the guest's requests wait while pvstack reconnects.
    Reconnecting,
    /// Reconnecting gave up after the configured window; requests wait forever.
    Failed,
}

/// Swap and reconnect counts with the stall each caused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Swaps to another backend that succeeded.
    pub swaps: StallStats,
    /// Swaps that were refused (the device stayed on its backend).
    pub refused_swaps: u64,
    /// Reconnects after a hang-up or on request.
    pub reconnects: StallStats,
}

/// What the control API shows of a vhost-user device.
#[derive(Clone, Debug)]
pub struct BackendStatus {
    /// The backend's socket.
    pub socket: PathBuf,
    /// The backend process's id, if pvstack started it.
    pub pid: Option<u32>,
    /// The connection's state.
    pub state: BackendState,
    /// Whether the driver runs the device (its rings are set up).
    pub active: bool,
    /// Whether the backend keeps an inflight log for crash recovery.
    pub inflight_log: bool,
    /// Counters.
    pub stats: BackendStats,
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    /// Names the device in log lines.
    name: String,
    shape: DeviceShape,
    memory: GuestMemoryMmap,
    handle: VhostUserHandle,
    /// What the backend was set up with, while the driver runs the device.
    rings: Option<RingSetup>,
    /// The backend process, if pvstack started it. Declared after the
    /// handle so the connection closes before the process is stopped.
    process: Option<BackendProcess>,
    /// How to reach the backend again after it hangs up.
    reconnector: Reconnector,
    /// Counts the connections this device has had, so a watcher of an
    /// old one knows its hang-up no longer matters.
    connection: u64,
    state: BackendState,
    stats: BackendStats,
}

impl VhostUserDevice {
    /// A device that `handle`'s backend serves in `memory`; `process` is
    /// the backend if pvstack started it (stopped when the device drops).
    pub fn new(
        name: impl Into<String>,
        shape: DeviceShape,
        memory: GuestMemoryMmap,
        handle: VhostUserHandle,
        process: Option<BackendProcess>,
        reconnector: Reconnector,
    ) -> Self {
        VhostUserDevice {
            name: name.into(),
            shape,
            memory,
            handle,
            rings: None,
            process,
            reconnector,
            connection: 0,
            state: BackendState::Connected,
            stats: BackendStats::default(),
        }
    }

    /// The device's name in logs and in the control API.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the driver sees of the device.
    pub fn shape(&self) -> &DeviceShape {
        &self.shape
    }

    /// The connection to the backend.
    pub fn handle(&self) -> &VhostUserHandle {
        &self.handle
    }

    /// The backend process, if pvstack started it.
    pub fn process(&self) -> Option<&BackendProcess> {
        self.process.as_ref()
    }

    /// Whether the backend is serving the driver's queues.
    pub fn is_active(&self) -> bool {
        self.rings.is_some()
    }

    /// The device's backend, connection state and counters.
    pub fn status(&self) -> BackendStatus {
        BackendStatus {
            socket: self.handle.socket().to_path_buf(),
            pid: self.process.as_ref().map(BackendProcess::pid),
            state: self.state,
            active: self.rings.is_some(),
            inflight_log: self.handle.keeps_inflight_log(),
            stats: self.stats.clone(),
        }
    }

    /// The current connection's number and a duplicate of its socket, to
    /// watch for hang-up; `None` while no backend is connected.
    pub fn watch(&self) -> Result<Option<(u64, OwnedFd)>> {
        if self.state != BackendState::Connected {
            return Ok(None);
        }
        Ok(Some((self.connection, self.handle.watch_fd()?)))
    }

    /// The current connection's number (see [`Self::watch`]).
    pub fn connection(&self) -> u64 {
        self.connection
    }

    /// Moves the device to the backend listening on `socket`: connects
    /// and checks it first (a backend that cannot take over is refused and
    /// the old one keeps serving), then stops the rings on the old backend
    /// once the requests it took are complete, replays the ring setup to
    /// the new one, and resumes. Returns the stall: how long no backend
    /// served the rings.
    pub fn swap(&mut self, socket: &Path) -> Result<Duration> {
        let result = self.try_swap(socket);
        match &result {
            Ok(stall) => {
                self.stats.swaps.record(*stall);
                info!(
                    "{}: swapped to {} (stall {} us)",
                    self.name,
                    socket.display(),
                    stall.as_micros()
                );
            }
            Err(err) => {
                self.stats.refused_swaps += 1;
                warn!("{}: swap to {} refused: {err}", self.name, socket.display());
            }
        }
        result
    }

    fn try_swap(&mut self, socket: &Path) -> Result<Duration> {
        if self.state != BackendState::Connected {
            return Err(Error::Incompatible {
                socket: self.handle.socket().to_path_buf(),
                reason: "the device is reconnecting to its backend; swap once it is back".into(),
            });
        }
        let mut new = VhostUserHandle::connect(socket)?;
        self.check_config(&mut new)?;
        let mut began = Instant::now();
        if let Some(rings) = self.rings.as_mut() {
            new.check_takeover(rings)?;
            // The new backend keeps an inflight log of its own; the old
            // one's goes back to it if the swap fails.
            let old_inflight = rings.inflight.take();
            if let Err(err) = new.prepare(rings) {
                rings.inflight = old_inflight;
                return Err(err);
            }
            began = Instant::now();
            if let Err(err) = self.handle.stop(rings) {
                // The old backend is gone or broken: continue as after a
                // hang-up, from what the driver saw completed.
                warn!(
                    "{}: stopping the old backend failed ({err}); taking over from the used rings",
                    self.name
                );
                rewind_to_used(rings)?;
            }
            let stopped = began.elapsed();
            if let Err(err) = new.resume(rings) {
                // Give the rings back to the old backend where it stopped.
                rings.inflight = old_inflight;
                if let Err(again) = self.handle.start(rings) {
                    error!(
                        "{}: the old backend cannot resume either: {again}",
                        self.name
                    );
                }
                return Err(err);
            }
            let resumed = began.elapsed();
            wait_for_service(rings);
            debug!(
                "{}: old backend stopped in {} us, new one set up in {} us, serving after {} us",
                self.name,
                stopped.as_micros(),
                (resumed - stopped).as_micros(),
                began.elapsed().as_micros()
            );
        } else {
            let missing = self.shape.features & !new.backend_features();
            if missing != 0 {
                return Err(Error::Incompatible {
                    socket: socket.to_path_buf(),
                    reason: format!("it lacks offered features (missing bits {missing:#x})"),
                });
            }
        }
        let stall = began.elapsed();
        let socket = socket.to_path_buf();
        self.replace_connection(new, None);
        self.reconnector = Box::new(move || Ok((VhostUserHandle::connect(&socket)?, None)));
        Ok(stall)
    }

    /// Refuses a backend whose configuration space (disk capacity, for
    /// instance) differs from what the driver was shown.
    fn check_config(&self, new: &mut VhostUserHandle) -> Result<()> {
        let ConfigSource::Backend { takeover_check } = self.shape.config_source else {
            return Ok(());
        };
        let config = new.get_config(self.shape.config.len() as u32)?;
        match takeover_check(&self.shape.config, &config) {
            None => Ok(()),
            Some(reason) => Err(Error::Incompatible {
                socket: new.socket().to_path_buf(),
                reason,
            }),
        }
    }

    /// Makes `handle` the device's connection; the old one is shut down
    /// so its backend (and any watcher) sees the hang-up.
    fn replace_connection(&mut self, handle: VhostUserHandle, process: Option<BackendProcess>) {
        let old = std::mem::replace(&mut self.handle, handle);
        old.shut_down();
        drop(old);
        self.process = process;
        self.connection += 1;
        self.state = BackendState::Connected;
    }

    /// Marks the connection lost (the watcher saw a hang-up): the
    /// guest's requests wait in the rings until [`Self::try_reconnect`]
    /// succeeds.
    pub fn mark_lost(&mut self) {
        warn!(
            "{}: backend {} hung up; holding the device's requests while reconnecting",
            self.name,
            self.handle.socket().display()
        );
        self.state = BackendState::Reconnecting;
    }

    /// Marks reconnecting as given up.
    pub fn mark_failed(&mut self) {
        error!(
            "{}: gave up reconnecting to {}; the device's requests wait forever",
            self.name,
            self.handle.socket().display()
        );
        self.state = BackendState::Failed;
    }

    /// One attempt to reach the backend again after it hung up (`began`
    /// is when), and to resume the rings where the driver last saw
    /// completions. The previous backend cannot be asked where it
    /// stopped, so the rings restart at the used ring's index, as QEMU's
    /// do. A backend that keeps an inflight log (pvstack-blk,
    /// qemu-storage-daemon) gets the log its predecessor wrote, serves
    /// again exactly the requests that were taken and not completed, in
    /// the order they were taken, and moves on past them; one without
    /// serves every request from the used index on again, which is exact
    /// only if it completes each queue's requests in order.
    pub fn try_reconnect(&mut self, began: Instant) -> Result<()> {
        // A crashed child is reaped before a new one starts.
        self.process = None;
        let (mut new, process) = (self.reconnector)()?;
        self.check_config(&mut new)?;
        if let Some(rings) = self.rings.as_mut() {
            rewind_to_used(rings)?;
            new.check_takeover(rings)?;
            new.start(rings)?;
            wait_for_service(rings);
        }
        self.replace_connection(new, process);
        let stall = began.elapsed();
        self.stats.reconnects.record(stall);
        info!(
            "{}: reconnected to {} (stall {} us)",
            self.name,
            self.handle.socket().display(),
            stall.as_micros()
        );
        Ok(())
    }

    /// Ends the current connection on request and reconnects at once
    /// (the `device reconnect` command): the rings are stopped cleanly
    /// first, so nothing is served twice.
    pub fn reconnect(&mut self) -> Result<Duration> {
        let began = Instant::now();
        if let Some(rings) = self.rings.as_mut() {
            if let Err(err) = self.handle.stop(rings) {
                warn!(
                    "{}: cannot stop the rings before reconnecting: {err}",
                    self.name
                );
            }
        }
        self.handle.shut_down();
        self.state = BackendState::Reconnecting;
        self.try_reconnect(began)?;
        Ok(began.elapsed())
    }
}

/// How long [`wait_for_service`] waits for a new backend's first completion.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(1);

/// Waits until the backend that just started on `rings` completes a
/// request on each queue where requests were waiting, so the stall
/// recorded is what the guest sees (the backend's threads must also be
/// scheduled) rather than only the setup messages. Gives up quietly after
/// [`SERVICE_TIMEOUT`]; the stall then says so.
fn wait_for_service(rings: &RingSetup) {
    let started = Instant::now();
    for queue in &rings.queues {
        let waiting = |memory| {
            let used = used_idx(memory, queue).ok()?;
            let avail = avail_idx(memory, queue).ok()?;
            Some(used == queue.next_avail && avail != queue.next_avail)
        };
        while waiting(&rings.memory) == Some(true) && started.elapsed() < SERVICE_TIMEOUT {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// Sets every queue to resume at its used ring's index: the requests the
/// driver has not seen completed are served again.
fn rewind_to_used(rings: &mut RingSetup) -> Result<()> {
    for queue in &mut rings.queues {
        queue.next_avail = used_idx(&rings.memory, queue)?;
    }
    Ok(())
}

impl VirtioDevice for VhostUserDevice {
    fn device_id(&self) -> u32 {
        self.shape.device_id
    }

    fn features(&self) -> u64 {
        self.shape.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.shape.queue_max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.shape.config, offset, data);
    }

    fn activate(&mut self, activation: Activation<'_>) -> Result<()> {
        let mut queues = Vec::new();
        for (index, (config, kick)) in
            (0u16..).zip(activation.queues.iter().zip(&activation.events.kicks))
        {
            if config.ready {
                queues.push(ActiveQueue {
                    index,
                    config: *config,
                    next_avail: 0,
                    kick: clone_eventfd(kick, format!("{} queue {index} kicks", self.name))?,
                });
            }
        }
        let mut setup = RingSetup {
            features: activation.features,
            memory: self.memory.clone(),
            queues,
            call: clone_eventfd(&activation.events.call, format!("{} interrupts", self.name))?,
            inflight: None,
        };
        self.handle.start(&mut setup)?;
        info!(
            "{}: driver started {} queues on {}",
            self.name,
            setup.queues.len(),
            self.handle.socket().display()
        );
        self.rings = Some(setup);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut rings) = self.rings.take() {
            match self.handle.stop(&mut rings) {
                Ok(()) => info!("{}: driver reset the device; rings stopped", self.name),
                Err(err) => error!("{}: cannot stop the rings on reset: {err}", self.name),
            }
        }
    }

    /// The backend raises the interrupt itself, through the irqfd, so the
    /// VMM never learns why an interrupt came. Linux's virtio-mmio handler
    /// reads InterruptStatus first and ignores an interrupt that shows no
    /// reason (and eventually disables a line that keeps doing that), so
    /// while the backend serves the queues, report "used buffers" always:
    /// a driver that then finds nothing new in its used rings loses only
    /// the look. Configuration changes never happen here.
    fn interrupt_status(&self) -> u32 {
        if self.rings.is_some() {
            VIRTIO_MMIO_INT_VRING
        } else {
            0
        }
    }
}
