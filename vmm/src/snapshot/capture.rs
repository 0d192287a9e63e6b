//! The running VM's side of snapshots and take-overs: what they need of
//! it ([`LiveVm`]), pausing it until every vCPU is parked, stopping and
//! restarting the backends' rings, and reading the whole [`VmState`].

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, MutexGuard};

use kvm_ioctls::VmFd;
use pvstack_devices::vhost_user::{RingPosition, SharedVhostUserDevice, VhostUserDevice};
use pvstack_devices::virtio::mmio::MmioTransport;
use pvstack_devices::SharedUart;

use super::state::{
    monotonic_ns, DeviceKind, DeviceState, HostIdentity, VcpuState, VmSpec, VmState, FORMAT,
    VERSION,
};
use super::{platform, vcpu};
use crate::api::VmControl;
use crate::error::{Error, Result};
use crate::lifecycle::Lifecycle;

/// A virtio device with a vhost-user backend, as snapshots see it.
pub struct LiveDevice {
    pub id: String,
    pub kind: DeviceKind,
    /// Its index among devices of its kind.
    pub index: u32,
    pub slot: u32,
    pub transport: SharedVhostUserDevice,
}

impl LiveDevice {
    /// The device, locked.
    pub fn lock(&self) -> MutexGuard<'_, MmioTransport<VhostUserDevice>> {
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What snapshots and take-overs of a running VM need of it.
pub struct LiveVm {
    pub vm_fd: Arc<VmFd>,
    pub spec: VmSpec,
    pub devices: Vec<LiveDevice>,
    /// The `--serial` UART, if any.
    pub uart: Option<SharedUart>,
    /// Devices that snapshots do not cover, by name and why: a snapshot
    /// or take-over of a VM with any is refused naming them.
    pub unsupported: Vec<String>,
    /// A snapshot left the VM paused with its backends' rings stopped: a
    /// resume must start them again.
    rings_stopped: AtomicBool,
}

/// The VM paused by a snapshot or take-over; dropping it resumes the VM
/// unless it was paused before or [`Paused::keep`] was called.
pub struct Paused<'a> {
    lifecycle: &'a Lifecycle,
    /// Which vCPUs had been started.
    pub started: Vec<bool>,
    resume: bool,
}

impl Paused<'_> {
    /// Leaves the VM paused when this is dropped.
    pub fn keep(mut self) {
        self.resume = false;
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if self.resume {
            self.lifecycle.resume();
        }
    }
}

impl LiveVm {
    pub fn new(
        vm_fd: Arc<VmFd>,
        spec: VmSpec,
        devices: Vec<LiveDevice>,
        uart: Option<SharedUart>,
        unsupported: Vec<String>,
    ) -> LiveVm {
        LiveVm {
            vm_fd,
            spec,
            devices,
            uart,
            unsupported,
            rings_stopped: AtomicBool::new(false),
        }
    }

    /// Refuses a VM with devices snapshots do not cover.
    pub fn check_supported(&self, what: &str) -> Result<()> {
        if self.unsupported.is_empty() {
            return Ok(());
        }
        Err(Error::Takeover(format!(
            "cannot {what} this VM: {}",
            self.unsupported.join("; ")
        )))
    }

