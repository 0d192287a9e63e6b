//! Live replacement of the VMM (`pvstack ctl upgrade --binary PATH`).
//!
//! The running pvstack (the old process) starts the new binary as
//! `pvstack take-over --fd 3`, with one end of a Unix socket pair as fd 3,
//! and the two talk in [`Message`]s, each a JSON body that may carry file
//! descriptors (SCM_RIGHTS):
//!
//! 1. old → new `Offer` + the guest memfd: the new process creates its KVM
//!    VM on the same memory, and its vCPUs, and answers `Prepared`.
//!    Meanwhile the old process lets go of the devices' irqfds and relays
//!    their interrupts itself ([`super::relay`]). The guest runs on.
//! 2. old → new `Devices` + per device its kick and call eventfds and its
//!    backend connection: the new process creates its devices on them
//!    (asking each backend what it offers, and telling it the features
//!    the driver took) and answers `Attached`. The
//!    old process holds the devices' locks meanwhile, so only one process
//!    speaks to a backend at a time; the guest runs on (a vCPU that
//!    touches a device's registers waits).
//! 3. The old pauses the guest (every vCPU parked), stops relaying, reads
//!    the VM's state and sends `State` + the API socket and the devices'
//!    inflight logs. Backends are not stopped: their rings, memory, kicks
//!    and calls stay the same, so they serve on throughout. A device whose
//!    backend connection or driver activation changed since step 2 fails
//!    the hand-over.
//! 4. The new process sets the devices' transport state, the saved state
//!    of the vCPUs and the in-kernel devices (guest clocks moved on by the
//!    pause), binds the devices' interrupts and answers `Ready` with how
//!    long each step took; the old answers `Commit`, after which it will
//!    never run the guest again; the new one resumes the guest, raises
//!    every device's interrupt once (one raised while no VM listened is
//!    not lost), serves the API and answers `Running`. The old process
//!    then exits without tearing anything down.
//!
//! Any failure before `Commit` (the new process dying included) ends the
//! new process and resumes the guest in the old one. Backends pvstack
//! started itself (`--blk image=`, `--net tap=`, `--console stdio`) die
//! with the old process (PR_SET_PDEATHSIG); the new process's supervisors
//! then start new ones, which take over with the inflight log, as after a
//! backend crash.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pvstack_devices::vhost_user::{InflightLog, VhostUserDevice};
use pvstack_devices::virtio::mmio::MmioTransport;
use pvstack_devices::InheritedDevice;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::capture::LiveVm;
use super::phases::{describe, Phase, PhaseClock};
use super::relay::InterruptRelay;
use super::restore::{own_console, restore_devices, restore_vcpus, vm_config};
use super::state::{monotonic_ns, VmSpec, VmState};
use crate::api::VmControl;
use crate::cli::TakeOverArgs;
use crate::error::{Error, Result};
use crate::lifecycle::VmEnd;
use crate::memory;
use crate::memory::GuestMemory;
use crate::run::Devices;
use crate::vcpu::Vcpu;
use crate::vm::{Vm, VmConfig};

/// Test-only fault injection: with this variable set to `prepared` or
/// `state`, the new process dies (SIGKILL) right after that step, as a
/// process killed in the middle of a take-over would; the tests check
/// that the old one then resumes the guest.
const DIE_AT_VARIABLE: &str = "PVSTACK_TEST_TAKE_OVER_DIE_AT";

