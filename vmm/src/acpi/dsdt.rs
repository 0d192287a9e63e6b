//! The DSDT: every virtio-mmio device as an `LNRO0005` device (what
//! Linux's virtio_mmio driver matches) with its register window and
//! interrupt line, COM1 as a `PNP0501` at 0x3f8 / IRQ 4, and `\_S5`, the
//! sleep type that powers the machine off.
//!
//! The devices' interrupts are edge-triggered, active high: each is an
//! irqfd on an IOAPIC pin, which KVM pulses (assert, deassert) for every
//! write of the eventfd. A level-triggered line would have to stay
//! asserted until the guest acknowledges it (KVM's resample eventfd) and
//! be deasserted by whoever knows the interrupt was handled; the
//! vhost-user backends only hold a call eventfd and report "used buffers"
//! for as long as they serve the queues (`VhostUserDevice::
//! interrupt_status`), so a level line would never drop. With edges an
//! interrupt that arrives while Linux's handler runs is latched in the
//! LAPIC and runs the handler again, which reads every queue: none is lost.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use pvstack_devices::console::uart::{COM1_IRQ, COM1_PORT, REGISTERS};
use pvstack_devices::legacy::power::S5_SLEEP_TYPE;

use super::{AcpiPlatform, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// The hardware ID of a virtio-mmio device in ACPI.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// DSDT revision 2: integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;

/// An edge-triggered, active-high, exclusive interrupt line (see the
/// module documentation for why edge).
fn edge_interrupt(gsi: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, gsi)
}

