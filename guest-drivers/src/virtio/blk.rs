//! The virtio-blk driver (virtio 1.x section 5.2): several queues, several
//! requests in flight on each, completions polled from the used rings.
//!
//! A request is a chain: a 16-byte header the device reads, the data
//! buffers, and one status byte the device writes. Headers and status
//! bytes live in per-queue tables indexed by the chain's head descriptor,
//! so a completion leads straight back to its status.

use super::mmio::MmioTransport;
use super::queue::{Buffer, QueueLayout, SplitQueue};
use super::{device_id, VirtioError};
use crate::bump::Bump;
use core::ptr;

/// Block device feature bits.
pub mod feature {
    /// `size_max` limits the size of one data segment.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` limits the data segments of one request.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The disk is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` holds the optimal block size.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// FLUSH is supported.
    pub const FLUSH: u64 = 1 << 9;
    /// `num_queues` holds the number of queues.
    pub const MQ: u64 = 1 << 12;
    /// DISCARD is supported.
    pub const DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES is supported.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request types.
pub mod request {
    /// Read sectors.
    pub const IN: u32 = 0;
    /// Write sectors.
    pub const OUT: u32 = 1;
    /// Make earlier writes durable.
    pub const FLUSH: u32 = 4;
    /// Read the 20-byte device id (serial).
    pub const GET_ID: u32 = 8;
    /// Discard ranges.
    pub const DISCARD: u32 = 11;
    /// Zero ranges.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status values (the byte the device writes last).
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error (also the answer to a malformed request).
    pub const IOERR: u8 = 1;
    /// Unsupported request type.
    pub const UNSUPP: u8 = 2;
    /// What the driver puts in the status byte before submitting: seeing it
    /// after completion means the device never wrote a status.
    pub const NONE: u8 = 0xff;
}

/// Bytes in a sector (the unit of `sector` and `capacity`).
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of a GET_ID answer.
pub const ID_LEN: usize = 20;
/// Most queues the driver sets up.
pub const MAX_QUEUES: usize = 16;
/// Most data segments the driver puts in one request.
const MAX_SEGMENTS: usize = 64;
/// Largest data length the driver puts in one request.
const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// Largest queue the driver asks for.
const QUEUE_SIZE_MAX: u16 = 1024;
const HEADER_SIZE: usize = 16;

/// Configuration space offsets.
mod config {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const NUM_QUEUES: usize = 34;
}

/// What the driver learnt about the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Negotiated features (device-independent bits included).
    pub features: u64,
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Optimal block size (512 if the device does not say).
    pub blk_size: u32,
    /// Queues the device offers.
    pub num_queues: u16,
    /// Largest data segment (`u32::MAX` if unlimited).
    pub size_max: u32,
    /// Most data segments per request (`MAX_SEGMENTS` if the device does not say).
    pub seg_max: u32,
}

impl BlkConfig {
    /// Size in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity * SECTOR_SIZE
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.features & feature::RO != 0
    }
}

/// How to set the device up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkOptions {
    /// Queues to use (at most what the device offers and [`MAX_QUEUES`]).
    pub queues: u16,
    /// Descriptors per queue (rounded down to a power of two, capped by the
    /// device's maximum).
    pub queue_size: u16,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX if offered.
    pub event_idx: bool,
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// What `submit` returned for it.
    pub token: u16,
    /// Its status byte ([`status`]; `status::NONE` if the device wrote none).
    pub status: u8,
    /// Bytes the device says it wrote into the chain.
    pub len: u32,
}

/// Ways to break a request on purpose, for fault-injection workloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Malformation {
    /// Point the header descriptor here instead of the real header.
    pub header_addr: Option<u64>,
    /// Give the header descriptor this length instead of 16.
    pub header_len: Option<u32>,
    /// Make the chain loop back to its head.
    pub loop_back: bool,
}

