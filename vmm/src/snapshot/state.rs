//! What a snapshot (and a take-over) records: everything needed to
//! continue a VM but its RAM, versioned and self-describing. Written as
//! JSON (`state.json` in a snapshot directory); KVM's structures are kept
//! as KVM lays them out (byte arrays), so nothing is lost in translation.

use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use pvstack_devices::vhost_user::{InflightShape, RingPosition};
use pvstack_devices::virtio::mmio::TransportState;
use pvstack_devices::{BlkSpec, ConsoleSpec, NetSpec, UartState};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kvm_flavour::{Flavour, Privilege};

/// The `format` field of every state file.
pub const FORMAT: &str = "pvstack-vm-state";
/// The state format's version; a state of any other version is refused.
/// 2: a `--console socket=` device records its `backend_uid` (the spec
/// became a struct variant, which version 1 readers cannot parse), and a
/// take-over hands the devices over before the pause.
/// 3: the emulated UART's registers and receive FIFO (`uart`): a VM with
/// `--serial`, a Linux guest's console, is snapshotted and handed over.
pub const VERSION: u32 = 3;
/// The state in a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// Guest RAM in a snapshot directory: the memfd's bytes at their offsets,
/// with holes where the guest never wrote.
pub const MEMORY_FILE: &str = "memory.bin";

/// Everything needed to continue a VM, but its RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub format: String,
    pub version: u32,
    /// The host the state was taken on, which a restore must match.
    pub host: HostIdentity,
    pub config: VmSpec,
    /// TIME_NS of pvstack's own guest when the state was taken.
    pub guest_time_ns: u64,
    /// CLOCK_MONOTONIC (ns) when the state was taken: a take-over on the
    /// same host advances the guest's clocks by the time since.
    pub taken_at_ns: u64,
    pub vcpus: Vec<VcpuState>,
    pub platform: PlatformState,
    pub devices: Vec<DeviceState>,
    /// The `--serial` UART (a Linux guest's COM1, or pvstack's own
    /// guest's UART in its slot), if the VM has one.
    pub uart: Option<UartState>,
}

/// What must not differ between the host a state was taken on and the
/// one it continues on: the KVM flavour and the CPU model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostIdentity {
    pub flavour: Flavour,
    pub cpu: CpuModel,
}

/// The host CPU's vendor, family, model and stepping (CPUID leaves 0, 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    pub vendor: String,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
}

impl CpuModel {
    /// The CPU this process runs on.
    pub fn host() -> CpuModel {
        // CPUID leaves 0 and 1 exist on every x86-64 CPU.
        let (leaf0, leaf1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
        let mut vendor = Vec::with_capacity(12);
        for word in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
            vendor.extend_from_slice(&word.to_le_bytes());
        }
        let eax = leaf1.eax;
        let base_family = (eax >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((eax >> 20) & 0xff)
        } else {
            base_family
        };
        let base_model = (eax >> 4) & 0xf;
        let model = if base_family == 0x6 || base_family == 0xf {
            base_model | (((eax >> 16) & 0xf) << 4)
        } else {
            base_model
        };
        CpuModel {
            vendor: String::from_utf8_lossy(&vendor).into_owned(),
            family,
            model,
            stepping: eax & 0xf,
        }
    }
}

impl std::fmt::Display for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} family {:#x} model {:#x} stepping {}",
            self.vendor, self.family, self.model, self.stepping
        )
    }
}

impl HostIdentity {
    /// This host.
    pub fn here() -> HostIdentity {
        HostIdentity {
            flavour: Flavour::detect(),
            cpu: CpuModel::host(),
        }
    }

    /// Why a state taken on `self` cannot continue on `here`, if it cannot.
    pub fn mismatch(&self, here: &HostIdentity) -> Option<String> {
        if self.flavour != here.flavour {
            return Some(format!(
                "taken on a {} host, this host is {}; a VM moves only between hosts of one KVM flavour",
                self.flavour, here.flavour
            ));
        }
        if self.cpu != here.cpu {
            return Some(format!(
                "taken on a {} CPU, this host has a {}",
                self.cpu, here.cpu
            ));
        }
        None
    }
}

