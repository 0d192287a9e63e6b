//! One vCPU's state: read by the vCPU's own thread while it is parked
//! (a vCPU parks only once KVM owes the guest nothing, see
//! `crate::vcpu`), and set on a new vCPU before its thread starts.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use super::state::VcpuRegisters;
use crate::error::{Error, Result};

/// IA32_TSC: set first, so that TSC-relative MSRs (TSC_DEADLINE) and
/// KVM's clock see the restored counter.
const MSR_IA32_TSC: u32 = 0x10;

/// The MSRs KVM lists (KVM_GET_MSR_INDEX_LIST) that this vCPU can read;
/// KVM lists some the CPU or the flavour (PVM) does not implement.
pub fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(Error::kvm("list the MSRs to save"))?;
    let mut readable = Vec::new();
    let mut rest: &[u32] = listed.as_slice();
    while !rest.is_empty() {
        let (read, _) = read_msrs(vcpu, rest)?;
        readable.extend(read.iter().map(|&(index, _)| index));
        // KVM_GET_MSRS stops at the first MSR it cannot read: skip it.
        rest = rest.get(read.len() + 1..).unwrap_or(&[]);
    }
    Ok(readable)
}

/// Reads `indices` in order up to the first KVM refuses; returns those
/// read and whether all were.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<(Vec<(u32, u64)>, bool)> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| {
        Error::Takeover(format!(
            "{} MSRs are too many to read at once",
            entries.len()
        ))
    })?;
    let read = vcpu.get_msrs(&mut msrs).map_err(Error::kvm("read MSRs"))?;
    let values = msrs.as_slice()[..read]
        .iter()
        .map(|e| (e.index, e.data))
        .collect();
    Ok((values, read == indices.len()))
}

/// Reads the state of a parked vCPU; `msrs` from [`readable_msrs`].
pub fn capture(vcpu: &VcpuFd, msrs: &[u32]) -> Result<VcpuRegisters> {
    let (msr_values, complete) = read_msrs(vcpu, msrs)?;
    if !complete {
        return Err(Error::Takeover(format!(
            "KVM refused to read MSR {:#x}",
            msrs.get(msr_values.len()).copied().unwrap_or_default()
        )));
    }
    Ok(VcpuRegisters {
        regs: vcpu.get_regs().map_err(Error::kvm("read registers"))?,
        sregs: vcpu
            .get_sregs()
            .map_err(Error::kvm("read special registers"))?,
        xsave: vcpu
            .get_xsave()
            .map_err(Error::kvm("read the XSAVE area"))?,
        xcrs: vcpu.get_xcrs().map_err(Error::kvm("read XCR0"))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(Error::kvm("read debug registers"))?,
        msrs: msr_values,
        lapic: vcpu.get_lapic().map_err(Error::kvm("read the LAPIC"))?,
        events: vcpu
            .get_vcpu_events()
            .map_err(Error::kvm("read pending vCPU events"))?,
        mp_state: vcpu
            .get_mp_state()
            .map_err(Error::kvm("read the MP state"))?,
        tsc_khz: vcpu
            .get_tsc_khz()
            .map_err(Error::kvm("read the TSC rate"))?,
    })
}

