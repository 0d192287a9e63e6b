//! Building and running a VM: KVM, guest memory, devices, the guest (one
//! of the two boot paths of `crate::boot`), then one thread per vCPU
//! until the VM ends.
//!
//! ```text
//! let mut vm = Vm::new(&config)?;          // KVM VM, memory, irqchip (+ PIT and
//!                                          // legacy ports for a Linux guest)
//! vm.add_device(slot, device, info)?;      // as many as needed
//! vm.add_serial_port(port)?;               // Linux: COM1
//! let end = vm.run(guest, console)?;       // loads the guest, blocks until the VM ends
//! ```

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use pvstack_devices::bus::{Bus, SharedDevice};
use pvstack_devices::console::uart;
use pvstack_devices::legacy::{self, AcpiPowerRegisters, PowerEvent, PowerHandler, I8042};
use pvstack_devices::SerialPort;
use pvstack_protocols::boot::{device_kind, BootInfo, DeviceInfo, BOOT_INFO_MAGIC, CMDLINE_MAX};
use pvstack_protocols::hypercall::ABI_VERSION;
use pvstack_protocols::layout;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::signal::Killable;

use crate::acpi::AcpiPlatform;
use crate::api::{ApiServer, VmControl};
use crate::boot::{own_guest, Guest};
use crate::console::Console;
use crate::counters::ExitCounters;
use crate::error::{Error, Result};
use crate::kvm_flavour::{Flavour, Privilege};
use crate::lifecycle::{Lifecycle, VmEnd};
use crate::machine::Machine;
use crate::memory::{self, GuestMemory};
use crate::snapshot::LiveVm;
use crate::vcpu::{self, Launch, Vcpu};
use crate::x86::cpuid::Topology;
use crate::{signals, x86};

/// The KVM API version every KVM since Linux 2.6.22 reports.
pub const KVM_API_VERSION: i32 = 12;

/// Where VMX wants its TSS and identity-map pages: just below the
/// in-kernel IOAPIC/LAPIC, inside the MMIO hole, out of the guest's RAM.
const VMX_TSS_ADDR: usize = 0xfffb_d000;
const VMX_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// What to build.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The KVM device node, normally /dev/kvm.
    pub kvm_device: PathBuf,
    /// Bytes of guest RAM.
    pub memory_size: u64,
    /// vCPU count.
    pub cpus: u32,
    /// Guest privilege; `None` picks the flavour's default.
    pub privilege: Option<Privilege>,
    /// pvstack's own guest's command line (at most [`CMDLINE_MAX`]
    /// bytes), for its boot info.
    pub cmdline: String,
    /// The VM boots a Linux kernel: it gets a PIT, the legacy PC ports
    /// (i8042 reset, ACPI power registers) and all vCPUs run from the
    /// start.
    pub linux: bool,
}

impl VmConfig {
    /// Checks the limits of the memory map (the CLI checks them too, as
    /// usage errors; this guards other callers).
    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config(what));
        if !(1..=layout::MAX_VCPUS).contains(&self.cpus) {
            return bad(format!(
                "{} vCPUs, must be 1 to {}",
                self.cpus,
                layout::MAX_VCPUS
            ));
        }
        if !(layout::MIN_MEMORY..=layout::MAX_MEMORY).contains(&self.memory_size)
            || self.memory_size % 4096 != 0
        {
            return bad(format!(
                "{} bytes of memory, must be a multiple of 4K from {} to {}",
                self.memory_size,
                layout::MIN_MEMORY,
                layout::MAX_MEMORY
            ));
        }
        if self.cmdline.len() > CMDLINE_MAX {
            return bad(format!("command line longer than {CMDLINE_MAX} bytes"));
        }
        Ok(())
    }
}

/// A VM being set up.
pub struct Vm {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    memory: GuestMemory,
    bus: Bus,
    pio: Bus,
    devices: BTreeMap<u32, DeviceInfo>,
    serial_port: bool,
    flavour: Flavour,
    privilege: Privilege,
    cpus: u32,
    cmdline: String,
    linux: bool,
    tsc_deadline: bool,
    lifecycle: Arc<Lifecycle>,
    created: Instant,
    api: Option<ApiServer>,
    /// What snapshots and take-overs of the running VM need.
    live: Option<Arc<LiveVm>>,
}

