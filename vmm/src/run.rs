//! `pvstack run`: from command-line options to a finished VM.

use std::borrow::Cow;

use pvstack_devices::blk::BlkMode;
use pvstack_devices::{
    create_blk, create_console, create_net, create_serial_port, create_uart, BlkDevice, BlkSpec,
    ConsoleDevice, ConsoleSpec, DeviceContext, NetDevice, NetSpec, SerialPort, SharedUart,
    UartDevice, UartState,
};

use std::os::unix::net::UnixListener;
use std::sync::{Arc, MutexGuard};

use pvstack_devices::vhost_user::{SharedVhostUserDevice, VhostUserDevice};
use pvstack_devices::virtio::mmio::MmioTransport;
use pvstack_devices::InheritedDevice;

use crate::api::{ApiDevice, ApiServer};
use crate::boot::linux::LinuxGuest;
use crate::boot::{own_guest, Guest, KernelKind};
use crate::cli::RunArgs;
use crate::console::{guest_stdout, Console};
use crate::error::{Error, Result};
use crate::kvm_flavour::{Flavour, Privilege};
use crate::lifecycle::VmEnd;
use crate::memory;
use crate::snapshot::state::{DeviceKind, VmSpec};
use crate::snapshot::{LiveDevice, LiveVm};
use crate::vm::{Vm, VmConfig};

/// Builds the VM `args` describe, runs it and returns how it ended.
pub fn run(args: &RunArgs) -> Result<VmEnd> {
    // Read and check the guest first: a bad image or option should fail
    // before any VM exists.
    let guest = guest(args)?;
    if guest.is_linux() {
        check_linux_options(args)?;
    }
    crate::sandbox::configure(&args.sandbox);
    let console = match &args.console_log {
        Some(path) => Console::file(path, args.console_log_max_bytes)?,
        None => Console::stdout(),
    };
    let config = VmConfig {
        kvm_device: args.kvm_device.clone(),
        memory_size: args.memory,
        cpus: args.cpus,
        privilege: args.guest_privilege,
        cmdline: args.own_guest_args().to_string(),
        linux: guest.is_linux(),
    };
    let mut vm = if args.hugepages {
        Vm::with_memory(&config, memory::create_huge(args.memory)?)?
    } else {
        Vm::new(&config)?
    };
    let mut spec = VmSpec {
        kvm_device: args.kvm_device.clone(),
        memory_size: args.memory,
        cpus: args.cpus,
        privilege: vm.privilege(),
        linux: guest.is_linux(),
        kernel: args.kernel.clone(),
        cmdline: args.own_guest_args().to_string(),
        blk: args.blk.clone(),
        net: args.net.clone(),
        console: args.console.clone(),
        serial: args.serial,
        console_log: args.console_log.clone(),
        api_socket: args.api_socket.clone(),
        api_socket_mode: args.api_socket_mode,
    };
    // The devices own their backend connections (and any child backend
    // process), so they must live until the VM has ended.
    let devices = Devices::attach(&mut vm, &mut spec, &|_| None)?;
    devices.serve(&mut vm, spec, None)?;
    // Set up: from here on every thread keeps to pvstack's allow-list.
    crate::sandbox::confine_vmm()?;
    let end = vm.run(guest, console);
    drop(devices);
    end
}

/// The devices of a VM, kept alive while it runs.
pub(crate) struct Devices {
    disks: Vec<BlkDevice>,
    nics: Vec<NetDevice>,
    consoles: Consoles,
    /// The virtio-console over vhost-user, if any.
    console: Option<SharedVhostUserDevice>,
}

/// The device a take-over hands over for a slot, if any.
pub(crate) type Inheritance<'a> = dyn Fn(u32) -> Option<&'a InheritedDevice> + 'a;

impl Devices {
    /// Creates the devices `spec` describes in their slots (disks, NICs,
    /// the console, the UART) and records in `spec` the names and MACs
    /// they got, so a snapshot names them the same. `inherited` gives
    /// what a take-over hands over for each slot.
    pub(crate) fn attach(
        vm: &mut Vm,
        spec: &mut VmSpec,
        inherited: &Inheritance<'_>,
    ) -> Result<Devices> {
        let disks = attach_disks(vm, &spec.blk, inherited)?;
        let nics = attach_nics(vm, &spec.net, disks.len() as u32, inherited)?;
        let (consoles, console) = attach_consoles(
            vm,
            spec.console.as_ref(),
            spec.has_uart(),
            (disks.len() + nics.len()) as u32,
            spec.linux,
            inherited,
        )?;
        for (blk, disk) in spec.blk.iter_mut().zip(&disks) {
            blk.id = Some(disk.id().to_string());
        }
        for (net, nic) in spec.net.iter_mut().zip(&nics) {
            net.id = Some(nic.id().to_string());
            net.mac = Some(nic.mac());
        }
        Ok(Devices {
            disks,
            nics,
            consoles,
            console,
        })
    }