/// The DSDT's bytes.
pub fn build(platform: &AcpiPlatform) -> Vec<u8> {
    // The AML builder borrows its children, so each device's parts live
    // in vectors that outlive the devices built from them.
    let names: Vec<String> = (0..platform.virtio_mmio.len())
        .map(|i| format!("VR{i:02X}"))
        .collect();
    let windows: Vec<Memory32Fixed> = platform
        .virtio_mmio
        .iter()
        .map(|d| Memory32Fixed::new(true, d.mmio_addr as u32, d.mmio_size as u32))
        .collect();
    let lines: Vec<Interrupt> = platform
        .virtio_mmio
        .iter()
        .map(|d| edge_interrupt(d.irq))
        .collect();
    let resources: Vec<ResourceTemplate> = windows
        .iter()
        .zip(&lines)
        .map(|(window, line)| ResourceTemplate::new(vec![window, line]))
        .collect();
    let uids: Vec<u32> = (0..platform.virtio_mmio.len() as u32).collect();
    let hid = VIRTIO_MMIO_HID.to_string();
    let hid_names: Vec<Name> = uids
        .iter()
        .map(|_| Name::new("_HID".into(), &hid))
        .collect();
    let uid_names: Vec<Name> = uids
        .iter()
        .map(|uid| Name::new("_UID".into(), uid))
        .collect();
    let crs_names: Vec<Name> = resources
        .iter()
        .map(|r| Name::new("_CRS".into(), r))
        .collect();
    let devices: Vec<Device> = names
        .iter()
        .zip(hid_names.iter().zip(uid_names.iter().zip(&crs_names)))
        .map(|(name, (hid, (uid, crs)))| Device::new(name.as_str().into(), vec![hid, uid, crs]))
        .collect();

    let com1_hid = EISAName::new("PNP0501");
    let com1_io = IO::new(COM1_PORT, COM1_PORT, 1, REGISTERS as u8);
    let com1_irq = edge_interrupt(COM1_IRQ);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_parts = [
        Name::new("_HID".into(), &com1_hid),
        Name::new("_UID".into(), &0u8),
        Name::new("_CRS".into(), &com1_crs),
    ];
    let com1 = Device::new(
        "COM1".into(),
        com1_parts.iter().map(|p| p as &dyn Aml).collect(),
    );

    let mut bus: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    if platform.serial {
        bus.push(&com1);
    }
    let system_bus = Scope::new(Path::new("\\_SB_"), bus);
    let s5_package = Package::new(vec![&S5_SLEEP_TYPE, &0u8]);
    let s5 = Name::new(Path::new("\\_S5_"), &s5_package);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    let mut aml = Vec::new();
    system_bus.to_aml_bytes(&mut aml);
    s5.to_aml_bytes(&mut aml);
    dsdt.append_slice(&aml);
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::super::decode::*;
    use super::*;
    use pvstack_protocols::boot::DeviceInfo;
    use pvstack_protocols::layout;

    /// Small resource descriptors as written in a _CRS (ACPI 6.x, 6.4):
    /// Memory32Fixed (0x86) and the extended interrupt descriptor (0x89).
    fn memory32_fixed(base: u32, len: u32) -> Vec<u8> {
        let mut d = vec![0x86, 9, 0, 1];
        d.extend_from_slice(&base.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d
    }

    fn edge_irq(gsi: u32) -> Vec<u8> {
        // Flags: consumer (bit 0), edge (bit 1), active high, exclusive.
        let mut d = vec![0x89, 6, 0, 0b0011, 1];
        d.extend_from_slice(&gsi.to_le_bytes());
        d
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    fn position(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    fn device(slot: u32) -> DeviceInfo {
        DeviceInfo {
            mmio_addr: layout::device_mmio_addr(slot),
            mmio_size: layout::DEVICE_MMIO_SIZE,
            irq: layout::device_irq(slot),
            ..Default::default()
        }
    }

    #[test]
    fn every_device_with_its_window_and_line() {
        let slots = [0, 1, 2, 7, 15];
        let platform = AcpiPlatform {
            cpus: 1,
            virtio_mmio: slots.iter().map(|&s| device(s)).collect(),
            serial: true,
        };
        let bytes = build(&platform);
        let dsdt = table(&bytes, b"DSDT");
        assert_eq!(dsdt.len(), bytes.len());
        assert_eq!(dsdt[8], DSDT_REVISION);
        // One LNRO0005 string per device, each followed (in its own
        // device) by its window and its line.
        let hid = b"LNRO0005\0";
        assert_eq!(count(dsdt, hid), slots.len());
        let mut search_from = 0;
        for (i, &slot) in slots.iter().enumerate() {
            let name = format!("VR{i:02X}");
            let at = search_from + position(&dsdt[search_from..], name.as_bytes()).unwrap();
            let window = memory32_fixed(layout::device_mmio_addr(slot) as u32, 0x1000);
            let line = edge_irq(layout::device_irq(slot));
            let rest = &dsdt[at..];
            let next = position(&rest[4..], b"VR").map_or(rest.len(), |p| p + 4);
            let own = &rest[..next];
            assert!(position(own, hid).is_some(), "{name} has its _HID");
            assert!(
                position(own, &window).is_some(),
                "{name} has window {window:x?}"
            );
            assert!(position(own, &line).is_some(), "{name} has line {line:x?}");
            search_from = at + 4;
        }
        // COM1: PNP0501 as an EISA id, I/O 0x3f8..0x3ff, IRQ 4.
        assert_eq!(count(dsdt, b"COM1"), 1);
        assert_eq!(count(dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]), 1);
        assert_eq!(count(dsdt, &edge_irq(4)), 1);
        assert_eq!(
            count(dsdt, &0x0105_d041u32.to_le_bytes()),
            1,
            "EISAID PNP0501"
        );
        // \_S5_: Package (2) { 5, 0 }.
        let s5 = position(dsdt, b"_S5_").unwrap();
        assert_eq!(&dsdt[s5 + 4..s5 + 10], &[0x12, 5, 2, 0x0a, 5, 0]);
    }

    #[test]
    fn no_serial_no_com1() {
        let platform = AcpiPlatform {
            cpus: 1,
            virtio_mmio: vec![device(0)],
            serial: false,
        };
        let bytes = build(&platform);
        assert_eq!(count(&bytes, b"COM1"), 0);
        assert_eq!(count(&bytes, b"LNRO0005"), 1);
        assert!(checksum_ok(&bytes));
    }
}
