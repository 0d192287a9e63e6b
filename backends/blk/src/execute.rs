//! Carrying out a checked request against the image and guest memory.

use std::io;

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use crate::config::{ID_BYTES, SECTOR_SIZE};
use crate::image::DiskImage;
use crate::request::{Operation, SectorRange, Segment};

/// Executes `operation`; returns how many bytes it wrote into guest memory
/// (the used length, not counting the status byte).
pub fn execute(
    operation: &Operation,
    image: &DiskImage,
    mem: &GuestMemoryMmap,
    serial: &[u8; ID_BYTES],
) -> io::Result<u32> {
    match operation {
        Operation::Read { sector, buffers } => {
            let mut iovecs = host_iovecs(mem, buffers)?;
            // SAFETY: the iovecs point into mapped guest memory that stays
            // mapped while `mem` (a snapshot holding the mappings) lives; the
            // driver gave these device-writable buffers to the device.
            unsafe { image.read_vectored_at(sector * SECTOR_SIZE, &mut iovecs)? };
            Ok(buffers.iter().map(|b| b.len).sum())
        }
        Operation::Write { sector, buffers } => {
            let mut iovecs = host_iovecs(mem, buffers)?;
            // SAFETY: as for Read; the buffers are only read.
            unsafe { image.write_vectored_at(sector * SECTOR_SIZE, &mut iovecs)? };
            Ok(0)
        }
        Operation::Flush => image.flush().map(|()| 0),
        Operation::GetId { buffers } => write_id(mem, buffers, serial),
        Operation::Discard(ranges) => {
            for_each_range(ranges, |offset, len, _| image.discard(offset, len))
        }
        Operation::WriteZeroes(ranges) => for_each_range(ranges, |offset, len, unmap| {
            image.write_zeroes(offset, len, unmap)
        }),
    }
}

/// Host iovecs for checked guest segments (a segment crossing a memory region
/// boundary becomes several iovecs).
fn host_iovecs(mem: &GuestMemoryMmap, segments: &[Segment]) -> io::Result<Vec<libc::iovec>> {
    let mut iovecs = Vec::with_capacity(segments.len());
    for segment in segments {
        for slice in mem.get_slices(segment.addr, segment.len as usize) {
            let slice = slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(iovecs)
}

fn write_id(
    mem: &GuestMemoryMmap,
    buffers: &[Segment],
    serial: &[u8; ID_BYTES],
) -> io::Result<u32> {
    let mut rest: &[u8] = serial;
    let mut written = 0;
    for segment in buffers {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(segment.len as usize);
        mem.write_slice(&rest[..n], segment.addr)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        rest = &rest[n..];
        written += n as u32;
    }
    Ok(written)
}

fn for_each_range<F>(ranges: &[SectorRange], mut action: F) -> io::Result<u32>
where
    F: FnMut(u64, u64, bool) -> io::Result<()>,
{
    for range in ranges {
        action(
            range.sector * SECTOR_SIZE,
            u64::from(range.count) * SECTOR_SIZE,
            range.unmap,
        )?;
    }
    Ok(0)
}
