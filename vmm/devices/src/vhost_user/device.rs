//! [`VhostUserDevice`]: a virtio device whose queues a backend process
//! serves. The device is the same for every device type; what differs
//! (features, queue sizes, configuration space) is worked out by the
//! device-specific constructor (see `crate::blk`) and passed in a
//! [`DeviceShape`].

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use vm_memory::GuestMemoryMmap;

use super::connection::BackendConnection;
use super::handle::{avail_idx, used_idx, ActiveQueue, InflightLog, RingSetup, VhostUserHandle};
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

/// A connection to a backend, and the backend's process if pvstack started it.
pub type Connected = (Box<dyn BackendConnection>, Option<BackendProcess>);

/// Connects to the device's backend again (starting a new child for a
/// backend pvstack runs itself): what crash recovery and `reconnect` use.
pub type Reconnector = Box<dyn FnMut() -> Result<Connected> + Send>;

/// Connects to the backend listening on a socket: what a swap uses.
pub type Connector = fn(&Path) -> Result<Box<dyn BackendConnection>>;

/// The real [`Connector`]: a vhost-user connection, negotiated.
fn connect_vhost_user(socket: &Path) -> Result<Box<dyn BackendConnection>> {
    Ok(Box::new(VhostUserHandle::connect(socket)?))
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
    handle: Box<dyn BackendConnection>,
    /// What the backend was set up with, while the driver runs the device.
    rings: Option<RingSetup>,
    /// The backend process, if pvstack started it. Declared after the
    /// handle so the connection closes before the process is stopped.
    process: Option<BackendProcess>,
    /// How to reach the backend again after it hangs up.
    reconnector: Reconnector,
    /// How to reach the backend a swap names.
    connector: Connector,
    /// Counts the connections this device has had, so a watcher of an
    /// old one knows its hang-up no longer matters.
    connection: u64,
    state: BackendState,
    stats: BackendStats,
}

