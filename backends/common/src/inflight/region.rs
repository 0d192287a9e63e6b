//! The inflight region: per queue, which descriptor chains the backend
//! has taken from the available ring and not yet returned, in the layout
//! of the vhost-user specification for split virtqueues.
//!
//! Each queue's log is a 16-byte header (features u64, version u16,
//! desc_num u16, last_batch_head u16, used_idx u16) followed by one 16-byte
//! state per descriptor (inflight u8, 5 bytes of padding, next u16,
//! counter u64). Queues follow each other at the stride libvhost-user uses,
//! so a region pvstack-blk wrote can be picked up by qemu-storage-daemon
//! and the other way round.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

use crate::fds::{check_mappable, check_sealed};

const QUEUE_HEADER: usize = 16;
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
const DESC_STATE: usize = 16;
const COUNTER_AT: usize = 8;
/// The only layout version there is.
const VERSION: u16 = 1;
const QUEUE_ALIGNMENT: usize = 64;

/// Bytes one queue of `queue_size` descriptors takes in the region. The
/// formula is libvhost-user's (it counts a 2-byte header, but rounding up
/// to 64 bytes always leaves room for the real 16-byte one).
pub fn queue_stride(queue_size: u16) -> usize {
    let bytes = DESC_STATE * usize::from(queue_size) + 2;
    bytes.div_ceil(QUEUE_ALIGNMENT) * QUEUE_ALIGNMENT
}

/// Bytes a region for `num_queues` queues of `queue_size` takes.
pub fn region_size(num_queues: u16, queue_size: u16) -> usize {
    usize::from(num_queues) * queue_stride(queue_size)
}

/// A new, zeroed region (every queue's `desc_num` filled in) in a memfd,
/// to hand to the frontend in answer to GET_INFLIGHT_FD. The memfd is
/// sealed at its size (F_SEAL_SHRINK, F_SEAL_GROW, and F_SEAL_SEAL so no
/// other seal can be added): a frontend cannot cut it short under the
/// mapping of this or the next backend.
pub fn create_region(num_queues: u16, queue_size: u16) -> io::Result<File> {
    let memfd = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create("pvstack-inflight")
        .map_err(memfd_io_error)?;
    let size = region_size(num_queues, queue_size);
    memfd.as_file().set_len(size as u64)?;
    memfd
        .add_seals(&[
            memfd::FileSeal::SealShrink,
            memfd::FileSeal::SealGrow,
            memfd::FileSeal::SealSeal,
        ])
        .map_err(memfd_io_error)?;
    let file = memfd.into_file();
    let region = InflightRegion::map(file.try_clone()?, 0, size as u64, num_queues, queue_size)?;
    for queue in 0..num_queues {
        region
            .header(usize::from(queue))
            .store(queue_size, DESC_NUM_AT, Ordering::Relaxed)
            .map_err(io::Error::other)?;
    }
    Ok(file)
}

/// The system error behind a memfd failure.
fn memfd_io_error(error: memfd::Error) -> io::Error {
    match error {
        memfd::Error::Create(e) | memfd::Error::AddSeals(e) | memfd::Error::GetSeals(e) => e,
    }
}

/// A mapped inflight region, shared with the frontend (which keeps it
/// across backend restarts) and with whichever backend came before.
pub struct InflightRegion {
    mapping: MmapRegion<()>,
    queue_size: u16,
    queues: Vec<QueueState>,
}

/// What this process keeps about one queue's log.
struct QueueState {
    /// Set when the region arrives: the queue's worker must recover the
    /// log before it takes anything new from the ring.
    recovery_due: AtomicBool,
    /// Order stamp for the next chain taken from the ring.
    next_counter: AtomicU64,
}