struct BlkQueue<'a> {
    ring: SplitQueue<'a>,
    /// One 16-byte header per descriptor index.
    headers: *mut u8,
    /// One status byte per descriptor index.
    statuses: *mut u8,
}

/// A virtio-blk device, set up and running.
pub struct BlkDevice<'a> {
    transport: MmioTransport,
    config: BlkConfig,
    queues: [Option<BlkQueue<'a>>; MAX_QUEUES],
    queue_count: u16,
    kicks: u64,
}

impl<'a> BlkDevice<'a> {
    /// Initialises the block device behind `transport` with rings and
    /// request tables from `memory`.
    pub fn new(
        transport: MmioTransport,
        options: &BlkOptions,
        memory: &mut Bump<'a>,
    ) -> Result<Self, VirtioError> {
        let found = transport.device_id()?;
        if found != device_id::BLOCK {
            return Err(VirtioError::WrongDevice {
                expected: device_id::BLOCK,
                found,
            });
        }
        let mut wanted = feature::SIZE_MAX
            | feature::SEG_MAX
            | feature::RO
            | feature::BLK_SIZE
            | feature::FLUSH
            | feature::MQ
            | feature::DISCARD
            | feature::WRITE_ZEROES;
        if options.event_idx {
            wanted |= super::feature::RING_EVENT_IDX;
        }
        let features = transport.negotiate(wanted)?;
        let has = |bit: u64| features & bit != 0;
        let config = BlkConfig {
            features,
            capacity: transport.config_u64(config::CAPACITY),
            blk_size: if has(feature::BLK_SIZE) {
                transport.config_u32(config::BLK_SIZE)
            } else {
                512
            },
            num_queues: if has(feature::MQ) {
                transport.config_u16(config::NUM_QUEUES).max(1)
            } else {
                1
            },
            size_max: match has(feature::SIZE_MAX).then(|| transport.config_u32(config::SIZE_MAX)) {
                // qemu-storage-daemon offers SIZE_MAX with a size_max of 0:
                // read that as no limit.
                Some(0) | None => u32::MAX,
                Some(size_max) => size_max,
            },
            seg_max: if has(feature::SEG_MAX) {
                transport.config_u32(config::SEG_MAX).max(1)
            } else {
                MAX_SEGMENTS as u32
            },
        };
        let queue_count = options
            .queues
            .clamp(1, config.num_queues.min(MAX_QUEUES as u16));
        let mut device = BlkDevice {
            transport,
            config,
            queues: core::array::from_fn(|_| None),
            queue_count,
            kicks: 0,
        };
        for index in 0..queue_count {
            match device.setup_queue(index, options, memory) {
                Ok(queue) => device.queues[index as usize] = Some(queue),
                Err(error) => {
                    device.transport.fail();
                    return Err(error);
                }
            }
        }
        device.transport.driver_ok();
        Ok(device)
    }

