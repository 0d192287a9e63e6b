//! The guest physical memory map.
//!
//! ```text
//! 0x0000_0000 .. 0x0000_1000   unmapped (catches null pointers)
//! 0x0000_1000 .. 0x0000_2000   GDT and TSS
//! 0x0000_2000 .. 0x0000_3000   PML4
//! 0x0000_3000 .. 0x0000_4000   PDPT
//! 0x0000_4000 .. 0x0004_4000   page directories (one per GiB, 2 MiB pages)
//! 0x0004_4000 .. 0x0004_5000   page table for the first 2 MiB (4 KiB pages)
//! 0x0010_0000 .. 0x0020_0000   vCPU stacks (STACK_SIZE each, vCPU 0 on top)
//! 0x0020_0000 ..               the guest image (where its ELF says)
//!          ..  LOW_RAM_END      RAM
//! 0xC000_0000 .. 0x1_0000_0000  MMIO hole: hypercall doorbell, devices,
//!                               then the in-kernel IOAPIC and LAPIC
//! 0x1_0000_0000 ..              RAM above LOW_RAM_END, if any
//! ```
//!
//! Everything below `GUEST_IMAGE_MIN` belongs to the VMM; an ELF segment
//! that reaches into it is refused.

/// Start of the GDT (which also holds the TSS descriptor).
pub const GDT_ADDR: u64 = 0x1000;
/// Where the TSS lives (the CPU wants one loaded in 64-bit mode even
/// though the guest never switches stacks through it).
pub const TSS_ADDR: u64 = 0x1800;
/// Root of the identity page tables.
pub const PML4_ADDR: u64 = 0x2000;
/// The single page-directory-pointer table (covers 512 GiB).
pub const PDPT_ADDR: u64 = 0x3000;
/// First page directory; page directory `i` maps GiB `i`.
pub const PD_ADDR: u64 = 0x4000;
/// How many GiB of guest physical address space the page tables map.
pub const MAPPED_GIB: u64 = 64;
/// The page table that maps the first 2 MiB with 4 KiB pages, so that
/// page 0 can stay unmapped; it follows the page directories.
pub const LOW_PT_ADDR: u64 = PD_ADDR + MAPPED_GIB * 0x1000;

/// Bottom of the vCPU stack area.
pub const STACK_AREA_START: u64 = 0x10_0000;
/// Top of the vCPU stack area (exclusive); vCPU 0's stack ends here.
pub const STACK_AREA_END: u64 = 0x20_0000;
/// Bytes of stack for each vCPU.
pub const STACK_SIZE: u64 = 0x4000;
/// Most vCPUs a VM may have: as many stacks as fit the stack area.
pub const MAX_VCPUS: u32 = ((STACK_AREA_END - STACK_AREA_START) / STACK_SIZE) as u32;

/// Lowest address a loaded guest image may use.
pub const GUEST_IMAGE_MIN: u64 = 0x20_0000;

/// End of RAM below the MMIO hole.
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// Start of the MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the MMIO hole (exclusive); RAM continues here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Where RAM beyond `LOW_RAM_END` bytes is placed.
pub const HIGH_RAM_START: u64 = MMIO_HOLE_END;

/// Smallest guest memory the VMM accepts: the page tables, stacks and a
/// guest image must fit.
pub const MIN_MEMORY: u64 = 4 << 20;
/// Largest guest memory: what the identity page tables map, less the hole.
pub const MAX_MEMORY: u64 = (MAPPED_GIB << 30) - (MMIO_HOLE_END - MMIO_HOLE_START);

/// The hypercall doorbell page (see [`crate::hypercall`]).
pub const HYPERCALL_ADDR: u64 = 0xC000_0000;
/// Size of the hypercall doorbell window.
pub const HYPERCALL_SIZE: u64 = 0x1000;

/// First device MMIO window; device `i` gets `DEVICE_MMIO_START + i * DEVICE_MMIO_SIZE`.
pub const DEVICE_MMIO_START: u64 = 0xC000_1000;
/// Size of one device's MMIO window (one virtio-mmio register page).
pub const DEVICE_MMIO_SIZE: u64 = 0x1000;
/// Most devices a VM may have: each needs its own line on the in-kernel
/// IOAPIC, which has 24, of which the first five are left to legacy uses.
pub const MAX_DEVICES: u32 = 16;
/// First interrupt line (IOAPIC GSI) handed to devices; device `i` gets `FIRST_DEVICE_IRQ + i`.
pub const FIRST_DEVICE_IRQ: u32 = 5;

/// MMIO window of device slot `index`.
pub const fn device_mmio_addr(index: u32) -> u64 {
    DEVICE_MMIO_START + index as u64 * DEVICE_MMIO_SIZE
}

/// Interrupt line of device slot `index`.
pub const fn device_irq(index: u32) -> u32 {
    FIRST_DEVICE_IRQ + index
}

/// Top of the stack of vCPU `cpu` (exclusive).
pub const fn stack_top(cpu: u32) -> u64 {
    STACK_AREA_END - cpu as u64 * STACK_SIZE
}

/// Guest physical RAM ranges `(start, len)` for `mem_size` bytes of RAM.
pub const fn ram_ranges(mem_size: u64) -> [(u64, u64); 2] {
    if mem_size <= LOW_RAM_END {
        [(0, mem_size), (HIGH_RAM_START, 0)]
    } else {
        [(0, LOW_RAM_END), (HIGH_RAM_START, mem_size - LOW_RAM_END)]
    }
}

// The layout's invariants, checked when the crate compiles.
// The VMM's tables and the stacks fit below the guest image.
const _: () = assert!(LOW_PT_ADDR + 0x1000 <= STACK_AREA_START);
const _: () = assert!(STACK_AREA_END <= GUEST_IMAGE_MIN);
const _: () = assert!(TSS_ADDR > GDT_ADDR && TSS_ADDR + 0x68 < PML4_ADDR);
// Device windows fit in the hole below the in-kernel IOAPIC (0xFEC0_0000),
// after the hypercall window.
const _: () = assert!(device_mmio_addr(MAX_DEVICES) <= 0xFEC0_0000);
const _: () = assert!(HYPERCALL_ADDR + HYPERCALL_SIZE <= DEVICE_MMIO_START);
// GSIs 0..=23 exist on the in-kernel IOAPIC.
const _: () = assert!(device_irq(MAX_DEVICES - 1) < 24);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(256 << 20), [(0, 256 << 20), (HIGH_RAM_START, 0)]);
        assert_eq!(
            ram_ranges(4 << 30),
            [(0, LOW_RAM_END), (HIGH_RAM_START, (4 << 30) - LOW_RAM_END)]
        );
    }
}
