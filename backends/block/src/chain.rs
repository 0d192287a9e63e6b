//! Answering one descriptor chain: parse and check it, run it, write the
//! status byte. Shared by every place that serves a virtio-blk queue.

use pvstack_logging::warn_limited;
use std::io;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::{DiskLimits, ID_BYTES};
use crate::execute::execute;
use crate::image::DiskImage;
use crate::request::{self, Malformed, Operation, Parsed, Rejection};

/// The disk a queue serves, as the request engine needs it.
#[derive(Clone, Copy)]
pub struct Disk<'a> {
    pub image: &'a DiskImage,
    pub limits: &'a DiskLimits,
    pub serial: &'a [u8; ID_BYTES],
}

/// How a chain was answered, for the caller's logs and counters.
#[derive(Debug)]
pub enum Outcome {
    /// Carried out; status OK.
    Done,
    /// Refused with the rejection's status.
    Rejected(Rejection),
    /// The image operation failed; status IOERR.
    Failed {
        operation: Operation,
        error: io::Error,
    },
    /// No status byte to write; returned with nothing written.
    Unanswerable(Malformed),
}

/// One answered chain.
#[derive(Debug)]
pub struct Answer {
    /// The used length to put in the used ring.
    pub used_len: u32,
    pub outcome: Outcome,
}

/// A chain looked at: a checked request still to carry out, or a chain
/// already answered (refused, or without a status byte to write).
#[derive(Debug)]
pub enum Looked {
    Run {
        operation: Operation,
        /// Where its status byte goes.
        status: GuestAddress,
    },
    Answered(Answer),
}

/// Parses and checks one chain of a queue of `queue_size` entries,
/// answering it at once if it is refused. An engine carries out what is
/// left to run, synchronously or not, and then calls [`finish`].
pub fn look<I>(chain: I, mem: &GuestMemoryMmap, limits: &DiskLimits, queue_size: u16) -> Looked
where
    I: IntoIterator<Item = Descriptor>,
{
    match request::parse(chain, mem, limits, queue_size) {
        Parsed::Unanswerable(why) => Looked::Answered(Answer {
            used_len: 0,
            outcome: Outcome::Unanswerable(why),
        }),
        Parsed::Rejected { rejection, status } => Looked::Answered(Answer {
            used_len: write_status(mem, status, rejection.status()),
            outcome: Outcome::Rejected(rejection),
        }),
        Parsed::Request { operation, status } => Looked::Run { operation, status },
    }
}

/// Answers a request that was carried out with `result` (the bytes it
/// wrote into guest memory, or why it failed): writes its status byte.
pub fn finish(
    mem: &GuestMemoryMmap,
    status: GuestAddress,
    operation: Operation,
    result: io::Result<u32>,
) -> Answer {
    match result {
        Ok(written) => Answer {
            used_len: written + write_status(mem, status, VIRTIO_BLK_S_OK as u8),
            outcome: Outcome::Done,
        },
        Err(error) => Answer {
            used_len: write_status(mem, status, VIRTIO_BLK_S_IOERR as u8),
            outcome: Outcome::Failed { operation, error },
        },
    }
}

