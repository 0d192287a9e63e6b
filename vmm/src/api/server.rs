//! The control API server: a Unix socket served by one thread, one
//! connection at a time, one JSON request per line (see vmm/API.md).
//! Nothing a client sends can harm the VM: a bad line gets an error
//! response; an overlong line, or a line that is not complete within
//! [`REQUEST_TIMEOUT`] (however it trickles in), loses the connection.

use std::cell::Cell;
use std::io::{BufReader, ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, info, warn};
use pvstack_backend_common::listen_with_mode;
use pvstack_devices::vhost_user::control::{self, ParkVcpus};
use pvstack_devices::vhost_user::{BackendState, SharedVhostUserDevice, StallStats};
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET};

use super::line::{read_line, DeadlineStream, Line, LineSource};
use super::protocol::{
    DeviceInfo, Reply, Request, Response, StallCounters, VmInfo, VmState, MAX_REQUEST_BYTES,
};
use crate::error::{Error, Result};
use crate::lifecycle::VmEnd;
use crate::machine::Machine;
use crate::snapshot::{self, LiveVm};

/// How long a client may take to send a whole request line (from the
/// connection, or from the previous response) or to take its response
/// before the server drops it and serves the next client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop looks whether the VM is ending.
const ACCEPT_POLL_MS: i32 = 100;

/// A device the API can name.
pub struct ApiDevice {
    pub id: String,
    pub device: SharedVhostUserDevice,
}

/// The API socket, bound before the VM starts so a bad path fails early.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    devices: Vec<ApiDevice>,
}

/// What the server needs of the running VM.
pub struct VmControl {
    pub machine: Arc<Machine>,
    /// What snapshots and take-overs need; `None` where they are not offered.
    pub live: Option<Arc<LiveVm>>,
    pub vcpus: u32,
    /// Kicks every vCPU thread out of `KVM_RUN` (so a pause takes effect).
    pub kick_vcpus: Box<dyn Fn() + Send>,
}