/// Opens the KVM device and checks its API version.
pub fn open_kvm(path: &Path) -> Result<Kvm> {
    let open_error = |source| Error::KvmOpen {
        path: path.to_path_buf(),
        cause: source,
    };
    // A path from the command line cannot hold a NUL byte; refuse it anyway.
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| open_error(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(open_error)?;
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(Error::NotKvm {
            path: path.to_path_buf(),
        });
    }
    if version != KVM_API_VERSION {
        return Err(Error::KvmApiVersion {
            path: path.to_path_buf(),
            found: version,
            expected: KVM_API_VERSION,
        });
    }
    Ok(kvm)
}

impl Vm {
    /// Creates the KVM VM with its memory and in-kernel irqchip.
    pub fn new(config: &VmConfig) -> Result<Vm> {
        config.validate()?;
        check_host_memory(config.memory_size)?;
        Self::with_memory(config, memory::create(config.memory_size)?)
    }

    /// As [`Self::new`], with guest RAM given (a restored snapshot's, or
    /// the memfd a take-over hands over): it must be `config.memory_size`
    /// bytes laid out as [`memory::create`] lays it out.
    pub fn with_memory(config: &VmConfig, memory: GuestMemory) -> Result<Vm> {
        let created = Instant::now();
        config.validate()?;
        let kvm = open_kvm(&config.kvm_device)?;
        let max_vcpus = kvm.get_max_vcpus();
        if config.cpus as usize > max_vcpus {
            return Err(Error::TooManyVcpus {
                requested: config.cpus,
                max: max_vcpus,
            });
        }
        for (cap, name) in [
            (Cap::Irqchip, "in-kernel irqchip"),
            (Cap::UserMemory, "user memory"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::KvmCapability(name));
            }
        }
        let flavour = Flavour::detect();
        let privilege = if config.linux {
            Privilege::Kernel
        } else {
            config.privilege.unwrap_or(flavour.default_privilege())
        };
        log::info!(
            "KVM flavour {flavour}; guest runs at CPL{} ({privilege:?})",
            privilege.cpl()
        );

        let vm_fd = kvm.create_vm().map_err(Error::kvm("create a VM"))?;
        if flavour == Flavour::Vmx {
            vm_fd
                .set_identity_map_address(VMX_IDENTITY_MAP_ADDR)
                .map_err(Error::kvm("set the identity map address"))?;
            vm_fd
                .set_tss_address(VMX_TSS_ADDR)
                .map_err(Error::kvm("set the TSS address"))?;
        }
        vm_fd
            .create_irq_chip()
            .map_err(Error::kvm("create the in-kernel irqchip"))?;

        register_memory(&vm_fd, &memory)?;

        let lifecycle = Arc::new(if config.linux {
            Lifecycle::all_running(config.cpus)
        } else {
            Lifecycle::new(config.cpus)
        });
        let mut pio = Bus::new();
        if config.linux {
            // The in-kernel PIT (with port 0x61's speaker bits), for a
            // kernel that calibrates or ticks with it; Linux on this
            // hardware-reduced ACPI platform runs on kvmclock and the
            // LAPIC's TSC-deadline timer instead.
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm_fd
                .create_pit2(pit)
                .map_err(Error::kvm("create the in-kernel PIT"))?;
            add_legacy_ports(&mut pio, power_handler(&lifecycle))?;
        }