/// Parses, checks and runs one chain of a queue of `queue_size` entries
/// and writes its status byte, all before returning.
pub fn answer<I>(chain: I, mem: &GuestMemoryMmap, disk: Disk<'_>, queue_size: u16) -> Answer
where
    I: IntoIterator<Item = Descriptor>,
{
    match look(chain, mem, disk.limits, queue_size) {
        Looked::Answered(answer) => answer,
        Looked::Run { operation, status } => {
            let result = execute(&operation, disk.image, mem, disk.serial);
            finish(mem, status, operation, result)
        }
    }
}

/// Writes the status byte (already checked to be inside guest memory);
/// returns its contribution to the used length.
fn write_status(mem: &GuestMemoryMmap, status: GuestAddress, value: u8) -> u32 {
    match mem.write_obj(value, status) {
        Ok(()) => 1,
        Err(e) => {
            warn_limited!("cannot write the status byte at {:#x}: {e}", status.0);
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::seg_max;
    use crate::test_chains::*;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    /// The driver's queue: far smaller than the request, as when QEMU sets
    /// 128 entries and the device allows more.
    const QUEUE_SIZE: u16 = 16;
    const TABLE: u64 = 0x10_0000;
    const HEADER: u64 = 0x20_0000;
    const STATUS: u64 = 0x20_0100;
    /// Data segments of SEGMENT bytes every 8 KiB from here.
    const DATA: u64 = 0x40_0000;
    const SEGMENT: usize = 4096;
    const SECTOR: u64 = 8;

    struct Bench {
        mem: GuestMemoryMmap,
        image: DiskImage,
        path: std::path::PathBuf,
        limits: DiskLimits,
    }

    impl Bench {
        /// Guest memory and a 1 MiB image named after the test.
        fn new(test: &str) -> Bench {
            let path = std::env::temp_dir()
                .join(format!("pvstack-block-{test}-{}.img", std::process::id()));
            let pattern: Vec<u8> = (0..1usize << 20)
                .map(|i| (i * 31 + i / 4096) as u8)
                .collect();
            std::fs::write(&path, pattern).expect("write scratch image");
            let image = DiskImage::open(&path, false, false).expect("open image");
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)])
                .expect("guest memory");
            let limits = DiskLimits {
                capacity_sectors: image.capacity_sectors(),
                readonly: false,
                max_segments: seg_max(256),
            };
            Bench {
                mem,
                image,
                path,
                limits,
            }
        }

        fn segment(index: usize) -> u64 {
            DATA + 0x2000 * index as u64
        }

        /// Answers a request of `request_type` with `segments` data
        /// segments, all in one indirect table, on a queue of QUEUE_SIZE.
        fn answer(&self, request_type: u32, segments: usize) -> Answer {
            write_header(&self.mem, HEADER, request_type, SECTOR);
            self.mem
                .write_obj(0xffu8, GuestAddress(STATUS))
                .expect("status");
            let data = |addr, len| {
                if request_type == VIRTIO_BLK_T_IN {
                    writable(addr, len)
                } else {
                    readable(addr, len)
                }
            };
            let mut entries: Vec<RawDescriptor> = vec![readable(HEADER, 16)];
            entries.extend((0..segments).map(|i| data(Self::segment(i), SEGMENT as u32)));
            entries.push(writable(STATUS, 1));
            let head = indirect_table(&self.mem, TABLE, &entries);
            let queue = MockSplitQueue::new(&self.mem, QUEUE_SIZE);
            let chain = queue.build_desc_chain(&[head]).expect("build chain");
            let serial = [0u8; ID_BYTES];
            let disk = Disk {
                image: &self.image,
                limits: &self.limits,
                serial: &serial,
            };
            answer(chain, &self.mem, disk, QUEUE_SIZE)
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).expect("status")
        }

        /// The guest's data segments, end to end.
        fn guest_data(&self, segments: usize) -> Vec<u8> {
            let mut data = vec![0u8; segments * SEGMENT];
            for (i, chunk) in data.chunks_mut(SEGMENT).enumerate() {
                self.mem
                    .read_slice(chunk, GuestAddress(Self::segment(i)))
                    .expect("guest read");
            }
            data
        }

        fn disk_data(&self, segments: usize) -> Vec<u8> {
            let start = SECTOR as usize * 512;
            std::fs::read(&self.path).expect("read image")[start..start + segments * SEGMENT]
                .to_vec()
        }
    }

    impl Drop for Bench {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    #[test]
    fn seg_max_segments_in_one_indirect_table_are_served_byte_exactly() {
        let bench = Bench::new("indirect-served");
        let segments = bench.limits.max_segments as usize;
        assert!(segments + 2 > usize::from(QUEUE_SIZE));

        let read = bench.answer(VIRTIO_BLK_T_IN, segments);
        assert!(matches!(read.outcome, Outcome::Done), "{:?}", read.outcome);
        assert_eq!(read.used_len as usize, segments * SEGMENT + 1);
        assert_eq!(bench.status(), VIRTIO_BLK_S_OK as u8);
        assert!(bench.guest_data(segments) == bench.disk_data(segments));

        for i in 0..segments {
            let fill = vec![i as u8 ^ 0x5a; SEGMENT];
            bench
                .mem
                .write_slice(&fill, GuestAddress(Bench::segment(i)))
                .expect("guest write");
        }
        let write = bench.answer(VIRTIO_BLK_T_OUT, segments);
        assert!(
            matches!(write.outcome, Outcome::Done),
            "{:?}",
            write.outcome
        );
        assert_eq!(write.used_len, 1);
        assert_eq!(bench.status(), VIRTIO_BLK_S_OK as u8);
        assert!(bench.disk_data(segments) == bench.guest_data(segments));
    }

    #[test]
    fn one_segment_more_than_seg_max_is_an_io_error_and_touches_nothing() {
        let bench = Bench::new("indirect-too-long");
        let segments = bench.limits.max_segments as usize + 1;
        let before = std::fs::read(&bench.path).expect("read image");
        let write = bench.answer(VIRTIO_BLK_T_OUT, segments);
        assert!(
            matches!(
                write.outcome,
                Outcome::Rejected(request::Rejection::TooManyDescriptors { .. })
            ),
            "{:?}",
            write.outcome
        );
        assert_eq!(write.used_len, 1);
        assert_eq!(bench.status(), VIRTIO_BLK_S_IOERR as u8);
        assert!(std::fs::read(&bench.path).expect("read image") == before);
    }
}
