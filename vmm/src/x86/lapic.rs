//! The local APIC's interrupt pins as a PC BIOS leaves them for Linux
//! ("virtual wire" mode): LINT0 delivers the legacy PIC's interrupts
//! (ExtINT), LINT1 delivers NMIs. The in-kernel LAPIC resets both masked
//! in fixed mode; Linux keeps what it finds on LINT0 until it switches to
//! the IOAPIC, and expects NMIs on LINT1.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

use crate::error::{Error, Result};

/// Offsets of the LVT LINT0 and LINT1 registers in the LAPIC page.
const LVT_LINT0: usize = 0x350;
const LVT_LINT1: usize = 0x360;
/// Delivery mode field (bits 8..10) and its ExtINT and NMI values.
const DELIVERY_MODE_MASK: u32 = 0x700;
const DELIVERY_EXTINT: u32 = 0x700;
const DELIVERY_NMI: u32 = 0x400;

fn register(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_register(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        state.regs[offset + i] = byte as _;
    }
}

/// LINT0 to ExtINT and LINT1 to NMI in `state`, other bits kept.
fn wire_lints(state: &mut kvm_lapic_state) {
    for (offset, mode) in [(LVT_LINT0, DELIVERY_EXTINT), (LVT_LINT1, DELIVERY_NMI)] {
        let value = (register(state, offset) & !DELIVERY_MODE_MASK) | mode;
        set_register(state, offset, value);
    }
}

/// Sets the vCPU's LINT0 to ExtINT and LINT1 to NMI.
pub fn set_lints(vcpu: &VcpuFd) -> Result<()> {
    let mut state = vcpu
        .get_lapic()
        .map_err(Error::kvm("read the local APIC"))?;
    wire_lints(&mut state);
    vcpu.set_lapic(&state)
        .map_err(Error::kvm("set the local APIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lints_get_extint_and_nmi_and_keep_their_other_bits() {
        let mut state = kvm_lapic_state::default();
        set_register(&mut state, LVT_LINT0, 0x1_0000); // masked, fixed
        set_register(&mut state, LVT_LINT1, 0x1_0000 | 0x200); // masked, SMI
        wire_lints(&mut state);
        assert_eq!(register(&state, LVT_LINT0), 0x1_0700);
        assert_eq!(register(&state, LVT_LINT1), 0x1_0400);
    }
}