impl InflightRegion {
    /// Maps `size` bytes of `file` from `offset` as the region for
    /// `num_queues` queues of `queue_size` descriptors (SET_INFLIGHT_FD).
    /// The file must be a memfd sealed against shrinking that holds what
    /// is mapped (as regions from [`create_region`] and libvhost-user
    /// are): a mapping past the end of a file faults on first touch.
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Self> {
        let needed = region_size(num_queues, queue_size);
        if num_queues == 0 || queue_size == 0 || size < needed as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "an inflight region of {size} bytes cannot log {num_queues} queues of {queue_size} descriptors ({needed} bytes)"
                ),
            ));
        }
        check_sealed(&file, "the inflight region")?;
        check_mappable(file.as_fd(), offset, needed as u64, "the inflight region")?;
        let mapping = MmapRegion::from_file(FileOffset::new(file, offset), needed)
            .map_err(io::Error::other)?;
        Ok(InflightRegion {
            mapping,
            queue_size,
            queues: (0..num_queues)
                .map(|_| QueueState {
                    recovery_due: AtomicBool::new(true),
                    next_counter: AtomicU64::new(1),
                })
                .collect(),
        })
    }

    /// The log of queue `index`, if the region has one.
    pub fn queue(&self, index: usize) -> Option<QueueLog<'_>> {
        let state = self.queues.get(index)?;
        Some(QueueLog {
            header: self.header(index),
            state,
            capacity: self.queue_size,
        })
    }

    fn header(&self, index: usize) -> VolatileSlice<'_> {
        let stride = queue_stride(self.queue_size);
        // In range: `map` checked the size for every queue.
        self.mapping
            .get_slice(index * stride, stride)
            .expect("queue log inside the mapping")
    }
}

/// One queue's log. The worker that serves the queue is its only writer.
pub struct QueueLog<'a> {
    header: VolatileSlice<'a>,
    state: &'a QueueState,
    /// Descriptor states the log has room for.
    capacity: u16,
}

impl QueueLog<'_> {
    /// Returns true once after the region arrived: time to [`Self::recover`].
    pub fn recovery_due(&self) -> bool {
        self.state.recovery_due.swap(false, Ordering::AcqRel)
    }

    /// Records that the chain at `head` was taken from the available ring.
    pub fn taken(&self, head: u16) {
        let counter = self.state.next_counter.fetch_add(1, Ordering::Relaxed);
        self.store_desc(head, COUNTER_AT, counter);
        self.store_desc(head, 0, 1u8);
    }

    /// Records that `head` is about to go to the used ring (so a restart
    /// that finds the used index moved knows which chain moved it).
    pub fn returning(&self, head: u16) {
        self.store(LAST_BATCH_HEAD_AT, head);
    }

    /// Records that `head` is in the used ring, whose index is now `used_idx`.
    pub fn returned(&self, head: u16, used_idx: u16) {
        // The used ring is written before this: after a crash the log
        // must never say "done" for a chain the driver cannot see.
        fence(Ordering::SeqCst);
        self.store_desc(head, 0, 0u8);
        self.store(USED_IDX_AT, used_idx);
    }

    /// Reads what a previous backend left, given the used ring's index as
    /// the driver sees it: the chains it took and did not return, oldest
    /// first, to be served again before anything new. A fresh log is
    /// initialised instead. Errors describe a log that makes no sense (it
    /// is then left alone and nothing is resubmitted).
    pub fn recover(&self, used_idx: u16) -> Result<Vec<u16>, String> {
        let version: u16 = self.load(VERSION_AT);
        if version == 0 {
            self.store(USED_IDX_AT, used_idx);
            self.store(VERSION_AT, VERSION);
            return Ok(Vec::new());
        }
        if version != VERSION {
            return Err(format!("unknown inflight log version {version}"));
        }
        let desc_num: u16 = self.load(DESC_NUM_AT);
        if desc_num == 0 || desc_num > self.capacity {
            return Err(format!(
                "the log claims {desc_num} descriptors, it has room for {}",
                self.capacity
            ));
        }
        if self.load::<u16>(USED_IDX_AT) != used_idx {
            // The previous backend moved the used index for its last chain
            // and died before it marked the chain done.
            let last: u16 = self.load(LAST_BATCH_HEAD_AT);
            if last >= desc_num {
                return Err(format!("last returned chain {last} is not a descriptor"));
            }
            self.store_desc(last, 0, 0u8);
            self.store(USED_IDX_AT, used_idx);
        }
        let mut taken: Vec<(u64, u16)> = (0..desc_num)
            .filter(|&head| self.load_desc::<u8>(head, 0) == 1)
            .map(|head| (self.load_desc::<u64>(head, COUNTER_AT), head))
            .collect();
        taken.sort_unstable();
        let newest = taken.last().map_or(0, |&(counter, _)| counter);
        self.state
            .next_counter
            .store(newest.wrapping_add(1).max(1), Ordering::Relaxed);
        Ok(taken.into_iter().map(|(_, head)| head).collect())
    }

    fn store<T: vm_memory::AtomicAccess>(&self, at: usize, value: T) {
        // Offsets are constants inside the header.
        let _ = self.header.store(value, at, Ordering::Release);
    }

    fn load<T: vm_memory::AtomicAccess>(&self, at: usize) -> T {
        self.header
            .load(at, Ordering::Acquire)
            .expect("header field inside the log")
    }

    /// Descriptor states outside the log are ignored (a head is always
    /// below the ring size, which is at most the log's capacity).
    fn store_desc<T: vm_memory::AtomicAccess>(&self, head: u16, at: usize, value: T) {
        if head < self.capacity {
            self.store(desc_offset(head) + at, value);
        }
    }

    fn load_desc<T: vm_memory::AtomicAccess>(&self, head: u16, at: usize) -> T {
        self.load(desc_offset(head) + at)
    }
}

