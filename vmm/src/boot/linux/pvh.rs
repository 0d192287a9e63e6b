//! An ELF vmlinux with a PVH entry point: the kernel names a 32-bit entry
//! in an ELF note (XEN_ELFNOTE_PHYS32_ENTRY, owner "Xen"), is loaded at
//! its segments' physical addresses (linux-loader) and started in 32-bit
//! protected mode with an `hvm_start_info` in RBX that points at the
//! command line, the memory map, the initrd (a module) and the RSDP.

use elf::abi::{EM_X86_64, PT_LOAD, PT_NOTE};
use elf::endian::AnyEndian;
use elf::note::Note;
use elf::ElfBytes;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};

use super::e820;
use super::layout::HIGH_MEMORY_START;

/// The note that carries the PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u64 = 18;
/// hvm_start_info's magic and the version pvstack fills in.
const START_INFO_MAGIC: u32 = 0x336e_c578;
const START_INFO_VERSION: u32 = 1;
/// Linux's command line limit on x86 (COMMAND_LINE_SIZE), less the NUL.
pub const CMDLINE_MAX: usize = 2047;

/// The PVH entry point `image` names, if it is an ELF with the note.
pub fn entry_point(image: &[u8]) -> Option<u64> {
    let elf = ElfBytes::<AnyEndian>::minimal_parse(image).ok()?;
    let segments = elf.segments()?;
    segments
        .iter()
        .filter(|phdr| phdr.p_type == PT_NOTE)
        .filter_map(|phdr| elf.segment_data_as_notes(&phdr).ok())
        .flatten()
        .find_map(|note| match note {
            Note::Unknown(any)
                if any.n_type == XEN_ELFNOTE_PHYS32_ENTRY
                    && any.name_str().is_ok_and(|name| name == "Xen") =>
            {
                let bytes: [u8; 4] = any.desc.get(..4)?.try_into().ok()?;
                Some(u64::from(u32::from_le_bytes(bytes)))
            }
            _ => None,
        })
}

/// A checked PVH vmlinux: its entry and the physical range its segments take.
#[derive(Clone, Copy, Debug)]
pub struct PvhKernel {
    pub entry: u64,
    pub start: u64,
    pub end: u64,
}

impl PvhKernel {
    /// Checks that `image` is an x86-64 ELF with a PVH note whose
    /// segments load at or above 1 MiB.
    pub fn parse(image: &[u8]) -> Result<PvhKernel, String> {
        let elf = ElfBytes::<AnyEndian>::minimal_parse(image)
            .map_err(|e| format!("not an ELF file ({e})"))?;
        if elf.ehdr.e_machine != EM_X86_64 {
            return Err(format!(
                "ELF vmlinux for another machine (e_machine {})",
                elf.ehdr.e_machine
            ));
        }
        let entry = entry_point(image).ok_or("ELF has no PVH entry note")?;
        let segments = elf.segments().ok_or("ELF has no program headers")?;
        let mut start = u64::MAX;
        let mut end = 0;
        for phdr in segments.iter().filter(|p| p.p_type == PT_LOAD) {
            let seg_end = phdr
                .p_paddr
                .checked_add(phdr.p_memsz)
                .ok_or_else(|| format!("segment at {:#x} wraps around", phdr.p_paddr))?;
            if phdr.p_paddr < HIGH_MEMORY_START {
                return Err(format!(
                    "segment at {:#x} is below 1 MiB, where the boot data goes",
                    phdr.p_paddr
                ));
            }
            if phdr.p_offset.saturating_add(phdr.p_filesz) > image.len() as u64 {
                return Err(format!(
                    "truncated ELF: segment at {:#x} needs file bytes up to {}, the file has {}",
                    phdr.p_paddr,
                    phdr.p_offset.saturating_add(phdr.p_filesz),
                    image.len()
                ));
            }
            start = start.min(phdr.p_paddr);
            end = end.max(seg_end);
        }
        if end == 0 {
            return Err("ELF has no loadable segments".into());
        }
        if !(start..end).contains(&entry) {
            return Err(format!(
                "PVH entry point {entry:#x} is in no loadable segment"
            ));
        }
        Ok(PvhKernel { entry, start, end })
    }
}

/// What PVH hands the kernel: the start info, the initrd as its one
/// module, and the memory map.
pub struct StartInfo {
    pub info: hvm_start_info,
    pub module: Option<hvm_modlist_entry>,
    pub memmap: Vec<hvm_memmap_table_entry>,
}

/// The start info for a kernel whose command line is at `cmdline`, with
/// the initrd `(address, size)` and the tables of `map`, given where the
/// module list and memory map go and where the RSDP is.
pub fn start_info(
    cmdline: u64,
    initrd: Option<(u64, u64)>,
    map: &[e820::Entry],
    modlist_addr: u64,
    memmap_addr: u64,
    rsdp: u64,
) -> StartInfo {
    let module = initrd.map(|(paddr, size)| hvm_modlist_entry {
        paddr,
        size,
        ..Default::default()
    });
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: START_INFO_MAGIC,
        version: START_INFO_VERSION,
        nr_modules: u32::from(module.is_some()),
        modlist_paddr: if module.is_some() { modlist_addr } else { 0 },
        cmdline_paddr: cmdline,
        rsdp_paddr: rsdp,
        memmap_paddr: memmap_addr,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    StartInfo {
        info,
        module,
        memmap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvstack_guest_has_no_pvh_note() {
        let image = crate::boot::own_guest::BUILTIN_GUEST;
        assert_eq!(entry_point(image), None);
        assert!(PvhKernel::parse(image)
            .unwrap_err()
            .contains("no PVH entry note"));
        assert!(PvhKernel::parse(b"not an elf").is_err());
    }

    #[test]
    fn start_info_points_at_everything() {
        let map = e820::memory_map(256 << 20);
        let s = start_info(
            0x4_6000,
            Some((0x0f00_0000, 4096)),
            &map,
            0x4_5100,
            0x4_5200,
            0xe_0000,
        );
        let info = s.info;
        assert_eq!(
            (info.magic, info.version, info.nr_modules),
            (START_INFO_MAGIC, 1, 1)
        );
        assert_eq!((info.cmdline_paddr, info.rsdp_paddr), (0x4_6000, 0xe_0000));
        assert_eq!(
            (info.modlist_paddr, info.memmap_paddr),
            (0x4_5100, 0x4_5200)
        );
        assert_eq!(info.memmap_entries as usize, map.len());
        let module = s.module.unwrap();
        assert_eq!((module.paddr, module.size), (0x0f00_0000, 4096));
        assert_eq!(s.memmap[0].type_, 1);
        let none = start_info(0x4_6000, None, &map, 0x4_5100, 0x4_5200, 0xe_0000);
        assert_eq!((none.info.nr_modules, none.info.modlist_paddr), (0, 0));
    }
}