/// The running server; dropping it stops the thread and removes the socket.
pub struct RunningApi {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiServer {
    /// Binds the API socket at `path` (which must not exist yet), its
    /// file with permissions `mode` (0600 unless `--api-socket-mode`).
    pub fn bind(path: &Path, mode: u32, devices: Vec<ApiDevice>) -> Result<Self> {
        let listener = listen_with_mode(path, mode).map_err(|source| Error::File {
            action: "bind the API socket",
            path: path.to_path_buf(),
            cause: source,
        })?;
        info!("control API on {}", path.display());
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            devices,
        })
    }

    /// Serves on a socket already bound at `path` (the one a take-over
    /// hands over, so clients keep the same path throughout).
    pub fn from_listener(listener: UnixListener, path: &Path, devices: Vec<ApiDevice>) -> Self {
        info!("control API on {} (handed over)", path.display());
        ApiServer {
            listener,
            path: path.to_path_buf(),
            devices,
        }
    }

    /// Serves the API from its own thread until the returned handle drops.
    pub fn start(self, vm: VmControl) -> Result<RunningApi> {
        let stop = Arc::new(AtomicBool::new(false));
        let path = self.path.clone();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("api".into())
                .spawn(move || self.serve(&vm, &stop))
                .map_err(|source| Error::Os {
                    what: "spawn the control API thread",
                    cause: source,
                })?
        };
        Ok(RunningApi {
            stop,
            thread: Some(thread),
            path,
        })
    }

    fn serve(&self, vm: &VmControl, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            if !readable(&self.listener, ACCEPT_POLL_MS) {
                continue;
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(err) = self.serve_client(stream, vm) {
                        debug!("control API client: {err}");
                    }
                }
                Err(err) => warn!("control API: accept failed: {err}"),
            }
        }
    }

    /// Answers each request line of one client until it hangs up, does
    /// not complete a line within [`REQUEST_TIMEOUT`] or sends an overlong
    /// line.
    fn serve_client(&self, stream: UnixStream, vm: &VmControl) -> std::io::Result<()> {
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let writer = stream.try_clone()?;
        self.serve_lines(BufReader::new(DeadlineStream::new(stream)), writer, vm)
    }

    /// Reads request lines from `reader` and writes a response line to
    /// `writer` for each, until the end of the input, a line that is
    /// overlong or late, or a shutdown; one client connection's
    /// conversation (also run by the fuzz target in tests/fuzz on bytes in
    /// memory).
    pub fn serve_lines(
        &self,
        mut reader: impl LineSource,
        mut writer: impl Write,
        vm: &VmControl,
    ) -> std::io::Result<()> {
        loop {
            let line = match read_line(&mut reader, MAX_REQUEST_BYTES, REQUEST_TIMEOUT) {
                Ok(Line::Complete(line)) => line,
                Ok(Line::End) => return Ok(()),
                Ok(Line::TooLong) => {
                    let response = Response::error(format!(
                        "request longer than {MAX_REQUEST_BYTES} bytes; closing the connection"
                    ));
                    return write_response(&mut writer, &response);
                }
                Err(err) if err.kind() == ErrorKind::TimedOut => {
                    let response = Response::error(format!(
                        "no complete request line within {} s; closing the connection",
                        REQUEST_TIMEOUT.as_secs()
                    ));
                    // The client may not read it; it is dropped either way.
                    let _ = write_response(&mut writer, &response);
                    return Err(err);
                }
                Err(err) => return Err(err),
            };
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            let response = match serde_json::from_str::<Request>(&text) {
                Ok(request) => self.handle(request, vm),
                Err(err) => Response::error(format!("bad request: {err}")),
            };
            write_response(&mut writer, &response)?;
            if matches!(&response.result, Some(Reply::Upgrade { .. })) {
                // The VM runs in the new process now; this one leaves
                // without tearing anything down (the devices' backends,
                // the API socket and the guest's memory are the new
                // process's now).
                info!("control API: the VM now runs in the new pvstack; exiting");
                std::process::exit(0);
            }
            if matches!(
                &response,
                Response {
                    ok: true,
                    result: Some(Reply::State {
                        state: VmState::ShuttingDown
                    }),
                    ..
                }
            ) {
                return Ok(());
            }
        }
    }

    fn handle(&self, request: Request, vm: &VmControl) -> Response {
        let lifecycle = &vm.machine.lifecycle;
        match request {
            Request::Info {} => Response::ok(Reply::Info(self.info(vm))),
            Request::Pause {} => {
                // Returns once every vCPU has stopped running guest code.
                lifecycle.pause_until_parked(&*vm.kick_vcpus);
                info!("control API: VM paused");
                state_reply(vm)
            }
            Request::Resume {} => {
                if let Some(live) = &vm.live {
                    if let Err(err) = live.before_resume() {
                        return Response::error(format!("cannot resume: {err}"));
                    }
                }
                lifecycle.resume();
                info!("control API: VM resumed");
                state_reply(vm)
            }
            Request::Shutdown {} => {
                info!("control API: shutting the VM down");
                lifecycle.end(VmEnd::Shutdown);
                (vm.kick_vcpus)();
                state_reply(vm)
            }
            Request::DeviceSwap {
                id,
                socket,
                pause_vcpus,
            } => self.with_device(&id, |device| {
                let park = SwapPause {
                    vm,
                    paused_here: Cell::new(false),
                };
                let park = pause_vcpus.then_some(&park as &dyn ParkVcpus);
                control::swap(device, Path::new(&socket), park).map(|stall| stall_reply(&id, stall))
            }),
            Request::DeviceReconnect { id } => self.with_device(&id, |device| {
                control::reconnect(device).map(|stall| stall_reply(&id, stall))
            }),
            Request::Snapshot { to, resume } => {
                let Some(live) = &vm.live else {
                    return Response::error("this VM cannot be snapshotted");
                };
                match snapshot::save::snapshot(live, vm, Path::new(&to), resume) {
                    Ok(written) => Response::ok(Reply::Snapshot {
                        dir: to,
                        memory_bytes: written.memory_bytes,
                        data_bytes: written.data_bytes,
                        paused_us: micros(written.paused),
                        state: vm_state(vm),
                    }),
                    Err(err) => Response::error(format!("snapshot failed: {err}")),
                }
            }
            Request::Upgrade { binary } => {
                let Some(live) = &vm.live else {
                    return Response::error("this VM cannot be handed over");
                };
                match snapshot::takeover::hand_over(live, vm, &self.listener, Path::new(&binary)) {
                    Ok(done) => Response::ok(Reply::Upgrade {
                        pid: done.pid,
                        paused_us: micros(done.paused),
                        phases: done.phases,
                    }),
                    Err(err) => {
                        Response::error(format!("upgrade failed, the VM runs on here: {err}"))
                    }
                }
            }
        }
    }

    /// Runs `operation` on device `id`; it takes the device's lock itself,
    /// only while it does not wait for a backend.
    fn with_device(
        &self,
        id: &str,
        operation: impl FnOnce(&SharedVhostUserDevice) -> pvstack_devices::Result<Reply>,
    ) -> Response {
        let Some(entry) = self.devices.iter().find(|d| d.id == id) else {
            let known: Vec<&str> = self.devices.iter().map(|d| d.id.as_str()).collect();
            return Response::error(format!("no device {id:?} (devices: {})", known.join(", ")));
        };
        match operation(&entry.device) {
            Ok(reply) => Response::ok(reply),
            Err(err) => Response::error(format!("{id}: {err}")),
        }
    }

    fn info(&self, vm: &VmControl) -> VmInfo {
        let devices = self
            .devices
            .iter()
            .map(|entry| {
                let status = control::lock(&entry.device).device().status();
                DeviceInfo {
                    id: entry.id.clone(),
                    kind: kind(status.device_id).into(),
                    socket: status.socket.display().to_string(),
                    backend_pid: status.pid,
                    backend_state: match status.state {
                        BackendState::Connected => "connected",
                        BackendState::Reconnecting => "reconnecting",
                        BackendState::Failed => "failed",
                    }
                    .into(),
                    active: status.active,
                    inflight_log: status.inflight_log,
                    swaps: counters(&status.stats.swaps),
                    refused_swaps: status.stats.refused_swaps,
                    reconnects: counters(&status.stats.reconnects),
                }
            })
            .collect();
        VmInfo {
            state: vm_state(vm),
            vcpus: vm.vcpus,
            memory_bytes: vm.machine.boot_info.mem_size,
            devices,
        }
    }
}