        Ok(Vm {
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            kvm,
            vm_fd: Arc::new(vm_fd),
            memory,
            bus: Bus::new(),
            pio,
            devices: BTreeMap::new(),
            serial_port: false,
            flavour,
            privilege,
            cpus: config.cpus,
            cmdline: config.cmdline.clone(),
            linux: config.linux,
            lifecycle,
            created,
            api: None,
            live: None,
        })
    }

    /// The KVM VM, for devices that register ioeventfds and irqfds.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// Guest RAM; every region's `file_offset()` is the shared memfd.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The KVM flavour the host runs.
    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// The privilege level the guest runs at.
    pub fn privilege(&self) -> Privilege {
        self.privilege
    }

    /// Attaches `device` at device slot `slot`: its register window goes on
    /// the bus at [`layout::device_mmio_addr`]`(slot)` and `info` joins the
    /// boot info's device list with the slot's address, size and interrupt
    /// line filled in (`kind`, `subtype` and `index` are the caller's).
    pub fn add_device(&mut self, slot: u32, device: SharedDevice, info: DeviceInfo) -> Result<()> {
        let device_error = |reason: String| Error::Device { slot, reason };
        if slot >= layout::MAX_DEVICES {
            return Err(device_error(format!(
                "slots go up to {}",
                layout::MAX_DEVICES - 1
            )));
        }
        if self.devices.contains_key(&slot) {
            return Err(device_error("slot already taken".into()));
        }
        let mmio_addr = layout::device_mmio_addr(slot);
        self.bus
            .insert(mmio_addr, layout::DEVICE_MMIO_SIZE, device)
            .map_err(|e| device_error(e.to_string()))?;
        let info = DeviceInfo {
            mmio_addr,
            mmio_size: layout::DEVICE_MMIO_SIZE,
            irq: layout::device_irq(slot),
            ..info
        };
        self.devices.insert(slot, info);
        Ok(())
    }

    /// Puts a Linux guest's COM1 on its I/O ports (0x3f8..0x400); the
    /// ACPI tables then list it.
    pub fn add_serial_port(&mut self, port: &SerialPort) -> Result<()> {
        self.pio
            .insert(
                u64::from(uart::COM1_PORT),
                uart::REGISTERS,
                port.bus_device(),
            )
            .map_err(|e| Error::Config(format!("COM1: {e}")))?;
        self.serial_port = true;
        Ok(())
    }

    /// Serves the control API while the VM runs.
    pub fn serve_api(&mut self, server: ApiServer) {
        self.api = Some(server);
    }

    /// What the ACPI tables of a Linux guest describe.
    fn acpi_platform(&self) -> AcpiPlatform {
        AcpiPlatform {
            cpus: self.cpus,
            virtio_mmio: self
                .devices
                .values()
                .filter(|d| d.kind == device_kind::VIRTIO_MMIO)
                .copied()
                .collect(),
            serial: self.serial_port,
        }
    }

    /// Loads `guest` into memory and sets up `vcpus` as its boot path
    /// wants them; returns how each vCPU thread begins.
    fn boot(&self, guest: &Guest, vcpus: &[Vcpu]) -> Result<Vec<Launch>> {
        match guest {
            Guest::Own { image, name } => {
                own_guest::start(&self.memory, image, name, self.privilege, vcpus)
            }
            Guest::Linux(linux) if self.linux => {
                linux.start(&self.memory, &self.acpi_platform(), vcpus)
            }
            Guest::Linux(_) => Err(Error::Config(
                "a Linux guest in a VM not set up for Linux".into(),
            )),
        }
    }

    /// Loads `guest` and runs the VM until it ends; console output of
    /// pvstack's own guest goes to `console`. Blocks SIGTERM and SIGINT
    /// in the calling process and turns them into [`VmEnd::Signal`].
    pub fn run(self, guest: Guest, console: Console) -> Result<VmEnd> {
        let vcpus = self.create_vcpus()?;
        let launches = self.boot(&guest, &vcpus)?;
        drop(guest);
        self.run_vcpus(vcpus, launches, console, 0)
    }

    /// Creates the vCPUs with their CPUID and reset FPU state.
    pub fn create_vcpus(&self) -> Result<Vec<Vcpu>> {
        let supported_cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("get the supported CPUID"))?;
        (0..self.cpus)
            .map(|index| self.create_vcpu(index, &supported_cpuid))
            .collect()
    }

    /// Lets snapshots and take-overs of the running VM happen (through
    /// the control API).
    pub fn enable_snapshots(&mut self, live: Arc<LiveVm>) {
        self.live = Some(live);
    }

    /// The lifecycle the vCPU threads will share (a restore marks which
    /// vCPUs had been started).
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// Runs `vcpus`, each beginning as its launch says, until the VM ends
    /// (the second half of [`Self::run`], also what a restore and a
    /// take-over run once they have set the vCPUs' state).
    /// `time_base_ns` is the guest time (TIME_NS) already passed.
    pub fn run_vcpus(
        mut self,
        vcpus: Vec<Vcpu>,
        launches: Vec<Launch>,
        console: Console,
        time_base_ns: u64,
    ) -> Result<VmEnd> {
        let tsc_khz = vcpus
            .first()
            .and_then(|vcpu| vcpu.fd.get_tsc_khz().ok())
            .unwrap_or(0);

        let machine = Arc::new(Machine {
            boot_info: self.boot_info(tsc_khz),
            memory: self.memory,
            bus: std::mem::take(&mut self.bus),
            pio: std::mem::take(&mut self.pio),
            linux: self.linux,
            console,
            counters: ExitCounters::default(),
            lifecycle: self.lifecycle.clone(),
            created: self.created,
            time_base_ns,
        });
        let signals_to_vm = signals::forward_termination(machine.clone());
        vcpu::install_kick_handler()?;

        let mut threads = Vec::new();
        for (vcpu, launch) in vcpus.into_iter().zip(launches) {
            match vcpu::spawn(vcpu, machine.clone(), launch) {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    machine.lifecycle.end(VmEnd::Failed(e));
                    break;
                }
            }
        }
        let api = match self.api.take() {
            Some(server) => {
                let pthreads: Vec<libc::pthread_t> =
                    threads.iter().map(|t| t.as_pthread_t()).collect();
                let signal = vcpu::kick_signal();
                let control = VmControl {
                    machine: machine.clone(),
                    live: self.live.clone(),
                    vcpus: self.cpus,
                    kick_vcpus: Box::new(move || {
                        for &thread in &pthreads {
                            // SAFETY: the threads are joined only after the
                            // API server (which owns this closure) stopped.
                            unsafe { libc::pthread_kill(thread, signal) };
                        }
                    }),
                };
                match server.start(control) {
                    Ok(api) => Some(api),
                    Err(e) => {
                        machine.lifecycle.end(VmEnd::Failed(e));
                        None
                    }
                }
            }
            None => None,
        };
        let end = machine.lifecycle.wait_for_end();
        // Stop the API before the vCPU threads it may kick are joined.
        drop(api);
        for thread in &threads {
            if let Err(e) = thread.kill(vcpu::kick_signal()) {
                log::debug!("cannot kick a vCPU thread: {e}");
            }
        }
        for thread in threads {
            if thread.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
        // Release the signal thread's hold on the machine, so the devices
        // (and their backend processes) are dropped with it.
        drop(signals_to_vm);
        Ok(end)
    }

    fn create_vcpu(&self, index: u32, supported_cpuid: &CpuId) -> Result<Vcpu> {
        let fd = self
            .vm_fd
            .create_vcpu(u64::from(index))
            .map_err(Error::kvm("create a vCPU"))?;
        let topology = Topology {
            cpus: self.cpus,
            tsc_deadline: self.tsc_deadline,
        };
        x86::cpuid::set_cpuid(&fd, supported_cpuid, index, topology)?;
        x86::fpu::set_fpu(&fd)?;
        Ok(Vcpu { index, fd })
    }

    fn boot_info(&self, tsc_khz: u32) -> BootInfo {
        let mut info = BootInfo {
            magic: BOOT_INFO_MAGIC,
            abi_version: ABI_VERSION,
            cpu_count: self.cpus,
            mem_size: self.memory.iter().map(|r| r.len()).sum(),
            tsc_khz: u64::from(tsc_khz),
            flavour: self.flavour.abi_value(),
            privilege: u32::from(self.privilege.cpl()),
            device_count: self.devices.len() as u32,
            ..BootInfo::EMPTY
        };
        for (entry, device) in info.devices.iter_mut().zip(self.devices.values()) {
            *entry = *device;
        }
        // VmConfig::validate bounded its length.
        let cmdline = self.cmdline.as_bytes();
        info.cmdline[..cmdline.len()].copy_from_slice(cmdline);
        info.cmdline_len = cmdline.len() as u32;
        info
    }
}

