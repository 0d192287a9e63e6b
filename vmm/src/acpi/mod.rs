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
    use pvstack_protocols::layout;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// The tables of `platform` as separate files in a fresh directory:
    /// (signature, path) for the DSDT, FADT and MADT.
    fn table_files(platform: &AcpiPlatform, test: &str) -> (PathBuf, Vec<(String, PathBuf)>) {
        let tables = build(platform, BASE);
        let dir = std::env::temp_dir().join(format!("pvstack-acpi-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bytes = &tables.bytes;
        let at = |addr: u64| &bytes[(addr - BASE) as usize..];
        let xsdt = table(at(u64_at(bytes, 24)), b"XSDT");
        let fadt = table(at(u64_at(xsdt, 36)), b"FACP");
        let madt = table(at(u64_at(xsdt, 44)), b"APIC");
        let dsdt = table(at(u64_at(fadt, 140)), b"DSDT");
        let files = [("dsdt", dsdt), ("facp", fadt), ("apic", madt)]
            .into_iter()
            .map(|(name, table)| {
                let path = dir.join(format!("{name}.dat"));
                std::fs::write(&path, table).unwrap();
                (name.to_string(), path)
            })
            .collect();
        (dir, files)
    }

    /// `iasl -d` (acpica-tools) on `path`: its disassembly.
    fn disassemble(path: &Path) -> String {
        let output = Command::new("iasl")
            .arg("-d")
            .arg(path)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run iasl ({e}): install acpica-tools (scripts/install-deps)")
            });
        assert!(
            output.status.success(),
            "iasl -d {}: {output:?}",
            path.display()
        );
        std::fs::read_to_string(path.with_extension("dsl")).unwrap()
    }

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

    #[test]
    fn iasl_disassembles_what_linux_is_given() {
        let device = |slot| DeviceInfo {
            mmio_addr: layout::device_mmio_addr(slot),
            mmio_size: layout::DEVICE_MMIO_SIZE,
            irq: layout::device_irq(slot),
            ..Default::default()
        };
        let platform = AcpiPlatform {
            cpus: 2,
            virtio_mmio: vec![device(0), device(3)],
            serial: true,
        };
        let (dir, files) = table_files(&platform, "iasl");
        let text: std::collections::BTreeMap<String, String> = files
            .iter()
            .map(|(name, path)| (name.clone(), disassemble(path)))
            .collect();
        std::fs::remove_dir_all(dir).unwrap();
        // iasl's ASL, whitespace folded so multi-line items compare as one.
        let folded = |name: &str| text[name].split_whitespace().collect::<Vec<_>>().join(" ");
        let dsdt = folded("dsdt");
        for (index, slot) in [(0, 0u32), (1, 3)] {
            let device = format!(
                "Device (VR{index:02}) {{ Name (_HID, \"LNRO0005\") // _HID: Hardware ID Name (_UID, {}) // _UID: Unique ID Name (_CRS, ResourceTemplate () // _CRS: Current Resource Settings {{ Memory32Fixed (ReadWrite, 0x{:08X}, // Address Base 0x00001000, // Address Length ) Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{ 0x{:08X}, }} }}) }}",
                ["Zero", "One"][index],
                layout::device_mmio_addr(slot),
                layout::device_irq(slot)
            );
            assert!(dsdt.contains(&device), "{device}\nnot in\n{}", text["dsdt"]);
        }
        for expected in [
            "Device (COM1) { Name (_HID, EisaId (\"PNP0501\")",
            "IO (Decode16, 0x03F8, // Range Minimum 0x03F8, // Range Maximum 0x01, // Alignment 0x08, // Length ) Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000004, }",
            "Name (\\_S5, Package (0x02) // _S5_: S5 System State { 0x05, Zero })",
        ] {
            assert!(dsdt.contains(expected), "{expected}\nnot in\n{}", text["dsdt"]);
        }
        let facp = folded("facp");
        for expected in [
            "Hardware Reduced (V5) : 1",
            "Reset Register Supported (V2) : 1",
            "Value to cause reset : 01",
            "Sleep Control Register : [Generic Address Structure] [0F4h 0244 1] Space ID : 01 [SystemIO] [0F5h 0245 1] Bit Width : 08 [0F6h 0246 1] Bit Offset : 00 [0F7h 0247 1] Encoded Access Width : 01 [Byte Access:8] [0F8h 0248 8] Address : 0000000000000600",
            "DSDT Address : 00000000000E0030",
        ] {
            assert!(facp.contains(expected), "{expected}\nnot in\n{}", text["facp"]);
        }
        let apic = folded("apic");
        assert_eq!(
            apic.matches("Subtable Type : 00 [Processor Local APIC]")
                .count(),
            2
        );
        assert_eq!(apic.matches("Subtable Type : 01 [I/O APIC]").count(), 1);
        assert_eq!(
            apic.matches("[Interrupt Source Override]").count(),
            4,
            "IRQs 0, 4, 5, 8"
        );
        assert!(apic.contains("Interrupt Input LINT : 01"));
        assert!(!apic.contains("**** "), "iasl warnings:\n{}", text["apic"]);
    }
}
