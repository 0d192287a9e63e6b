//! The FADT of a hardware-reduced ACPI platform (no PM timer, no GPEs, no
//! SCI, no legacy PIC or RTC for Linux to drive): it points at the DSDT
//! and at the sleep control, sleep status and reset registers of
//! `pvstack_devices::legacy::power`, so that S5 (named in the DSDT)
//! powers the VM off and the reset register reboots it.

use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use pvstack_devices::legacy::power;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// IA-PC boot architecture flags: no VGA to probe, no CMOS RTC (and no
/// i8042 keyboard controller declared, so Linux does not probe one).
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// A one-byte register at I/O port `port`.
fn io_byte(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The FADT, with the DSDT at `dsdt`.
pub fn build(dsdt: u64) -> FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::Headless);
    fadt.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    fadt.reset_reg = io_byte(power::RESET_PORT);
    fadt.reset_value = power::RESET_VALUE;
    fadt.sleep_control_reg = io_byte(power::SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_byte(power::SLEEP_STATUS_PORT);
    fadt.finalize()
}

#[cfg(test)]
mod tests {
    use super::super::{aml_bytes, decode::*};
    use super::*;

    /// A generic address structure's space, width and address.
    fn gas(bytes: &[u8], at: usize) -> (u8, u8, u64) {
        (bytes[at], bytes[at + 1], u64_at(bytes, at + 4))
    }

    #[test]
    fn hardware_reduced_with_power_registers() {
        let bytes = aml_bytes(&build(0xe_1000));
        let fadt = table(&bytes, b"FACP");
        assert_eq!(fadt.len(), 276, "ACPI 6 FADT");
        // Offsets from the ACPI 6.x FADT layout.
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(fadt[8], 6, "major version");
        assert_eq!(u64_at(fadt, 140), 0xe_1000, "X_DSDT");
        assert_eq!(gas(fadt, 116), (1, 8, u64::from(power::RESET_PORT)));
        assert_eq!(fadt[128], power::RESET_VALUE);
        assert_eq!(gas(fadt, 244), (1, 8, u64::from(power::SLEEP_CONTROL_PORT)));
        assert_eq!(gas(fadt, 256), (1, 8, u64::from(power::SLEEP_STATUS_PORT)));
        assert_eq!(
            u16::from_le_bytes([fadt[109], fadt[110]]),
            IAPC_NO_VGA | IAPC_NO_CMOS_RTC
        );
    }
}
