//! [`VhostUserDevice`]: a virtio device whose queues a backend process
//! serves. The device is the same for every device type; what differs
//! (features, queue sizes, configuration space) is worked out by the
//! device-specific constructor (see `crate::blk`) and passed in a
//! [`DeviceShape`].
//!
//! Moving the device to another backend connection (a swap, a reconnect)
//! happens in steps so that the device's lock, which every vCPU touching
//! the device takes, is never held while pvstack waits for a backend to
//! accept a connection, negotiate or start: the new connection is made
//! and checked first without the lock (a [`SwapAttempt`] or
//! [`ReconnectAttempt`]), and the lock is taken only to install it and
//! replay the ring setup. `super::control` runs those steps.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use pvstack_logging::{info_limited, warn_limited};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use vm_memory::GuestMemoryMmap;

use super::connection::BackendConnection;
use super::control::{WeakVhostUserDevice, DRAIN_TIMEOUT};
use super::handle::{check_rings, ActiveQueue, InflightLog, RingSetup, VhostUserHandle};
use super::peer::AllowedBackend;
use super::process::BackendProcess;
use super::reset::{self, StandIn, Stopped};
use super::stall::StallStats;
use super::watch::{used_idx, RingWatch};
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

/// A connection to a backend, and the backend's process if pvstack started it.
pub type Connected = (Box<dyn BackendConnection>, Option<BackendProcess>);

/// Connects to the device's backend again (starting a new child for a
/// backend pvstack runs itself): what crash recovery and `reconnect` use.
pub type Reconnector = Box<dyn FnMut() -> Result<Connected> + Send>;

/// Connects to the backend listening on a socket: what a swap uses.
pub type Connector = Arc<dyn Fn(&Path) -> Result<Box<dyn BackendConnection>> + Send + Sync>;

/// The real [`Connector`]: a vhost-user connection to a backend `allowed`
/// lets serve the device, negotiated.
fn vhost_user_connector(allowed: AllowedBackend) -> Connector {
    Arc::new(move |socket| Ok(Box::new(VhostUserHandle::connect(socket, allowed)?)))
}

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
    /// The virtio device id (1 net, 2 block, 3 console).
    pub device_id: u32,
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

/// Checks a new backend's configuration space against what the driver
/// was shown; a copy of the device's, so it runs without the device's lock.
#[derive(Clone, Debug)]
struct ConfigCheck {
    shown: Vec<u8>,
    source: ConfigSource,
}

impl ConfigCheck {
    /// Refuses a backend whose configuration space (disk capacity, for
    /// instance) differs from what the driver was shown.
    fn check(&self, new: &mut dyn BackendConnection) -> Result<()> {
        let ConfigSource::Backend { takeover_check } = self.source else {
            return Ok(());
        };
        let config = new.get_config(self.shown.len() as u32)?;
        match takeover_check(&self.shown, &config) {
            None => Ok(()),
            Some(reason) => Err(Error::Incompatible {
                socket: new.socket().to_path_buf(),
                reason,
            }),
        }
    }
}

/// A reconnect attempt: reaching the backend again, made without the
/// device's lock; [`VhostUserDevice::finish_reconnect`] installs it.
pub struct ReconnectAttempt {
    reconnector: Arc<Mutex<Reconnector>>,
    config: ConfigCheck,
}

impl ReconnectAttempt {
    /// Waits for this device's turn to reconnect. One attempt at a time,
    /// from connecting to installing: when the supervisor and a `device
    /// reconnect` request both try, the second must see the first's
    /// connection installed rather than connect as well, since a backend
    /// serves one frontend at a time and would leave it waiting for
    /// replies. Taken without the device's lock, which it may take.
    pub fn turn(&self) -> MutexGuard<'_, Reconnector> {
        self.reconnector
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Connects with `turn` (starting a new child backend for one pvstack
    /// runs itself), negotiates and checks the configuration space.
    pub fn connect(&self, turn: &mut Reconnector) -> Result<Connected> {
        let (mut new, process) = turn()?;
        self.config.check(new.as_mut())?;
        Ok((new, process))
    }
}

/// What became of a connection offered to a device that had lost its own.
pub enum Reconnected {
    /// It serves the device now; the watch (if the driver runs the
    /// device) sees when it first completes a waiting request.
    Installed(Option<RingWatch>, Retired),
    /// Another connection was installed first; this one was dropped.
    AlreadyConnected,
}

/// A connection the device no longer uses, already shut down, with the
/// backend process pvstack had started for it. Dropping it joins the
/// connection's reply watchdog thread and stops that process, hundreds
/// of microseconds or more on a busy host: the caller drops it once the
/// new backend serves, without the device's lock, so neither the guest's
/// stall nor the vCPUs wait for it.
#[must_use = "drop it once the new backend serves, without the device's lock"]
pub struct Retired {
    // Declared in this order so the connection closes before the process
    // is stopped.
    _handle: Box<dyn BackendConnection>,
    _process: Option<BackendProcess>,
}

/// The first step of a swap: connecting to the new backend and checking
/// it, without the device's lock.
pub struct SwapAttempt {
    connector: Connector,
    config: ConfigCheck,
    socket: PathBuf,
    /// The device's connection when the swap began.
    connection: u64,
}

impl SwapAttempt {
    /// Connects to the new backend, negotiates and checks its
    /// configuration space.
    pub fn connect(&self) -> Result<Box<dyn BackendConnection>> {
        let mut new = (self.connector)(&self.socket)?;
        self.config.check(new.as_mut())?;
        Ok(new)
    }
}

/// A swap whose new backend is prepared and whose old one is stopped,
/// while the old one completes what it had taken (waited for without the
/// device's lock); [`VhostUserDevice::finish_swap`] ends it.
pub struct SwapInProgress {
    socket: PathBuf,
    new: Box<dyn BackendConnection>,
    /// The old backend's inflight log, given back to it if the swap fails.
    old_inflight: Option<InflightLog>,
    /// What to wait for before the new backend may resume the rings;
    /// `None` if the device was inactive or the old backend could not be
    /// stopped (then the new one takes over from the used rings).
    drain: Option<RingWatch>,
    connection: u64,
    activation: u64,
    began: Instant,
}

impl SwapInProgress {
    /// When no backend began serving the rings any more.
    pub fn began(&self) -> Instant {
        self.began
    }

    /// The old backend's requests still to complete.
    pub fn drain(&self) -> Option<&RingWatch> {
        self.drain.as_ref()
    }
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    /// Names the device in log lines.
    name: String,
    shape: DeviceShape,
    memory: GuestMemoryMmap,
    handle: Box<dyn BackendConnection>,
    /// What the backend was set up with, while the driver runs the device.
    rings: Option<RingSetup>,
    /// The driver started the device while no backend was connected, so
    /// no backend has served `rings` yet: the first one starts them at 0.
    rings_unserved: bool,
    /// The backend process, if pvstack started it. Declared after the
    /// handle so the connection closes before the process is stopped.
    process: Option<BackendProcess>,
    /// How to reach the backend again after it hangs up; shared with
    /// reconnect attempts in progress, replaced (not changed) by a swap.
    reconnector: Arc<Mutex<Reconnector>>,
    /// How to reach the backend a swap names.
    connector: Connector,
    /// Counts the connections this device has had, so a watcher of an
    /// old one knows its hang-up no longer matters.
    connection: u64,
    /// Counts the driver's starts and resets, so a swap that waited
    /// without the lock knows whether its rings are still the driver's.
    activation: u64,
    /// The driver's features already acknowledged on an adopted
    /// connection (see [`Self::acknowledge_features`]).
    acknowledged: Option<u64>,
    /// The rings were adopted from another pvstack (see
    /// [`Self::adopt_rings`]): the backend knows guest memory by that
    /// process's addresses until it is given this one's memory table.
    adopted: bool,
    state: BackendState,
    stats: BackendStats,
    /// The device behind its transport, where a driver's reset finishes
    /// from its own thread (see [`super::reset`]); set by
    /// [`Self::attach`].
    this: Option<WeakVhostUserDevice>,
    /// A driver's reset is stopping the backend's rings on its own thread,
    /// which holds the connection; `handle` is a [`StandIn`] meanwhile.
    resetting: bool,
}

impl VhostUserDevice {
    /// A device that `handle`'s backend serves in `memory`; `process` is
    /// the backend if pvstack started it (stopped when the device drops).
    /// `reconnect` reaches the same backend again (see [`Reconnector`]);
    /// a swap connects to backends `allowed` lets serve the device.
    pub fn new(
        name: impl Into<String>,
        shape: DeviceShape,
        memory: GuestMemoryMmap,
        handle: VhostUserHandle,
        process: Option<BackendProcess>,
        mut reconnect: impl FnMut() -> Result<(VhostUserHandle, Option<BackendProcess>)>
            + Send
            + 'static,
        allowed: AllowedBackend,
    ) -> Self {
        let reconnector: Reconnector = Box::new(move || {
            let (handle, process) = reconnect()?;
            Ok((Box::new(handle), process))
        });
        Self::with_connection(
            name,
            shape,
            memory,
            (Box::new(handle), process),
            reconnector,
            vhost_user_connector(allowed),
        )
    }

