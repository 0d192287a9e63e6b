//! Identity page tables: one PML4 entry, one PDPT entry per GiB and 2 MiB
//! pages covering [`layout::MAPPED_GIB`] GiB of guest physical space, RAM
//! and MMIO hole alike, except the first 2 MiB: they are mapped in 4 KiB
//! pages so that page 0 can stay unmapped and catch null pointers, as the
//! layout promises to pvstack's own guest. (A Linux kernel reads the BIOS
//! data area in page 0 before it switches to its own tables, so it gets
//! page 0 mapped.) A CPL3 guest needs the U bit at every level; the MMIO
//! hole is mapped uncached so device register accesses are not combined or
//! reordered.

use pvstack_protocols::layout;
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::memory::GuestMemory;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE_PAGE: u64 = 1 << 7;

const ENTRIES_PER_TABLE: u64 = 512;
const TABLE_SIZE: u64 = 0x1000;
const PAGE_SIZE_4K: u64 = 0x1000;
const PAGE_SIZE_2M: u64 = 2 << 20;

use layout::LOW_PT_ADDR;
const _: () = assert!(LOW_PT_ADDR + TABLE_SIZE <= layout::STACK_AREA_START);

/// Flags every entry carries for a guest at the given privilege.
fn base_flags(user: bool) -> u64 {
    PRESENT | WRITABLE | if user { USER } else { 0 }
}

/// The page-directory entry that maps the 2 MiB page at `addr`.
fn pd_entry(addr: u64, user: bool) -> u64 {
    let in_hole = (layout::MMIO_HOLE_START..layout::MMIO_HOLE_END).contains(&addr);
    let caching = if in_hole {
        CACHE_DISABLE | WRITE_THROUGH
    } else {
        0
    };
    addr | base_flags(user) | HUGE_PAGE | caching
}

/// The bytes of all page directories, one 4 KiB table per GiB. The first
/// entry points at the low page table instead of mapping a 2 MiB page.
fn page_directories(user: bool) -> Vec<u8> {
    let low = LOW_PT_ADDR | base_flags(user);
    std::iter::once(low)
        .chain(
            (1..layout::MAPPED_GIB * ENTRIES_PER_TABLE)
                .map(|page| pd_entry(page * PAGE_SIZE_2M, user)),
        )
        .flat_map(u64::to_le_bytes)
        .collect()
}

/// Whether page 0 is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageZero {
    /// Left out, so null pointers fault (pvstack's own guest).
    Unmapped,
    /// Mapped like the rest (a Linux guest reads the BIOS data area).
    Mapped,
}

/// The low page table's bytes: 4 KiB pages for the first 2 MiB.
fn low_page_table(user: bool, page_zero: PageZero) -> Vec<u8> {
    let first = match page_zero {
        PageZero::Unmapped => 0,
        PageZero::Mapped => base_flags(user),
    };
    std::iter::once(first)
        .chain((1..ENTRIES_PER_TABLE).map(|page| (page * PAGE_SIZE_4K) | base_flags(user)))
        .flat_map(u64::to_le_bytes)
        .collect()
}

/// The PDPT's bytes: entry `i` points at page directory `i`.
fn pdpt(user: bool) -> Vec<u8> {
    (0..layout::MAPPED_GIB)
        .flat_map(|gib| ((layout::PD_ADDR + gib * TABLE_SIZE) | base_flags(user)).to_le_bytes())
        .collect()
}

/// Writes the page tables; CR3 is then [`layout::PML4_ADDR`].
pub fn write(mem: &GuestMemory, user: bool, page_zero: PageZero) -> Result<()> {
    let write_error = Error::guest_write;
    mem.write_obj(
        layout::PDPT_ADDR | base_flags(user),
        GuestAddress(layout::PML4_ADDR),
    )
    .map_err(write_error("the PML4"))?;
    mem.write_slice(&pdpt(user), GuestAddress(layout::PDPT_ADDR))
        .map_err(write_error("the PDPT"))?;
    mem.write_slice(&page_directories(user), GuestAddress(layout::PD_ADDR))
        .map_err(write_error("the page directories"))?;
    mem.write_slice(&low_page_table(user, page_zero), GuestAddress(LOW_PT_ADDR))
        .map_err(write_error("the low page table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables in guest memory like the MMU does for `addr`,
    /// returning the physical address (None if not present) and the flags
    /// seen at the PML4, PDPT and last level.
    fn walk(mem: &GuestMemory, addr: u64) -> (Option<u64>, [u64; 3]) {
        let entry = |table: u64, shift: u32| -> u64 {
            let index = (addr >> shift) & 511;
            mem.read_obj(GuestAddress((table & 0x000f_ffff_ffff_f000) + index * 8))
                .unwrap()
        };
        let pml4e = entry(layout::PML4_ADDR, 39);
        let pdpte = entry(pml4e, 30);
        let pde = entry(pdpte, 21);
        let (leaf, page_size) = if pde & HUGE_PAGE != 0 {
            (pde, PAGE_SIZE_2M)
        } else {
            (entry(pde, 12), PAGE_SIZE_4K)
        };
        let phys = (leaf & PRESENT != 0)
            .then(|| (leaf & 0x000f_ffff_ffff_f000 & !(page_size - 1)) | (addr & (page_size - 1)));
        (phys, [pml4e & 0xfff, pdpte & 0xfff, leaf & 0xfff])
    }

    #[test]
    fn identity_maps_ram_and_the_hole() {
        let mem = crate::memory::create(layout::MIN_MEMORY).unwrap();
        write(&mem, true, PageZero::Unmapped).unwrap();
        for addr in [
            0x1000,
            layout::STACK_AREA_END - 8,
            0x20_1234,
            layout::HYPERCALL_ADDR + 8,
            layout::HIGH_RAM_START + 0x1000,
            (layout::MAPPED_GIB << 30) - 8,
        ] {
            let (phys, flags) = walk(&mem, addr);
            assert_eq!(phys, Some(addr));
            for level in flags {
                assert_eq!(
                    level & (PRESENT | WRITABLE | USER),
                    PRESENT | WRITABLE | USER
                );
            }
        }
        let (_, ram) = walk(&mem, 0x20_0000);
        assert_eq!(ram[2] & CACHE_DISABLE, 0);
        let (_, hole) = walk(&mem, layout::HYPERCALL_ADDR);
        assert_ne!(hole[2] & CACHE_DISABLE, 0);
    }

    #[test]
    fn page_zero_is_unmapped() {
        let mem = crate::memory::create(layout::MIN_MEMORY).unwrap();
        write(&mem, true, PageZero::Unmapped).unwrap();
        assert_eq!(walk(&mem, 0x8).0, None);
        assert_eq!(walk(&mem, 0xfff).0, None);
        assert_eq!(walk(&mem, 0x1000).0, Some(0x1000));
        write(&mem, false, PageZero::Mapped).unwrap();
        assert_eq!(walk(&mem, 0x413).0, Some(0x413));
    }

    #[test]
    fn kernel_tables_lack_the_user_bit() {
        let mem = crate::memory::create(layout::MIN_MEMORY).unwrap();
        write(&mem, false, PageZero::Unmapped).unwrap();
        let (phys, flags) = walk(&mem, 0x30_0000);
        assert_eq!(phys, Some(0x30_0000));
        assert!(flags.iter().all(|f| f & USER == 0));
    }
}
