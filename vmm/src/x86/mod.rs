//! x86-64 specifics: the GDT, the identity page tables and the state a
//! vCPU starts in.

pub mod cpu;
pub mod gdt;
pub mod paging;

use crate::error::Result;
use crate::flavour::Privilege;
use crate::memory::GuestMemory;

/// Writes the GDT, TSS and page tables every vCPU shares.
pub fn write_tables(mem: &GuestMemory, privilege: Privilege) -> Result<()> {
    gdt::write(mem, privilege.cpl())?;
    paging::write(mem, privilege == Privilege::User)
}