/// Dies by SIGKILL if [`DIE_AT_VARIABLE`] names `step`.
fn die_if_asked(step: &str) {
    if std::env::var(DIE_AT_VARIABLE).is_ok_and(|at| at == step) {
        log::warn!("take-over: dying after {step}, as {DIE_AT_VARIABLE} asks");
        // SAFETY: raise(2) with a valid signal number.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

/// The file descriptor the new process finds its end of the socket on.
const CHANNEL_FD: RawFd = 3;
/// How long either side waits for the other's next message while the
/// guest is paused: generous, it only turns a hung peer into a failure.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long either side waits for the other's next message while the
/// guest runs on (steps 1 and 2): building a VM and unbinding interrupts
/// are slow on a busy host (KVM took 48 s to unbind four irqfds on a
/// machine running three nested guests), and a wait here costs the guest
/// nothing.
const PREPARATION_TIMEOUT: Duration = Duration::from_secs(180);
/// Most descriptors one message carries (the kernel's SCM_MAX_FD).
const MAX_FDS: usize = 253;
/// Longest message body accepted.
const MAX_BODY: u64 = 64 << 20;

/// One step of the conversation (see the module documentation).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "kebab-case")]
enum Message {
    /// Carries the memfd.
    Offer {
        spec: VmSpec,
    },
    Prepared,
    /// Carries per device in `devices` its kicks, call and connection.
    Devices {
        devices: Vec<HandedDevice>,
    },
    /// The new process has created the devices on what it was handed.
    Attached,
    /// Carries the API listener (if `api`), then the inflight log of each
    /// device named in `inflight`, in that order.
    State {
        state: Box<VmState>,
        api: bool,
        inflight: Vec<String>,
    },
    /// With how long each of the new process's steps took.
    Ready {
        #[serde(default)]
        phases: Vec<Phase>,
    },
    Commit,
    Running {
        pid: u32,
    },
    Failed {
        error: String,
    },
}

/// Which descriptors of a `Devices` message belong to one device.
#[derive(Debug, Serialize, Deserialize)]
struct HandedDevice {
    id: String,
    slot: u32,
    kicks: usize,
    /// The socket its backend listens on (for reconnects).
    socket: PathBuf,
    /// The features its driver took, if it runs the device: the new
    /// process tells the backend connection before the pause.
    features: Option<u64>,
}

/// One end of the socket pair.
struct Channel {
    stream: UnixStream,
}

impl Channel {
    /// How long [`Self::receive`] waits from here on.
    fn wait_at_most(&self, timeout: Duration) -> Result<()> {
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| Error::Takeover(format!("cannot set a timeout: {e}")))
    }

    fn send(&self, message: &Message, fds: &[RawFd]) -> Result<()> {
        let body = serde_json::to_vec(message)
            .map_err(|e| Error::Takeover(format!("cannot encode {message:?}: {e}")))?;
        let header = (body.len() as u64).to_le_bytes();
        let io =
            |e: std::io::Error| Error::Takeover(format!("cannot send to the other pvstack: {e}"));
        self.stream
            .send_with_fds(&[&header[..]], fds)
            .map_err(|e| io(std::io::Error::from_raw_os_error(e.errno())))?;
        (&self.stream).write_all(&body).map_err(io)
    }

    fn receive(&self) -> Result<(Message, Vec<OwnedFd>)> {
        let gone = |what: String| Error::Takeover(format!("the other pvstack {what}"));
        let mut header = [0u8; 8];
        let mut fds = vec![-1; MAX_FDS];
        let mut iovec = [libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: header.len(),
        }];
        // SAFETY: the iovec points at `header`, which lives across the call
        // and may hold any bytes.
        let (read, count) = unsafe { self.stream.recv_with_fds(&mut iovec, &mut fds) }
            .map_err(|e| gone(format!("cannot be heard: {e}")))?;
        // SAFETY: the first `count` entries are descriptors the kernel
        // just gave this process; nothing else owns them.
        let owned: Vec<OwnedFd> = fds[..count]
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if read == 0 {
            return Err(gone("hung up".into()));
        }
        if read < header.len() {
            (&self.stream)
                .read_exact(&mut header[read..])
                .map_err(|e| gone(format!("hung up mid-message: {e}")))?;
        }
        let len = u64::from_le_bytes(header);
        if len > MAX_BODY {
            return Err(gone(format!("sent a {len}-byte message")));
        }
        let mut body = vec![0u8; len as usize];
        (&self.stream)
            .read_exact(&mut body)
            .map_err(|e| gone(format!("hung up mid-message: {e}")))?;
        let message = serde_json::from_slice(&body)
            .map_err(|e| gone(format!("sent an unreadable message: {e}")))?;
        if let Message::Failed { error } = &message {
            return Err(Error::Takeover(format!("the new pvstack failed: {error}")));
        }
        Ok((message, owned))
    }

    fn expect(&self, name: &str, matches: impl Fn(&Message) -> bool) -> Result<Vec<OwnedFd>> {
        let (message, fds) = self.receive()?;
        if !matches(&message) {
            return Err(Error::Takeover(format!(
                "expected {name} from the other pvstack, got {message:?}"
            )));
        }
        Ok(fds)
    }
}

