//! x86-64 specifics: the tables in guest memory (GDT, identity page
//! tables) and the state of each vCPU (registers, CPUID, MSRs, FPU,
//! LAPIC) that the two boot paths start their guest with.

pub mod cpu;
pub mod cpuid;
pub mod fpu;
pub mod gdt;
pub mod lapic;
pub mod msrs;
pub mod paging;

use crate::error::Result;
use crate::kvm_flavour::Privilege;
use crate::memory::GuestMemory;

/// Writes the GDT, TSS and page tables every vCPU of pvstack's own guest
/// shares.
pub fn write_tables(mem: &GuestMemory, privilege: Privilege) -> Result<()> {
    gdt::write(mem, privilege.cpl(), gdt::CodeMode::Long)?;
    paging::write(
        mem,
        privilege == Privilege::User,
        paging::PageZero::Unmapped,
    )
}
