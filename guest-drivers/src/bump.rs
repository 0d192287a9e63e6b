//! A bump allocator over the guest's free RAM (from the end of the image to
//! the end of low RAM). Nothing is ever freed: workloads allocate their
//! rings and buffers once and the VM ends when they are done. Because the
//! guest's memory is identity mapped, an allocation's address is also its
//! guest physical address, which is what devices are given.

/// Hands out zeroed, aligned pieces of one memory region.
#[derive(Debug)]
pub struct Bump<'a> {
    rest: &'a mut [u8],
}

impl<'a> Bump<'a> {
    /// An allocator over `mem`.
    pub fn new(mem: &'a mut [u8]) -> Self {
        Bump { rest: mem }
    }

    /// `len` zeroed bytes aligned to `align` (a power of two), or `None`
    /// when the region is exhausted.
    pub fn alloc(&mut self, len: usize, align: usize) -> Option<&'a mut [u8]> {
        let rest = core::mem::take(&mut self.rest);
        let pad = rest.as_ptr().align_offset(align);
        if pad
            .checked_add(len)
            .is_none_or(|needed| needed > rest.len())
        {
            self.rest = rest;
            return None;
        }
        let (piece, rest) = rest[pad..].split_at_mut(len);
        self.rest = rest;
        piece.fill(0);
        Some(piece)
    }

    /// A slice of `count` copies of `value`, or `None` when the region is
    /// exhausted.
    pub fn alloc_slice<T: Copy>(&mut self, count: usize, value: T) -> Option<&'a mut [T]> {
        let bytes = self.alloc(
            count.checked_mul(core::mem::size_of::<T>())?,
            core::mem::align_of::<T>(),
        )?;
        let items = bytes.as_mut_ptr().cast::<T>();
        for i in 0..count {
            // SAFETY: `bytes` holds `count` properly aligned `T`s.
            unsafe { items.add(i).write(value) };
        }
        // SAFETY: every element was initialised above; the memory is ours
        // for 'a (taken out of the region for good).
        Some(unsafe { core::slice::from_raw_parts_mut(items, count) })
    }

    /// Bytes left (before alignment padding).
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    #[test]
    fn allocations_are_aligned_zeroed_and_disjoint() {
        let mut mem = vec![0xaau8; 10_000];
        let mut bump = Bump::new(&mut mem);
        let a = bump.alloc(10, 1).expect("fits");
        let b = bump.alloc(100, 4096).expect("fits");
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(b.iter().all(|&x| x == 0));
        assert!(a.as_ptr() as usize + a.len() <= b.as_ptr() as usize);
        assert!(bump.alloc(20_000, 1).is_none());
        assert!(bump.alloc(1000, 8).is_some());
        assert!(bump.remaining() < 10_000 - 1100);
        let words = bump.alloc_slice(5, 7u64).expect("fits");
        assert_eq!(words, [7; 5]);
        assert_eq!(words.as_ptr() as usize % 8, 0);
    }
}