/// The new process that runs the VM now, how long the guest was paused
/// and what the pause was spent on.
pub struct HandedOver {
    pub pid: u32,
    pub paused: Duration,
    pub phases: Vec<Phase>,
}

/// The old process's side: hands the VM over to a new pvstack started
/// from `binary`. On success the caller exits; on failure the VM runs on
/// here (and the new process has been stopped).
pub fn hand_over(
    live: &LiveVm,
    control: &VmControl,
    listener: &UnixListener,
    binary: &Path,
) -> Result<HandedOver> {
    live.check_supported("hand over")?;
    let (ours, theirs) = UnixStream::pair()
        .map_err(|e| Error::Takeover(format!("cannot create a socket pair: {e}")))?;
    let mut child = spawn(binary, theirs)?;
    let channel = Channel { stream: ours };
    let mut irqfds = None;
    let result = converse(live, control, listener, &channel, &child, &mut irqfds);
    match result {
        Ok(done) => {
            if let Some(irqfds) = irqfds {
                irqfds.keep_released();
            }
            Ok(done)
        }
        Err(err) => {
            // The new process must not run on with half a VM, and must be
            // gone before this VM binds the interrupts again (dropping
            // `irqfds`): it may hold them.
            let _ = child.kill();
            let _ = child.wait();
            drop(irqfds);
            log::warn!(
                "take-over by {} failed; the VM runs on here: {err}",
                binary.display()
            );
            Err(err)
        }
    }
}

/// Starts `binary take-over --fd 3` with `channel` as its fd 3; it
/// inherits stdin, stdout and stderr (the guest's console goes on there).
fn spawn(binary: &Path, channel: UnixStream) -> Result<Child> {
    let fd = channel.as_raw_fd();
    let mut command = Command::new(binary);
    command.args(["take-over", "--fd", &CHANNEL_FD.to_string()]);
    command.args(crate::sandbox::take_over_args());
    // SAFETY: between fork and exec the closure only calls dup2 and fcntl,
    // which are async-signal-safe, on descriptors it names.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(fd, CHANNEL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 onto itself keeps close-on-exec; clear it either way.
            if libc::fcntl(CHANNEL_FD, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| Error::Takeover(format!("cannot start {}: {e}", binary.display())))?;
    drop(channel);
    log::info!(
        "take-over: started {} (pid {})",
        binary.display(),
        child.id()
    );
    Ok(child)
}

