//! The MADT: the local APIC of every vCPU (APIC ID = vCPU index), the
//! in-kernel IOAPIC with GSIs 0..24 at its usual address, the ISA
//! interrupt lines pvstack drives (all edge-triggered, active high) and
//! the LAPICs' LINT1 as the NMI input.
//!
//! KVM's default GSI routing sends GSI `n` to IOAPIC pin `n` (and, below
//! 16, to the PIC): the PIT's IRQ 0 is GSI 0, COM1's IRQ 4 is GSI 4 and
//! device slot `i`'s line is GSI `5 + i`.

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::{Aml, AmlSink};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use super::{AcpiPlatform, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// Where KVM's in-kernel LAPIC and IOAPIC are.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The IOAPIC's ID (distinct from every LAPIC's, which go up to 63).
const IOAPIC_ID: u8 = 0xfe;
/// ISA lines with their own GSIs (0..16).
const ISA_LINES: u32 = 16;
/// The PIT's ISA line.
const PIT_IRQ: u32 = 0;
/// MPS INTI flags: active high (polarity 01), edge-triggered (trigger 01).
const EDGE_ACTIVE_HIGH: u16 = 0b0101;
/// "All processors" in a processor UID field.
const ALL_PROCESSORS: u8 = 0xff;

/// MADT structure types not in acpi_tables.
const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const TYPE_LOCAL_APIC_NMI: u8 = 4;

/// ISA line `source` arrives on `gsi` with the given polarity and trigger.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
pub struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

impl InterruptSourceOverride {
    fn isa_edge(irq: u32) -> Self {
        InterruptSourceOverride {
            kind: TYPE_INTERRUPT_SOURCE_OVERRIDE,
            length: std::mem::size_of::<Self>() as u8,
            bus: 0,
            source: irq as u8,
            gsi: irq.into(),
            flags: EDGE_ACTIVE_HIGH.into(),
        }
    }
}

/// Which LINT pin of which processors' LAPIC carries NMIs.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
pub struct LocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// The ISA lines (below 16) that carry an interrupt on `platform`.
pub fn isa_lines(platform: &AcpiPlatform) -> Vec<u32> {
    let mut lines = vec![PIT_IRQ];
    if platform.serial {
        lines.push(pvstack_devices::console::uart::COM1_IRQ);
    }
    lines.extend(
        platform
            .virtio_mmio
            .iter()
            .map(|d| d.irq)
            .filter(|&irq| irq < ISA_LINES),
    );
    lines.sort_unstable();
    lines.dedup();
    lines
}

/// The MADT for `platform`.
pub fn build(platform: &AcpiPlatform) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for cpu in 0..platform.cpus {
        madt.add_structure(ProcessorLocalApic::new(
            cpu as u8,
            cpu as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(IOAPIC_ID, IOAPIC_ADDR, 0));
    for irq in isa_lines(platform) {
        madt.add_structure(InterruptSourceOverride::isa_edge(irq));
    }
    madt.add_structure(LocalApicNmi {
        kind: TYPE_LOCAL_APIC_NMI,
        length: std::mem::size_of::<LocalApicNmi>() as u8,
        processor_uid: ALL_PROCESSORS,
        flags: 0.into(),
        lint: 1,
    });
    madt
}

#[cfg(test)]
mod tests {
    use super::super::{aml_bytes, decode::*};
    use super::*;
    use pvstack_protocols::boot::DeviceInfo;
    use pvstack_protocols::layout;

    /// The MADT's structures as (type, bytes).
    fn structures(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut at = 44;
        let mut found = Vec::new();
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            assert!(len >= 2, "structure at {at} has length {len}");
            found.push((kind, &madt[at..at + len]));
            at += len;
        }
        assert_eq!(at, madt.len(), "structures fill the table exactly");
        found
    }

    #[test]
    fn one_lapic_per_cpu_the_ioapic_and_isa_overrides() {
        let device = |slot| DeviceInfo {
            mmio_addr: layout::device_mmio_addr(slot),
            mmio_size: layout::DEVICE_MMIO_SIZE,
            irq: layout::device_irq(slot),
            ..Default::default()
        };
        let platform = AcpiPlatform {
            cpus: 4,
            virtio_mmio: vec![device(0), device(15)],
            serial: true,
        };
        let bytes = aml_bytes(&build(&platform));
        let madt = table(&bytes, b"APIC");
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
        assert_eq!(u32_at(madt, 40) & 1, 0, "no PC/AT dual 8259 in use");
        let found = structures(madt);
        let lapics: Vec<(u8, u8, u32)> = found
            .iter()
            .filter(|(kind, _)| *kind == 0)
            .map(|(_, s)| (s[2], s[3], u32_at(s, 4)))
            .collect();
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]);
        let ioapics: Vec<&[u8]> = found
            .iter()
            .filter(|(k, _)| *k == 1)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(
            (u32_at(ioapics[0], 4), u32_at(ioapics[0], 8)),
            (IOAPIC_ADDR, 0)
        );
        let overrides: Vec<(u8, u32, u16)> = found
            .iter()
            .filter(|(k, _)| *k == 2)
            .map(|(_, s)| (s[3], u32_at(s, 4), u16::from_le_bytes([s[8], s[9]])))
            .collect();
        // PIT, COM1 and slot 0's line; slot 15's GSI 20 is no ISA line.
        assert_eq!(
            overrides,
            vec![
                (0, 0, EDGE_ACTIVE_HIGH),
                (4, 4, EDGE_ACTIVE_HIGH),
                (5, 5, EDGE_ACTIVE_HIGH)
            ]
        );
        let nmi: Vec<&[u8]> = found
            .iter()
            .filter(|(k, _)| *k == 4)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(nmi.len(), 1);
        assert_eq!((nmi[0][2], nmi[0][5]), (ALL_PROCESSORS, 1));
    }
}
