//! Where a Linux guest's boot data goes in guest memory. Above 1 MiB and
//! in the MMIO hole the map is the VM's (`pvstack_protocols::layout`:
//! RAM split around the hole at 3 GiB, device windows and their
//! interrupt lines, IOAPIC, LAPIC); below 1 MiB it is a PC's:
//!
//! ```text
//! 0x0000_0000 .. 0x0000_1000   BIOS data area (zeros: no BIOS)
//! 0x0000_1000 .. 0x0000_2000   GDT and TSS (as for pvstack's own guest)
//! 0x0000_2000 .. 0x0004_5000   identity page tables (bzImage entry only)
//! 0x0004_5000 .. 0x0004_6000   boot_params (zero page), or PVH start info,
//!                               module list and memory map
//! 0x0004_6000 .. 0x0004_7000   kernel command line
//!            .. 0x0008_0000   boot stack of vCPU 0 (grows down)
//! 0x0009_fc00 .. 0x0010_0000   reserved in the e820 map (EBDA, BIOS area):
//! 0x000e_0000 ..               ACPI tables, RSDP first (where Linux scans)
//! 0x000f_fff0 .. 0x0010_0000   the reset vector (`reset_vector`)
//! 0x0010_0000 ..               the kernel: a bzImage's protected-mode code,
//!                               a vmlinux at its physical addresses
//!          .. top of low RAM   the initrd, as high as it may go
//! ```
//!
//! Linux copies its boot parameters and command line early and then owns
//! all RAM the e820 map lists, tables included.

use pvstack_protocols::layout;

/// boot_params (bzImage) or hvm_start_info (PVH).
pub const BOOT_PARAMS: u64 = layout::LOW_PT_ADDR + 0x1000;
/// The PVH module list (the initrd), in the start info's page.
pub const PVH_MODLIST: u64 = BOOT_PARAMS + 0x100;
/// The PVH memory map, in the start info's page.
pub const PVH_MEMMAP: u64 = BOOT_PARAMS + 0x200;
/// Most PVH memory map entries that fit the page.
pub const PVH_MEMMAP_MAX: usize = ((BOOT_PARAMS + 0x1000 - PVH_MEMMAP) / 24) as usize;
/// The kernel command line.
pub const CMDLINE: u64 = BOOT_PARAMS + 0x1000;
/// Room for the command line, its NUL included.
pub const CMDLINE_ROOM: usize = 0x1000;
/// Top of vCPU 0's boot stack (the kernel moves to its own at once).
pub const BOOT_STACK_TOP: u64 = 0x8_0000;
/// End of the RAM below 1 MiB; a PC's EBDA begins here.
pub const EBDA_START: u64 = 0x9_fc00;
/// The ACPI tables, RSDP first, in the BIOS area Linux scans for it.
pub const ACPI_TABLES: u64 = 0xe_0000;
/// End of the room for the ACPI tables: the reset vector follows.
pub const ACPI_TABLES_END: u64 = super::reset_vector::RESET_VECTOR;
/// The kernel loads at or above 1 MiB.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

const _: () = assert!(CMDLINE + CMDLINE_ROOM as u64 <= BOOT_STACK_TOP);
const _: () = assert!(BOOT_STACK_TOP < EBDA_START);
const _: () = assert!(EBDA_START < ACPI_TABLES && ACPI_TABLES < ACPI_TABLES_END);
