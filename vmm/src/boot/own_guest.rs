//! The boot path of pvstack's own guest (and of any static x86-64 ELF
//! written for its ABI): the GDT and identity page tables below 2 MiB,
//! then the image's segments, refusing images that are not for x86-64 or
//! whose segments would land outside guest RAM or on the VMM's own
//! structures below [`layout::GUEST_IMAGE_MIN`]. vCPU 0 starts at the ELF
//! entry; the others when the guest asks with CPU_START. What the guest
//! needs to know it asks for with the BOOT_INFO hypercall.

use std::ops::Range;

use elf::abi::{EM_X86_64, ET_EXEC, PT_LOAD};
use elf::endian::AnyEndian;
use elf::file::Class;
use elf::segment::ProgramHeader;
use elf::ElfBytes;
use pvstack_protocols::layout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::error::{Error, Result};
use crate::kvm_flavour::Privilege;
use crate::lifecycle::CpuStart;
use crate::memory::GuestMemory;
use crate::vcpu::{Launch, Vcpu};
use crate::x86;

/// The pvstack-guest image built by build.rs, embedded in the binary.
pub static BUILTIN_GUEST: &[u8] = include_bytes!(env!("PVSTACK_GUEST_ELF"));

/// One loadable segment, checked.
struct Segment<'a> {
    addr: u64,
    data: &'a [u8],
    mem_size: u64,
}

/// Writes the tables the guest runs on at `privilege`, loads `image`
/// (see [`load`]) and puts every vCPU in long mode at that privilege;
/// returns how each vCPU thread begins: vCPU 0 at the entry point, the
/// others when the guest asks with CPU_START.
pub fn start(
    mem: &GuestMemory,
    image: &[u8],
    name: &str,
    privilege: Privilege,
    vcpus: &[Vcpu],
) -> Result<Vec<Launch>> {
    x86::write_tables(mem, privilege)?;
    let entry = load(mem, image, name)?;
    for vcpu in vcpus {
        x86::cpu::set_long_mode(&vcpu.fd, privilege.cpl())?;
    }
    let first = CpuStart {
        entry,
        stack_top: layout::stack_top(0),
        arg: 0,
    };
    Ok(vcpus
        .iter()
        .map(|vcpu| match vcpu.index {
            0 => Launch::At(first),
            _ => Launch::OnCpuStart,
        })
        .collect())
}

/// Copies the loadable segments of `image` into `mem` and returns the entry
/// point. `name` names the image in errors (a path, or "built-in guest").
/// Nothing is written unless every segment is acceptable.
pub fn load(mem: &GuestMemory, image: &[u8], name: &str) -> Result<u64> {
    let bad = |reason: String| Error::BadImage {
        image: name.to_string(),
        reason,
    };
    let elf = ElfBytes::<AnyEndian>::minimal_parse(image)
        .map_err(|e| bad(format!("not an ELF file ({e})")))?;
    check_header(&elf).map_err(bad)?;
    let phdrs = elf
        .segments()
        .ok_or_else(|| bad("ELF has no program headers".into()))?;
    let mut segments = Vec::new();
    for phdr in phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD && p.p_memsz > 0)
    {
        segments.push(check_segment(mem, &elf, &phdr).map_err(bad)?);
    }
    if segments.is_empty() {
        return Err(bad("ELF has no loadable segments".into()));
    }
    let entry = elf.ehdr.e_entry;
    if !segments
        .iter()
        .any(|s| (s.addr..s.addr + s.mem_size).contains(&entry))
    {
        return Err(bad(format!(
            "entry point {entry:#x} is in no loadable segment"
        )));
    }
    for segment in &segments {
        write_segment(mem, segment)?;
    }
    Ok(entry)
}

fn check_header(elf: &ElfBytes<AnyEndian>) -> std::result::Result<(), String> {
    let ehdr = &elf.ehdr;
    if ehdr.e_machine != EM_X86_64 {
        let machine = elf::to_str::e_machine_to_human_str(ehdr.e_machine).unwrap_or("unknown");
        return Err(format!(
            "ELF is for another machine ({machine}, e_machine {}), pvstack runs x86-64 guests",
            ehdr.e_machine
        ));
    }
    if ehdr.class != Class::ELF64 {
        return Err("ELF is 32-bit, pvstack runs 64-bit guests".into());
    }
    if ehdr.e_type != ET_EXEC {
        return Err(format!(
            "ELF is not a static executable (e_type {}); link it with -static -no-pie",
            ehdr.e_type
        ));
    }
    Ok(())
}

