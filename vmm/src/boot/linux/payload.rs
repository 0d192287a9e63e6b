//! The kernel inside a bzImage, unpacked by pvstack instead of by the
//! kernel's own decompressor.
//!
//! A bzImage carries the kernel proper (an ELF vmlinux) compressed, and a
//! small decompressor that runs first in the guest: it moves the payload
//! out of the way, decompresses it, lays the ELF's segments out, applies
//! the KASLR relocations and jumps to the kernel's 64-bit entry. In a VM
//! all of that is guest time, and under nested virtualisation each page
//! it touches first costs a nested page fault. pvstack decompresses the
//! payload on the host instead when it knows the format (LZ4, which
//! Debian's kernels use), loads the ELF's segments where they are linked
//! and starts vCPU 0 at the kernel's own 64-bit entry with the same boot
//! parameters, as Firecracker and Cloud Hypervisor do with a vmlinux.
//! Other formats are left to the kernel's decompressor.
//!
//! What the guest loses: the decompressor's KASLR of the kernel's
//! physical and virtual placement (the kernel runs where it is linked;
//! `nokaslr` in effect).

use elf::abi::{EM_X86_64, PT_LOAD};
use elf::endian::AnyEndian;
use elf::ElfBytes;

use super::layout::HIGH_MEMORY_START;

/// The legacy LZ4 frame `lz4 -l` writes (the kernel build's format): this
/// magic, then blocks of a 32-bit little-endian compressed length and an
/// LZ4 block, each at most 8 MiB decompressed.
const LZ4_LEGACY_MAGIC: [u8; 4] = 0x184c_2102_u32.to_le_bytes();
const LZ4_LEGACY_BLOCK_MAX: usize = 8 << 20;
/// Most bytes pvstack decompresses a kernel to (a vmlinux is tens of MiB).
const VMLINUX_MAX: usize = 1 << 30;

/// A kernel unpacked from a bzImage: the ELF vmlinux, where it starts
/// (its 64-bit entry, a physical address) and where its segments end.
pub struct Unpacked {
    pub elf: Vec<u8>,
    pub entry: u64,
    pub end: u64,
}

/// Unpacks `payload` (the bzImage's compressed kernel) if pvstack knows
/// its format; `Ok(None)` if not. Errors say what is wrong with it.
pub fn unpack(payload: &[u8]) -> Result<Option<Unpacked>, String> {
    if !payload.starts_with(&LZ4_LEGACY_MAGIC) {
        return Ok(None);
    }
    let elf = unlz4_legacy(payload)?;
    let (entry, end) = check_vmlinux(&elf)?;
    Ok(Some(Unpacked { elf, entry, end }))
}

/// Decompresses a legacy LZ4 frame followed, as the kernel build appends
/// it, by the decompressed length (32 bits, little endian).
fn unlz4_legacy(payload: &[u8]) -> Result<Vec<u8>, String> {
    let corrupt = |what: String| format!("its LZ4 payload is corrupt: {what}");
    let Some((body, trailer)) = payload
        .len()
        .checked_sub(4)
        .filter(|&split| split >= LZ4_LEGACY_MAGIC.len())
        .map(|split| payload.split_at(split))
    else {
        return Err(corrupt("shorter than its header".into()));
    };
    let expected = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]) as usize;
    if expected == 0 || expected > VMLINUX_MAX {
        return Err(corrupt(format!(
            "it says it decompresses to {expected} bytes"
        )));
    }
    // Zeroed pages from the allocator cost nothing until written.
    let mut out = vec![0u8; expected];
    let mut written = 0;
    let mut rest = &body[LZ4_LEGACY_MAGIC.len()..];
    while !rest.is_empty() {
        let Some((len, after)) = rest.split_first_chunk::<4>() else {
            return Err(corrupt(format!("{} stray bytes at its end", rest.len())));
        };
        // Concatenated frames repeat the magic.
        if *len == LZ4_LEGACY_MAGIC {
            rest = after;
            continue;
        }
        let len = u32::from_le_bytes(*len) as usize;
        let Some(block) = after.get(..len) else {
            return Err(corrupt(format!(
                "a block of {len} bytes, with {} left",
                after.len()
            )));
        };
        let room = (expected - written).min(LZ4_LEGACY_BLOCK_MAX);
        written += lz4_flex::block::decompress_into(block, &mut out[written..written + room])
            .map_err(|e| corrupt(format!("a block at decompressed offset {written}: {e}")))?;
        rest = &after[len..];
    }
    if written != expected {
        return Err(corrupt(format!(
            "it decompresses to {written} bytes, its trailer says {expected}"
        )));
    }
    Ok(out)
}

