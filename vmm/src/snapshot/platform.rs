//! The VM's in-kernel devices: the two PICs and the IOAPIC of the
//! in-kernel irqchip, the PIT (a Linux guest's VM has one), and KVM's
//! clock (kvmclock's base).

use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use super::state::PlatformState;
use crate::error::{Error, Result};

fn get_chip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(Error::kvm(what))?;
    Ok(chip)
}

/// Reads the in-kernel devices of a paused VM; `pit` whether it has one.
pub fn capture(vm: &VmFd, pit: bool) -> Result<PlatformState> {
    Ok(PlatformState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "read the master PIC")?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "read the slave PIC")?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "read the IOAPIC")?,
        pit: if pit {
            Some(vm.get_pit2().map_err(Error::kvm("read the PIT"))?)
        } else {
            None
        },
        clock: vm.get_clock().map_err(Error::kvm("read the KVM clock"))?,
    })
}

/// Sets `saved` on a new VM (irqchip and, if saved, PIT created); KVM's
/// clock moves on by `advance_ns` (see [`super::vcpu::restore`]).
pub fn restore(vm: &VmFd, saved: &PlatformState, advance_ns: u64) -> Result<()> {
    for (chip, what) in [
        (&saved.pic_master, "set the master PIC"),
        (&saved.pic_slave, "set the slave PIC"),
        (&saved.ioapic, "set the IOAPIC"),
    ] {
        vm.set_irqchip(chip).map_err(Error::kvm(what))?;
    }
    if let Some(pit) = &saved.pit {
        vm.set_pit2(pit).map_err(Error::kvm("set the PIT"))?;
    }
    let mut clock = saved.clock;
    clock.clock = clock.clock.wrapping_add(advance_ns);
    // The flags say which other fields KVM filled in on the old VM; a
    // set with them would ask KVM to use those (host TSC, real time).
    clock.flags = 0;
    vm.set_clock(&clock)
        .map_err(Error::kvm("set the KVM clock"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    #[test]
    fn platform_state_round_trips_through_kvm() {
        let kvm = Kvm::new().expect("this host has KVM");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mut saved = capture(&vm, false).unwrap();
        // IOAPIC redirection entry 5: vector 0x35, masked off.
        // SAFETY: reading and writing the ioapic member of the union that
        // KVM filled in for chip_id IOAPIC.
        unsafe { saved.ioapic.chip.ioapic.redirtbl[5].bits = 0x35 };
        let other = kvm.create_vm().unwrap();
        other.create_irq_chip().unwrap();
        restore(&other, &saved, 1_000_000).unwrap();
        let back = capture(&other, false).unwrap();
        // SAFETY: as above, the IOAPIC member of an IOAPIC chip.
        let entry = unsafe { back.ioapic.chip.ioapic.redirtbl[5].bits };
        assert_eq!(entry, 0x35);
        assert!(back.clock.clock >= saved.clock.clock + 1_000_000);
    }
}
