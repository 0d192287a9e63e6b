//! Structures the VMM writes into guest memory on request: the boot
//! information ([`BootInfo`]) and the exit counters ([`Counters`]).

use crate::layout::MAX_DEVICES;

/// `BootInfo::magic`: "PVSTACK" followed by a zero byte, little endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"PVSTACK\0");

/// Longest guest command line (the text of `--guest-args`).
pub const CMDLINE_MAX: usize = 1024;

/// What kind of KVM the VMM runs on.
pub mod flavour {
    /// Could not tell.
    pub const UNKNOWN: u32 = 0;
    /// Intel VMX.
    pub const VMX: u32 = 1;
    /// AMD SVM.
    pub const SVM: u32 = 2;
    /// PVM: software KVM, guest code native only at CPL3.
    pub const PVM: u32 = 3;
}

/// Device kinds in [`DeviceInfo::kind`].
pub mod device_kind {
    /// A virtio-mmio (virtio 1.x) register window; `DeviceInfo::subtype` is
    /// the virtio device id (1 net, 2 block, 3 console).
    pub const VIRTIO_MMIO: u32 = 1;
    /// The emulated register-level disk controller of
    /// [`crate::legacy_blk`]; `DeviceInfo::subtype` is 0.
    pub const LEGACY_BLOCK: u32 = 2;
    /// An emulated 16550 UART with its eight byte-wide registers at
    /// offsets 0..8 of the MMIO window (register `i` at offset `i`), every
    /// access trapped; `DeviceInfo::subtype` is 0.
    pub const UART_16550: u32 = 3;
}

/// One device the guest can use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// One of [`device_kind`].
    pub kind: u32,
    /// Meaning depends on `kind`.
    pub subtype: u32,
    /// Guest physical address of the register window.
    pub mmio_addr: u64,
    /// Size of the register window.
    pub mmio_size: u64,
    /// Interrupt line (IOAPIC GSI).
    pub irq: u32,
    /// Index of the device among those of its kind and subtype, in the
    /// order given on the command line (`--blk` number 0, 1, ...).
    pub index: u32,
}

/// Everything the guest needs to know about its machine, so that it never
/// has to probe (or execute `cpuid`, which hangs on PVM).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// The VMM's [`crate::hypercall::ABI_VERSION`].
    pub abi_version: u32,
    /// vCPUs in the VM (vCPU 0 runs at boot; see `nr::CPU_START`).
    pub cpu_count: u32,
    /// Bytes of guest RAM (see [`crate::layout::ram_ranges`]).
    pub mem_size: u64,
    /// TSC frequency in kHz, or 0 if unknown.
    pub tsc_khz: u64,
    /// One of [`flavour`].
    pub flavour: u32,
    /// Privilege level the guest runs at: 0 (kernel) or 3 (user).
    pub privilege: u32,
    /// Valid entries in `devices`.
    pub device_count: u32,
    /// Valid bytes in `cmdline`.
    pub cmdline_len: u32,
    /// The devices, in slot order.
    pub devices: [DeviceInfo; MAX_DEVICES as usize],
    /// The guest command line (UTF-8, not terminated).
    pub cmdline: [u8; CMDLINE_MAX],
}

impl BootInfo {
    /// A boot info with nothing in it.
    pub const EMPTY: BootInfo = BootInfo {
        magic: 0,
        abi_version: 0,
        cpu_count: 0,
        mem_size: 0,
        tsc_khz: 0,
        flavour: flavour::UNKNOWN,
        privilege: 0,
        device_count: 0,
        cmdline_len: 0,
        devices: [DeviceInfo {
            kind: 0,
            subtype: 0,
            mmio_addr: 0,
            mmio_size: 0,
            irq: 0,
            index: 0,
        }; MAX_DEVICES as usize],
        cmdline: [0; CMDLINE_MAX],
    };

    /// The command line, if it is valid UTF-8 and its length in range.
    pub fn cmdline(&self) -> Option<&str> {
        let bytes = self.cmdline.get(..self.cmdline_len as usize)?;
        core::str::from_utf8(bytes).ok()
    }

    /// The valid device entries.
    pub fn devices(&self) -> &[DeviceInfo] {
        let count = (self.device_count as usize).min(self.devices.len());
        &self.devices[..count]
    }
}

/// Exits to the VMM, by kind, summed over all vCPUs since the VM started.
/// Fields are only ever appended (raising the ABI minor version).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Every return of `KVM_RUN` to the VMM.
    pub exits: u64,
    /// Exits for hypercall doorbell writes (a subset of `exits`).
    pub hypercall_exits: u64,
    /// Exits for MMIO accesses to device registers (not hypercalls).
    pub mmio_exits: u64,
    /// Exits for port I/O.
    pub pio_exits: u64,
    /// Any other exit (interrupted by a signal, and so on).
    pub other_exits: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn boot_info_has_no_padding() {
        assert_eq!(size_of::<DeviceInfo>(), 32);
        let fields = 8 + 4 + 4 + 8 + 8 + 4 * 4;
        assert_eq!(
            size_of::<BootInfo>(),
            fields + MAX_DEVICES as usize * size_of::<DeviceInfo>() + CMDLINE_MAX
        );
    }

    #[test]
    fn cmdline_is_bounded() {
        let mut info = BootInfo::EMPTY;
        info.cmdline[..5].copy_from_slice(b"hello");
        info.cmdline_len = 5;
        assert_eq!(info.cmdline(), Some("hello"));
        info.cmdline_len = CMDLINE_MAX as u32 + 1;
        assert_eq!(info.cmdline(), None);
    }
}
