//! The architectural state a vCPU starts in: 64-bit long mode with the
//! identity page tables and GDT written by [`super::write_tables`],
//! segments at the guest's privilege, SSE usable, interrupts off.

use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_regs, CpuId, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;
use pvstack_protocols::layout;

use super::gdt::{self, Segment};
use crate::error::{Error, Result};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
/// RFLAGS bit 1 is always set; everything else (IF included) clear.
const RFLAGS_RESERVED: u64 = 1 << 1;
/// x87 control word and MXCSR at reset: all exceptions masked.
const FPU_CONTROL_WORD: u16 = 0x37f;
const MXCSR_DEFAULT: u32 = 0x1f80;

/// CPUID leaf 1 and the bits of its EBX holding the initial APIC ID.
const CPUID_LEAF_FEATURES: u32 = 1;
const APIC_ID_SHIFT: u32 = 24;

/// Hands the vCPU the CPUID KVM supports (so SSE and friends are enabled
/// for the guest), with the APIC ID of vCPU `index`.
pub fn set_cpuid(vcpu: &VcpuFd, supported: &CpuId, index: u32) -> Result<()> {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        if entry.function == CPUID_LEAF_FEATURES {
            entry.ebx = (entry.ebx & !(0xff << APIC_ID_SHIFT)) | (index << APIC_ID_SHIFT);
        }
    }
    vcpu.set_cpuid2(&cpuid)
        .map_err(Error::kvm("set the vCPU's CPUID"))
}

/// Long mode, paging, segments with DPL `cpl`, a clean FPU/SSE state.
pub fn set_long_mode(vcpu: &VcpuFd, cpl: u8) -> Result<()> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(Error::kvm("read special registers"))?;
    let rpl = u16::from(cpl);
    let code = Segment::code64(cpl).to_kvm(gdt::CODE_SELECTOR | rpl);
    let data = Segment::data(cpl).to_kvm(gdt::DATA_SELECTOR | rpl);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = Segment::tss().to_kvm(gdt::TSS_SELECTOR);
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = gdt::gdt_limit();
    // No IDT: the guest handles no exceptions (see vmm/README.md).
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
    vcpu.set_sregs(&sregs)
        .map_err(Error::kvm("set special registers"))?;

    let fpu = kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("set the FPU state"))
}

/// Where the vCPU starts: `entry` with stack `stack_top` and `arg` in RDI.
/// Also makes it runnable: with the in-kernel irqchip, every vCPU but the
/// first begins in the "wait for INIT/SIPI" state, in which KVM_RUN blocks.
pub fn set_entry(vcpu: &VcpuFd, entry: u64, stack_top: u64, arg: u64) -> Result<()> {
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(Error::kvm("make the vCPU runnable"))?;
    let regs = kvm_regs {
        rip: entry,
        rsp: stack_top,
        rdi: arg,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(Error::kvm("set registers"))
}