/// Ends the VM when a Linux guest powers off or resets it.
fn power_handler(lifecycle: &Arc<Lifecycle>) -> PowerHandler {
    let lifecycle = lifecycle.clone();
    Arc::new(move |event| {
        lifecycle.end(match event {
            PowerEvent::PowerOff => VmEnd::PowerOff,
            PowerEvent::Reset(how) => VmEnd::Reset {
                how: how.to_string(),
                report: None,
            },
        })
    })
}

/// The i8042's reset line and the ACPI power registers on the port bus.
fn add_legacy_ports(pio: &mut Bus, handler: PowerHandler) -> Result<()> {
    let bus_error = |e: pvstack_devices::bus::BusError| Error::Config(format!("legacy ports: {e}"));
    let i8042: SharedDevice = Arc::new(std::sync::Mutex::new(I8042::new(handler.clone())));
    pio.insert(
        u64::from(legacy::i8042::I8042_PORT),
        legacy::i8042::I8042_PORTS,
        i8042,
    )
    .map_err(bus_error)?;
    let power: SharedDevice = Arc::new(std::sync::Mutex::new(AcpiPowerRegisters::new(handler)));
    pio.insert(
        u64::from(legacy::power::SLEEP_CONTROL_PORT),
        legacy::power::PORTS,
        power,
    )
    .map_err(bus_error)
}