    /// The vhost-user devices by name, in slot order, with their slots.
    pub(crate) fn vhost_user(&self) -> Vec<LiveDevice> {
        let disks = (0u32..).zip(&self.disks).filter_map(|(index, disk)| {
            Some(LiveDevice {
                id: disk.id().to_string(),
                kind: DeviceKind::Blk,
                index,
                slot: index,
                transport: disk.transport()?.clone(),
            })
        });
        let first_nic = self.disks.len() as u32;
        let nics = (0u32..).zip(&self.nics).filter_map(|(index, nic)| {
            Some(LiveDevice {
                id: nic.id().to_string(),
                kind: DeviceKind::Net,
                index,
                slot: first_nic + index,
                transport: nic.transport()?.clone(),
            })
        });
        let console = self.console.iter().map(|transport| {
            let id = lock(transport).name().to_string();
            let slot = self.disks.len() + self.nics.len();
            LiveDevice {
                id,
                kind: DeviceKind::Console,
                index: 0,
                slot: slot as u32,
                transport: transport.clone(),
            }
        });
        disks.chain(nics).chain(console).collect()
    }

    /// The devices snapshots do not cover, named with why.
    fn unsupported(&self) -> Vec<String> {
        self.disks
            .iter()
            .filter(|disk| disk.transport().is_none())
            .map(|disk| format!("{} is served in the VMM (mode={})", disk.id(), disk.mode()))
            .chain(
                self.nics
                    .iter()
                    .filter(|nic| nic.transport().is_none())
                    .map(|nic| format!("{} is served in the VMM (mode=emulated)", nic.id())),
            )
            .collect()
    }

    /// Sets the saved UART state on this VM's UART; after the in-kernel
    /// irqchip's state, so that the interrupt it raises again if one was
    /// pending reaches the guest.
    pub(crate) fn restore_uart(&self, saved: Option<&UartState>) -> Result<()> {
        // VmState::from_json refused a state whose UART and configuration
        // disagree, and the configuration made this VM's devices.
        match (self.consoles.uart(), saved) {
            (Some(uart), Some(saved)) => Ok(uart
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore_state(saved)?),
            (None, None) => Ok(()),
            (ours, _) => Err(Error::Takeover(format!(
                "the saved VM {}, this one {}",
                if saved.is_some() {
                    "has an emulated UART"
                } else {
                    "has no emulated UART"
                },
                if ours.is_some() {
                    "has one"
                } else {
                    "has none"
                }
            ))),
        }
    }

    /// Serves the control API if `spec` asks for it (on `listener` if one
    /// is handed over) and lets it snapshot and hand over the VM.
    pub(crate) fn serve(
        &self,
        vm: &mut Vm,
        spec: VmSpec,
        listener: Option<UnixListener>,
    ) -> Result<()> {
        let live = self.vhost_user();
        if let Some(path) = &spec.api_socket {
            let devices = live
                .iter()
                .filter(|device| device.kind != DeviceKind::Console)
                .map(|device| ApiDevice {
                    id: device.id.clone(),
                    device: device.transport.clone(),
                })
                .collect();
            let server = match listener {
                Some(listener) => ApiServer::from_listener(listener, path, devices),
                None => ApiServer::bind(path, spec.api_socket_mode, devices)?,
            };
            vm.serve_api(server);
        }
        let unsupported = self.unsupported();
        vm.enable_snapshots(Arc::new(LiveVm::new(
            vm.vm_fd().clone(),
            spec,
            live,
            self.consoles.uart(),
            unsupported,
        )));
        Ok(())
    }
}

fn lock(device: &SharedVhostUserDevice) -> MutexGuard<'_, MmioTransport<VhostUserDevice>> {
    device.lock().unwrap_or_else(|p| p.into_inner())
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
        cause: source,
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

