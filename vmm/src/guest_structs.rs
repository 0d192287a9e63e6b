//! The protocols structures as vm-memory values, so the VMM can read and
//! write them in guest memory.
//!
//! The `ByteValued` impls live here rather than in pvstack-protocols:
//! protocols is linked into the no_std guest, and a vm-memory dependency
//! there (even behind a feature) pulls std into the guest whenever cargo
//! unifies features across a workspace build.

use pvstack_protocols::boot::{BootInfo, Counters};
use pvstack_protocols::hypercall::HypercallBlock;
use vm_memory::ByteValued;

/// A protocols structure, byte-for-byte as it sits in guest memory.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abi<T>(pub T);

// SAFETY: repr(transparent) over a repr(C) struct of u64/i64 fields with
// no padding (protocols checks the size); any bit pattern is valid.
unsafe impl ByteValued for Abi<HypercallBlock> {}
// SAFETY: repr(transparent) over a repr(C) struct of integers and integer
// arrays, laid out without padding (protocols' `boot_info_has_no_padding`);
// any bit pattern is valid.
unsafe impl ByteValued for Abi<BootInfo> {}
// SAFETY: repr(transparent) over a repr(C) struct of u64 fields only.
unsafe impl ByteValued for Abi<Counters> {}