/// The VM's configuration, as `pvstack run` was given it (after defaults).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmSpec {
    pub kvm_device: PathBuf,
    pub memory_size: u64,
    pub cpus: u32,
    pub privilege: Privilege,
    /// A Linux kernel was booted (the other boot path: pvstack's own guest).
    pub linux: bool,
    /// The kernel image that was booted (the built-in guest if `None`);
    /// kept for the record, a restore does not read it.
    pub kernel: Option<PathBuf>,
    /// pvstack's own guest's command line (its boot info).
    pub cmdline: String,
    pub blk: Vec<BlkSpec>,
    pub net: Vec<NetSpec>,
    pub console: Option<ConsoleSpec>,
    pub serial: bool,
    pub console_log: Option<PathBuf>,
    pub api_socket: Option<PathBuf>,
    /// The API socket's permissions (`--api-socket-mode`).
    #[serde(default = "default_socket_mode")]
    pub api_socket_mode: u32,
}

impl VmSpec {
    /// Whether the VM has the emulated UART (`--serial`, or `--console
    /// uart` for pvstack's own guest).
    pub fn has_uart(&self) -> bool {
        self.serial || self.console == Some(ConsoleSpec::Uart)
    }
}

/// A state written before `api_socket_mode` existed had 0600 sockets.
fn default_socket_mode() -> u32 {
    pvstack_backend_common::DEFAULT_SOCKET_MODE
}

/// One vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u32,
    /// `None` for a vCPU of pvstack's own guest that CPU_START never
    /// started: it waits for CPU_START again.
    pub registers: Option<Box<VcpuRegisters>>,
}

/// A started vCPU's architectural state, as KVM reports it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuRegisters {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    /// (index, value) of every MSR in KVM's list that could be read.
    pub msrs: Vec<(u32, u64)>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    /// The guest TSC's rate, which the restored vCPU must have too.
    pub tsc_khz: u32,
}

/// The in-kernel devices of the VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlatformState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    /// The PIT, which only a Linux guest's VM has.
    pub pit: Option<kvm_pit_state2>,
    pub clock: kvm_clock_data,
}

/// One virtio device with a vhost-user backend.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceState {
    /// Its name (`blk0`, `net0`, `console0`).
    pub id: String,
    pub kind: DeviceKind,
    /// Its index among devices of its kind (the `--blk`/`--net` number).
    pub index: u32,
    pub slot: u32,
    pub transport: TransportState,
    /// Where each queue stopped, when the backend's rings were stopped (a
    /// snapshot); empty in a take-over, whose backend keeps serving.
    pub rings: Vec<RingPosition>,
    /// The socket the backend was reached on.
    pub socket: PathBuf,
    /// The shape of the backend's inflight log, if it keeps one (a
    /// take-over hands the log itself over).
    pub inflight: Option<InflightShape>,
}

/// Which kind of device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    Blk,
    Net,
    Console,
}

/// The first fields of any state, read before the rest so that another
/// version is refused by name rather than by a parse error.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u32,
}