/// Steps 1 to 4 of the module documentation, on the old side.
fn converse<'a>(
    live: &'a LiveVm,
    control: &VmControl,
    listener: &UnixListener,
    channel: &Channel,
    child: &Child,
    irqfds: &mut Option<Irqfds<'a>>,
) -> Result<HandedOver> {
    let memory = &control.machine.memory;
    let memfd = memory::backing_file(memory)
        .ok_or_else(|| Error::Takeover("guest memory has no file behind it".into()))?;
    channel.wait_at_most(PREPARATION_TIMEOUT)?;
    let offered = Instant::now();
    channel.send(
        &Message::Offer {
            spec: live.spec.clone(),
        },
        &[memfd.as_raw_fd()],
    )?;
    // KVM binds an eventfd to one irqfd at a time, across VMs: this VM
    // lets go of the interrupts for the new one to bind them, while the
    // new process builds its VM and the guest runs on, since that is
    // slow (see `relay`).
    let irqfds = irqfds.insert(Irqfds::release(live)?);
    channel.expect("Prepared", |m| matches!(m, Message::Prepared))?;

    let marks = hand_devices_over(live, channel)?;
    let prepared = offered.elapsed();

    channel.wait_at_most(REPLY_TIMEOUT)?;
    let began = Instant::now();
    let mut phases = PhaseClock::start();
    let paused = live.pause(control)?;
    phases.mark("pause");
    // What the backends signal from now on stays counted in the eventfds,
    // and KVM injects it when the new VM binds them.
    irqfds.stop_relay();
    phases.mark("stop-relay");
    let state = live.capture(control, &paused, Vec::new())?;
    phases.mark("capture");
    // The devices stay locked until this process exits (or the hand-over
    // fails): no guest access, reset or reconnect may touch them now.
    let guards: Vec<_> = live.devices.iter().map(|d| d.lock()).collect();
    let mut fds: Vec<RawFd> = vec![listener.as_raw_fd()];
    let mut inflight = Vec::new();
    for ((device, transport), mark) in live.devices.iter().zip(&guards).zip(&marks) {
        if DeviceMark::of(transport) != *mark {
            return Err(Error::Takeover(format!(
                "{}: its driver restarted it or its backend reconnected during the hand-over; try again",
                device.id
            )));
        }
        if let Some(log) = transport.device().inflight_log() {
            fds.push(log.file().as_raw_fd());
            inflight.push(device.id.clone());
        }
    }
    channel.send(
        &Message::State {
            state: Box::new(state),
            api: true,
            inflight,
        },
        &fds,
    )?;
    phases.mark("send-state");
    let (reply, _) = channel.receive()?;
    let Message::Ready { phases: theirs } = reply else {
        return Err(Error::Takeover(format!(
            "expected Ready from the other pvstack, got {reply:?}"
        )));
    };
    phases.mark("new-process");
    phases.add("new:", theirs);
    channel.send(&Message::Commit, &[])?;
    // From here on the guest is the new process's: whatever happens, this
    // one must not resume it (nor bind its interrupts: see `hand_over`).
    paused.keep();
    std::mem::forget(guards);
    let reply = channel.receive();
    let paused_for = began.elapsed();
    phases.mark("commit");
    match reply {
        Ok((Message::Running { pid }, _)) => {
            log::info!(
                "take-over: pid {pid} runs the VM; the guest was paused {} us ({}), \
                 after {} us of preparation while it ran",
                paused_for.as_micros(),
                describe(phases.phases()),
                prepared.as_micros()
            );
            Ok(HandedOver {
                pid,
                paused: paused_for,
                phases: phases.into_phases(),
            })
        }
        other => {
            log::error!(
                "take-over: the new pvstack (pid {}) committed but then: {other:?}",
                child.id()
            );
            Ok(HandedOver {
                pid: child.id(),
                paused: paused_for,
                phases: phases.into_phases(),
            })
        }
    }
}

/// What must not change about a device between its hand-over and the
/// pause: its backend connection and its driver's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DeviceMark {
    connection: u64,
    activation: u64,
}

impl DeviceMark {
    fn of(transport: &MmioTransport<VhostUserDevice>) -> DeviceMark {
        DeviceMark {
            connection: transport.device().connection(),
            activation: transport.device().activation(),
        }
    }
}

