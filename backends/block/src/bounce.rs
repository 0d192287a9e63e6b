//! Bounce buffers for O_DIRECT transfers whose guest buffers the kernel
//! cannot take as they are (misaligned addresses or lengths).
//!
//! A bounce buffer holds at most [`BOUNCE_CHUNK`] bytes, whatever the
//! request asks for: a larger request is moved chunk by chunk, so a guest
//! that sends a 4 GiB request with unaligned buffers costs the backend one
//! chunk, not 4 GiB.
//!
//! Guest memory is shared with a guest that may change it at any moment,
//! so bytes move between it and a bounce buffer only through vm-memory's
//! volatile accessors (`Bytes::read_slice`/`write_slice` on guest memory);
//! no Rust reference to guest memory is ever made here. The bounce buffer
//! itself is this process's own memory, handed to the kernel only while
//! no slice of it is alive.

use std::alloc::{self, Layout};
use std::io;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::request::Segment;

/// Bytes one bounce buffer holds: a request larger than this is moved in
/// chunks of this size. A multiple of every O_DIRECT alignment.
pub const BOUNCE_CHUNK: usize = 1 << 20;
/// Alignment of bounce buffers, enough for any O_DIRECT memory alignment.
pub const BOUNCE_ALIGN: usize = 4096;

/// A zeroed heap buffer aligned for O_DIRECT.
pub struct AlignedBuffer {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is plain owned heap memory; moving its ownership to
// another thread is no different from moving a Vec<u8>.
unsafe impl Send for AlignedBuffer {}

impl AlignedBuffer {
    /// A buffer of `len` bytes (at least one) aligned to [`BOUNCE_ALIGN`].
    pub fn new(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), BOUNCE_ALIGN)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(AlignedBuffer { ptr, layout })
    }

    /// A buffer of [`BOUNCE_CHUNK`] bytes.
    pub fn chunk() -> io::Result<Self> {
        Self::new(BOUNCE_CHUNK)
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points at `layout.size()` initialised (zeroed at
        // first) bytes we own; the kernel writes them only while no
        // reference exists (see the module comment).
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }

    /// The first `len` bytes as an iovec, for the kernel.
    pub fn iovec(&mut self, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: len.min(self.layout.size()),
        }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this very layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Copies request bytes `[skip, skip + into.len())` out of the guest's
/// `segments` (laid end to end) into `into`.
pub fn gather(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    skip: usize,
    into: &mut [u8],
) -> io::Result<()> {
    let mut done = 0;
    for_each_piece(segments, skip, into.len(), |addr, len| {
        mem.read_slice(&mut into[done..done + len], addr)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        done += len;
        Ok(())
    })
}

/// Copies `from` into request bytes `[skip, skip + from.len())` of the
/// guest's `segments` (laid end to end).
pub fn scatter(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    skip: usize,
    from: &[u8],
) -> io::Result<()> {
    let mut done = 0;
    for_each_piece(segments, skip, from.len(), |addr, len| {
        mem.write_slice(&from[done..done + len], addr)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        done += len;
        Ok(())
    })
}

/// Calls `piece` with the guest address and length of every part of
/// request bytes `[skip, skip + len)`, in order.
fn for_each_piece<F>(
    segments: &[Segment],
    mut skip: usize,
    mut len: usize,
    mut piece: F,
) -> io::Result<()>
where
    F: FnMut(GuestAddress, usize) -> io::Result<()>,
{
    for segment in segments {
        if len == 0 {
            break;
        }
        let seg_len = segment.len as usize;
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(len);
        piece(GuestAddress(segment.addr.0 + skip as u64), n)?;
        skip = 0;
        len -= n;
    }
    if len == 0 {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a bounce copy runs past the request's buffers",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn gather_and_scatter_walk_segments_from_any_offset() {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("guest memory");
        let segments = [
            segment(0x1003, 100),
            segment(0x5001, 50),
            segment(0x9000, 10),
        ];
        let bytes: Vec<u8> = (0..160u8).collect();
        scatter(&mem, &segments, 0, &bytes).expect("scatter");
        let mut back = vec![0u8; 160];
        gather(&mem, &segments, 0, &mut back).expect("gather");
        assert_eq!(back, bytes);
        // A window straddling the first two segments.
        let mut window = vec![0u8; 30];
        gather(&mem, &segments, 90, &mut window).expect("gather window");
        assert_eq!(window, bytes[90..120]);
        let first: u8 = mem.read_obj(GuestAddress(0x5001)).expect("read");
        assert_eq!(first, 100, "the second segment starts with byte 100");
        // Past the end of the buffers.
        assert!(gather(&mem, &segments, 150, &mut [0u8; 11]).is_err());
    }

    #[test]
    fn buffers_are_aligned_and_bounded() {
        let mut buffer = AlignedBuffer::chunk().expect("allocate");
        assert_eq!(buffer.as_slice().as_ptr() as usize % BOUNCE_ALIGN, 0);
        assert_eq!(buffer.len(), BOUNCE_CHUNK);
        assert_eq!(buffer.iovec(usize::MAX).iov_len, BOUNCE_CHUNK);
        assert!(buffer.as_mut_slice().iter().all(|&b| b == 0));
    }
}