/// Refuses more guest RAM than the host has at all.
fn check_host_memory(size: u64) -> Result<()> {
    let available = memory::host_mem_total(Path::new("/proc/meminfo"))?;
    if size > available {
        return Err(Error::MemoryTooLarge {
            requested: size,
            available,
        });
    }
    Ok(())
}

/// One KVM memory slot per guest RAM region.
fn register_memory(vm_fd: &VmFd, memory: &GuestMemory) -> Result<()> {
    for (slot, region) in memory.iter().enumerate() {
        let slot_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the mapping belongs to `memory`, which outlives the VM:
        // the VM's Machine owns it until every vCPU thread has been joined,
        // and devices hold clones that keep the mapping alive.
        unsafe { vm_fd.set_user_memory_region(slot_region) }
            .map_err(Error::kvm("register guest memory"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kvm_device: "/dev/kvm".into(),
            memory_size: 64 << 20,
            cpus: 2,
            privilege: None,
            cmdline: "hello".into(),
            linux: false,
        }
    }

    #[test]
    fn config_limits() {
        assert!(config().validate().is_ok());
        let bad = [
            VmConfig {
                cpus: 0,
                ..config()
            },
            VmConfig {
                cpus: layout::MAX_VCPUS + 1,
                ..config()
            },
            VmConfig {
                memory_size: 0,
                ..config()
            },
            VmConfig {
                memory_size: layout::MAX_MEMORY + 4096,
                ..config()
            },
            VmConfig {
                memory_size: (64 << 20) + 1,
                ..config()
            },
            VmConfig {
                cmdline: "x".repeat(CMDLINE_MAX + 1),
                ..config()
            },
        ];
        for config in bad {
            assert!(
                matches!(config.validate(), Err(Error::Config(_))),
                "{config:?}"
            );
        }
    }

    #[test]
    fn devices_take_their_slot_window_and_line() {
        struct Inert;
        impl pvstack_devices::bus::BusDevice for Inert {
            fn read(&mut self, _: u64, _: &mut [u8]) {}
            fn write(&mut self, _: u64, _: &[u8]) {}
        }
        let device = || -> SharedDevice { Arc::new(std::sync::Mutex::new(Inert)) };
        let mut vm = Vm::new(&config()).expect("this host has KVM");
        let info = DeviceInfo {
            kind: 1,
            subtype: 2,
            ..Default::default()
        };
        vm.add_device(3, device(), info).unwrap();
        assert!(vm.add_device(3, device(), info).is_err());
        assert!(vm.add_device(layout::MAX_DEVICES, device(), info).is_err());
        vm.add_device(0, device(), info).unwrap();
        let boot = vm.boot_info(0);
        let slots: Vec<(u64, u32)> = boot
            .devices()
            .iter()
            .map(|d| (d.mmio_addr, d.irq))
            .collect();
        assert_eq!(
            slots,
            vec![
                (layout::device_mmio_addr(0), layout::device_irq(0)),
                (layout::device_mmio_addr(3), layout::device_irq(3))
            ]
        );
        assert_eq!(boot.cmdline(), Some("hello"));
        assert_eq!(boot.mem_size, 64 << 20);
    }
}
