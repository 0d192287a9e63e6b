//! The architectural state a vCPU starts in, one function per entry
//! protocol:
//!
//! - [`set_long_mode`] + [`set_entry`]: pvstack's own guest, in 64-bit
//!   long mode on the identity page tables and GDT of
//!   [`super::write_tables`], segments at the guest's privilege;
//! - [`set_linux64_entry`]: Linux's 64-bit boot protocol (a bzImage's
//!   entry at its load address + 0x200), long mode at CPL0 with the boot
//!   parameters' address in RSI;
//! - [`set_pvh_entry`]: the PVH entry of an ELF vmlinux, 32-bit protected
//!   mode without paging, the start info's address in RBX.
//!
//! Interrupts are off in every case.

use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_sregs, KVM_MP_STATE_RUNNABLE};
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

/// Segments and control registers for 64-bit code at `cpl` on the
/// identity page tables.
fn long_mode_sregs(mut sregs: kvm_sregs, cpl: u8) -> kvm_sregs {
    let rpl = u16::from(cpl);
    let code = Segment::code64(cpl).to_kvm(gdt::CODE_SELECTOR | rpl);
    let data = Segment::data(cpl).to_kvm(gdt::DATA_SELECTOR | rpl);
    set_segments(&mut sregs, code, data);
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
    sregs
}

fn set_segments(
    sregs: &mut kvm_sregs,
    code: kvm_bindings::kvm_segment,
    data: kvm_bindings::kvm_segment,
) {
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = Segment::tss().to_kvm(gdt::TSS_SELECTOR);
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = gdt::gdt_limit();
    // No IDT: the guest installs its own before it enables interrupts
    // (pvstack's own guest handles none, see vmm/README.md).
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
}

fn get_sregs(vcpu: &VcpuFd) -> Result<kvm_sregs> {
    vcpu.get_sregs()
        .map_err(Error::kvm("read special registers"))
}

fn set_sregs(vcpu: &VcpuFd, sregs: &kvm_sregs) -> Result<()> {
    vcpu.set_sregs(sregs)
        .map_err(Error::kvm("set special registers"))
}

fn set_regs(vcpu: &VcpuFd, regs: kvm_regs) -> Result<()> {
    vcpu.set_regs(&regs).map_err(Error::kvm("set registers"))
}

/// Long mode, paging, segments with DPL `cpl` (pvstack's own guest).
pub fn set_long_mode(vcpu: &VcpuFd, cpl: u8) -> Result<()> {
    set_sregs(vcpu, &long_mode_sregs(get_sregs(vcpu)?, cpl))
}

/// Where the vCPU starts: `entry` with stack `stack_top` and `arg` in RDI.
/// Also makes it runnable: with the in-kernel irqchip, every vCPU but the
/// first begins in the "wait for INIT/SIPI" state, in which KVM_RUN blocks.
pub fn set_entry(vcpu: &VcpuFd, entry: u64, stack_top: u64, arg: u64) -> Result<()> {
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(Error::kvm("make the vCPU runnable"))?;
    set_regs(
        vcpu,
        kvm_regs {
            rip: entry,
            rsp: stack_top,
            rdi: arg,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
    )
}

/// Linux's 64-bit boot protocol (Documentation/arch/x86/boot.rst): long
/// mode at CPL0 on identity page tables that cover the kernel, its boot
/// parameters (`boot_params`, in RSI) and command line; `entry` is the
/// 64-bit entry point.
pub fn set_linux64_entry(
    vcpu: &VcpuFd,
    entry: u64,
    boot_params: u64,
    stack_top: u64,
) -> Result<()> {
    set_sregs(vcpu, &long_mode_sregs(get_sregs(vcpu)?, 0))?;
    set_regs(
        vcpu,
        kvm_regs {
            rip: entry,
            rsi: boot_params,
            rsp: stack_top,
            rbp: stack_top,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
    )
}

/// The PVH entry (xen/include/public/arch-x86/hvm/start_info.h): 32-bit
/// protected mode, paging off, flat 4 GiB code and data segments, the
/// `hvm_start_info` address in RBX.
pub fn set_pvh_entry(vcpu: &VcpuFd, entry: u64, start_info: u64) -> Result<()> {
    let mut sregs = get_sregs(vcpu)?;
    let code = Segment::code32(0).to_kvm(gdt::CODE_SELECTOR);
    let data = Segment::data(0).to_kvm(gdt::DATA_SELECTOR);
    set_segments(&mut sregs, code, data);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    set_sregs(vcpu, &sregs)?;
    set_regs(
        vcpu,
        kvm_regs {
            rip: entry,
            rbx: start_info,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_has_paging_and_64_bit_code_at_the_cpl() {
        let sregs = long_mode_sregs(kvm_sregs::default(), 3);
        assert_eq!((sregs.cs.l, sregs.cs.dpl, sregs.cs.selector), (1, 3, 0x0b));
        assert_eq!(sregs.ss.dpl, 3);
        assert_ne!(sregs.cr0 & CR0_PG, 0);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_eq!(sregs.cr3, layout::PML4_ADDR);
        let kernel = long_mode_sregs(kvm_sregs::default(), 0);
        assert_eq!((kernel.cs.dpl, kernel.cs.selector), (0, 0x08));
    }
}