/// Step 2 before the pause: hands each device's eventfds and backend
/// connection to the new process, which creates its devices on them
/// (and asks the backends what they offer) while the guest runs. The
/// devices stay locked meanwhile, so nothing here speaks to a backend at
/// the same time (a vCPU touching a device's registers waits); returns
/// what must still hold at the pause.
fn hand_devices_over(live: &LiveVm, channel: &Channel) -> Result<Vec<DeviceMark>> {
    let guards: Vec<_> = live.devices.iter().map(|d| d.lock()).collect();
    let mut fds: Vec<RawFd> = Vec::new();
    let mut connections = Vec::new();
    let mut devices = Vec::new();
    for (device, transport) in live.devices.iter().zip(&guards) {
        let events = transport.events();
        fds.extend(events.kicks.iter().map(|k| k.as_raw_fd()));
        fds.push(events.call.as_raw_fd());
        let connection = transport.device().connection_fd()?;
        fds.push(connection.as_raw_fd());
        connections.push(connection);
        devices.push(HandedDevice {
            id: device.id.clone(),
            slot: device.slot,
            kicks: events.kicks.len(),
            socket: transport.device().status().socket,
            features: transport.device().driver_features(),
        });
    }
    if fds.len() > MAX_FDS {
        return Err(Error::Takeover(format!(
            "{} descriptors to hand over, at most {MAX_FDS} fit one message",
            fds.len()
        )));
    }
    channel.send(&Message::Devices { devices }, &fds)?;
    channel.expect("Attached", |m| matches!(m, Message::Attached))?;
    Ok(guards.iter().map(|t| DeviceMark::of(t)).collect())
}

/// The devices' interrupt eventfds, unbound from this VM's irqfds for the
/// new VM and relayed meanwhile (see `relay`); bound again when dropped,
/// unless the hand-over committed.
struct Irqfds<'a> {
    vm: &'a kvm_ioctls::VmFd,
    released: Vec<(EventFd, u32)>,
    relay: Option<InterruptRelay>,
}

impl<'a> Irqfds<'a> {
    /// Relays every device's interrupt, then unbinds its irqfd.
    fn release(live: &'a LiveVm) -> Result<Irqfds<'a>> {
        let mut calls = Vec::new();
        for device in &live.devices {
            let gsi = pvstack_protocols::layout::device_irq(device.slot);
            let call = device.lock().events().call.try_clone().map_err(|e| {
                Error::Takeover(format!("{}: cannot duplicate its call: {e}", device.id))
            })?;
            calls.push((call, gsi, device.id.as_str()));
        }
        let mut relayed = Vec::new();
        for (call, gsi, _) in &calls {
            let copy = call
                .try_clone()
                .map_err(|e| Error::Takeover(format!("cannot duplicate a call: {e}")))?;
            relayed.push((copy, *gsi));
        }
        let began = Instant::now();
        let mut irqfds = Irqfds {
            vm: &live.vm_fd,
            released: Vec::new(),
            relay: Some(InterruptRelay::start(live.vm_fd.clone(), relayed)?),
        };
        for (call, gsi, id) in calls {
            irqfds
                .vm
                .unregister_irqfd(&call, gsi)
                .map_err(|e| Error::Takeover(format!("{id}: cannot unbind its interrupt: {e}")))?;
            irqfds.released.push((call, gsi));
        }
        log::info!(
            "take-over: {} device interrupts unbound in {} us, relayed meanwhile",
            irqfds.released.len(),
            began.elapsed().as_micros()
        );
        Ok(irqfds)
    }

    /// Ends the relay: the guest is paused. (Its thread is joined when
    /// this is dropped, out of the pause.)
    fn stop_relay(&mut self) {
        if let Some(relay) = &self.relay {
            relay.stop();
        }
    }

    fn keep_released(mut self) {
        self.stop_relay();
        self.released.clear();
    }
}

impl Drop for Irqfds<'_> {
    fn drop(&mut self) {
        self.stop_relay();
        for (call, gsi) in &self.released {
            if let Err(e) = self.vm.register_irqfd(call, *gsi) {
                log::error!("cannot bind the interrupt of GSI {gsi} again: {e}");
            }
            // Raise it once: a completion may have come while unbound.
            let _ = call.write(1);
        }
    }
}