fn check_segment<'a>(
    mem: &GuestMemory,
    elf: &ElfBytes<'a, AnyEndian>,
    phdr: &ProgramHeader,
) -> std::result::Result<Segment<'a>, String> {
    let addr = phdr.p_paddr;
    let range = addr
        .checked_add(phdr.p_memsz)
        .map(|end| addr..end)
        .ok_or_else(|| {
            format!(
                "segment at {addr:#x} of {:#x} bytes wraps around",
                phdr.p_memsz
            )
        })?;
    let show = |r: &Range<u64>| format!("segment {:#x}..{:#x}", r.start, r.end);
    if addr < layout::GUEST_IMAGE_MIN {
        return Err(format!(
            "{} starts below {:#x}, where pvstack keeps its page tables and stacks",
            show(&range),
            layout::GUEST_IMAGE_MIN
        ));
    }
    if !mem.check_range(GuestAddress(addr), phdr.p_memsz as usize) {
        return Err(format!("{} lies outside guest RAM", show(&range)));
    }
    if phdr.p_filesz > phdr.p_memsz {
        return Err(format!(
            "{} has more file bytes than memory bytes",
            show(&range)
        ));
    }
    let data = elf
        .segment_data(phdr)
        .map_err(|e| format!("{}: cannot read its bytes ({e})", show(&range)))?;
    Ok(Segment {
        addr,
        data,
        mem_size: phdr.p_memsz,
    })
}

fn write_segment(mem: &GuestMemory, segment: &Segment) -> Result<()> {
    // The rest of the segment (.bss) needs no writing: guest RAM is a
    // fresh memfd, all zeros, and the VMM writes nothing at or above
    // GUEST_IMAGE_MIN.
    mem.write_slice(segment.data, GuestAddress(segment.addr))
        .map_err(Error::guest_write("the guest image"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte offsets in an ELF64 header and program header.
    const E_MACHINE: usize = 18;
    const E_PHOFF: usize = 32;
    const P_PADDR: usize = 24;

    fn mem() -> GuestMemory {
        crate::memory::create(16 << 20).unwrap()
    }

    fn first_load_phdr(image: &[u8]) -> usize {
        let elf = ElfBytes::<AnyEndian>::minimal_parse(image).unwrap();
        let index = elf
            .segments()
            .unwrap()
            .iter()
            .position(|p| p.p_type == PT_LOAD)
            .unwrap();
        let phoff = u64::from_le_bytes(image[E_PHOFF..E_PHOFF + 8].try_into().unwrap());
        phoff as usize + index * elf.ehdr.e_phentsize as usize
    }

    fn error_text(image: &[u8]) -> String {
        load(&mem(), image, "img").unwrap_err().to_string()
    }

    #[test]
    fn builtin_guest_loads_above_the_vmm_area() {
        let mem = mem();
        let entry = load(&mem, BUILTIN_GUEST, "built-in guest").unwrap();
        assert!(entry >= layout::GUEST_IMAGE_MIN);
        // The entry point holds code now.
        let first: u64 = mem.read_obj(GuestAddress(entry)).unwrap();
        assert_ne!(first, 0);
    }

    #[test]
    fn refuses_what_is_not_an_x86_64_executable() {
        assert!(error_text(b"#!/bin/sh\necho hi\n").contains("not an ELF file"));
        let mut arm = BUILTIN_GUEST.to_vec();
        arm[E_MACHINE..E_MACHINE + 2].copy_from_slice(&183u16.to_le_bytes());
        assert!(error_text(&arm).contains("another machine"));
    }

    #[test]
    fn refuses_segments_outside_ram_or_on_the_vmm_area() {
        let phdr = first_load_phdr(BUILTIN_GUEST);
        let patched = |paddr: u64| {
            let mut image = BUILTIN_GUEST.to_vec();
            image[phdr + P_PADDR..phdr + P_PADDR + 8].copy_from_slice(&paddr.to_le_bytes());
            image
        };
        assert!(error_text(&patched(0x1000)).contains("starts below 0x200000"));
        assert!(error_text(&patched(1 << 40)).contains("outside guest RAM"));
        assert!(error_text(&patched(layout::MMIO_HOLE_START)).contains("outside guest RAM"));
    }
}
