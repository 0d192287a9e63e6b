//! `pvstack restore --from DIR`: a new VM from a snapshot, on this host,
//! with the snapshot's configuration unless options override it, and the
//! steps a take-over shares with it: devices back in their state, vCPUs
//! and the in-kernel devices set, the VM run.

use std::str::FromStr;
use std::time::Instant;

use pvstack_devices::{BlkSpec, NetSpec};

use super::memfile;
use super::state::{DeviceState, VmSpec, VmState, MEMORY_FILE, STATE_FILE};
use super::{platform, vcpu};
use crate::cli::RestoreArgs;
use crate::console::Console;
use crate::error::{Error, Result};
use crate::lifecycle::VmEnd;
use crate::memory;
use crate::run::Devices;
use crate::vcpu::{Launch, Vcpu};
use crate::vm::{Vm, VmConfig};

/// Restores the snapshot `args` name and runs it until the VM ends.
pub fn restore(args: &RestoreArgs) -> Result<VmEnd> {
    let began = Instant::now();
    let dir = &args.from;
    let snapshot_error = |reason: String| Error::Snapshot {
        dir: dir.clone(),
        reason,
    };
    if !dir.is_dir() {
        return Err(snapshot_error("no such directory".into()));
    }
    let bytes = std::fs::read(dir.join(STATE_FILE))
        .map_err(|e| snapshot_error(format!("cannot read {STATE_FILE}: {e}")))?;
    let state = VmState::from_json(&bytes, dir)?;
    state.check_host(dir)?;
    let mut spec = state.config.clone();
    override_spec(&mut spec, args)?;
    crate::sandbox::configure(&args.sandbox);
    let console = own_console(&spec)?;
    let file = memfile::load(&dir.join(MEMORY_FILE), spec.memory_size, args.memory)?;
    let memory = memory::from_file(file, spec.memory_size)?;
    // The VM's creation begins here: the vCPU's `boot:` line counts its
    // `vm setup` from this point, so memory plus vm setup is the time from
    // the restore's start to the first guest instruction.
    let memory_ready = began.elapsed();
    let mut vm = Vm::with_memory(&vm_config(&spec), memory)?;
    let devices = Devices::attach(&mut vm, &mut spec, &|_| None)?;
    restore_devices(&devices, &state.devices, None)?;
    let devices_ready = began.elapsed();
    devices.serve(&mut vm, spec, None)?;
    let vcpus = vm.create_vcpus()?;
    let launches = restore_vcpus(&vm, &vcpus, &state, 0)?;
    devices.restore_uart(state.uart.as_ref())?;
    crate::sandbox::confine_vmm()?;
    log::info!(
        "restore: {} ready to run {:.1} ms after the restore began (memory {:.1} ms as {:?}, devices {:.1} ms)",
        dir.display(),
        ms(began.elapsed()),
        ms(memory_ready),
        args.memory,
        ms(devices_ready - memory_ready),
    );
    let end = vm.run_vcpus(vcpus, launches, console, state.guest_time_ns);
    drop(devices);
    end
}