    fn setup_queue(
        &self,
        index: u16,
        options: &BlkOptions,
        memory: &mut Bump<'a>,
    ) -> Result<BlkQueue<'a>, VirtioError> {
        let max = self.transport.queue_max_size(index)?;
        let wanted = options.queue_size.clamp(1, QUEUE_SIZE_MAX).min(max);
        // Split queues must be a power of two in size.
        let size = 1u16 << (15 - wanted.leading_zeros());
        let ring_memory = memory
            .alloc(QueueLayout::new(size).total, QueueLayout::ALIGN)
            .ok_or(VirtioError::OutOfMemory)?;
        let ring = SplitQueue::new(
            ring_memory,
            size,
            self.config.features & super::feature::RING_EVENT_IDX != 0,
        )?;
        let tables = memory
            .alloc((HEADER_SIZE + 1) * size as usize, HEADER_SIZE)
            .ok_or(VirtioError::OutOfMemory)?;
        let headers = tables.as_mut_ptr();
        // SAFETY: the status bytes follow the headers inside `tables`.
        let statuses = unsafe { headers.add(HEADER_SIZE * size as usize) };
        self.transport.enable_queue(index, &ring);
        Ok(BlkQueue {
            ring,
            headers,
            statuses,
        })
    }

    /// The disk's parameters.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Queues in use.
    pub fn queue_count(&self) -> u16 {
        self.queue_count
    }

    /// Descriptors in queue `queue`.
    pub fn queue_size(&self, queue: u16) -> Result<u16, VirtioError> {
        Ok(self.queue(queue)?.ring.size())
    }

    /// Descriptors a request with `data_len` bytes of data occupies.
    pub fn descriptors_per_request(&self, data_len: u32) -> usize {
        2 + data_len.div_ceil(self.config.size_max).max(1) as usize
    }

    /// Largest data length one request can carry (a multiple of the sector
    /// size), given the device's segment limits and the smallest queue's
    /// size: a chain (header, data, status) must fit in its ring, since
    /// this driver uses no indirect tables.
    pub fn max_request_bytes(&self) -> u32 {
        let segments = u64::from(self.segments_per_request());
        let bytes = (u64::from(self.config.size_max) * segments).min(MAX_REQUEST_BYTES);
        (bytes - bytes % SECTOR_SIZE) as u32
    }

    /// Most data segments one request may have: the device's seg_max, the
    /// driver's own limit, and what the smallest ring holds besides the
    /// header and the status.
    fn segments_per_request(&self) -> u32 {
        let ring_room = self
            .queues
            .iter()
            .flatten()
            .map(|queue| u32::from(queue.ring.size()).saturating_sub(2).max(1))
            .min()
            .unwrap_or(1);
        self.config.seg_max.min(MAX_SEGMENTS as u32).min(ring_room)
    }

    /// Doorbell kicks sent so far (on all queues).
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    fn queue(&self, queue: u16) -> Result<&BlkQueue<'a>, VirtioError> {
        self.queues
            .get(queue as usize)
            .and_then(Option::as_ref)
            .ok_or(VirtioError::NoSuchQueue(queue))
    }

    fn queue_mut(&mut self, queue: u16) -> Result<&mut BlkQueue<'a>, VirtioError> {
        self.queues
            .get_mut(queue as usize)
            .and_then(Option::as_mut)
            .ok_or(VirtioError::NoSuchQueue(queue))
    }

    /// Queues a request of type `kind` at `sector` with `data` (split into
    /// segments as the device requires) on queue `queue`; it reaches the
    /// device at the next [`kick`](Self::kick). Returns its token.
    ///
    /// # Safety
    /// The device reads or writes `data` until the request completes:
    /// nothing else may use that memory meanwhile, and it must not be Rust
    /// data the program relies on (bump-allocated buffers, or addresses
    /// outside guest RAM).
    pub unsafe fn submit(
        &mut self,
        queue: u16,
        kind: u32,
        sector: u64,
        data: Option<Buffer>,
    ) -> Result<u16, VirtioError> {
        let mut segments = [Buffer {
            addr: 0,
            len: 0,
            device_writes: false,
        }; MAX_SEGMENTS];
        let mut count = 0;
        if let Some(data) = data {
            let mut offset = 0;
            loop {
                let len = (data.len - offset).min(self.config.size_max);
                *segments
                    .get_mut(count)
                    .ok_or(VirtioError::TooManySegments)? = Buffer {
                    addr: data.addr + u64::from(offset),
                    len,
                    ..data
                };
                count += 1;
                offset += len;
                if offset == data.len {
                    break;
                }
            }
            if count > self.segments_per_request() as usize {
                return Err(VirtioError::TooManySegments);
            }
        }
        // SAFETY: passed on from our caller.
        unsafe {
            self.submit_malformed(
                queue,
                kind,
                sector,
                &segments[..count],
                Malformation::default(),
            )
        }
    }

    /// Queues a request whose chain is built as given: the header, the
    /// `data` buffers exactly as passed, the status byte; then applies
    /// `how`. For fault-injection workloads ([`submit`](Self::submit) is
    /// the normal way).
    ///
    /// # Safety
    /// As for [`submit`](Self::submit), for every buffer and for
    /// `how.header_addr`.
    pub unsafe fn submit_malformed(
        &mut self,
        queue: u16,
        kind: u32,
        sector: u64,
        data: &[Buffer],
        how: Malformation,
    ) -> Result<u16, VirtioError> {
        let q = self.queue_mut(queue)?;
        if data.len() + 2 > q.ring.free_descriptors() as usize {
            return Err(super::queue::QueueError::Full.into());
        }
        let head = q.ring.next_head().ok_or(super::queue::QueueError::Full)?;
        // SAFETY: head < ring size, so the header and status slots lie in
        // the tables `setup_queue` allocated; the device does not use a
        // slot while its head is free.
        let (header, status_byte) = unsafe {
            (
                q.headers.add(HEADER_SIZE * head as usize),
                q.statuses.add(head as usize),
            )
        };
        // SAFETY: as above; the header slot is 16-byte aligned.
        unsafe {
            ptr::write_volatile(header.cast::<u32>(), kind);
            ptr::write_volatile(header.add(4).cast::<u32>(), 0);
            ptr::write_volatile(header.add(8).cast::<u64>(), sector);
            ptr::write_volatile(status_byte, status::NONE);
        }
        let mut chain = [Buffer {
            addr: 0,
            len: 0,
            device_writes: false,
        }; MAX_SEGMENTS + 2];
        chain[0] = Buffer {
            addr: how.header_addr.unwrap_or(header as u64),
            len: how.header_len.unwrap_or(HEADER_SIZE as u32),
            device_writes: false,
        };
        let data_end = 1 + data.len();
        chain
            .get_mut(1..data_end)
            .ok_or(VirtioError::TooManySegments)?
            .copy_from_slice(data);
        chain[data_end] = Buffer {
            addr: status_byte as u64,
            len: 1,
            device_writes: true,
        };
        let token = q.ring.add(&chain[..=data_end])?;
        if how.loop_back {
            q.ring.loop_chain_back(token);
        }
        Ok(token)
    }

    /// Shows the device everything queued on `queue`, kicking it if it
    /// asked for notifications.
    pub fn kick(&mut self, queue: u16) -> Result<(), VirtioError> {
        if self.queue_mut(queue)?.ring.publish() {
            self.transport.notify(queue);
            self.kicks += 1;
        }
        Ok(())
    }

    /// The next finished request on `queue`, if any.
    pub fn poll(&mut self, queue: u16) -> Result<Option<Completion>, VirtioError> {
        let q = self.queue_mut(queue)?;
        let Some(used) = q.ring.pop_used()? else {
            return Ok(None);
        };
        // SAFETY: the head came back from the ring, so it is below the ring
        // size; the device is done with the slot (the used ring says so and
        // `pop_used` ordered our reads after it).
        let status = unsafe { ptr::read_volatile(q.statuses.add(used.head as usize)) };
        Ok(Some(Completion {
            token: used.head,
            status,
            len: used.len,
        }))
    }
}

/// The 16-byte range descriptor of a DISCARD or WRITE_ZEROES request.
pub fn range_descriptor(sector: u64, sectors: u32, unmap: bool) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&sector.to_le_bytes());
    bytes[8..12].copy_from_slice(&sectors.to_le_bytes());
    bytes[12..].copy_from_slice(&u32::from(unmap).to_le_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_descriptor_layout() {
        let bytes = range_descriptor(0x0102, 8, true);
        assert_eq!(&bytes[..8], &0x0102u64.to_le_bytes());
        assert_eq!(&bytes[8..12], &8u32.to_le_bytes());
        assert_eq!(&bytes[12..], &1u32.to_le_bytes());
    }
}