impl Drop for RunningApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("the control API thread panicked");
            }
        }
        if let Err(err) = std::fs::remove_file(&self.path) {
            debug!("cannot remove {}: {err}", self.path.display());
        }
    }
}

/// The `kind` of a vhost-user device in `info`, by virtio device id.
fn kind(device_id: u32) -> &'static str {
    match device_id {
        VIRTIO_ID_NET => "vhost-user-net",
        VIRTIO_ID_BLOCK => "vhost-user-blk",
        VIRTIO_ID_CONSOLE => "vhost-user-console",
        _ => "vhost-user",
    }
}

fn vm_state(vm: &VmControl) -> VmState {
    let lifecycle = &vm.machine.lifecycle;
    if lifecycle.is_stopping() {
        VmState::ShuttingDown
    } else if lifecycle.is_paused() {
        VmState::Paused
    } else {
        VmState::Running
    }
}

fn state_reply(vm: &VmControl) -> Response {
    Response::ok(Reply::State {
        state: vm_state(vm),
    })
}

/// Parks the vCPUs during a swap (`pause_vcpus`); a VM the API has paused
/// already stays paused.
struct SwapPause<'a> {
    vm: &'a VmControl,
    paused_here: Cell<bool>,
}

impl ParkVcpus for SwapPause<'_> {
    fn park(&self) {
        let lifecycle = &self.vm.machine.lifecycle;
        if !lifecycle.is_paused() {
            lifecycle.pause_until_parked(&*self.vm.kick_vcpus);
            self.paused_here.set(true);
        }
    }

    fn unpark(&self) {
        if self.paused_here.take() {
            self.vm.machine.lifecycle.resume();
        }
    }
}

fn stall_reply(id: &str, stall: Duration) -> Reply {
    Reply::Stall {
        device: id.to_string(),
        stall_us: micros(stall),
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn counters(stats: &StallStats) -> StallCounters {
    StallCounters {
        count: stats.count,
        last_stall_us: stats.last_us,
        max_stall_us: stats.max_us,
        p99_stall_us: stats.p99_us(),
    }
}

fn write_response(writer: &mut impl Write, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line)
}

/// Whether `listener` has a connection to accept within `timeout_ms`.
fn readable(listener: &UnixListener, timeout_ms: i32) -> bool {
    let mut pollfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
    if ready < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != ErrorKind::Interrupted {
            warn!("control API: poll failed: {err}");
            std::thread::sleep(Duration::from_millis(u64::from(timeout_ms.unsigned_abs())));
        }
    }
    ready > 0
}
