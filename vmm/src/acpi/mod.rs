//! The ACPI tables a Linux guest learns the machine from (acpi_tables
//! crate, AML included): RSDP, XSDT, a hardware-reduced FADT ([`fadt`]),
//! the MADT with the CPUs and interrupt controllers ([`madt`]) and the
//! DSDT with the devices ([`dsdt`]). They are laid out one after the
//! other from a base address, RSDP first.

pub mod dsdt;
pub mod fadt;
pub mod madt;

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use pvstack_protocols::boot::DeviceInfo;

/// OEM identification in every table header.
pub const OEM_ID: [u8; 6] = *b"PVSTCK";
pub const OEM_TABLE_ID: [u8; 8] = *b"PVSTACK ";
pub const OEM_REVISION: u32 = 1;

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct AcpiPlatform {
    /// vCPUs; vCPU `i` has APIC ID `i`.
    pub cpus: u32,
    /// The virtio-mmio devices: window and interrupt line each.
    pub virtio_mmio: Vec<DeviceInfo>,
    /// COM1 at 0x3f8, IRQ 4.
    pub serial: bool,
}

/// The tables as bytes to copy to their base address.
pub struct Tables {
    /// Every table, from the base address on.
    pub bytes: Vec<u8>,
    /// Where the RSDP is (the base address).
    pub rsdp: u64,
}

/// Tables start on 16-byte boundaries (the RSDP must; the rest follow suit).
const ALIGN: usize = 16;

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Builds the tables for `platform`, to be placed at `base`.
pub fn build(platform: &AcpiPlatform, base: u64) -> Tables {
    let mut bytes = Vec::new();
    let mut place = |table: Vec<u8>| -> u64 {
        bytes.resize(bytes.len().next_multiple_of(ALIGN), 0);
        let addr = base + bytes.len() as u64;
        bytes.extend_from_slice(&table);
        addr
    };
    // The RSDP comes first but points at the XSDT, which comes last: it
    // is written once every address is known, at offset 0.
    let rsdp_len = Rsdp::len();
    place(vec![0; rsdp_len]);
    let dsdt = place(dsdt::build(platform));
    let fadt = place(aml_bytes(&fadt::build(dsdt)));
    let madt = place(aml_bytes(&madt::build(platform)));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = place(aml_bytes(&xsdt));
    bytes[..rsdp_len].copy_from_slice(&aml_bytes(&Rsdp::new(OEM_ID, xsdt)));
    Tables { bytes, rsdp: base }
}

/// Helpers for the tests of the tables: reading back what was built.
#[cfg(test)]
pub(crate) mod decode {
    /// The bytes sum to zero, as every table's checksum makes them.
    pub fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    pub fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    pub fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    /// The table with its header's signature and length checked.
    pub fn table<'a>(bytes: &'a [u8], signature: &[u8; 4]) -> &'a [u8] {
        assert_eq!(&bytes[..4], signature);
        let len = u32_at(bytes, 4) as usize;
        let table = &bytes[..len];
        assert!(
            checksum_ok(table),
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        table
    }
}

#[cfg(test)]
mod tests {
    use super::decode::*;
    use super::*;

    const BASE: u64 = 0xe_0000;

    fn platform() -> AcpiPlatform {
        AcpiPlatform {
            cpus: 2,
            virtio_mmio: vec![],
            serial: false,
        }
    }

    #[test]
    fn rsdp_leads_to_every_table() {
        let tables = build(&platform(), BASE);
        let bytes = &tables.bytes;
        assert_eq!(tables.rsdp, BASE);
        assert_eq!(&bytes[..8], b"RSD PTR ");
        assert!(checksum_ok(&bytes[..20]), "ACPI 1.0 checksum");
        assert!(checksum_ok(&bytes[..36]), "extended checksum");
        assert_eq!(bytes[15], 2, "revision 2: has an XSDT");
        let at = |addr: u64| &bytes[(addr - BASE) as usize..];
        let xsdt = table(at(u64_at(bytes, 24)), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        let fadt = table(at(u64_at(xsdt, 36)), b"FACP");
        let madt = table(at(u64_at(xsdt, 44)), b"APIC");
        assert!(madt.len() > 44);
        // FADT: X_DSDT at offset 140.
        table(at(u64_at(fadt, 140)), b"DSDT");
        for addr in [u64_at(bytes, 24), u64_at(xsdt, 36), u64_at(xsdt, 44)] {
            assert_eq!(addr % 16, 0);
        }
    }
}