/// The context for a device in `slot`, inheriting what a take-over
/// hands over for it.
fn context<'a>(
    vm: &'a Vm,
    slot: u32,
    index: u32,
    inherited: Option<&'a InheritedDevice>,
) -> DeviceContext<'a> {
    let context = DeviceContext::for_slot(vm.vm_fd(), vm.memory(), slot, index);
    match inherited {
        Some(inherited) => context.inheriting(inherited),
        None => context,
    }
}

/// Creates the `--blk` devices, in slots 0, 1, ... in command-line order.
fn attach_disks(
    vm: &mut Vm,
    specs: &[BlkSpec],
    inherited: &Inheritance<'_>,
) -> Result<Vec<BlkDevice>> {
    let mut disks = Vec::with_capacity(specs.len());
    for (index, spec) in (0u32..).zip(specs) {
        let slot = index;
        let disk =
            create_blk(spec, &context(vm, slot, index, inherited(slot))).map_err(|source| {
                Error::Blk {
                    index,
                    cause: source,
                }
            })?;
        vm.add_device(slot, disk.bus_device(), disk.info())?;
        disks.push(disk);
    }
    Ok(disks)
}

/// Creates the `--net` devices in the slots from `first_slot` on, in
/// command-line order.
fn attach_nics(
    vm: &mut Vm,
    specs: &[NetSpec],
    first_slot: u32,
    inherited: &Inheritance<'_>,
) -> Result<Vec<NetDevice>> {
    let mut nics = Vec::with_capacity(specs.len());
    for (index, spec) in (0u32..).zip(specs) {
        let slot = first_slot + index;
        let nic =
            create_net(spec, &context(vm, slot, index, inherited(slot))).map_err(|source| {
                Error::Net {
                    index,
                    cause: source,
                }
            })?;
        vm.add_device(slot, nic.bus_device(), nic.info())?;
        nics.push(nic);
    }
    Ok(nics)
}

/// The console devices of a VM, kept alive while it runs.
struct Consoles {
    _virtio: Option<ConsoleDevice>,
    uart: Option<UartDevice>,
    serial_port: Option<SerialPort>,
}

impl Consoles {
    /// The `--serial` UART, wherever it is.
    fn uart(&self) -> Option<SharedUart> {
        let in_slot = self.uart.as_ref().map(UartDevice::uart);
        in_slot.or_else(|| self.serial_port.as_ref().map(SerialPort::uart))
    }
}

/// Creates the `--console` device in the slot `first_slot`, and the
/// `--serial` UART: for pvstack's own guest in the next slot, for a Linux
/// guest at COM1 with stdin as its input. Returns them with the
/// virtio-console's transport.
fn attach_consoles(
    vm: &mut Vm,
    console: Option<&ConsoleSpec>,
    serial: bool,
    first_slot: u32,
    linux: bool,
    inherited: &Inheritance<'_>,
) -> Result<(Consoles, Option<SharedVhostUserDevice>)> {
    let mut slot = first_slot;
    let mut virtio = None;
    let mut transport = None;
    if let Some(spec) = console.filter(|spec| spec.is_virtio()) {
        let device =
            create_console(spec, &context(vm, slot, 0, inherited(slot))).map_err(|source| {
                Error::Console {
                    option: "console",
                    cause: source,
                }
            })?;
        vm.add_device(slot, device.bus_device(), device.info())?;
        transport = Some(device.transport().clone());
        virtio = Some(device);
        slot += 1;
    }
    let serial_error = |source| Error::Console {
        option: "serial",
        cause: source,
    };
    if serial && linux {
        let port = create_serial_port(vm.vm_fd(), guest_stdout(), Some(Box::new(std::io::stdin())))
            .map_err(serial_error)?;
        vm.add_serial_port(&port)?;
        let consoles = Consoles {
            _virtio: virtio,
            uart: None,
            serial_port: Some(port),
        };
        return Ok((consoles, transport));
    }
    let mut uart = None;
    if serial {
        let context = DeviceContext::for_slot(vm.vm_fd(), vm.memory(), slot, 0);
        let device = create_uart(&context, guest_stdout()).map_err(|source| Error::Console {
            option: "serial",
            cause: source,
        })?;
        vm.add_device(slot, device.bus_device(), device.info())?;
        uart = Some(device);
    }
    let consoles = Consoles {
        _virtio: virtio,
        uart,
        serial_port: None,
    };
    Ok((consoles, transport))
}