fn ms(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The VM to create for `spec`.
pub(crate) fn vm_config(spec: &VmSpec) -> VmConfig {
    VmConfig {
        kvm_device: spec.kvm_device.clone(),
        memory_size: spec.memory_size,
        cpus: spec.cpus,
        privilege: Some(spec.privilege),
        cmdline: spec.cmdline.clone(),
        linux: spec.linux,
    }
}

/// pvstack's own guest's console: appended to `--console-log`, or stdout.
pub(crate) fn own_console(spec: &VmSpec) -> Result<Console> {
    match &spec.console_log {
        Some(path) => Console::append(path),
        None => Ok(Console::stdout()),
    }
}

/// Applies the restore's options to the snapshot's configuration.
fn override_spec(spec: &mut VmSpec, args: &RestoreArgs) -> Result<()> {
    for value in &args.blk {
        let (id, text) = split_override("blk", value)?;
        let mut replacement =
            BlkSpec::from_str(text).map_err(|e| Error::Usage(format!("--blk {value}: {e}")))?;
        replacement.id = Some(id.to_string());
        let ids: Vec<String> = spec.blk.iter().filter_map(|b| b.id.clone()).collect();
        let slot = spec
            .blk
            .iter_mut()
            .find(|b| b.id.as_deref() == Some(id))
            .ok_or_else(|| {
                Error::Usage(format!(
                    "--blk {value}: the snapshot has no disk {id:?} (disks: {})",
                    ids.join(", ")
                ))
            })?;
        *slot = replacement;
    }
    for value in &args.net {
        let (id, text) = split_override("net", value)?;
        let mut replacement =
            NetSpec::from_str(text).map_err(|e| Error::Usage(format!("--net {value}: {e}")))?;
        let ids: Vec<String> = spec.net.iter().filter_map(|n| n.id.clone()).collect();
        let slot = spec
            .net
            .iter_mut()
            .find(|n| n.id.as_deref() == Some(id))
            .ok_or_else(|| {
                Error::Usage(format!(
                    "--net {value}: the snapshot has no NIC {id:?} (NICs: {})",
                    ids.join(", ")
                ))
            })?;
        // The guest keeps the MAC its driver read.
        replacement.id = Some(id.to_string());
        replacement.mac = slot.mac;
        *slot = replacement;
    }
    if let Some(console) = &args.console {
        if spec.console.as_ref().map(|c| c.is_virtio()) != Some(console.is_virtio()) {
            return Err(Error::Usage(
                "--console: the snapshot's console is of another kind; only its backend can change"
                    .into(),
            ));
        }
        spec.console = Some(console.clone());
    }
    if args.api_socket.is_some() {
        spec.api_socket.clone_from(&args.api_socket);
    }
    if let Some(mode) = args.api_socket_mode {
        spec.api_socket_mode = mode;
    }
    if args.console_log.is_some() {
        spec.console_log.clone_from(&args.console_log);
    }
    Ok(())
}

/// `ID=SPEC` of a `--blk`/`--net` override.
fn split_override<'a>(option: &str, value: &'a str) -> Result<(&'a str, &'a str)> {
    value
        .split_once('=')
        .filter(|(id, spec)| !id.is_empty() && spec.contains('='))
        .ok_or_else(|| {
            Error::Usage(format!(
                "--{option} {value}: expected ID=SPEC, e.g. {option}0=socket=/path/to.sock"
            ))
        })
}

/// The inflight log handed over for a device, by name.
pub(crate) type InflightLogs<'a> =
    dyn FnMut(&str) -> Option<pvstack_devices::vhost_user::InflightLog> + 'a;

/// Puts each device of `saved` back in its state on the device of the
/// same name (the two VMs must have the same devices). Without `adopt`,
/// each device's rings start on its backend where the snapshot stopped
/// them; with it (a take-over), the backends keep serving the rings and
/// `adopt` gives each device its handed-over inflight log.
pub(crate) fn restore_devices(
    devices: &Devices,
    saved: &[DeviceState],
    mut adopt: Option<&mut InflightLogs<'_>>,
) -> Result<()> {
    let live = devices.vhost_user();
    let names = |list: &mut dyn Iterator<Item = &str>| list.collect::<Vec<_>>().join(", ");
    if live.len() != saved.len() {
        return Err(Error::Takeover(format!(
            "the saved VM has the devices [{}], this one [{}]",
            names(&mut saved.iter().map(|d| d.id.as_str())),
            names(&mut live.iter().map(|d| d.id.as_str()))
        )));
    }
    for device in saved {
        let Some(target) = live
            .iter()
            .find(|l| l.id == device.id && l.kind == device.kind)
        else {
            return Err(Error::Takeover(format!(
                "the saved device {} ({:?}) is not in this VM",
                device.id, device.kind
            )));
        };
        let mut transport = target.lock();
        match adopt.as_mut() {
            None => transport.restore_state(&device.transport, |dev, act| {
                dev.restore_rings(act, &device.rings)
            })?,
            Some(inflight) => {
                let log = inflight(&device.id);
                transport.restore_state(&device.transport, |dev, act| dev.adopt_rings(act, log))?
            }
        }
    }
    Ok(())
}

/// Sets the saved state on the new `vcpus` and on the VM's in-kernel
/// devices; returns how each vCPU thread begins.
/// `advance_ns`: how far the guest's clocks move on (see
/// [`vcpu::restore`]).
pub(crate) fn restore_vcpus(
    vm: &Vm,
    vcpus: &[Vcpu],
    state: &VmState,
    advance_ns: u64,
) -> Result<Vec<Launch>> {
    if state.vcpus.len() != vcpus.len() {
        return Err(Error::Takeover(format!(
            "the state has {} vCPUs, the VM {}",
            state.vcpus.len(),
            vcpus.len()
        )));
    }
    platform::restore(vm.vm_fd(), &state.platform, advance_ns)?;
    let started: Vec<bool> = state.vcpus.iter().map(|v| v.registers.is_some()).collect();
    vm.lifecycle().set_started(&started);
    let mut launches = Vec::with_capacity(vcpus.len());
    for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
        match &saved.registers {
            Some(registers) => {
                vcpu::restore(&vcpu.fd, registers, advance_ns)?;
                launches.push(Launch::Configured);
            }
            None => launches.push(Launch::OnCpuStart),
        }
    }
    Ok(launches)
}
