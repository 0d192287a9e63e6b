//! The guest's GDT: a flat code segment (64-bit, or 32-bit for a PVH
//! entry), a flat data segment (both with DPL = the guest's privilege) and
//! a TSS, which x86-64 insists on having loaded even though the guest
//! never switches stacks through it. A Linux guest replaces it with its
//! own before it loads any selector.
//!
//! The same [`Segment`] gives both the descriptor written into guest
//! memory and the hidden segment state handed to KVM, so the two agree.

use kvm_bindings::kvm_segment;
use pvstack_protocols::layout;
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::memory::GuestMemory;

/// Selector (without RPL) of the code segment.
pub const CODE_SELECTOR: u16 = 1 << 3;
/// Selector (without RPL) of the data segment.
pub const DATA_SELECTOR: u16 = 2 << 3;
/// Selector of the TSS (a 16-byte descriptor in slots 3 and 4).
pub const TSS_SELECTOR: u16 = 3 << 3;
/// Bytes in a 64-bit TSS, less one.
const TSS_LIMIT: u32 = 0x67;
/// Offset of the I/O permission bitmap base in the TSS.
const TSS_IOMAP_BASE_OFFSET: u64 = 0x66;

/// A segment as both a GDT descriptor and KVM's `kvm_segment` see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    /// The 20-bit limit field (in pages when `granular`).
    pub limit: u32,
    /// Descriptor type (4 bits).
    pub kind: u8,
    /// Code/data (true) or system (false) descriptor.
    pub code_or_data: bool,
    pub dpl: u8,
    /// 64-bit code segment.
    pub long: bool,
    /// Default operand size 32 bits (not for 64-bit code).
    pub big: bool,
    /// Limit counts 4 KiB pages.
    pub granular: bool,
}

impl Segment {
    /// Flat 64-bit code, execute/read, accessed.
    pub fn code64(dpl: u8) -> Segment {
        Segment {
            base: 0,
            limit: 0xf_ffff,
            kind: 0xb,
            code_or_data: true,
            dpl,
            long: true,
            big: false,
            granular: true,
        }
    }

    /// Flat 32-bit code, execute/read, accessed: the PVH entry's CS.
    pub fn code32(dpl: u8) -> Segment {
        Segment {
            long: false,
            big: true,
            ..Segment::code64(dpl)
        }
    }

    /// Flat data, read/write, accessed.
    pub fn data(dpl: u8) -> Segment {
        Segment {
            kind: 0x3,
            long: false,
            big: true,
            ..Segment::code64(dpl)
        }
    }

    /// The busy 64-bit TSS at [`layout::TSS_ADDR`].
    pub fn tss() -> Segment {
        Segment {
            base: layout::TSS_ADDR,
            limit: TSS_LIMIT,
            kind: 0xb,
            code_or_data: false,
            dpl: 0,
            long: false,
            big: false,
            granular: false,
        }
    }

    /// The first (or only) 8 bytes of the descriptor.
    pub fn descriptor(&self) -> u64 {
        let base = self.base & 0xffff_ffff;
        let limit = u64::from(self.limit & 0xf_ffff);
        let access = u64::from(self.kind & 0xf)
            | u64::from(self.code_or_data) << 4
            | u64::from(self.dpl & 3) << 5
            | 1 << 7; // present
        let flags =
            u64::from(self.long) << 1 | u64::from(self.big) << 2 | u64::from(self.granular) << 3;
        (limit & 0xffff)
            | (base & 0xff_ffff) << 16
            | access << 40
            | (limit >> 16) << 48
            | flags << 52
            | (base >> 24) << 56
    }

    /// What KVM loads into the hidden part of a segment register.
    pub fn to_kvm(&self, selector: u16) -> kvm_segment {
        let limit = if self.granular {
            (self.limit << 12) | 0xfff
        } else {
            self.limit
        };
        kvm_segment {
            base: self.base,
            limit,
            selector,
            type_: self.kind,
            present: 1,
            dpl: self.dpl,
            db: u8::from(self.big),
            s: u8::from(self.code_or_data),
            l: u8::from(self.long),
            g: u8::from(self.granular),
            ..Default::default()
        }
    }
}

/// What the code segment runs: 64-bit code in long mode, or 32-bit code
/// in protected mode (the PVH entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeMode {
    Long,
    Protected32,
}

impl CodeMode {
    fn segment(self, dpl: u8) -> Segment {
        match self {
            CodeMode::Long => Segment::code64(dpl),
            CodeMode::Protected32 => Segment::code32(dpl),
        }
    }
}

/// The GDT's descriptors, in slot order.
pub fn gdt_entries(dpl: u8, code: CodeMode) -> [u64; 5] {
    let tss = Segment::tss();
    [
        0,
        code.segment(dpl).descriptor(),
        Segment::data(dpl).descriptor(),
        tss.descriptor(),
        tss.base >> 32, // upper half of the 16-byte system descriptor
    ]
}

/// Bytes of the GDT, less one (the GDTR limit).
pub fn gdt_limit() -> u16 {
    (std::mem::size_of::<[u64; 5]>() - 1) as u16
}

/// Writes the GDT and an empty TSS into guest memory.
pub fn write(mem: &GuestMemory, dpl: u8, code: CodeMode) -> Result<()> {
    for (slot, entry) in gdt_entries(dpl, code).iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT_ADDR + slot as u64 * 8))
            .map_err(Error::guest_write("the GDT"))?;
    }
    // No I/O permission bitmap: its base points past the TSS limit.
    mem.write_obj(
        (TSS_LIMIT + 1) as u16,
        GuestAddress(layout::TSS_ADDR + TSS_IOMAP_BASE_OFFSET),
    )
    .map_err(Error::guest_write("the TSS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_classic_encodings() {
        // The well-known flat descriptors of a 64-bit kernel and user space.
        assert_eq!(Segment::code64(0).descriptor(), 0x00af_9b00_0000_ffff);
        assert_eq!(Segment::data(0).descriptor(), 0x00cf_9300_0000_ffff);
        assert_eq!(Segment::code64(3).descriptor(), 0x00af_fb00_0000_ffff);
        assert_eq!(Segment::data(3).descriptor(), 0x00cf_f300_0000_ffff);
        // TSS at 0x1800, limit 0x67, type 0xb (busy), present.
        assert_eq!(Segment::tss().descriptor(), 0x0000_8b00_1800_0067);
        // The 32-bit flat code segment of a PVH entry.
        assert_eq!(Segment::code32(0).descriptor(), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn kvm_view_agrees_with_the_descriptor() {
        let cs = Segment::code64(3).to_kvm(CODE_SELECTOR | 3);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.s, cs.type_), (1, 0, 3, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.selector, 0x0b);
        let tr = Segment::tss().to_kvm(TSS_SELECTOR);
        assert_eq!((tr.base, tr.limit, tr.s, tr.type_), (0x1800, 0x67, 0, 0xb));
    }

    #[test]
    fn gdt_lands_in_memory() {
        let mem = crate::memory::create(layout::MIN_MEMORY).unwrap();
        write(&mem, 3, CodeMode::Long).unwrap();
        let code: u64 = mem
            .read_obj(GuestAddress(layout::GDT_ADDR + u64::from(CODE_SELECTOR)))
            .unwrap();
        assert_eq!(code, Segment::code64(3).descriptor());
        assert_eq!(usize::from(gdt_limit()) + 1, 5 * 8);
        assert!(layout::GDT_ADDR + u64::from(gdt_limit()) < layout::TSS_ADDR);
    }
}
