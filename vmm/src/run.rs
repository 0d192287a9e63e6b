//! `pvstack run`: from command-line options to a finished VM.

use pvstack_devices::{
    create_blk, create_console, create_net, create_uart, BlkDevice, BlkSpec, ConsoleDevice,
    ConsoleSpec, DeviceContext, NetDevice, NetSpec, UartDevice,
};

use crate::api::{ApiDevice, ApiServer};
use crate::cli::RunArgs;
use crate::console::Console;
use crate::error::{Error, Result};
use crate::lifecycle::VmEnd;
use crate::vm::{Vm, VmConfig};

/// Builds the VM `args` describe, runs it and returns how it ended.
pub fn run(args: &RunArgs) -> Result<VmEnd> {
    // Read the image first: a bad path should fail before any VM exists.
    let kernel = match &args.kernel {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|source| Error::File {
                action: "open kernel",
                path: path.clone(),
                source,
            })?;
            Some((bytes, path.display().to_string()))
        }
        None => None,
    };
    let console = match &args.console_log {
        Some(path) => Console::file(path)?,
        None => Console::stdout(),
    };
    let mut vm = Vm::new(&VmConfig {
        kvm_device: args.kvm_device.clone(),
        memory_size: args.memory,
        cpus: args.cpus,
        privilege: args.guest_privilege,
        cmdline: args.guest_args.clone(),
    })?;
    if let Some((image, name)) = &kernel {
        vm.load_kernel(image, name)?;
    }
    // The devices own their backend connections (and any child backend
    // process), so they must live until the VM has ended.
    let disks = attach_disks(&mut vm, &args.blk)?;
    let nics = attach_nics(&mut vm, &args.net, disks.len() as u32)?;
    let consoles = attach_consoles(&mut vm, args, (disks.len() + nics.len()) as u32)?;
    if let Some(path) = &args.api_socket {
        // Disks the VMM emulates itself have no backend to swap.
        let devices = disks
            .iter()
            .filter_map(|disk| {
                Some(ApiDevice {
                    id: disk.id().to_string(),
                    device: disk.transport()?.clone(),
                })
            })
            .chain(nics.iter().filter_map(|nic| {
                Some(ApiDevice {
                    id: nic.id().to_string(),
                    device: nic.transport()?.clone(),
                })
            }))
            .collect();
        vm.serve_api(ApiServer::bind(path, devices)?);
    }
    let end = vm.run(console);
    drop(disks);
    drop(nics);
    drop(consoles);
    end
}

/// Creates the `--blk` devices, in slots 0, 1, ... in command-line order.
fn attach_disks(vm: &mut Vm, specs: &[BlkSpec]) -> Result<Vec<BlkDevice>> {
    let mut disks = Vec::with_capacity(specs.len());
    for (index, spec) in (0u32..).zip(specs) {
        let slot = index;
        let context = DeviceContext::for_slot(vm.vm_fd(), vm.memory(), slot, index);
        let disk = create_blk(spec, &context).map_err(|source| Error::Blk { index, source })?;
        vm.add_device(slot, disk.bus_device(), disk.info())?;
        disks.push(disk);
    }
    Ok(disks)
}

/// Creates the `--net` devices in the slots from `first_slot` on, in
/// command-line order.
fn attach_nics(vm: &mut Vm, specs: &[NetSpec], first_slot: u32) -> Result<Vec<NetDevice>> {
    let mut nics = Vec::with_capacity(specs.len());
    for (index, spec) in (0u32..).zip(specs) {
        let slot = first_slot + index;
        let context = DeviceContext::for_slot(vm.vm_fd(), vm.memory(), slot, index);
        let nic = create_net(spec, &context).map_err(|source| Error::Net { index, source })?;
        vm.add_device(slot, nic.bus_device(), nic.info())?;
        nics.push(nic);
    }
    Ok(nics)
}

/// The console devices of a VM, kept alive while it runs.
struct Consoles {
    _virtio: Option<ConsoleDevice>,
    _uart: Option<UartDevice>,
}

/// Creates the `--console` device and the `--serial` UART in the slots
/// from `first_slot` on (virtio console first).
fn attach_consoles(vm: &mut Vm, args: &RunArgs, first_slot: u32) -> Result<Consoles> {
    let mut slot = first_slot;
    let mut virtio = None;
    if let Some(spec) = args.console.as_ref().filter(|spec| spec.is_virtio()) {
        let context = DeviceContext::for_slot(vm.vm_fd(), vm.memory(), slot, 0);
        let console = create_console(spec, &context).map_err(|source| Error::Console {
            option: "console",
            source,
        })?;
        vm.add_device(slot, console.bus_device(), console.info())?;
        virtio = Some(console);
        slot += 1;
    }
    let mut uart = None;
    if args.serial || args.console == Some(ConsoleSpec::Uart) {
        let context = DeviceContext::for_slot(vm.vm_fd(), vm.memory(), slot, 0);
        let device = create_uart(&context, Box::new(std::io::stdout())).map_err(|source| {
            Error::Console {
                option: "serial",
                source,
            }
        })?;
        vm.add_device(slot, device.bus_device(), device.info())?;
        uart = Some(device);
    }
    Ok(Consoles {
        _virtio: virtio,
        _uart: uart,
    })
}