impl VhostUserDevice {
    /// A device that `handle`'s backend serves in `memory`; `process` is
    /// the backend if pvstack started it (stopped when the device drops).
    /// `reconnect` reaches the same backend again (see [`Reconnector`]).
    pub fn new(
        name: impl Into<String>,
        shape: DeviceShape,
        memory: GuestMemoryMmap,
        handle: VhostUserHandle,
        process: Option<BackendProcess>,
        mut reconnect: impl FnMut() -> Result<(VhostUserHandle, Option<BackendProcess>)>
            + Send
            + 'static,
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
            connect_vhost_user,
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
            process,
            reconnector,
            connector,
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
        let mut new = (self.connector)(socket)?;
        self.check_config(new.as_mut())?;
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
                return Err(Error::MissingFeatures {
                    socket: socket.to_path_buf(),
                    missing,
                });
            }
        }
        let stall = began.elapsed();
        let socket = socket.to_path_buf();
        self.replace_connection(new, None);
        let connect = self.connector;
        self.reconnector = Box::new(move || Ok((connect(&socket)?, None)));
        Ok(stall)
    }

    /// Refuses a backend whose configuration space (disk capacity, for
    /// instance) differs from what the driver was shown.
    fn check_config(&self, new: &mut dyn BackendConnection) -> Result<()> {
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
    fn replace_connection(
        &mut self,
        handle: Box<dyn BackendConnection>,
        process: Option<BackendProcess>,
    ) {
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
        self.check_config(new.as_mut())?;
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
        if self.state == BackendState::Connected {
            return Ok(());
        }
        Err(Error::Incompatible {
            socket: self.handle.socket().to_path_buf(),
            reason: format!("the device is reconnecting to its backend; {what} once it is back"),
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
        if let Some(rings) = self.rings.as_ref() {
            self.handle.resume(rings)?;
        }
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
        self.handle.acknowledge_features(&setup)?;
        self.rings = Some(setup);
        Ok(())
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
        let mut setup = self.ring_setup(&activation)?;
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

#[cfg(test)]
mod tests {
    //! The device's swap, reconnect and rewind decisions, driven with
    //! scripted connections in place of backends (the integration tests in
    //! tests/ run the same paths against real pvstack-blk processes).

    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::vhost_user::supervisor::{self, ReconnectPolicy};
    use crate::virtio::{DeviceEvents, QueueConfig};

    const VERSION_1: u64 = 1 << 32;
    const EXTRA_FEATURE: u64 = 1 << 9;
    const AVAIL_IDX: u64 = 0x2002;
    const USED_IDX: u64 = 0x3002;

    /// What a scripted backend offers and which of its steps fail.
    #[derive(Clone)]
    struct Script {
        features: u64,
        queues: u64,
        fail_prepare: bool,
        fail_resume: bool,
        fail_stop: bool,
    }

    impl Default for Script {
        fn default() -> Self {
            Script {
                features: VERSION_1,
                queues: 1,
                fail_prepare: false,
                fail_resume: false,
                fail_stop: false,
            }
        }
    }

    /// The steps every scripted backend of one test took, in order.
    type Log = Arc<Mutex<Vec<String>>>;

    /// A backend that records each step in the test's log. It serves like
    /// a well-behaved backend: `stop` completes every available request
    /// and reports the available index as its base; `resume` completes
    /// whatever waits.
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
        log.lock().unwrap().push(format!("{name} connect"));
        Ok(Box::new(Scripted {
            name,
            socket: path.clone(),
            script: script.clone(),
            log: log.clone(),
            watched: stream.take().unwrap(),
        }))
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
            self.record("stop".into());
            if self.script.fail_stop {
                return Err(self.fail("stop"));
            }
            let avail: u16 = setup.memory.read_obj(GuestAddress(AVAIL_IDX)).unwrap();
            setup
                .memory
                .write_obj(avail, GuestAddress(USED_IDX))
                .unwrap();
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
        device: VhostUserDevice,
        log: Log,
        memory: GuestMemoryMmap,
        /// Keeps the first backend's connection open.
        _first_peer: UnixStream,
    }

    /// A device on the scripted backend `<test>-a`, with the driver's
    /// queue 0 (16 entries) started on it.
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
        let mut device = VhostUserDevice::with_connection(
            test,
            shape,
            memory.clone(),
            (connection, None),
            reconnector,
            connect_scripted,
        );
        let queue = QueueConfig {
            max_size: 16,
            size: 16,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        let events = DeviceEvents::new(1).unwrap();
        device
            .activate(Activation {
                features: VERSION_1,
                queues: &[queue],
                events: &events,
            })
            .unwrap();
        log.lock().unwrap().clear();
        Rig {
            device,
            log,
            memory,
            _first_peer: first_peer,
        }
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

        fn steps(&self) -> Vec<String> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }
    }

    #[test]
    fn a_swap_prepares_the_new_backend_then_moves_the_rings_where_the_old_one_stopped() {
        let mut rig = rig("swap", Script::default());
        rig.rings(5, 3);
        let _peer = listen("/scripted/swap-b", Script::default(), &rig.log);
        rig.device.swap(Path::new("/scripted/swap-b")).unwrap();
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
        let status = rig.device.status();
        assert_eq!(status.socket, Path::new("/scripted/swap-b"));
        assert_eq!(status.stats.swaps.count, 1);
        assert_eq!(status.stats.refused_swaps, 0);
        // After the swap, reconnecting reaches the new backend's socket.
        let _again = listen("/scripted/swap-b", Script::default(), &rig.log);
        rig.device.reconnect().unwrap();
        assert_eq!(
            rig.steps()[..3],
            ["swap-b stop", "swap-b shut down", "swap-b connect"]
        );
    }

    #[test]
    fn a_swap_target_serving_too_few_queues_is_refused_before_the_old_backend_stops() {
        let mut rig = rig("few", Script::default());
        let no_queues = Script {
            queues: 0,
            ..Script::default()
        };
        let _peer = listen("/scripted/few-b", no_queues, &rig.log);
        let err = rig.device.swap(Path::new("/scripted/few-b")).unwrap_err();
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
        let status = rig.device.status();
        assert_eq!(status.socket, Path::new("/scripted/few-a"));
        assert_eq!(status.stats.refused_swaps, 1);
        // A socket with no backend behind it is refused the same way.
        let err = rig.device.swap(Path::new("/scripted/few-c")).unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err}");
        assert_eq!(rig.device.status().stats.refused_swaps, 2);
    }

    #[test]
    fn a_swap_target_may_lack_features_the_driver_did_not_accept() {
        // The device offers EXTRA_FEATURE; the driver accepted VERSION_1 only.
        let mut rig = rig("unused", Script::default());
        let without_extra = Script {
            features: VERSION_1,
            ..Script::default()
        };
        let _peer = listen("/scripted/unused-b", without_extra, &rig.log);
        rig.device.swap(Path::new("/scripted/unused-b")).unwrap();
        assert_eq!(rig.device.status().stats.swaps.count, 1);
    }

    #[test]
    fn a_swap_target_lacking_a_feature_the_driver_uses_is_refused() {
        let mut rig = rig("lack", Script::default());
        let lacking = Script {
            features: 0,
            ..Script::default()
        };
        let _peer = listen("/scripted/lack-b", lacking, &rig.log);
        let err = rig.device.swap(Path::new("/scripted/lack-b")).unwrap_err();
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
        assert_eq!(rig.device.status().socket, Path::new("/scripted/lack-a"));
    }

    #[test]
    fn a_new_backend_that_fails_to_resume_gives_the_rings_back_to_the_old_one() {
        let mut rig = rig("back", Script::default());
        rig.rings(7, 4);
        let failing = Script {
            fail_resume: true,
            ..Script::default()
        };
        let _peer = listen("/scripted/back-b", failing, &rig.log);
        rig.device.swap(Path::new("/scripted/back-b")).unwrap_err();
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
        let status = rig.device.status();
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
        let mut rig = rig("rewind", broken);
        // Requests 3 and 4 were taken and never completed by the old
        // backend: the new one serves them again.
        rig.rings(5, 3);
        let _peer = listen("/scripted/rewind-b", Script::default(), &rig.log);
        rig.device.swap(Path::new("/scripted/rewind-b")).unwrap();
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
    fn after_a_hang_up_the_rings_resume_at_the_used_index_on_the_reconnected_backend() {
        let mut rig = rig("hangup", Script::default());
        rig.rings(9, 6);
        rig.device.mark_lost();
        assert_eq!(rig.device.status().state, BackendState::Reconnecting);
        // A swap is refused while no backend is connected.
        assert!(rig.device.swap(Path::new("/scripted/hangup-b")).is_err());
        // The backend is not back yet: the attempt fails, the state stays.
        assert!(rig.device.try_reconnect(Instant::now()).is_err());
        assert_eq!(rig.device.status().state, BackendState::Reconnecting);
        let _peer = listen("/scripted/hangup-a", Script::default(), &rig.log);
        rig.device.try_reconnect(Instant::now()).unwrap();
        assert_eq!(
            rig.steps(),
            [
                "hangup-a connect",
                "hangup-a prepare",
                "hangup-a resume at [6]",
                "hangup-a shut down"
            ]
        );
        let status = rig.device.status();
        assert_eq!(status.state, BackendState::Connected);
        assert_eq!(status.stats.reconnects.count, 1);
        assert_eq!(status.stats.refused_swaps, 1);
    }

    #[test]
    fn a_requested_reconnect_stops_the_rings_cleanly_first() {
        let mut rig = rig("request", Script::default());
        rig.rings(4, 1);
        let _peer = listen("/scripted/request-a", Script::default(), &rig.log);
        rig.device.reconnect().unwrap();
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
        let mut rig = rig("reset", Script::default());
        rig.device.reset();
        assert_eq!(rig.steps(), ["reset-a stop"]);
        assert!(!rig.device.is_active());
        assert_eq!(rig.device.interrupt_status(), 0);
    }

    #[test]
    fn the_supervisor_reconnects_after_a_hang_up_and_gives_up_after_its_window() {
        let Rig {
            device,
            log,
            _first_peer: first_peer,
            ..
        } = rig("supervised", Script::default());
        let transport = supervisor::supervised(
            device,
            DeviceEvents::new(1).unwrap(),
            ReconnectPolicy {
                window: Some(Duration::from_millis(300)),
            },
        )
        .unwrap();
        let state = || transport.lock().unwrap().device().status().state;
        let wait_for = |wanted: BackendState| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while state() != wanted {
                assert!(Instant::now() < deadline, "never {wanted:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // The backend comes back on its socket: the supervisor reconnects.
        let second_peer = listen("/scripted/supervised-a", Script::default(), &log);
        drop(first_peer);
        wait_for(BackendState::Connected);
        let reconnects = || {
            transport
                .lock()
                .unwrap()
                .device()
                .status()
                .stats
                .reconnects
                .count
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while reconnects() == 0 {
            assert!(Instant::now() < deadline, "no reconnect");
            std::thread::sleep(Duration::from_millis(5));
        }
        // It hangs up again and never returns: after the window, failed.
        drop(second_peer);
        wait_for(BackendState::Failed);
        assert_eq!(reconnects(), 1);
        let steps = log.lock().unwrap().clone();
        assert!(
            steps.contains(&"supervised-a resume at [0]".to_string()),
            "{steps:?}"
        );
    }
}
