//! What CPUID tells each vCPU: what KVM supports on this host
//! (KVM_GET_SUPPORTED_CPUID, which includes KVM's paravirtual leaves
//! 0x4000_0000 and 0x4000_0001: kvmclock, PV EOI, PV TLB flush, PV IPIs
//! and the rest), with the machine's topology filled in. The VM is one
//! socket of `cpus` cores, one thread each; vCPU `i` has APIC ID `i`.
//!
//! pvstack's own guest never executes CPUID (it hangs on PVM) and reads
//! the vCPU count from the boot info; a Linux guest counts its CPUs in the
//! MADT and takes its topology from here.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use kvm_ioctls::VcpuFd;

use crate::error::{Error, Result};

/// The machine shape CPUID describes.
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    /// vCPUs (cores of the one socket).
    pub cpus: u32,
    /// KVM emulates the LAPIC's TSC-deadline timer mode
    /// (KVM_CAP_TSC_DEADLINE_TIMER), so CPUID may offer it.
    pub tsc_deadline: bool,
}

const LEAF_VENDOR: u32 = 0;
const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZE: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

/// Leaf 1 ECX: TSC-deadline timer, and "running under a hypervisor".
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX (AMD): core count comes from 0x8000_0008.
const ECX_CMP_LEGACY: u32 = 1 << 1;
/// Leaf 0xB/0x1F level types.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `count` things (the APIC ID shift of a level).
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .is_some_and(|e| {
            let vendor = [e.ebx, e.edx, e.ecx].map(u32::to_le_bytes).concat();
            vendor == b"AuthenticAMD" || vendor == b"HygonGenuine"
        })
}

/// Fills in vCPU `index`'s APIC ID and the topology in `entries`.
pub fn patch(entries: &mut [kvm_cpuid_entry2], index: u32, topology: Topology) {
    let cpus = topology.cpus.max(1);
    let amd = is_amd(entries);
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (index << 24) | ((cpus & 0xff) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if topology.tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if cpus > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE if entry.eax & 0x1f != 0 => {
                // Cores per package, and how many threads share this
                // cache: one core's for L1 and L2, all for L3 and beyond.
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                entry.eax =
                    (entry.eax & 0x3fff) | ((sharing & 0xfff) << 14) | ((cpus - 1).min(63) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                let (shift, count, level) = match entry.index {
                    0 => (0, 1, LEVEL_SMT),
                    1 => (id_bits(cpus), cpus, LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = count;
                entry.ecx = (level << 8) | (entry.index & 0xff);
                entry.edx = index;
            }
            LEAF_EXT_FEATURES if amd => {
                if cpus > 1 {
                    entry.ecx |= ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !ECX_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZE => {
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(cpus) << 12) | (cpus - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                entry.eax = index;
                entry.ebx = index & 0xff; // compute unit `index`, one thread each
                entry.ecx = 0; // node 0 of 1
            }
            _ => {}
        }
    }
}

/// Hands vCPU `index` the supported CPUID with the topology filled in.
pub fn set_cpuid(vcpu: &VcpuFd, supported: &CpuId, index: u32, topology: Topology) -> Result<()> {
    let mut cpuid = supported.clone();
    patch(cpuid.as_mut_slice(), index, topology);
    vcpu.set_cpuid2(&cpuid)
        .map_err(Error::kvm("set the vCPU's CPUID"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn apic_ids_and_topology_per_vcpu() {
        let mut l3 = entry(LEAF_CACHE, 3);
        l3.eax = (3 << 5) | 3; // level 3 unified
        let mut entries = vec![
            entry(LEAF_FEATURES, 0),
            l3,
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
            entry(LEAF_AMD_SIZE, 0),
            entry(0x4000_0001, 0),
        ];
        entries[0].ebx = 0xaa55_0800; // APIC ID 0xaa, count 0x55, CLFLUSH 8
        patch(
            &mut entries,
            2,
            Topology {
                cpus: 3,
                tsc_deadline: true,
            },
        );
        let leaf1 = find(&entries, LEAF_FEATURES, 0);
        assert_eq!(leaf1.ebx, 0x0203_0800);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
        let cache = find(&entries, LEAF_CACHE, 3);
        assert_eq!((cache.eax >> 26, (cache.eax >> 14) & 0xfff), (2, 2));
        let smt = find(&entries, LEAF_TOPOLOGY, 0);
        let core = find(&entries, LEAF_TOPOLOGY, 1);
        let end = find(&entries, LEAF_TOPOLOGY, 2);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
            (0, 1, LEVEL_SMT, 2)
        );
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (2, 3, LEVEL_CORE, 2)
        );
        assert_eq!((end.ebx, end.ecx), (0, 2));
        let size = find(&entries, LEAF_AMD_SIZE, 0);
        assert_eq!((size.ecx & 0xff, (size.ecx >> 12) & 0xf), (2, 2));
        assert_eq!(find(&entries, 0x4000_0001, 0), entry(0x4000_0001, 0));
    }

    #[test]
    fn one_cpu_has_no_htt() {
        let mut entries = vec![entry(LEAF_FEATURES, 0)];
        entries[0].edx = EDX_HTT;
        patch(
            &mut entries,
            0,
            Topology {
                cpus: 1,
                tsc_deadline: false,
            },
        );
        assert_eq!(entries[0].edx & EDX_HTT, 0);
        assert_eq!(entries[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(entries[0].ebx >> 16, 1);
    }
}