/// Checks that `elf` is an x86-64 vmlinux whose segments load at or above
/// 1 MiB and whose entry is in one of them; its `(entry, end)`.
fn check_vmlinux(elf: &[u8]) -> Result<(u64, u64), String> {
    let bad = |what: String| format!("its decompressed kernel {what}");
    let file = ElfBytes::<AnyEndian>::minimal_parse(elf)
        .map_err(|e| bad(format!("is not an ELF file ({e})")))?;
    if file.ehdr.e_machine != EM_X86_64 {
        return Err(bad(format!(
            "is for another machine (e_machine {})",
            file.ehdr.e_machine
        )));
    }
    let segments = file
        .segments()
        .ok_or_else(|| bad("has no program headers".into()))?;
    let mut ranges = Vec::new();
    for phdr in segments.iter().filter(|p| p.p_type == PT_LOAD) {
        let end = phdr
            .p_paddr
            .checked_add(phdr.p_memsz)
            .filter(|_| phdr.p_offset.saturating_add(phdr.p_filesz) <= elf.len() as u64)
            .ok_or_else(|| bad(format!("has a bad segment at {:#x}", phdr.p_paddr)))?;
        if phdr.p_paddr < HIGH_MEMORY_START {
            return Err(bad(format!(
                "has a segment at {:#x}, below 1 MiB",
                phdr.p_paddr
            )));
        }
        ranges.push(phdr.p_paddr..end);
    }
    let entry = file.ehdr.e_entry;
    if !ranges.iter().any(|r| r.contains(&entry)) {
        return Err(bad(format!("has its entry {entry:#x} in no segment")));
    }
    let end = ranges.iter().map(|r| r.end).max().unwrap_or(0);
    Ok((entry, end))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal x86-64 ELF: one PT_LOAD of `code` at physical 16 MiB,
    /// entered at its start.
    pub(crate) fn tiny_vmlinux(code: &[u8]) -> Vec<u8> {
        let phoff = 64u64;
        let data_off = phoff + 56;
        let mut elf = Vec::new();
        elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf.extend_from_slice(&EM_X86_64.to_le_bytes());
        elf.extend_from_slice(&1u32.to_le_bytes());
        elf.extend_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
        elf.extend_from_slice(&phoff.to_le_bytes());
        elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        elf.extend_from_slice(&0u32.to_le_bytes());
        for half in [64u16, 56, 1, 64, 0, 0] {
            elf.extend_from_slice(&half.to_le_bytes());
        }
        elf.extend_from_slice(&PT_LOAD.to_le_bytes());
        elf.extend_from_slice(&7u32.to_le_bytes()); // RWX
        for word in [
            data_off,
            0xffff_ffff_8100_0000,
            0x100_0000,
            code.len() as u64,
            code.len() as u64 + 4096,
            4096,
        ] {
            elf.extend_from_slice(&word.to_le_bytes());
        }
        elf.extend_from_slice(code);
        elf
    }

    /// `data` in the kernel build's LZ4 format, cut into blocks of
    /// `block` bytes.
    pub(crate) fn lz4_legacy(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in data.chunks(block) {
            let compressed = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            out.extend_from_slice(&compressed);
        }
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    #[test]
    fn lz4_payload_unpacks_to_the_vmlinux() {
        let code: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let elf = tiny_vmlinux(&code);
        let unpacked = unpack(&lz4_legacy(&elf, 30_000)).unwrap().unwrap();
        assert_eq!(unpacked.elf, elf);
        assert_eq!(unpacked.entry, 0x100_0000);
        assert_eq!(unpacked.end, 0x100_0000 + code.len() as u64 + 4096);
    }

    #[test]
    fn other_formats_are_left_to_the_kernel() {
        assert!(unpack(b"\x1f\x8b\x08\0gzip").unwrap().is_none());
        assert!(unpack(&[]).unwrap().is_none());
    }

    #[test]
    fn bad_payloads_are_refused_with_the_reason() {
        let elf = tiny_vmlinux(&[0x90; 5000]);
        let good = lz4_legacy(&elf, 4096);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..good.len() - 9].to_vec(), "corrupt"),
            (LZ4_LEGACY_MAGIC.to_vec(), "shorter than its header"),
            (
                [&good[..good.len() - 4], &[0u8; 4][..]].concat(),
                "decompresses to 0 bytes",
            ),
            (
                [
                    &good[..good.len() - 4],
                    &((elf.len() + 1) as u32).to_le_bytes()[..],
                ]
                .concat(),
                "its trailer says",
            ),
            (
                lz4_legacy(b"not an ELF file at all", 4096),
                "is not an ELF file",
            ),
        ];
        for (payload, needle) in cases {
            let err = unpack(&payload).err().expect(needle);
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
    }
}