/// Sets `saved` on a new vCPU (CPUID already set). `advance_ns` moves the
/// guest's TSC on by that much (a take-over, whose guest should see the
/// time it was paused pass; 0 for a snapshot, whose guest continues where
/// it stopped).
pub fn restore(vcpu: &VcpuFd, saved: &VcpuRegisters, advance_ns: u64) -> Result<()> {
    let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
    if tsc_khz != saved.tsc_khz {
        vcpu.set_tsc_khz(saved.tsc_khz)
            .map_err(Error::kvm("set the saved TSC rate"))?;
    }
    vcpu.set_sregs(&saved.sregs)
        .map_err(Error::kvm("set special registers"))?;
    vcpu.set_regs(&saved.regs)
        .map_err(Error::kvm("set registers"))?;
    // SAFETY: `saved.xsave` is a whole legacy (4 KiB) XSAVE area as
    // KVM_GET_XSAVE filled it on a vCPU of the same CPU model (the host
    // check refused any other); KVM reads no more than that from it.
    unsafe { vcpu.set_xsave(&saved.xsave) }.map_err(Error::kvm("set the XSAVE area"))?;
    vcpu.set_xcrs(&saved.xcrs).map_err(Error::kvm("set XCR0"))?;
    vcpu.set_lapic(&saved.lapic)
        .map_err(Error::kvm("set the LAPIC"))?;
    set_msrs(vcpu, &ordered_msrs(saved, advance_ns))?;
    vcpu.set_debug_regs(&saved.debugregs)
        .map_err(Error::kvm("set debug registers"))?;
    vcpu.set_vcpu_events(&saved.events)
        .map_err(Error::kvm("set pending vCPU events"))?;
    vcpu.set_mp_state(saved.mp_state)
        .map_err(Error::kvm("set the MP state"))?;
    Ok(())
}

/// The saved MSRs with IA32_TSC first, moved on by `advance_ns`.
fn ordered_msrs(saved: &VcpuRegisters, advance_ns: u64) -> Vec<kvm_msr_entry> {
    let ticks = u128::from(advance_ns) * u128::from(saved.tsc_khz) / 1_000_000;
    let mut entries: Vec<kvm_msr_entry> = saved
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data: if index == MSR_IA32_TSC {
                data.wrapping_add(ticks as u64)
            } else {
                data
            },
            ..Default::default()
        })
        .collect();
    entries.sort_by_key(|e| e.index != MSR_IA32_TSC);
    entries
}

/// Sets `entries` in order; one KVM refuses (a read-only MSR it lists)
/// is skipped with a warning and the rest are set.
fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<()> {
    let mut rest = entries;
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest).map_err(|_| {
            Error::Takeover(format!("{} MSRs are too many to set at once", rest.len()))
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(Error::kvm("set MSRs"))?;
        if let Some(refused) = rest.get(set) {
            log::warn!(
                "KVM refused to set MSR {:#x} to {:#x}; it keeps its reset value",
                refused.index,
                refused.data
            );
        }
        rest = rest.get(set + 1..).unwrap_or(&[]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_goes_first_and_moves_on() {
        let saved_msr = |index, data| (index, data);
        let mut registers = test_registers();
        registers.msrs = vec![saved_msr(0x6e0, 5), saved_msr(MSR_IA32_TSC, 1000)];
        registers.tsc_khz = 2_000_000;
        let entries = ordered_msrs(&registers, 1_000);
        assert_eq!(entries[0].index, MSR_IA32_TSC);
        // 1 µs at 2 GHz.
        assert_eq!(entries[0].data, 3000);
        assert_eq!((entries[1].index, entries[1].data), (0x6e0, 5));
    }

    fn test_registers() -> VcpuRegisters {
        VcpuRegisters {
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            msrs: Vec::new(),
            lapic: Default::default(),
            events: Default::default(),
            mp_state: Default::default(),
            tsc_khz: 0,
        }
    }

    #[test]
    fn a_vcpu_state_round_trips_through_kvm() {
        let kvm = Kvm::new().expect("this host has KVM");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let msrs = readable_msrs(&kvm, &vcpu).unwrap();
        assert!(msrs.contains(&MSR_IA32_TSC), "{msrs:x?}");
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0x20_0000;
        vcpu.set_regs(&regs).unwrap();
        let saved = capture(&vcpu, &msrs).unwrap();
        let other = vm.create_vcpu(1).unwrap();
        restore(&other, &saved, 0).unwrap();
        let back = other.get_regs().unwrap();
        assert_eq!((back.rax, back.rip), (0x1234_5678, 0x20_0000));
        let json = serde_json::to_vec(&saved).unwrap();
        let decoded: VcpuRegisters = serde_json::from_slice(&json).unwrap();
        assert_eq!(decoded.msrs, saved.msrs);
        assert_eq!(decoded.lapic.regs, saved.lapic.regs);
    }
}