impl VmState {
    /// The state as JSON.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self)
            .map_err(|e| Error::Takeover(format!("cannot encode the VM state: {e}")))
    }

    /// Reads a state from JSON (`origin` names it in errors): refuses
    /// another format or version before anything else.
    pub fn from_json(bytes: &[u8], origin: &Path) -> Result<VmState> {
        let bad = |reason: String| Error::Snapshot {
            dir: origin.to_path_buf(),
            reason,
        };
        let header: Header = serde_json::from_slice(bytes).map_err(|e| {
            bad(format!(
                "{STATE_FILE} is not a complete pvstack VM state ({e})"
            ))
        })?;
        if header.format != FORMAT {
            return Err(bad(format!(
                "{STATE_FILE} is a {:?}, not a {FORMAT:?}",
                header.format
            )));
        }
        if header.version != VERSION {
            return Err(bad(format!(
                "state version {} was written by another pvstack; this one reads version {VERSION} only",
                header.version
            )));
        }
        let state: VmState = serde_json::from_slice(bytes).map_err(|e| {
            bad(format!(
                "{STATE_FILE} is not a complete pvstack VM state ({e})"
            ))
        })?;
        if state.config.has_uart() != state.uart.is_some() {
            return Err(bad(format!(
                "{STATE_FILE} is inconsistent: its VM has {} emulated UART, but it holds {} UART state",
                if state.config.has_uart() { "an" } else { "no" },
                if state.uart.is_some() { "the" } else { "no" }
            )));
        }
        Ok(state)
    }

    /// Refuses a state taken on a host unlike this one.
    pub fn check_host(&self, origin: &Path) -> Result<()> {
        match self.host.mismatch(&HostIdentity::here()) {
            None => Ok(()),
            Some(reason) => Err(Error::Snapshot {
                dir: origin.to_path_buf(),
                reason,
            }),
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds (what `taken_at_ns` counts in).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_versions_and_formats_are_refused_by_name() {
        let origin = Path::new("/snap");
        let err = VmState::from_json(br#"{"format":"pvstack-vm-state","version":99}"#, origin)
            .unwrap_err()
            .to_string();
        assert!(err.contains("state version 99"), "{err}");
        let err = VmState::from_json(br#"{"format":"other","version":1}"#, origin)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"other\""), "{err}");
        let err = VmState::from_json(br#"{"format":"pvstack-vm-st"#, origin)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a complete"), "{err}");
    }

    #[test]
    fn a_linux_guests_uart_and_pit_round_trip_through_json_and_version_2_is_refused() {
        let uart = UartState {
            divisor_low: 1,
            divisor_high: 0,
            interrupt_enable: 0x03,
            interrupt_identification: 0xc2,
            line_control: 0x03,
            line_status: 0x60,
            modem_control: 0x0b,
            modem_status: 0xb0,
            scratch: 0x5a,
            receive_fifo: b"ls\n".to_vec(),
        };
        let mut pit = kvm_pit_state2::default();
        pit.channels[0].count = 1193;
        let state = VmState {
            format: FORMAT.into(),
            version: VERSION,
            host: HostIdentity::here(),
            config: VmSpec {
                kvm_device: "/dev/kvm".into(),
                memory_size: 512 << 20,
                cpus: 1,
                privilege: Privilege::Kernel,
                linux: true,
                kernel: Some("/l2/vmlinuz".into()),
                cmdline: String::new(),
                blk: Vec::new(),
                net: Vec::new(),
                console: None,
                serial: true,
                console_log: None,
                api_socket: None,
                api_socket_mode: default_socket_mode(),
            },
            guest_time_ns: 1,
            taken_at_ns: 2,
            vcpus: Vec::new(),
            platform: PlatformState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Some(pit),
                clock: Default::default(),
            },
            devices: Vec::new(),
            uart: Some(uart.clone()),
        };
        let json = state.to_json().unwrap();
        let back = VmState::from_json(&json, Path::new("/snap")).unwrap();
        assert_eq!(back.uart.as_ref(), Some(&uart));
        assert_eq!(back.platform.pit.unwrap().channels[0].count, 1193);
        assert!(back.config.linux && back.config.serial);

        // The same state as version 2 wrote it (no UART) is refused by name.
        let mut older: serde_json::Value = serde_json::from_slice(&json).unwrap();
        older["version"] = 2.into();
        older.as_object_mut().unwrap().remove("uart");
        let err = VmState::from_json(older.to_string().as_bytes(), Path::new("/snap"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("state version 2 was written by another pvstack"),
            "{err}"
        );

        // A UART the configuration does not have, or the reverse.
        for (serial, uart) in [(true, None), (false, Some(uart))] {
            let mut inconsistent: serde_json::Value = serde_json::from_slice(&json).unwrap();
            inconsistent["config"]["serial"] = serial.into();
            inconsistent["uart"] = serde_json::to_value(uart).unwrap();
            let err = VmState::from_json(inconsistent.to_string().as_bytes(), Path::new("/snap"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("state.json is inconsistent"), "{err}");
        }
    }

    #[test]
    fn host_differences_are_named() {
        let here = HostIdentity::here();
        assert_eq!(here.mismatch(&here), None);
        let other_cpu = HostIdentity {
            cpu: CpuModel {
                model: here.cpu.model + 1,
                ..here.cpu.clone()
            },
            ..here.clone()
        };
        assert!(other_cpu.mismatch(&here).unwrap().contains("model"));
        let other_flavour = HostIdentity {
            flavour: if here.flavour == Flavour::Pvm {
                Flavour::Svm
            } else {
                Flavour::Pvm
            },
            ..here.clone()
        };
        assert!(other_flavour.mismatch(&here).unwrap().contains("flavour"));
        assert!(!here.cpu.vendor.is_empty());
    }
}
