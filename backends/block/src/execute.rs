//! Carrying out a checked request against the image and guest memory.

use std::io;

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use crate::bounce::{gather, scatter, AlignedBuffer, BOUNCE_CHUNK};
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
            let offset = sector * SECTOR_SIZE;
            if let Some(mapping) = image.mapping() {
                mapping.read(offset, mem, buffers)?;
                return Ok(buffers.iter().map(|b| b.len).sum());
            }
            let mut iovecs = host_iovecs(mem, buffers)?;
            if image.takes_directly(&iovecs) {
                // SAFETY: the iovecs point into mapped guest memory that
                // stays mapped while `mem` (a snapshot holding the
                // mappings) lives; the driver gave these device-writable
                // buffers to the device. The kernel writes them; this
                // process makes no reference to them.
                unsafe { image.read_vectored_at(offset, &mut iovecs)? };
            } else {
                bounced(image, mem, buffers, offset, Bounce::Read)?;
            }
            Ok(buffers.iter().map(|b| b.len).sum())
        }
        Operation::Write { sector, buffers } => {
            let offset = sector * SECTOR_SIZE;
            if let Some(mapping) = image.mapping() {
                mapping.write(offset, mem, buffers)?;
                return Ok(0);
            }
            let mut iovecs = host_iovecs(mem, buffers)?;
            if image.takes_directly(&iovecs) {
                // SAFETY: as for Read; the kernel only reads the buffers.
                unsafe { image.write_vectored_at(offset, &mut iovecs)? };
            } else {
                bounced(image, mem, buffers, offset, Bounce::Write)?;
            }
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

#[derive(Clone, Copy)]
enum Bounce {
    Read,
    Write,
}

/// Moves a request's bytes between the image at `offset` and the guest's
/// `buffers` through one bounce buffer of at most [`BOUNCE_CHUNK`] bytes,
/// chunk by chunk (O_DIRECT with buffers the kernel cannot take).
fn bounced(
    image: &DiskImage,
    mem: &GuestMemoryMmap,
    buffers: &[Segment],
    offset: u64,
    direction: Bounce,
) -> io::Result<()> {
    let total: usize = buffers.iter().map(|b| b.len as usize).sum();
    let mut bounce = AlignedBuffer::new(total.min(BOUNCE_CHUNK))?;
    let mut done = 0;
    while done < total {
        let n = (total - done).min(BOUNCE_CHUNK);
        let at = offset + done as u64;
        match direction {
            Bounce::Read => {
                // SAFETY: the iovec covers the first `n` bytes of our own
                // buffer, which no reference aliases during the call.
                unsafe { image.read_vectored_at(at, &mut [bounce.iovec(n)])? };
                scatter(mem, buffers, done, &bounce.as_slice()[..n])?;
            }
            Bounce::Write => {
                gather(mem, buffers, done, &mut bounce.as_mut_slice()[..n])?;
                // SAFETY: as for the read.
                unsafe { image.write_vectored_at(at, &mut [bounce.iovec(n)])? };
            }
        }
        done += n;
    }
    Ok(())
}

/// Host iovecs for checked guest segments (a segment crossing a memory region
/// boundary becomes several iovecs). They point into `mem`'s mappings: valid
/// while those are.
pub fn host_iovecs(mem: &GuestMemoryMmap, segments: &[Segment]) -> io::Result<Vec<libc::iovec>> {
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

/// Copies the device serial into the GET_ID buffers; returns the bytes written.
pub fn write_id(
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
    // A range of no sectors names nothing to do; fallocate would refuse
    // its zero length (EINVAL) and fail the whole request.
    for range in ranges.iter().filter(|range| range.count > 0) {
        action(
            range.sector * SECTOR_SIZE,
            u64::from(range.count) * SECTOR_SIZE,
            range.unmap,
        )?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use vm_memory::GuestAddress;

    fn scratch_image(name: &str, len: usize) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("pvstack-blk-{name}-{}.img", std::process::id()));
        let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + i / 512) as u8).collect();
        std::fs::write(&path, pattern).expect("write scratch image");
        path
    }

    fn segment(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn round_trip(direct: bool) {
        let path = scratch_image(if direct { "direct" } else { "buffered" }, 64 * 1024);
        let image = match DiskImage::open(&path, false, direct) {
            Ok(image) => image,
            Err(crate::Error::DirectUnsupported { .. }) => {
                panic!("the temp dir's filesystem lacks O_DIRECT; cannot test --direct")
            }
            Err(e) => panic!("open: {e}"),
        };
        // Two guest regions so one buffer crosses a region boundary.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .expect("guest memory");
        let serial = [0u8; ID_BYTES];
        let read = Operation::Read {
            sector: 4,
            buffers: vec![segment(0xfe00, 1024), segment(0x2000, 512)],
        };
        assert_eq!(execute(&read, &image, &mem, &serial).expect("read"), 1536);
        let file = std::fs::read(&path).expect("read back image");
        let mut guest = vec![0u8; 1536];
        mem.read_slice(&mut guest[..1024], GuestAddress(0xfe00))
            .expect("guest read");
        mem.read_slice(&mut guest[1024..], GuestAddress(0x2000))
            .expect("guest read");
        assert_eq!(guest, file[2048..2048 + 1536]);

        mem.write_slice(&[0xa5; 512], GuestAddress(0x4000))
            .expect("guest write");
        let write = Operation::Write {
            sector: 100,
            buffers: vec![segment(0x4000, 512)],
        };
        assert_eq!(execute(&write, &image, &mem, &serial).expect("write"), 0);
        let zero = Operation::WriteZeroes(vec![crate::request::SectorRange {
            sector: 10,
            count: 2,
            unmap: true,
        }]);
        execute(&zero, &image, &mem, &serial).expect("write zeroes");
        execute(&Operation::Flush, &image, &mem, &serial).expect("flush");
        let after = std::fs::read(&path).expect("read back image");
        assert_eq!(&after[100 * 512..101 * 512], &[0xa5; 512][..]);
        assert!(after[10 * 512..12 * 512].iter().all(|&b| b == 0));
        assert_eq!(
            &after[..10 * 512],
            &file[..10 * 512],
            "bytes before the zeroed range untouched"
        );
        assert_eq!(&after[12 * 512..100 * 512], &file[12 * 512..100 * 512]);
        std::fs::remove_file(&path).expect("remove scratch image");
    }

    /// Found by the blk_request fuzz target: a DISCARD (or WRITE_ZEROES)
    /// range of 0 sectors made fallocate fail with EINVAL, so a valid
    /// request failed as an I/O error. It is done, and the ranges beside
    /// it are carried out.
    #[test]
    fn ranges_of_no_sectors_are_done_and_the_others_carried_out() {
        let path = scratch_image("empty-range", 64 * 1024);
        let image = DiskImage::open(&path, false, false).expect("open");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory");
        let serial = [0u8; ID_BYTES];
        let range = |sector, count| SectorRange {
            sector,
            count,
            unmap: true,
        };
        let discard = Operation::Discard(vec![range(8, 0), range(0, 8)]);
        execute(&discard, &image, &mem, &serial).expect("discard");
        let zeroes = Operation::WriteZeroes(vec![range(20, 0), range(16, 2)]);
        execute(&zeroes, &image, &mem, &serial).expect("write zeroes");
        let after = std::fs::read(&path).expect("read back image");
        assert!(after[..8 * 512].iter().all(|&b| b == 0), "discarded");
        assert!(after[16 * 512..18 * 512].iter().all(|&b| b == 0), "zeroed");
        assert!(
            after[8 * 512..16 * 512].iter().any(|&b| b != 0),
            "untouched"
        );
        std::fs::remove_file(&path).expect("remove scratch image");
    }

    #[test]
    fn buffered_read_write_zeroes_round_trip() {
        round_trip(false);
    }

    #[test]
    fn direct_read_write_zeroes_round_trip() {
        round_trip(true);
    }

    /// O_DIRECT with misaligned guest buffers larger than a bounce
    /// chunk: moved chunk by chunk through one bounded bounce buffer.
    #[test]
    fn direct_transfers_of_misaligned_buffers_go_through_a_bounded_bounce() {
        let len = 2 * crate::bounce::BOUNCE_CHUNK + 4096;
        let path = scratch_image("bounce", len + 8192);
        let image = DiskImage::open(&path, false, true).expect("open with O_DIRECT");
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).expect("guest memory");
        let serial = [0u8; ID_BYTES];
        // Two buffers at odd addresses, the first not a sector multiple long.
        let buffers = vec![segment(0x1003, 700), segment(0x10_0001, len as u32 - 700)];
        let read = Operation::Read {
            sector: 8,
            buffers: buffers.clone(),
        };
        assert_eq!(
            execute(&read, &image, &mem, &serial).expect("read") as usize,
            len
        );
        let file = std::fs::read(&path).expect("read back image");
        let mut guest = vec![0u8; len];
        crate::bounce::gather(&mem, &buffers, 0, &mut guest).expect("gather");
        assert!(guest == file[4096..4096 + len], "read through the bounce");

        let fill: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        crate::bounce::scatter(&mem, &buffers, 0, &fill).expect("scatter");
        let write = Operation::Write { sector: 8, buffers };
        execute(&write, &image, &mem, &serial).expect("write");
        let after = std::fs::read(&path).expect("read back image");
        assert!(
            after[4096..4096 + len] == fill[..],
            "written through the bounce"
        );
        assert_eq!(after[..4096], file[..4096]);
        std::fs::remove_file(&path).expect("remove scratch image");
    }

    #[test]
    fn get_id_writes_the_serial_across_buffers() {
        let path = scratch_image("getid", 4096);
        let image = DiskImage::open(&path, true, false).expect("open");
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("guest memory");
        let mut serial = [0u8; ID_BYTES];
        serial[..11].copy_from_slice(b"disk-serial");
        let op = Operation::GetId {
            buffers: vec![segment(0x100, 4), segment(0x200, 64)],
        };
        assert_eq!(
            execute(&op, &image, &mem, &serial).expect("get id"),
            ID_BYTES as u32
        );
        let mut got = [0u8; ID_BYTES];
        mem.read_slice(&mut got[..4], GuestAddress(0x100))
            .expect("read");
        mem.read_slice(&mut got[4..], GuestAddress(0x200))
            .expect("read");
        assert_eq!(got, serial);
        std::fs::remove_file(&path).expect("remove scratch image");
    }
}
