//! `pvstack run`: from command-line options to a finished VM.

use std::borrow::Cow;

use pvstack_devices::blk::BlkMode;
use pvstack_devices::{
    create_blk, create_console, create_net, create_serial_port, create_uart, BlkDevice, BlkSpec,
    ConsoleDevice, ConsoleSpec, DeviceContext, NetDevice, NetSpec, SerialPort, UartDevice,
};

use crate::api::{ApiDevice, ApiServer};
use crate::boot::linux::LinuxGuest;
use crate::boot::{own_guest, Guest, KernelKind};
use crate::cli::RunArgs;
use crate::console::{guest_stdout, Console};
use crate::error::{Error, Result};
use crate::flavour::{Flavour, Privilege};
use crate::lifecycle::VmEnd;
use crate::vm::{Vm, VmConfig};

/// Builds the VM `args` describe, runs it and returns how it ended.
pub fn run(args: &RunArgs) -> Result<VmEnd> {
    // Read and check the guest first: a bad image or option should fail
    // before any VM exists.
    let guest = guest(args)?;
    if guest.is_linux() {
        check_linux_options(args)?;
    }
    let console = match &args.console_log {
        Some(path) => Console::file(path, args.console_log_max_bytes)?,
        None => Console::stdout(),
    };
    let mut vm = Vm::new(&VmConfig {
        kvm_device: args.kvm_device.clone(),
        memory_size: args.memory,
        cpus: args.cpus,
        privilege: args.guest_privilege,
        cmdline: args.own_guest_args().to_string(),
        linux: guest.is_linux(),
    })?;
    // The devices own their backend connections (and any child backend
    // process), so they must live until the VM has ended.
    let disks = attach_disks(&mut vm, &args.blk)?;
    let nics = attach_nics(&mut vm, &args.net, disks.len() as u32)?;
    let consoles = attach_consoles(
        &mut vm,
        args,
        (disks.len() + nics.len()) as u32,
        guest.is_linux(),
    )?;
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
    let end = vm.run(guest, console);
    drop(disks);
    drop(nics);
    drop(consoles);
    end
}

/// Reads `--kernel` (or takes the built-in guest), tells what it is and,
/// for a Linux kernel, checks it with its initrd and command line against
/// the VM's memory.
fn guest(args: &RunArgs) -> Result<Guest> {
    let Some(path) = &args.kernel else {
        return Ok(Guest::Own {
            image: Cow::Borrowed(own_guest::BUILTIN_GUEST),
            name: "built-in guest".into(),
        });
    };
    let image = std::fs::read(path).map_err(|source| Error::File {
        action: "open kernel",
        path: path.clone(),
        source,
    })?;
    let name = path.display().to_string();
    let kind = KernelKind::detect(&image).ok_or_else(|| Error::BadImage {
        image: name.clone(),
        reason: "not an ELF file or a Linux bzImage".into(),
    })?;
    if !kind.is_linux() {
        for (given, option) in [
            (args.initrd.is_some(), "--initrd"),
            (args.cmdline.is_some(), "--cmdline"),
        ] {
            if given {
                return Err(Error::Usage(format!(
                    "{option} is for a Linux kernel, and {name} is pvstack's own kind of guest (an ELF without a PVH note); it takes --guest-args"
                )));
            }
        }
        return Ok(Guest::Own {
            image: Cow::Owned(image),
            name,
        });
    }
    let linux = LinuxGuest::new(
        name,
        image,
        kind,
        args.initrd.clone(),
        args.cmdline.clone().unwrap_or_default(),
        args.memory,
    )?;
    Ok(Guest::Linux(Box::new(linux)))
}

/// What a Linux guest cannot have: options of pvstack's own guest, a disk
/// it has no driver for, two readers of stdin, and a PVM host unless the
/// user insists.
fn check_linux_options(args: &RunArgs) -> Result<()> {
    let usage = |text: String| Err(Error::Usage(text));
    if args.guest_args.is_some() {
        return usage(
            "--guest-args is for pvstack's own guest; a Linux kernel takes --cmdline".into(),
        );
    }
    if args.console_log.is_some() {
        return usage("--console-log is pvstack's own guest's hypercall console; a Linux guest's console is --serial (ttyS0) or --console (hvc0)".into());
    }
    if args.guest_privilege == Some(Privilege::User) {
        return usage("--guest-privilege user: a Linux kernel runs at CPL0".into());
    }
    if let Some(index) = args
        .blk
        .iter()
        .position(|b| b.mode == BlkMode::EmulatedLegacy)
    {
        return usage(format!(
            "--blk number {index}: mode=emulated-legacy is pvstack's register-level disk controller, which Linux has no driver for; use mode=emulated-virtio or a vhost-user mode"
        ));
    }
    if args.serial && args.console == Some(ConsoleSpec::Stdio) {
        return usage(
            "--serial and --console stdio would both read pvstack's stdin; give the virtio console pty or unix=PATH".into(),
        );
    }
    if Flavour::detect() == Flavour::Pvm && args.guest_privilege != Some(Privilege::Kernel) {
        let image = args
            .kernel
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        return Err(Error::LinuxOnPvm { image });
    }
    Ok(())
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
    _serial_port: Option<SerialPort>,
}

/// Creates the `--console` device in the slot `first_slot`, and the
/// `--serial` UART: for pvstack's own guest in the next slot, for a Linux
/// guest at COM1 with stdin as its input.
fn attach_consoles(vm: &mut Vm, args: &RunArgs, first_slot: u32, linux: bool) -> Result<Consoles> {
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
    let serial = args.serial || args.console == Some(ConsoleSpec::Uart);
    let serial_error = |source| Error::Console {
        option: "serial",
        source,
    };
    if serial && linux {
        let port = create_serial_port(vm.vm_fd(), guest_stdout(), Some(Box::new(std::io::stdin())))
            .map_err(serial_error)?;
        vm.add_serial_port(&port)?;
        return Ok(Consoles {
            _virtio: virtio,
            _uart: None,
            _serial_port: Some(port),
        });
    }
    let mut uart = None;
    if serial {
        let context = DeviceContext::for_slot(vm.vm_fd(), vm.memory(), slot, 0);
        let device = create_uart(&context, guest_stdout()).map_err(|source| Error::Console {
            option: "serial",
            source,
        })?;
        vm.add_device(slot, device.bus_device(), device.info())?;
        uart = Some(device);
    }
    Ok(Consoles {
        _virtio: virtio,
        _uart: uart,
        _serial_port: None,
    })
}