fn desc_offset(head: u16) -> usize {
    QUEUE_HEADER + DESC_STATE * usize::from(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(num_queues: u16, queue_size: u16) -> (File, InflightRegion) {
        let file = create_region(num_queues, queue_size).unwrap();
        let size = file.metadata().unwrap().len();
        let region =
            InflightRegion::map(file.try_clone().unwrap(), 0, size, num_queues, queue_size)
                .unwrap();
        (file, region)
    }

    /// What a restarted backend finds: the same file, mapped again.
    fn remap(file: &File, num_queues: u16, queue_size: u16) -> InflightRegion {
        let size = file.metadata().unwrap().len();
        InflightRegion::map(file.try_clone().unwrap(), 0, size, num_queues, queue_size).unwrap()
    }

    #[test]
    fn stride_matches_libvhost_user() {
        assert_eq!(queue_stride(128), 2112);
        assert_eq!(queue_stride(256), 4160);
        assert_eq!(queue_stride(1), 64);
        // Always room for the 16-byte header.
        for size in 1..=1024u16 {
            assert!(queue_stride(size) >= QUEUE_HEADER + DESC_STATE * usize::from(size));
        }
    }

    #[test]
    fn fresh_log_is_initialised_and_recovers_nothing() {
        let (_file, region) = region(2, 8);
        let log = region.queue(1).unwrap();
        assert!(log.recovery_due());
        assert!(!log.recovery_due());
        assert_eq!(log.recover(500), Ok(vec![]));
        assert!(region.queue(2).is_none());
    }

    #[test]
    fn out_of_order_completions_leave_the_rest_for_resubmission_in_order() {
        let (file, region) = region(1, 8);
        let log = region.queue(0).unwrap();
        log.recover(10).unwrap();
        for head in [6, 1, 4] {
            log.taken(head);
        }
        log.returning(1);
        log.returned(1, 11);
        drop(region);
        let again = remap(&file, 1, 8);
        assert_eq!(again.queue(0).unwrap().recover(11), Ok(vec![6, 4]));
    }

    #[test]
    fn a_chain_in_the_used_ring_but_not_marked_done_is_not_resubmitted() {
        let (file, region) = region(1, 8);
        let log = region.queue(0).unwrap();
        log.recover(0).unwrap();
        log.taken(3);
        log.taken(5);
        log.returning(3);
        // Died after the used ring moved to 1, before `returned`.
        drop(region);
        let again = remap(&file, 1, 8);
        assert_eq!(again.queue(0).unwrap().recover(1), Ok(vec![5]));
        // Died before the used ring moved: 3 is still owed.
        let (file, region) = self::region(1, 8);
        let log = region.queue(0).unwrap();
        log.recover(0).unwrap();
        log.taken(3);
        log.returning(3);
        drop(region);
        assert_eq!(remap(&file, 1, 8).queue(0).unwrap().recover(0), Ok(vec![3]));
    }

    #[test]
    fn counters_continue_after_recovery() {
        let (file, region) = region(1, 8);
        let log = region.queue(0).unwrap();
        log.recover(0).unwrap();
        log.taken(2);
        drop(region);
        let again = remap(&file, 1, 8);
        let log = again.queue(0).unwrap();
        assert_eq!(log.recover(0), Ok(vec![2]));
        log.taken(7);
        // 7 was taken after 2, so it must sort after it on the next restart.
        drop(again);
        assert_eq!(
            remap(&file, 1, 8).queue(0).unwrap().recover(0),
            Ok(vec![2, 7])
        );
    }

    #[test]
    fn nonsense_logs_are_refused() {
        let (_file, region) = region(1, 8);
        let log = region.queue(0).unwrap();
        log.store(VERSION_AT, 7u16);
        assert!(log.recover(0).unwrap_err().contains("version 7"));
        log.store(VERSION_AT, VERSION);
        log.store(DESC_NUM_AT, 9u16);
        assert!(log.recover(0).unwrap_err().contains("9 descriptors"));
        log.store(DESC_NUM_AT, 8u16);
        log.store(LAST_BATCH_HEAD_AT, 8u16);
        log.store(USED_IDX_AT, 3u16);
        assert!(log.recover(4).unwrap_err().contains("chain 8"));
    }

    #[test]
    fn regions_too_small_for_the_queues_are_refused() {
        let file = create_region(1, 8).unwrap();
        let err = InflightRegion::map(file, 0, 64, 2, 8).err().unwrap();
        assert!(err.to_string().contains("cannot log 2 queues"), "{err}");
    }

    /// What SET_INFLIGHT_FD claims is checked against the file itself:
    /// mapping past its end would fault (SIGBUS) on the first access.
    #[test]
    fn a_file_shorter_than_claimed_or_unsealed_is_refused() {
        let file = create_region(1, 8).unwrap();
        let claimed = 2 * queue_stride(8) as u64;
        let err = InflightRegion::map(file, 0, claimed, 2, 8).err().unwrap();
        assert!(err.to_string().contains("need a file of"), "{err}");
        let file = create_region(2, 8).unwrap();
        let err = InflightRegion::map(file, claimed, claimed, 2, 8)
            .err()
            .unwrap();
        assert!(err.to_string().contains("need a file of"), "{err}");
        let unsealed = memfd::MemfdOptions::default()
            .create("unsealed")
            .unwrap()
            .into_file();
        unsealed.set_len(claimed).unwrap();
        let err = InflightRegion::map(unsealed, 0, claimed, 2, 8)
            .err()
            .unwrap();
        assert!(err.to_string().contains("F_SEAL_SHRINK"), "{err}");
    }

    #[test]
    fn the_region_handed_out_cannot_be_resized() {
        let file = create_region(1, 8).unwrap();
        let size = file.metadata().unwrap().len();
        assert!(file.set_len(0).is_err(), "shrunk");
        assert!(file.set_len(size * 2).is_err(), "grown");
        assert_eq!(file.metadata().unwrap().len(), size);
    }
}