/// `pvstack take-over --fd N`: the new process's side. Runs the VM it is
/// handed until it ends.
pub fn take_over(args: &TakeOverArgs) -> Result<VmEnd> {
    crate::sandbox::configure_take_over(&args.sandbox)?;
    // SAFETY: the old pvstack started this process with its end of the
    // socket pair as this descriptor, which nothing else here owns.
    let stream = unsafe { UnixStream::from_raw_fd(args.fd) };
    stream
        .set_read_timeout(Some(PREPARATION_TIMEOUT))
        .map_err(|e| Error::Takeover(format!("fd {}: not a socket: {e}", args.fd)))?;
    let channel = Channel { stream };
    let end = match take_over_on(&channel) {
        Ok(run) => run(),
        Err(err) => {
            let _ = channel.send(
                &Message::Failed {
                    error: err.to_string(),
                },
                &[],
            );
            Err(err)
        }
    };
    end
}

/// Steps 1 to 4 on the new side; returns what runs the VM.
fn take_over_on(channel: &Channel) -> Result<Box<dyn FnOnce() -> Result<VmEnd> + '_>> {
    let (offer, mut fds) = channel.receive()?;
    let Message::Offer { mut spec } = offer else {
        return Err(Error::Takeover(format!("expected an offer, got {offer:?}")));
    };
    let memfd = fds
        .pop()
        .ok_or_else(|| Error::Takeover("the offer carried no guest memory".into()))?;
    let memory = memory::from_file(std::fs::File::from(memfd), spec.memory_size)?;
    let (mut vm, vcpus) = create_vm_gently(&vm_config(&spec), memory)?;
    let console = own_console(&spec)?;
    channel.send(&Message::Prepared, &[])?;
    log::info!("take-over: VM prepared, waiting for its devices");
    die_if_asked("prepared");

    let (message, fds) = channel.receive()?;
    let Message::Devices { devices: handed } = message else {
        return Err(Error::Takeover(format!(
            "expected the devices, got {message:?}"
        )));
    };
    let mut fds = fds.into_iter();
    let mut take = |what: &str| {
        fds.next()
            .ok_or_else(|| Error::Takeover(format!("the hand-over lacks a descriptor of {what}")))
    };
    let mut inherited = Vec::new();
    for device in &handed {
        let kicks = (0..device.kicks)
            .map(|_| take(&device.id).map(eventfd))
            .collect::<Result<Vec<_>>>()?;
        let call = eventfd(take(&device.id)?);
        let connection = UnixStream::from(take(&device.id)?);
        inherited.push((
            device.slot,
            InheritedDevice {
                kicks,
                call,
                connection: Some((connection, device.socket.clone())),
            },
        ));
    }
    let find = |slot: u32| inherited.iter().find(|(s, _)| *s == slot).map(|(_, i)| i);
    // The old process holds the devices while this one asks their
    // backends what they offer; their interrupts are bound below, once
    // the old VM is paused and has let go of them.
    let devices = Devices::attach(&mut vm, &mut spec, &find)?;
    for device in devices.vhost_user() {
        let features = handed
            .iter()
            .find(|h| h.slot == device.slot)
            .and_then(|h| h.features);
        if let Some(features) = features {
            device
                .lock()
                .device_mut()
                .acknowledge_features(features)
                .map_err(|e| Error::Takeover(format!("{}: {e}", device.id)))?;
        }
    }
    channel.send(&Message::Attached, &[])?;
    // The old process pauses the guest and sends its state next.
    channel.wait_at_most(REPLY_TIMEOUT)?;
    log::info!("take-over: devices attached, waiting for the state");

    let (message, fds) = channel.receive()?;
    let Message::State {
        state,
        api,
        inflight,
    } = message
    else {
        return Err(Error::Takeover(format!(
            "expected the state, got {message:?}"
        )));
    };
    die_if_asked("state");
    let mut phases = PhaseClock::start();
    state.check_host(Path::new("the handed-over state"))?;
    let mut fds = fds.into_iter();
    let mut take = |what: &str| {
        fds.next()
            .ok_or_else(|| Error::Takeover(format!("the state lacks the descriptor of {what}")))
    };
    let listener = if api {
        Some(UnixListener::from(take("the API socket")?))
    } else {
        None
    };
    let mut logs = Vec::new();
    for id in inflight {
        let file = std::fs::File::from(take(&id)?);
        let shape = state
            .devices
            .iter()
            .find(|d| d.id == id)
            .and_then(|d| d.inflight)
            .ok_or_else(|| Error::Takeover(format!("{id}: an inflight log without its shape")))?;
        logs.push((id, InflightLog::from_parts(file, shape)));
    }
    phases.mark("check-state");
    let mut take_log = |id: &str| {
        logs.iter()
            .position(|(log_id, _)| log_id == id)
            .map(|i| logs.swap_remove(i).1)
    };
    restore_devices(&devices, &state.devices, Some(&mut take_log))?;
    phases.mark("restore-devices");
    devices.serve(&mut vm, spec, listener)?;
    phases.mark("serve-api");
    let advance = monotonic_ns().saturating_sub(state.taken_at_ns);
    let launches = restore_vcpus(&vm, &vcpus, &state, advance)?;
    devices.restore_uart(state.uart.as_ref())?;
    phases.mark("restore-vcpus");
    // After the irqchip's state is set, so that what the backends
    // signalled while no VM listened is injected into it.
    for (slot, device) in &inherited {
        let gsi = pvstack_protocols::layout::device_irq(*slot);
        vm.vm_fd()
            .register_irqfd(&device.call, gsi)
            .map_err(|e| Error::Takeover(format!("cannot bind the interrupt of GSI {gsi}: {e}")))?;
    }
    phases.mark("bind-irqfds");
    // Set-up ends with the interrupts bound.
    crate::sandbox::confine_vmm_after_take_over()?;
    let calls: Vec<EventFd> = inherited
        .iter()
        .filter_map(|(_, i)| i.call.try_clone().ok())
        .collect();
    channel.send(
        &Message::Ready {
            phases: phases.into_phases(),
        },
        &[],
    )?;
    channel.expect("Commit", |m| matches!(m, Message::Commit))?;
    let guest_time_ns = state.guest_time_ns.saturating_add(advance);
    Ok(Box::new(move || {
        // An interrupt a backend raised while no VM listened would be
        // lost; a spurious one costs the driver a look at its used ring.
        for call in &calls {
            let _ = call.write(1);
        }
        let _ = channel.send(
            &Message::Running {
                pid: std::process::id(),
            },
            &[],
        );
        log::info!("take-over: running the VM (advanced its clocks by {advance} ns)");
        let end = vm.run_vcpus(vcpus, launches, console, guest_time_ns);
        drop(devices);
        end
    }))
}

/// Creates the VM and its vCPUs in a thread of the lowest priority:
/// KVM's set-up of guest memory costs CPU time in proportion to its size,
/// and meanwhile the guest runs on in the old process, whose vCPUs and
/// backends should not lose the CPU to it on a busy host. (A thread of
/// its own, since an unprivileged process cannot raise its priority
/// again; it starts no threads that would inherit it.)
fn create_vm_gently(config: &VmConfig, memory: GuestMemory) -> Result<(Vm, Vec<Vcpu>)> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setpriority(2) on the calling thread (who = 0 is
                // the caller's thread on Linux); lowering needs no privilege.
                if unsafe { libc::setpriority(libc::PRIO_PROCESS as _, 0, 19) } != 0 {
                    log::debug!(
                        "take-over: cannot lower the VM set-up's priority: {}",
                        std::io::Error::last_os_error()
                    );
                }
                let vm = Vm::with_memory(config, memory)?;
                let vcpus = vm.create_vcpus()?;
                Ok((vm, vcpus))
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Takeover("creating the VM panicked".into())))
    })
}

fn eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: the descriptor is an eventfd the old process handed over
    // (its position in the message says so), owned by nothing else.
    unsafe { EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) }
}