    /// Pauses the VM and waits until every started vCPU is parked.
    pub fn pause<'a>(&self, control: &'a VmControl) -> Result<Paused<'a>> {
        let lifecycle = &control.machine.lifecycle;
        let was_paused = lifecycle.is_paused();
        match lifecycle.pause_until_parked(&*control.kick_vcpus) {
            Some(started) => Ok(Paused {
                lifecycle,
                started,
                resume: !was_paused,
            }),
            None => Err(Error::Takeover("the VM is shutting down".into())),
        }
    }

    /// Stops every device's rings (each waits for its backend to complete
    /// what it took); returns where each stopped, by device. If one
    /// fails, those already stopped are started again.
    pub fn stop_rings(&self) -> Result<Vec<Vec<RingPosition>>> {
        let mut positions = Vec::new();
        for device in &self.devices {
            match device.lock().device_mut().stop_rings() {
                Ok(stopped) => positions.push(stopped),
                Err(err) => {
                    for started_again in &self.devices[..positions.len()] {
                        if let Err(e) = started_again.lock().device_mut().resume_rings() {
                            log::error!("{}: cannot restart the rings: {e}", started_again.id);
                        }
                    }
                    return Err(Error::Takeover(format!("{}: {err}", device.id)));
                }
            }
        }
        Ok(positions)
    }

    /// Starts the rings [`Self::stop_rings`] stopped again.
    pub fn resume_rings(&self) -> Result<()> {
        for device in &self.devices {
            device
                .lock()
                .device_mut()
                .resume_rings()
                .map_err(|e| Error::Takeover(format!("{}: {e}", device.id)))?;
        }
        self.rings_stopped.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Records that the rings stay stopped while the VM stays paused.
    pub fn leave_rings_stopped(&self) {
        self.rings_stopped.store(true, Ordering::SeqCst);
    }

    /// Before the VM resumes: starts the rings a snapshot left stopped.
    pub fn before_resume(&self) -> Result<()> {
        if self.rings_stopped.load(Ordering::SeqCst) {
            self.resume_rings()?;
        }
        Ok(())
    }

    /// Reads the whole state of the paused VM; `rings` are where each
    /// device's rings stopped (empty lists in a take-over, whose backends
    /// keep serving).
    pub fn capture(
        &self,
        control: &VmControl,
        paused: &Paused<'_>,
        rings: Vec<Vec<RingPosition>>,
    ) -> Result<VmState> {
        let vcpus = self.capture_vcpus(&control.machine.lifecycle, &paused.started)?;
        let platform = platform::capture(&self.vm_fd, self.spec.linux)?;
        let devices = self
            .devices
            .iter()
            .zip(rings.into_iter().chain(std::iter::repeat(Vec::new())))
            .map(|(device, rings)| {
                let transport = device.lock();
                let status = transport.device().status();
                DeviceState {
                    id: device.id.clone(),
                    kind: device.kind,
                    index: device.index,
                    slot: device.slot,
                    transport: transport.save_state(),
                    rings,
                    socket: status.socket,
                    inflight: transport.device().inflight_log().map(|log| log.shape()),
                }
            })
            .collect();
        // The vCPUs are parked: only the input feeder may touch it.
        let uart = self
            .uart
            .as_ref()
            .map(|uart| uart.lock().unwrap_or_else(|p| p.into_inner()).save_state());
        Ok(VmState {
            format: FORMAT.into(),
            version: VERSION,
            host: HostIdentity::here(),
            config: self.spec.clone(),
            guest_time_ns: control.machine.time_ns(),
            taken_at_ns: monotonic_ns(),
            vcpus,
            platform,
            devices,
            uart,
        })
    }

    /// Each started vCPU's state, read by its own (parked) thread.
    fn capture_vcpus(&self, lifecycle: &Lifecycle, started: &[bool]) -> Result<Vec<VcpuState>> {
        let kvm = Arc::new(crate::vm::open_kvm(&self.spec.kvm_device)?);
        let mut msrs: Option<Arc<Vec<u32>>> = None;
        let mut states = Vec::with_capacity(started.len());
        for (index, &running) in (0u32..).zip(started) {
            if !running {
                states.push(VcpuState {
                    index,
                    registers: None,
                });
                continue;
            }
            let (tx, rx) = mpsc::channel();
            let (kvm, known) = (kvm.clone(), msrs.clone());
            lifecycle.run_on_parked(
                index,
                Box::new(move |fd| {
                    let result = (|| -> Result<(super::state::VcpuRegisters, Arc<Vec<u32>>)> {
                        let list = match known {
                            Some(list) => list,
                            None => Arc::new(vcpu::readable_msrs(&kvm, fd)?),
                        };
                        Ok((vcpu::capture(fd, &list)?, list))
                    })();
                    // The requester waits for this; it is gone only if
                    // it gave up, and then nobody needs the state.
                    let _ = tx.send(result);
                }),
            );
            let (registers, list) = rx.recv().map_err(|_| {
                Error::Takeover(format!("vCPU {index} ended before its state was read"))
            })??;
            msrs = Some(list);
            states.push(VcpuState {
                index,
                registers: Some(Box::new(registers)),
            });
        }
        Ok(states)
    }
}

/// Writes `bytes` to `dir/name` through a temporary file and a rename,
/// so the file is either whole or absent.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let temporary = dir.join(format!("{name}.partial"));
    let file_error = |action, source| Error::File {
        action,
        path: path.clone(),
        cause: source,
    };
    std::fs::write(&temporary, bytes).map_err(|e| file_error("write", e))?;
    let file = std::fs::File::open(&temporary).map_err(|e| file_error("reopen", e))?;
    file.sync_all().map_err(|e| file_error("sync", e))?;
    std::fs::rename(&temporary, &path).map_err(|e| file_error("rename into place", e))
}