    /// A device on any [`BackendConnection`]: `connected` serves it now,
    /// `reconnector` reaches it again after a hang-up, `connector` reaches
    /// the backend a swap names.
    fn with_connection(
        name: impl Into<String>,
        shape: DeviceShape,
        memory: GuestMemoryMmap,
        (handle, process): Connected,
        reconnector: Reconnector,
        connector: Connector,
    ) -> Self {
        VhostUserDevice {
            name: name.into(),
            shape,
            memory,
            handle,
            rings: None,
            rings_unserved: false,
            process,
            reconnector: Arc::new(Mutex::new(reconnector)),
            connector,
            connection: 0,
            activation: 0,
            acknowledged: None,
            adopted: false,
            state: BackendState::Connected,
            stats: BackendStats::default(),
            this: None,
            resetting: false,
        }
    }

    /// Tells the device where it lives (behind its transport), so a
    /// driver's reset can finish from a thread of its own.
    pub fn attach(&mut self, this: WeakVhostUserDevice) {
        self.this = Some(this);
    }

    /// The device's name in logs and in the control API.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the driver sees of the device.
    pub fn shape(&self) -> &DeviceShape {
        &self.shape
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
            device_id: self.shape.device_id,
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
    /// `None` too while a driver's reset has the connection (its thread
    /// sees a hang-up itself).
    pub fn watch(&self) -> Result<Option<(u64, OwnedFd)>> {
        if self.state != BackendState::Connected || self.resetting {
            return Ok(None);
        }
        Ok(Some((self.connection, self.handle.watch_fd()?)))
    }

    /// The current connection's number (see [`Self::watch`]).
    pub fn connection(&self) -> u64 {
        self.connection
    }

    /// Counts the driver's starts and resets of the device.
    pub fn activation(&self) -> u64 {
        self.activation
    }

    fn config_check(&self) -> ConfigCheck {
        ConfigCheck {
            shown: self.shape.config.clone(),
            source: self.shape.config_source,
        }
    }

    /// Begins a swap to the backend listening on `socket`; refused while
    /// the device has no backend to swap from.
    pub fn swap_attempt(&self, socket: &Path) -> Result<SwapAttempt> {
        self.require_connected("swap")?;
        Ok(SwapAttempt {
            connector: self.connector.clone(),
            config: self.config_check(),
            socket: socket.to_path_buf(),
            connection: self.connection,
        })
    }

    /// Checks that `new` (connected by `attempt`) can take over the rings
    /// and prepares it while the old backend still serves, then stops the
    /// old backend. A backend that cannot take over is refused here and
    /// the old one keeps serving.
    pub fn stop_for_swap(
        &mut self,
        attempt: SwapAttempt,
        mut new: Box<dyn BackendConnection>,
    ) -> Result<SwapInProgress> {
        if self.connection != attempt.connection
            || self.state != BackendState::Connected
            || self.resetting
        {
            return Err(Error::Incompatible {
                socket: attempt.socket,
                reason: "the device's own backend connection changed meanwhile; try again".into(),
            });
        }
        let mut old_inflight = None;
        let mut drain = None;
        let mut began = Instant::now();
        if let Some(rings) = self.rings.as_mut() {
            new.check_takeover(rings)?;
            // The new backend keeps an inflight log of its own; the old
            // one's goes back to it if the swap fails.
            old_inflight = rings.inflight.take();
            if let Err(err) = new.prepare(rings) {
                rings.inflight = old_inflight;
                return Err(err);
            }
            began = Instant::now();
            match self.handle.stop(rings) {
                Ok(()) => drain = Some(RingWatch::of(rings)),
                // The old backend is gone or broken: continue as after a
                // hang-up, from what the driver saw completed.
                Err(err) => warn!(
                    "{}: stopping the old backend failed ({err}); taking over from the used rings",
                    self.name
                ),
            }
        } else {
            let missing = self.shape.features & !new.backend_features();
            if missing != 0 {
                return Err(Error::MissingFeatures {
                    socket: attempt.socket,
                    missing,
                });
            }
        }
        Ok(SwapInProgress {
            socket: attempt.socket,
            new,
            old_inflight,
            drain,
            connection: self.connection,
            activation: self.activation,
            began,
        })
    }

    /// Ends a swap once the old backend has drained (`drained`): resumes
    /// the rings on the new backend and makes it the device's. If the
    /// rings cannot resume there, they go back to the old backend. Returns
    /// a watch of the rings (when the driver runs the device) to see the
    /// new backend's first completion.
    pub fn finish_swap(
        &mut self,
        progress: SwapInProgress,
        drained: Result<()>,
    ) -> Result<(Option<RingWatch>, Retired)> {
        let SwapInProgress {
            socket,
            mut new,
            old_inflight,
            drain,
            connection,
            activation,
            ..
        } = progress;
        let abandon = |new: &mut Box<dyn BackendConnection>, reason: &str| {
            new.shut_down();
            Err(Error::Incompatible {
                socket: socket.clone(),
                reason: reason.into(),
            })
        };
        if self.connection != connection {
            return abandon(
                &mut new,
                "the device reconnected to its old backend during the swap",
            );
        }
        let mut watch = None;
        if self.activation != activation {
            // The driver reset the device while the old backend drained.
            if self.rings.is_some() {
                return abandon(
                    &mut new,
                    "the driver restarted the device during the swap, on its old backend",
                );
            }
            // Inactive now: the new backend is set up when the driver
            // starts the device again.
        } else if let Some(rings) = self.rings.as_mut() {
            let clean = drain.is_some() && drained.is_ok();
            if let Err(err) = drained {
                warn!(
                    "{}: {err}; the new backend takes over from the used rings",
                    self.name
                );
            }
            if !clean {
                rewind_to_used(rings)?;
            }
            if let Err(err) = new.resume(rings) {
                // Give the rings back to the old backend where it stopped.
                rings.inflight = old_inflight;
                if let Err(again) = self.handle.start(rings) {
                    error!(
                        "{}: the old backend cannot resume either: {again}",
                        self.name
                    );
                    self.lose_connection();
                } else {
                    interrupt_driver(&self.name, rings);
                }
                return Err(err);
            }
            interrupt_driver(&self.name, rings);
            watch = Some(RingWatch::of(rings));
        }
        let retired = self.replace_connection(new, None);
        let connect = self.connector.clone();
        let reconnect: Reconnector = Box::new(move || Ok((connect(&socket)?, None)));
        self.reconnector = Arc::new(Mutex::new(reconnect));
        Ok((watch, retired))
    }

    /// Counts a swap to `socket` that succeeded with `stall` or failed.
    pub fn record_swap(&mut self, socket: &Path, result: &Result<Duration>) {
        match result {
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
    }

    /// Makes `handle` the device's connection; the old one is shut down
    /// so its backend (and any watcher) sees the hang-up, and returned.
    fn replace_connection(
        &mut self,
        handle: Box<dyn BackendConnection>,
        process: Option<BackendProcess>,
    ) -> Retired {
        let old = std::mem::replace(&mut self.handle, handle);
        old.shut_down();
        // A new connection gets the whole setup, memory table included.
        self.adopted = false;
        let old_process = std::mem::replace(&mut self.process, process);
        self.connection += 1;
        self.state = BackendState::Connected;
        self.resetting = false;
        Retired {
            _handle: old,
            _process: old_process,
        }
    }

    /// Ends the current connection: the guest's requests wait in the
    /// rings until a reconnect attempt succeeds.
    fn lose_connection(&mut self) {
        self.handle.shut_down();
        self.state = BackendState::Reconnecting;
        // A reset's thread still holding the old connection ends it.
        self.resetting = false;
    }

    /// Marks the connection lost (the watcher saw a hang-up): the
    /// guest's requests wait in the rings until a reconnect succeeds.
    pub fn mark_lost(&mut self) {
        if self.state == BackendState::Connected {
            // A backend that crashes at once after each reconnect would
            // otherwise write this without end.
            warn_limited!(
                "{}: backend {} hung up; holding the device's requests while reconnecting",
                self.name,
                self.handle.socket().display()
            );
            self.state = BackendState::Reconnecting;
            self.resetting = false;
        }
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

    /// What a reconnect attempt needs, to be made without the lock.
    pub fn reconnect_attempt(&self) -> ReconnectAttempt {
        ReconnectAttempt {
            reconnector: self.reconnector.clone(),
            config: self.config_check(),
        }
    }

    /// Installs a connection a [`ReconnectAttempt`] made, unless another
    /// got there first, and resumes the rings where the driver last saw
    /// completions. The previous backend cannot be asked where it
    /// stopped, so the rings restart at the used ring's index, as QEMU's
    /// do. A backend that keeps an inflight log (pvstack-blk,
    /// qemu-storage-daemon) gets the log its predecessor wrote, serves
    /// again exactly the requests that were taken and not completed, in
    /// the order they were taken, and moves on past them; one without
    /// serves every request from the used index on again, which is exact
    /// only if it completes each queue's requests in order.
    pub fn finish_reconnect(&mut self, (mut new, process): Connected) -> Result<Reconnected> {
        if self.state == BackendState::Connected {
            new.shut_down();
            return Ok(Reconnected::AlreadyConnected);
        }
        let mut watch = None;
        if let Some(rings) = self.rings.as_mut() {
            if !self.rings_unserved {
                rewind_to_used(rings)?;
            }
            new.check_takeover(rings)?;
            new.start(rings)?;
            interrupt_driver(&self.name, rings);
            self.rings_unserved = false;
            watch = Some(RingWatch::of(rings));
        }
        let retired = self.replace_connection(new, process);
        Ok(Reconnected::Installed(watch, retired))
    }

    /// Counts a reconnect that held the rings for `stall`.
    pub fn record_reconnect(&mut self, stall: Duration) {
        self.stats.reconnects.record(stall);
        info!(
            "{}: reconnected to {} (stall {} us)",
            self.name,
            self.handle.socket().display(),
            stall.as_micros()
        );
    }

    /// Stops the rings on the current backend before a requested
    /// reconnect, so nothing is served twice; returns what to drain.
    pub fn stop_for_reconnect(&mut self) -> Option<RingWatch> {
        if self.state != BackendState::Connected || self.resetting {
            return None;
        }
        let rings = self.rings.as_mut()?;
        match self.handle.stop(rings) {
            Ok(()) => Some(RingWatch::of(rings)),
            Err(err) => {
                warn!(
                    "{}: cannot stop the rings before reconnecting: {err}",
                    self.name
                );
                None
            }
        }
    }

    /// Ends a driver's reset whose thread is done with the connection
    /// (`stopped`: it, and whether its rings stopped), taken from the
    /// device when its connection number was `number`: gives the
    /// connection back. (The driver cannot start the device meanwhile: the
    /// transport ignores status writes until the reset is done.) A backend
    /// that did not stop in time, or a connection the device has moved on
    /// from, is dropped.
    pub fn finish_reset(&mut self, stopped: Stopped, number: u64) {
        let Stopped {
            connection,
            outcome,
        } = stopped;
        if !self.resetting || self.connection != number {
            connection.shut_down();
            return;
        }
        self.resetting = false;
        // The stand-in goes; it holds nothing of the backend.
        drop(std::mem::replace(&mut self.handle, connection));
        if let Err(err) = outcome {
            warn_limited!(
                "{}: driver reset the device, and the backend did not stop in time ({err}); dropping its connection so it serves nothing more, and reconnecting",
                self.name
            );
            self.lose_connection();
            return;
        }
        info_limited!("{}: driver reset the device; rings stopped", self.name);
    }

    /// Ends the current connection on request; a reconnect follows.
    pub fn drop_connection(&mut self) {
        info!(
            "{}: disconnecting from {} to reconnect",
            self.name,
            self.handle.socket().display()
        );
        self.lose_connection();
    }
}

/// Where a stopped queue left off: what a snapshot records per queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingPosition {
    pub queue: u16,
    pub next_avail: u16,
}

/// Snapshots and take-overs: stopping the rings where they stand, starting
/// them again there (on this or another backend), and adopting rings that
/// a backend serves for another pvstack.
impl VhostUserDevice {
    /// The ring setup for what the driver programmed, every queue at 0.
    fn ring_setup(&self, activation: &Activation<'_>) -> Result<RingSetup> {
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
        Ok(RingSetup {
            features: activation.features,
            memory: self.memory.clone(),
            queues,
            call: clone_eventfd(&activation.events.call, format!("{} interrupts", self.name))?,
            inflight: None,
        })
    }

    /// Whether the backend is connected, so its rings can be stopped or
    /// its connection handed over.
    fn require_connected(&self, what: &str) -> Result<()> {
        let reason = if self.state != BackendState::Connected {
            format!("the device is reconnecting to its backend; {what} once it is back")
        } else if self.resetting {
            format!("the driver is resetting the device; {what} once its backend has stopped")
        } else {
            return Ok(());
        };
        Err(Error::Incompatible {
            socket: self.handle.socket().to_path_buf(),
            reason,
        })
    }

    /// Stops the backend's rings as a swap does (disable, GET_VRING_BASE,
    /// wait until everything taken is complete) and returns where each
    /// queue stands; nothing of the device is in flight afterwards. Empty
    /// while the driver does not run the device.
    pub fn stop_rings(&mut self) -> Result<Vec<RingPosition>> {
        self.require_connected("snapshot")?;
        let Some(rings) = self.rings.as_mut() else {
            return Ok(Vec::new());
        };
        self.handle.stop(rings)?;
        // The backend may answer GET_VRING_BASE before it completed what it
        // took; nothing may be in flight once this returns.
        RingWatch::of(rings).drain(DRAIN_TIMEOUT)?;
        Ok(rings
            .queues
            .iter()
            .map(|q| RingPosition {
                queue: q.index,
                next_avail: q.next_avail,
            })
            .collect())
    }

    /// Starts the rings [`Self::stop_rings`] stopped again, on the same backend.
    pub fn resume_rings(&mut self) -> Result<()> {
        let Some(rings) = self.rings.as_mut() else {
            return Ok(());
        };
        if self.adopted {
            // Ring addresses go by this process's mapping of guest
            // memory, which the backend learns only from a memory table
            // sent here: set the stopped (and drained) rings up again.
            self.handle.start(rings)?;
            self.adopted = false;
        } else {
            self.handle.resume(rings)?;
        }
        interrupt_driver(&self.name, rings);
        Ok(())
    }

    /// Starts the rings the driver programmed (`activation`) on this
    /// device's backend at `positions` (a restored snapshot).
    pub fn restore_rings(
        &mut self,
        activation: Activation<'_>,
        positions: &[RingPosition],
    ) -> Result<()> {
        let mut setup = self.ring_setup(&activation)?;
        for queue in &mut setup.queues {
            let position = positions.iter().find(|p| p.queue == queue.index);
            let Some(position) = position else {
                return Err(Error::Restore {
                    device: self.name.clone(),
                    reason: format!(
                        "the snapshot has no ring position for queue {}",
                        queue.index
                    ),
                });
            };
            queue.next_avail = position.next_avail;
        }
        self.handle.start(&mut setup)?;
        self.activation += 1;
        self.rings_unserved = false;
        info!(
            "{}: rings restored on {} at {positions:?}",
            self.name,
            self.handle.socket().display()
        );
        self.rings = Some(setup);
        Ok(())
    }

    /// Takes over rings that the backend keeps serving for the pvstack
    /// that handed this device over: records what the driver programmed
    /// and the backend's inflight log without stopping or restarting
    /// anything (only this side learns the features).
    pub fn adopt_rings(
        &mut self,
        activation: Activation<'_>,
        inflight: Option<InflightLog>,
    ) -> Result<()> {
        let mut setup = self.ring_setup(&activation)?;
        setup.inflight = inflight;
        if self.acknowledged != Some(setup.features) {
            self.handle.acknowledge_features(setup.features)?;
        }
        self.adopted = true;
        self.activation += 1;
        self.rings_unserved = false;
        self.rings = Some(setup);
        Ok(())
    }

    /// Tells the adopted connection (see [`Self::adopt_rings`]) ahead of
    /// time which features the driver took, so that adopting the rings
    /// with the same features asks the backend nothing (a take-over does
    /// this before it pauses the guest).
    pub fn acknowledge_features(&mut self, features: u64) -> Result<()> {
        self.handle.acknowledge_features(features)?;
        self.acknowledged = Some(features);
        Ok(())
    }

    /// The features the driver took, while it runs the device.
    pub fn driver_features(&self) -> Option<u64> {
        self.rings.as_ref().map(|rings| rings.features)
    }

    /// The inflight log of the running rings, if the backend keeps one.
    pub fn inflight_log(&self) -> Option<&InflightLog> {
        self.rings.as_ref().and_then(|r| r.inflight.as_ref())
    }

    /// A duplicate of the connection to the backend, to hand it over to
    /// another pvstack; refused while reconnecting.
    pub fn connection_fd(&self) -> Result<OwnedFd> {
        self.require_connected("hand the device over")?;
        self.handle.watch_fd()
    }
}

/// Interrupts the driver of device `name` once after its rings were
/// stopped and started again (on another backend, or on the same one
/// after a snapshot), so it looks at its used rings: the backend that had
/// them may have completed requests without an interrupt.
/// qemu-storage-daemon closes its interrupt eventfd when it answers
/// GET_VRING_BASE, and a request that completes after that reaches the
/// used ring with none ("vu_panic: Error writing eventfd: Bad file
/// descriptor"); a backend that died may have completed one just before.
/// The driver would wait for that interrupt for ever. A look that finds
/// nothing new costs it one interrupt.
fn interrupt_driver(name: &str, rings: &RingSetup) {
    if let Err(err) = rings.call.write(1) {
        // Only a counter at its maximum refuses: an interrupt is pending.
        warn!("{name}: cannot raise the interrupt after the move: {err}");
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

    /// Sets the backend up on the driver's rings. Rings outside guest RAM
    /// are the driver's error; a backend that fails to start them loses
    /// its connection, and the rings wait, as after a hang-up, for the
    /// backend that reconnects. The same when no backend is connected.
    fn activate(&mut self, activation: Activation<'_>) -> Result<()> {
        let mut setup = self.ring_setup(&activation)?;
        check_rings(&setup)?;
        self.activation += 1;
        self.rings_unserved = false;
        // The backend gets this process's memory table below (or a new
        // connection gets it).
        self.adopted = false;
        if self.state != BackendState::Connected {
            info_limited!(
                "{}: driver started {} queues; they wait for the backend to reconnect",
                self.name,
                setup.queues.len()
            );
            self.rings_unserved = true;
        } else if let Err(err) = self.handle.start(&mut setup) {
            warn_limited!(
                "{}: the backend failed to start the rings ({err}); they wait while pvstack reconnects",
                self.name
            );
            self.lose_connection();
        } else {
            info_limited!(
                "{}: driver started {} queues on {}",
                self.name,
                setup.queues.len(),
                self.handle.socket().display()
            );
        }
        self.rings = Some(setup);
        Ok(())
    }

    /// Stops the rings: the backend must stop taking requests and, within
    /// [`reset::RESET_DRAIN_TIMEOUT`], complete those it took. That runs on
    /// a thread of its own ([`reset::spawn_stop`]), so the vCPU and the
    /// device's lock are free at once; the status register reads 0 once
    /// it is done ([`VirtioDevice::reset_pending`]). A backend that fails
    /// loses its connection and is reconnected.
    fn reset(&mut self) {
        self.activation += 1;
        let Some(rings) = self.rings.take() else {
            return;
        };
        if self.state != BackendState::Connected || self.rings_unserved || self.resetting {
            return;
        }
        let Some(this) = self.this.clone() else {
            // Only a device outside a transport (never on the bus) has
            // nowhere to finish a reset: stop serving the rings at once.
            warn_limited!(
                "{}: reset outside a transport; dropping the backend's connection",
                self.name
            );
            self.lose_connection();
            return;
        };
        let stand_in: Box<dyn BackendConnection> = Box::new(StandIn::of(self.handle.as_ref()));
        let connection = std::mem::replace(&mut self.handle, stand_in);
        self.resetting = true;
        match reset::spawn_stop(&self.name, this, connection, rings, self.connection) {
            Ok(handoff) => {
                if let Some(stopped) = handoff.wait(reset::RESET_VCPU_WAIT) {
                    self.finish_reset(stopped, self.connection);
                }
            }
            Err(err) => {
                warn_limited!(
                    "{}: cannot start the reset's thread ({err}); the backend's connection is closed, reconnecting",
                    self.name
                );
                self.lose_connection();
            }
        }
    }

    fn reset_pending(&self) -> bool {
        self.resetting
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

#[cfg(test)]
mod tests {
    //! The device's swap, reconnect and rewind decisions, driven with
    //! scripted connections in place of backends (the integration tests in
    //! tests/ run the same paths against real pvstack-blk processes), and
    //! the device's lock staying free while a connection is being made.

    use std::io;
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::sync::mpsc;
    use std::sync::{Arc, Condvar, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    };
    use virtio_bindings::virtio_mmio::*;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::bus::BusDevice;
    use crate::vhost_user::control::{self, lock};
    use crate::vhost_user::supervisor::{self, ReconnectPolicy, SharedVhostUserDevice};
    use crate::virtio::DeviceEvents;

    const VERSION_1: u64 = 1 << 32;
    const EXTRA_FEATURE: u64 = 1 << 9;
    const DESC_TABLE: u64 = 0x1000;
    const AVAIL_RING: u64 = 0x2000;
    const USED_RING: u64 = 0x3000;
    const AVAIL_IDX: u64 = AVAIL_RING + 2;
    const USED_IDX: u64 = USED_RING + 2;
    /// Only turns a hang into a failure.
    const HANG: Duration = Duration::from_secs(30);

    /// A door a scripted connect waits at until the test opens it.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<(bool, bool)>, Condvar)>);

    impl Gate {
        /// Called by the connect: says it is here, waits to be let through.
        fn pass(&self) {
            let (state, changed) = &*self.0;
            let mut state = state.lock().unwrap();
            state.0 = true;
            changed.notify_all();
            while !state.1 {
                state = changed.wait(state).unwrap();
            }
        }

        /// Waits until a connect is waiting at the gate.
        fn wait_for_arrival(&self) {
            let (state, changed) = &*self.0;
            let state = state.lock().unwrap();
            let (state, timeout) = changed
                .wait_timeout_while(state, HANG, |state| !state.0)
                .unwrap();
            assert!(!timeout.timed_out() && state.0, "nothing reached the gate");
        }

        fn open(&self) {
            let (state, changed) = &*self.0;
            state.lock().unwrap().1 = true;
            changed.notify_all();
        }
    }

    /// What a scripted backend offers and which of its steps fail.
    #[derive(Clone)]
    struct Script {
        features: u64,
        queues: u64,
        fail_prepare: bool,
        fail_resume: bool,
        fail_stop: bool,
        /// `stop` completes every request taken (else they stay in flight).
        completes: bool,
        /// Connecting waits at this gate.
        gate: Option<Gate>,
        /// Stopping the rings waits at this gate.
        stop_gate: Option<Gate>,
    }

    impl Default for Script {
        fn default() -> Self {
            Script {
                features: VERSION_1,
                queues: 1,
                fail_prepare: false,
                fail_resume: false,
                fail_stop: false,
                completes: true,
                gate: None,
                stop_gate: None,
            }
        }
    }

    /// The steps every scripted backend of one test took, in order.
    type Log = Arc<Mutex<Vec<String>>>;

    /// A backend that records each step in the test's log. It serves like
    /// a well-behaved backend: `stop` reports the available index as its
    /// base and (unless told otherwise) completes every request it took;
    /// `resume` completes whatever waits.
    struct Scripted {
        name: String,
        socket: PathBuf,
        script: Script,
        log: Log,
        /// Our end of a socket pair whose other end the test may drop to
        /// play a hang-up.
        watched: UnixStream,
    }

    /// A backend a test registered: its socket, script, the test's log,
    /// and its end of the connection until something connects.
    type Registered = (PathBuf, Script, Log, Option<UnixStream>);

    /// Backends tests registered, for [`connect_scripted`].
    static BACKENDS: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

    /// Makes a scripted backend reachable at `socket`; returns the peer
    /// end of its connection (drop it to hang up).
    fn listen(socket: &str, script: Script, log: &Log) -> UnixStream {
        let (ours, peer) = UnixStream::pair().unwrap();
        BACKENDS
            .lock()
            .unwrap()
            .push((socket.into(), script, log.clone(), Some(ours)));
        peer
    }

    /// The test [`Connector`]: the backend registered at `socket`, once.
    fn connect_scripted(socket: &Path) -> Result<Box<dyn BackendConnection>> {
        let connection = {
            let mut backends = BACKENDS.lock().unwrap();
            let found = backends
                .iter_mut()
                .find(|(path, _, _, stream)| path == socket && stream.is_some());
            let Some((path, script, log, stream)) = found else {
                return Err(Error::Connect {
                    socket: socket.to_path_buf(),
                    cause: std::io::ErrorKind::NotFound.into(),
                });
            };
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            Scripted {
                name,
                socket: path.clone(),
                script: script.clone(),
                log: log.clone(),
                watched: stream.take().unwrap(),
            }
        };
        if let Some(gate) = &connection.script.gate {
            gate.pass();
        }
        connection.record("connect".into());
        Ok(Box::new(connection))
    }

    impl Scripted {
        fn record(&self, step: String) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} {step}", self.name));
        }

        fn fail(&self, step: &'static str) -> Error {
            Error::Incompatible {
                socket: self.socket.clone(),
                reason: format!("{step} refused by the script"),
            }
        }
    }

    impl BackendConnection for Scripted {
        fn socket(&self) -> &Path {
            &self.socket
        }
        fn backend_features(&self) -> u64 {
            self.script.features
        }
        fn queue_num(&self) -> u64 {
            self.script.queues
        }
        fn keeps_inflight_log(&self) -> bool {
            false
        }
        fn get_config(&mut self, _len: u32) -> Result<Vec<u8>> {
            Ok(Vec::new())
        }
        fn prepare(&mut self, _setup: &mut RingSetup) -> Result<()> {
            self.record("prepare".into());
            if self.script.fail_prepare {
                return Err(self.fail("prepare"));
            }
            Ok(())
        }
        fn resume(&mut self, setup: &RingSetup) -> Result<()> {
            let at: Vec<u16> = setup.queues.iter().map(|q| q.next_avail).collect();
            self.record(format!("resume at {at:?}"));
            if self.script.fail_resume {
                return Err(self.fail("resume"));
            }
            let avail: u16 = setup.memory.read_obj(GuestAddress(AVAIL_IDX)).unwrap();
            setup
                .memory
                .write_obj(avail, GuestAddress(USED_IDX))
                .unwrap();
            Ok(())
        }
        fn stop(&mut self, setup: &mut RingSetup) -> Result<()> {
            if let Some(gate) = &self.script.stop_gate {
                gate.pass();
            }
            self.record("stop".into());
            if self.script.fail_stop {
                return Err(self.fail("stop"));
            }
            let avail: u16 = setup.memory.read_obj(GuestAddress(AVAIL_IDX)).unwrap();
            if self.script.completes {
                setup
                    .memory
                    .write_obj(avail, GuestAddress(USED_IDX))
                    .unwrap();
            }
            for queue in &mut setup.queues {
                queue.next_avail = avail;
            }
            Ok(())
        }
        fn watch_fd(&self) -> Result<OwnedFd> {
            Ok(self.watched.try_clone().unwrap().into())
        }
        fn shut_down(&self) {
            self.record("shut down".into());
        }
    }

    struct Rig {
        /// The device behind its transport, as the bus and the API hold it.
        device: SharedVhostUserDevice,
        log: Log,
        memory: GuestMemoryMmap,
        /// Keeps the first backend's connection open.
        first_peer: Option<UnixStream>,
        /// The device's interrupt, as the guest's irqfd would see it.
        interrupt: EventFd,
    }

    /// A device on the scripted backend `<test>-a`, which the driver has
    /// started (queue 0, 16 entries) through the transport's registers.
    fn rig(test: &str, first: Script) -> Rig {
        let log = Log::default();
        let socket = format!("/scripted/{test}-a");
        let first_peer = listen(&socket, first, &log);
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let shape = DeviceShape {
            device_id: 2,
            features: VERSION_1 | EXTRA_FEATURE,
            queue_max_sizes: vec![16],
            config: Vec::new(),
            config_source: ConfigSource::Vmm,
        };
        let reconnect_socket = PathBuf::from(&socket);
        let reconnector: Reconnector =
            Box::new(move || Ok((connect_scripted(&reconnect_socket)?, None)));
        let connection = connect_scripted(Path::new(&socket)).unwrap();
        let device = VhostUserDevice::with_connection(
            test,
            shape,
            memory.clone(),
            (connection, None),
            reconnector,
            Arc::new(connect_scripted),
        );
        let events = DeviceEvents::new(1).unwrap();
        let interrupt = events.call.try_clone().unwrap();
        let device = supervisor::behind_transport(device, events);
        start_driver(&device);
        log.lock().unwrap().clear();
        Rig {
            device,
            log,
            memory,
            first_peer: Some(first_peer),
            interrupt,
        }
    }

    /// A register write as a vCPU's MMIO exit makes it.
    fn write_register(device: &SharedVhostUserDevice, register: u32, value: u32) {
        lock(device).write(u64::from(register), &value.to_le_bytes());
    }

    fn read_register(device: &SharedVhostUserDevice, register: u32) -> u32 {
        let mut data = [0u8; 4];
        lock(device).read(u64::from(register), &mut data);
        u32::from_le_bytes(data)
    }

    /// The driver's start: features, queue 0 at the rig's rings, DRIVER_OK.
    fn start_driver(device: &SharedVhostUserDevice) {
        let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        write_register(device, VIRTIO_MMIO_STATUS, status);
        write_register(device, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write_register(
            device,
            VIRTIO_MMIO_DRIVER_FEATURES,
            (VERSION_1 >> 32) as u32,
        );
        let status = status | VIRTIO_CONFIG_S_FEATURES_OK;
        write_register(device, VIRTIO_MMIO_STATUS, status);
        write_register(device, VIRTIO_MMIO_QUEUE_SEL, 0);
        write_register(device, VIRTIO_MMIO_QUEUE_NUM, 16);
        for (register, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, DESC_TABLE),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL_RING),
            (VIRTIO_MMIO_QUEUE_USED_LOW, USED_RING),
        ] {
            write_register(device, register, addr as u32);
        }
        write_register(device, VIRTIO_MMIO_QUEUE_READY, 1);
        write_register(
            device,
            VIRTIO_MMIO_STATUS,
            status | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        let status = read_register(device, VIRTIO_MMIO_STATUS);
        assert_eq!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "{status:#x}");
        assert_ne!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0, "{status:#x}");
    }

    /// The driver's reset: status 0, then, as virtio asks, the status read
    /// until it is 0 (the backend has stopped).
    fn reset_driver(device: &SharedVhostUserDevice) {
        write_register(device, VIRTIO_MMIO_STATUS, 0);
        wait_for_reset(device);
    }

    fn wait_for_reset(device: &SharedVhostUserDevice) {
        let deadline = Instant::now() + HANG;
        while read_register(device, VIRTIO_MMIO_STATUS) != 0 {
            assert!(Instant::now() < deadline, "the reset never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Touches the device's registers from another thread, as a vCPU
    /// would, and asserts that this gets through while `what` is under
    /// way (within a hang timeout: it blocks if the lock is held).
    fn registers_answer_while(device: &SharedVhostUserDevice, what: &str) {
        let (done, finished) = mpsc::channel();
        let device = device.clone();
        std::thread::spawn(move || {
            let magic = read_register(&device, VIRTIO_MMIO_MAGIC_VALUE);
            write_register(&device, VIRTIO_MMIO_QUEUE_SEL, 0);
            let max = read_register(&device, VIRTIO_MMIO_QUEUE_NUM_MAX);
            let _ = done.send((magic, max));
        });
        let answer = finished.recv_timeout(HANG).unwrap_or_else(|_| {
            panic!("the device's registers did not answer while {what}: its lock is held")
        });
        assert_eq!(answer, (u32::from_le_bytes(*b"virt"), 16));
    }

    impl Rig {
        /// The driver has made `avail` requests available; the backend has
        /// completed `used`.
        fn rings(&self, avail: u16, used: u16) {
            self.memory
                .write_obj(avail, GuestAddress(AVAIL_IDX))
                .unwrap();
            self.memory.write_obj(used, GuestAddress(USED_IDX)).unwrap();
        }

        /// How many times the device's interrupt was raised since the
        /// last look.
        fn interrupts(&self) -> u64 {
            match self.interrupt.read() {
                Ok(count) => count,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
                Err(err) => panic!("reading the interrupt eventfd: {err}"),
            }
        }

        fn steps(&self) -> Vec<String> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }

        fn status(&self) -> BackendStatus {
            lock(&self.device).device().status()
        }

        fn swap(&self, socket: &str) -> Result<Duration> {
            control::swap(&self.device, Path::new(socket), None)
        }

        fn mark_lost(&self) {
            lock(&self.device).device_mut().mark_lost();
        }

        fn reconnect_once(&self) -> Result<()> {
            control::reconnect_once(&Arc::downgrade(&self.device), Instant::now())
        }

        /// Waits until the backend connection's state is `wanted`.
        fn wait_for(&self, wanted: BackendState) {
            let deadline = Instant::now() + HANG;
            while self.status().state != wanted {
                assert!(Instant::now() < deadline, "never {wanted:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    #[test]
    fn a_swap_prepares_the_new_backend_then_moves_the_rings_where_the_old_one_stopped() {
        let rig = rig("swap", Script::default());
        rig.rings(5, 3);
        let _peer = listen("/scripted/swap-b", Script::default(), &rig.log);
        rig.swap("/scripted/swap-b").unwrap();
        assert_eq!(
            rig.steps(),
            [
                "swap-b connect",
                "swap-b prepare",
                "swap-a stop",
                "swap-b resume at [5]",
                "swap-a shut down"
            ]
        );
        let status = rig.status();
        assert_eq!(status.socket, Path::new("/scripted/swap-b"));
        assert_eq!(status.stats.swaps.count, 1);
        assert_eq!(status.stats.refused_swaps, 0);
        // After the swap, reconnecting reaches the new backend's socket.
        let _again = listen("/scripted/swap-b", Script::default(), &rig.log);
        control::reconnect(&rig.device).unwrap();
        assert_eq!(
            rig.steps()[..3],
            ["swap-b stop", "swap-b shut down", "swap-b connect"]
        );
    }

    /// Records parking in the rig's log, among the backends' steps.
    struct LoggedPark(Log);

    impl control::ParkVcpus for LoggedPark {
        fn park(&self) {
            self.0.lock().unwrap().push("park".into());
        }
        fn unpark(&self) {
            self.0.lock().unwrap().push("unpark".into());
        }
    }

    #[test]
    fn a_swap_asked_to_park_the_vcpus_parks_them_after_connecting_and_lets_them_go_on_every_way_out(
    ) {
        let rig = rig("park", Script::default());
        rig.rings(5, 3);
        let park = LoggedPark(rig.log.clone());
        let _peer = listen("/scripted/park-b", Script::default(), &rig.log);
        control::swap(&rig.device, Path::new("/scripted/park-b"), Some(&park)).unwrap();
        assert_eq!(
            rig.steps(),
            [
                "park-b connect",
                "park",
                "park-b prepare",
                "park-a stop",
                "park-b resume at [5]",
                "park-a shut down",
                "unpark"
            ]
        );
        // Refused after connecting (too few queues): let go all the same.
        let no_queues = Script {
            queues: 0,
            ..Script::default()
        };
        let _refused = listen("/scripted/park-c", no_queues, &rig.log);
        control::swap(&rig.device, Path::new("/scripted/park-c"), Some(&park)).unwrap_err();
        assert_eq!(rig.steps(), ["park-c connect", "park", "unpark"]);
        // Refused before connecting: never parked.
        control::swap(&rig.device, Path::new("/scripted/park-d"), Some(&park)).unwrap_err();
        assert!(rig.steps().is_empty());
    }

    #[test]
    fn a_swap_target_serving_too_few_queues_is_refused_before_the_old_backend_stops() {
        let rig = rig("few", Script::default());
        let no_queues = Script {
            queues: 0,
            ..Script::default()
        };
        let _peer = listen("/scripted/few-b", no_queues, &rig.log);
        let err = rig.swap("/scripted/few-b").unwrap_err();
        assert!(
            matches!(
                err,
                Error::TooFewQueues {
                    serves: 0,
                    needed: 1,
                    ..
                }
            ),
            "{err}"
        );
        // Nothing was asked of the old backend, which serves on.
        assert_eq!(rig.steps(), ["few-b connect"]);
        let status = rig.status();
        assert_eq!(status.socket, Path::new("/scripted/few-a"));
        assert_eq!(status.stats.refused_swaps, 1);
        // A socket with no backend behind it is refused the same way.
        let err = rig.swap("/scripted/few-c").unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err}");
        assert_eq!(rig.status().stats.refused_swaps, 2);
    }

    #[test]
    fn a_swap_target_may_lack_features_the_driver_did_not_accept() {
        // The device offers EXTRA_FEATURE; the driver accepted VERSION_1 only.
        let rig = rig("unused", Script::default());
        let without_extra = Script {
            features: VERSION_1,
            ..Script::default()
        };
        let _peer = listen("/scripted/unused-b", without_extra, &rig.log);
        rig.swap("/scripted/unused-b").unwrap();
        assert_eq!(rig.status().stats.swaps.count, 1);
    }

    #[test]
    fn a_swap_target_lacking_a_feature_the_driver_uses_is_refused() {
        let rig = rig("lack", Script::default());
        let lacking = Script {
            features: 0,
            ..Script::default()
        };
        let _peer = listen("/scripted/lack-b", lacking, &rig.log);
        let err = rig.swap("/scripted/lack-b").unwrap_err();
        assert!(
            matches!(
                err,
                Error::MissingFeatures {
                    missing: VERSION_1,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(rig.steps(), ["lack-b connect"]);
        assert_eq!(rig.status().socket, Path::new("/scripted/lack-a"));
    }

    #[test]
    fn a_new_backend_that_fails_to_resume_gives_the_rings_back_to_the_old_one() {
        let rig = rig("back", Script::default());
        rig.rings(7, 4);
        let failing = Script {
            fail_resume: true,
            ..Script::default()
        };
        let _peer = listen("/scripted/back-b", failing, &rig.log);
        rig.interrupts();
        rig.swap("/scripted/back-b").unwrap_err();
        // The old backend was stopped and drained like any other.
        assert_eq!(rig.interrupts(), 1);
        assert_eq!(
            rig.steps(),
            [
                "back-b connect",
                "back-b prepare",
                "back-a stop",
                "back-b resume at [7]",
                "back-a prepare",
                "back-a resume at [7]"
            ]
        );
        let status = rig.status();
        assert_eq!(status.socket, Path::new("/scripted/back-a"));
        assert_eq!(status.state, BackendState::Connected);
        assert_eq!(status.stats.refused_swaps, 1);
    }

    #[test]
    fn an_old_backend_that_cannot_stop_is_taken_over_from_the_used_ring() {
        let broken = Script {
            fail_stop: true,
            ..Script::default()
        };
        let rig = rig("rewind", broken);
        // Requests 3 and 4 were taken and never completed by the old
        // backend: the new one serves them again.
        rig.rings(5, 3);
        let _peer = listen("/scripted/rewind-b", Script::default(), &rig.log);
        rig.swap("/scripted/rewind-b").unwrap();
        assert_eq!(
            rig.steps(),
            [
                "rewind-b connect",
                "rewind-b prepare",
                "rewind-a stop",
                "rewind-b resume at [3]",
                "rewind-a shut down"
            ]
        );
    }

    #[test]
    fn the_driver_is_interrupted_once_its_rings_moved_to_another_backend() {
        // The old backend completed the last request as it stopped, with
        // no interrupt: without one now the driver never sees it.
        let rig = rig("interrupt", Script::default());
        rig.rings(4, 3);
        rig.interrupts();
        let _b = listen("/scripted/interrupt-b", Script::default(), &rig.log);
        rig.swap("/scripted/interrupt-b").unwrap();
        assert_eq!(rig.interrupts(), 1, "after a swap");
        // The same after a reconnect to a backend that replaced a dead one.
        rig.mark_lost();
        let _again = listen("/scripted/interrupt-b", Script::default(), &rig.log);
        rig.reconnect_once().unwrap();
        assert_eq!(rig.interrupts(), 1, "after a reconnect");
        // And after the rings were stopped and drained for a snapshot and
        // the VM goes on, on the same backend.
        rig.rings(6, 5);
        let mut device = lock(&rig.device);
        device.device_mut().stop_rings().unwrap();
        device.device_mut().resume_rings().unwrap();
        drop(device);
        assert_eq!(rig.interrupts(), 1, "after a snapshot's stop");
        assert_eq!(rig.interrupts(), 0);
    }

    #[test]
    fn after_a_hang_up_the_rings_resume_at_the_used_index_on_the_reconnected_backend() {
        let rig = rig("hangup", Script::default());
        rig.rings(9, 6);
        rig.mark_lost();
        assert_eq!(rig.status().state, BackendState::Reconnecting);
        // A swap is refused while no backend is connected.
        assert!(rig.swap("/scripted/hangup-b").is_err());
        // The backend is not back yet: the attempt fails, the state stays.
        assert!(rig.reconnect_once().is_err());
        assert_eq!(rig.status().state, BackendState::Reconnecting);
        let _peer = listen("/scripted/hangup-a", Script::default(), &rig.log);
        rig.reconnect_once().unwrap();
        assert_eq!(
            rig.steps(),
            [
                "hangup-a connect",
                "hangup-a prepare",
                "hangup-a resume at [6]",
                "hangup-a shut down"
            ]
        );
        let status = rig.status();
        assert_eq!(status.state, BackendState::Connected);
        assert_eq!(status.stats.reconnects.count, 1);
        assert_eq!(status.stats.refused_swaps, 1);
        // An attempt that finds the device connected again (another got
        // there first) connects nowhere.
        let _late = listen("/scripted/hangup-a", Script::default(), &rig.log);
        rig.reconnect_once().unwrap();
        assert!(rig.steps().is_empty());
        // A connection offered after another was installed is dropped.
        let attempt = lock(&rig.device).device().reconnect_attempt();
        let late = attempt.connect(&mut attempt.turn()).unwrap();
        let offered = lock(&rig.device).device_mut().finish_reconnect(late);
        assert!(matches!(offered, Ok(Reconnected::AlreadyConnected)));
        assert_eq!(rig.steps(), ["hangup-a connect", "hangup-a shut down"]);
        assert_eq!(rig.status().stats.reconnects.count, 1);
    }

    #[test]
    fn a_requested_reconnect_stops_the_rings_cleanly_first() {
        let rig = rig("request", Script::default());
        rig.rings(4, 1);
        let _peer = listen("/scripted/request-a", Script::default(), &rig.log);
        control::reconnect(&rig.device).unwrap();
        assert_eq!(
            rig.steps(),
            [
                "request-a stop",
                "request-a shut down",
                "request-a connect",
                "request-a prepare",
                "request-a resume at [4]",
                "request-a shut down"
            ]
        );
    }

    #[test]
    fn a_driver_reset_stops_the_rings() {
        let rig = rig("reset", Script::default());
        reset_driver(&rig.device);
        assert_eq!(rig.steps(), ["reset-a stop"]);
        let transport = lock(&rig.device);
        assert!(!transport.device().is_active());
        assert_eq!(transport.device().interrupt_status(), 0);
        assert_eq!(transport.device().status().state, BackendState::Connected);
    }

    /// A rig whose first backend stops its rings only once the returned
    /// gate opens.
    fn rig_with_gated_stop(test: &str) -> (Rig, Gate) {
        let gate = Gate::default();
        let gated = Script {
            stop_gate: Some(gate.clone()),
            ..Script::default()
        };
        (rig(test, gated), gate)
    }

    #[test]
    fn a_reset_on_a_prompt_backend_is_done_when_the_drivers_write_returns() {
        let (rig, gate) = rig_with_gated_stop("promptreset");
        rig.rings(2, 2);
        // The backend stops its rings 20 ms after it is asked: well within
        // what the vCPU waits.
        let opener = std::thread::spawn(move || {
            gate.wait_for_arrival();
            std::thread::sleep(Duration::from_millis(20));
            gate.open();
        });
        write_register(&rig.device, VIRTIO_MMIO_STATUS, 0);
        // As Linux's virtio-mmio does: no wait for the status to read 0
        // before setting the device up again.
        assert_eq!(read_register(&rig.device, VIRTIO_MMIO_STATUS), 0);
        write_register(&rig.device, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(
            read_register(&rig.device, VIRTIO_MMIO_STATUS),
            VIRTIO_CONFIG_S_ACKNOWLEDGE
        );
        opener.join().unwrap();
        assert_eq!(rig.steps(), ["promptreset-a stop"]);
        assert_eq!(rig.status().state, BackendState::Connected);
    }

    #[test]
    fn a_reset_stops_the_backend_without_holding_the_device_lock() {
        let (rig, gate) = rig_with_gated_stop("stallreset");
        rig.rings(2, 0);
        // The vCPU waits for the backend a short while only.
        write_register(&rig.device, VIRTIO_MMIO_STATUS, 0);
        gate.wait_for_arrival();
        // The vCPU's write returned; the registers and the API answer
        // while the backend has not stopped, and the reset shows as under
        // way: the status does not read 0 yet, and a status write is
        // ignored.
        registers_answer_while(&rig.device, "the backend was stopping");
        assert_ne!(read_register(&rig.device, VIRTIO_MMIO_STATUS), 0);
        write_register(&rig.device, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(rig.status().state, BackendState::Connected);
        let refused = rig.swap("/scripted/stallreset-b").unwrap_err().to_string();
        assert!(
            refused.contains("the driver is resetting the device"),
            "{refused}"
        );
        gate.open();
        wait_for_reset(&rig.device);
        assert_eq!(rig.steps(), ["stallreset-a stop"]);
        // The driver starts the device again on the same backend.
        start_driver(&rig.device);
        assert_eq!(
            rig.steps(),
            ["stallreset-a prepare", "stallreset-a resume at [0]"]
        );
        assert_eq!(rig.status().state, BackendState::Connected);
    }

    #[test]
    fn a_reset_waits_only_briefly_for_a_backend_that_does_not_complete_its_requests() {
        let slow = Script {
            completes: false,
            ..Script::default()
        };
        let rig = rig("slowreset", slow);
        // The backend took requests 3 and 4 and never completes them: the
        // reset gives up on it, drops its connection and reconnects.
        rig.rings(5, 3);
        reset_driver(&rig.device);
        assert_eq!(rig.steps(), ["slowreset-a stop", "slowreset-a shut down"]);
        assert_eq!(rig.status().state, BackendState::Reconnecting);
        assert!(!rig.status().active);
        // The backend comes back; with the device reset, there is nothing
        // to start on it until the driver starts the device again.
        let _peer = listen("/scripted/slowreset-a", Script::default(), &rig.log);
        rig.reconnect_once().unwrap();
        assert_eq!(
            rig.steps(),
            ["slowreset-a connect", "slowreset-a shut down"]
        );
        assert_eq!(rig.status().state, BackendState::Connected);
    }

    #[test]
    fn a_driver_start_while_the_backend_is_away_waits_for_its_return() {
        let rig = rig("away", Script::default());
        reset_driver(&rig.device);
        rig.mark_lost();
        rig.rings(2, 0);
        start_driver(&rig.device);
        assert!(rig.status().active);
        let _peer = listen("/scripted/away-a", Script::default(), &rig.log);
        rig.reconnect_once().unwrap();
        assert_eq!(
            rig.steps(),
            [
                "away-a stop",
                "away-a connect",
                "away-a prepare",
                "away-a resume at [0]",
                "away-a shut down"
            ]
        );
    }

    #[test]
    fn a_backend_that_fails_to_start_the_rings_loses_its_connection_and_the_rings_wait() {
        let rig = rig("nostart", Script::default());
        reset_driver(&rig.device);
        rig.mark_lost();
        let failing = Script {
            fail_prepare: true,
            ..Script::default()
        };
        let _peer = listen("/scripted/nostart-a", failing, &rig.log);
        rig.reconnect_once().unwrap();
        // The driver's start meets a backend that cannot set the rings up.
        rig.rings(3, 0);
        start_driver(&rig.device);
        assert_eq!(rig.status().state, BackendState::Reconnecting);
        let _peer = listen("/scripted/nostart-a", Script::default(), &rig.log);
        rig.reconnect_once().unwrap();
        assert_eq!(
            rig.steps(),
            [
                "nostart-a stop",
                "nostart-a connect",
                "nostart-a shut down",
                "nostart-a prepare",
                "nostart-a shut down",
                "nostart-a connect",
                "nostart-a prepare",
                "nostart-a resume at [0]",
                "nostart-a shut down"
            ]
        );
        assert_eq!(rig.status().state, BackendState::Connected);
    }

    #[test]
    fn the_supervisor_connects_without_holding_the_device_lock() {
        let mut rig = rig("gated", Script::default());
        let _supervisor =
            supervisor::spawn("gated", &rig.device, ReconnectPolicy { window: None }).unwrap();
        let gate = Gate::default();
        let gated = Script {
            gate: Some(gate.clone()),
            ..Script::default()
        };
        let _peer = listen("/scripted/gated-a", gated, &rig.log);
        // The backend hangs up; the supervisor's reconnect waits at the gate.
        drop(rig.first_peer.take());
        gate.wait_for_arrival();
        registers_answer_while(&rig.device, "the supervisor was connecting");
        assert_eq!(rig.status().state, BackendState::Reconnecting);
        gate.open();
        rig.wait_for(BackendState::Connected);
    }

    #[test]
    fn a_swap_connects_without_holding_the_device_lock() {
        let rig = rig("gatedswap", Script::default());
        let gate = Gate::default();
        let gated = Script {
            gate: Some(gate.clone()),
            ..Script::default()
        };
        let _peer = listen("/scripted/gatedswap-b", gated, &rig.log);
        let swapping = {
            let device = rig.device.clone();
            std::thread::spawn(move || {
                control::swap(&device, Path::new("/scripted/gatedswap-b"), None).map(drop)
            })
        };
        gate.wait_for_arrival();
        registers_answer_while(&rig.device, "a swap was connecting");
        gate.open();
        swapping.join().unwrap().unwrap();
        assert_eq!(rig.status().socket, Path::new("/scripted/gatedswap-b"));
    }

    #[test]
    fn a_swap_waits_for_the_old_backends_requests_without_holding_the_device_lock() {
        let slow = Script {
            completes: false,
            ..Script::default()
        };
        let rig = rig("drain", slow);
        rig.rings(5, 3);
        let _peer = listen("/scripted/drain-b", Script::default(), &rig.log);
        let swapping = {
            let device = rig.device.clone();
            std::thread::spawn(move || control::swap(&device, Path::new("/scripted/drain-b"), None))
        };
        let deadline = Instant::now() + HANG;
        while !rig
            .log
            .lock()
            .unwrap()
            .contains(&"drain-a stop".to_string())
        {
            assert!(
                Instant::now() < deadline,
                "the old backend was never stopped"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        registers_answer_while(&rig.device, "a swap waited for the old backend");
        // The old backend completes what it took; the swap goes on.
        rig.memory.write_obj(5u16, GuestAddress(USED_IDX)).unwrap();
        swapping.join().unwrap().unwrap();
        assert_eq!(
            rig.steps(),
            [
                "drain-b connect",
                "drain-b prepare",
                "drain-a stop",
                "drain-b resume at [5]",
                "drain-a shut down"
            ]
        );
    }

    #[test]
    fn the_supervisor_reconnects_after_a_hang_up_and_gives_up_after_its_window() {
        let mut rig = rig("supervised", Script::default());
        let _supervisor = supervisor::spawn(
            "supervised",
            &rig.device,
            ReconnectPolicy {
                window: Some(Duration::from_millis(300)),
            },
        )
        .unwrap();
        // The backend comes back on its socket: the supervisor reconnects.
        let second_peer = listen("/scripted/supervised-a", Script::default(), &rig.log);
        drop(rig.first_peer.take());
        let reconnects = || rig.status().stats.reconnects.count;
        let deadline = Instant::now() + HANG;
        while reconnects() == 0 {
            assert!(Instant::now() < deadline, "no reconnect");
            std::thread::sleep(Duration::from_millis(5));
        }
        rig.wait_for(BackendState::Connected);
        // It hangs up again and never returns: after the window, failed.
        drop(second_peer);
        rig.wait_for(BackendState::Failed);
        assert_eq!(reconnects(), 1);
        let steps = rig.steps();
        assert!(
            steps.contains(&"supervised-a resume at [0]".to_string()),
            "{steps:?}"
        );
    }
}
