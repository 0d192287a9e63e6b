//! [`BlockDevice`]: what the disk workloads need of a disk, implemented by
//! the virtio-blk driver and by the legacy controller's driver, so the same
//! workloads measure both; [`Disk`] holds either.

use crate::legacy_blk::{LegacyBlk, MAX_PENDING};
use crate::virtio::blk::{self, BlkDevice, Completion, SECTOR_SIZE};
use crate::virtio::queue::Buffer;
use crate::virtio::VirtioError;

/// A disk that takes requests on one or more queues and completes them
/// in any order.
pub trait BlockDevice {
    /// Size in bytes.
    fn capacity_bytes(&self) -> u64;
    /// Queues in use.
    fn queue_count(&self) -> u16;
    /// How many requests of `data_len` bytes fit in flight on one queue.
    fn max_in_flight(&self, data_len: u32) -> Result<u16, VirtioError>;
    /// Largest data length of one request (a multiple of the sector size).
    fn max_request_bytes(&self) -> u32;
    /// Whether FLUSH is supported.
    fn can_flush(&self) -> bool;
    /// Notifications sent to the device so far (doorbell kicks; commands
    /// for the legacy controller).
    fn kicks(&self) -> u64;
    /// Queues a request of type `kind` (`virtio::blk::request`) at
    /// `sector` with `data` on `queue`; returns its token.
    ///
    /// # Safety
    /// The device reads or writes `data` until the request completes:
    /// nothing else may use that memory meanwhile.
    unsafe fn submit(
        &mut self,
        queue: u16,
        kind: u32,
        sector: u64,
        data: Option<Buffer>,
    ) -> Result<u16, VirtioError>;
    /// Shows the device what was queued on `queue`.
    fn kick(&mut self, queue: u16) -> Result<(), VirtioError>;
    /// The next finished request on `queue`, if any.
    fn poll(&mut self, queue: u16) -> Result<Option<Completion>, VirtioError>;

    /// Submits one request, kicks and waits for it; returns its status.
    /// Use it only while nothing else is in flight on `queue`.
    ///
    /// # Safety
    /// As for [`submit`](Self::submit).
    unsafe fn run(
        &mut self,
        queue: u16,
        kind: u32,
        sector: u64,
        data: Option<Buffer>,
    ) -> Result<u8, VirtioError> {
        // SAFETY: passed on from our caller.
        let token = unsafe { self.submit(queue, kind, sector, data)? };
        self.kick(queue)?;
        loop {
            match self.poll(queue)? {
                Some(done) if done.token == token => return Ok(done.status),
                Some(_) => {}
                None => core::hint::spin_loop(),
            }
        }
    }
}

impl BlockDevice for BlkDevice<'_> {
    fn capacity_bytes(&self) -> u64 {
        self.config().capacity_bytes()
    }

    fn queue_count(&self) -> u16 {
        BlkDevice::queue_count(self)
    }

    fn max_in_flight(&self, data_len: u32) -> Result<u16, VirtioError> {
        let per_request = self.descriptors_per_request(data_len).max(1);
        Ok((usize::from(self.queue_size(0)?) / per_request) as u16)
    }

    fn max_request_bytes(&self) -> u32 {
        BlkDevice::max_request_bytes(self)
    }

    fn can_flush(&self) -> bool {
        self.config().features & blk::feature::FLUSH != 0
    }

    fn kicks(&self) -> u64 {
        BlkDevice::kicks(self)
    }

    unsafe fn submit(
        &mut self,
        queue: u16,
        kind: u32,
        sector: u64,
        data: Option<Buffer>,
    ) -> Result<u16, VirtioError> {
        // SAFETY: passed on from our caller.
        unsafe { BlkDevice::submit(self, queue, kind, sector, data) }
    }

    fn kick(&mut self, queue: u16) -> Result<(), VirtioError> {
        BlkDevice::kick(self, queue)
    }

    fn poll(&mut self, queue: u16) -> Result<Option<Completion>, VirtioError> {
        BlkDevice::poll(self, queue)
    }
}

impl BlockDevice for LegacyBlk {
    fn capacity_bytes(&self) -> u64 {
        self.capacity() * SECTOR_SIZE
    }

    fn queue_count(&self) -> u16 {
        1
    }

    fn max_in_flight(&self, _data_len: u32) -> Result<u16, VirtioError> {
        Ok(MAX_PENDING as u16)
    }

    fn max_request_bytes(&self) -> u32 {
        // Requests are split into commands of at most MAX_COUNT sectors,
        // so any whole number of sectors works.
        u32::MAX / SECTOR_SIZE as u32 * SECTOR_SIZE as u32
    }

    fn can_flush(&self) -> bool {
        true
    }

    fn kicks(&self) -> u64 {
        self.commands()
    }

    unsafe fn submit(
        &mut self,
        queue: u16,
        kind: u32,
        sector: u64,
        data: Option<Buffer>,
    ) -> Result<u16, VirtioError> {
        only_queue_zero(queue)?;
        // SAFETY: passed on from our caller.
        unsafe { LegacyBlk::submit(self, kind, sector, data) }
    }

    fn kick(&mut self, queue: u16) -> Result<(), VirtioError> {
        only_queue_zero(queue)
    }

    fn poll(&mut self, queue: u16) -> Result<Option<Completion>, VirtioError> {
        only_queue_zero(queue)?;
        Ok(LegacyBlk::poll(self))
    }
}

/// The legacy controller has one queue: any other number is an error.
fn only_queue_zero(queue: u16) -> Result<(), VirtioError> {
    if queue != 0 {
        return Err(VirtioError::NoSuchQueue(queue));
    }
    Ok(())
}

/// A disk of either kind.
// One Disk exists per workload and the guest has no heap to box into, so
// the size difference between the variants costs nothing that matters.
#[allow(clippy::large_enum_variant)]
pub enum Disk<'a> {
    Virtio(BlkDevice<'a>),
    Legacy(LegacyBlk),
}

impl Disk<'_> {
    fn device(&self) -> &dyn BlockDevice {
        match self {
            Disk::Virtio(d) => d,
            Disk::Legacy(d) => d,
        }
    }

    fn device_mut(&mut self) -> &mut dyn BlockDevice {
        match self {
            Disk::Virtio(d) => d,
            Disk::Legacy(d) => d,
        }
    }
}

impl BlockDevice for Disk<'_> {
    fn capacity_bytes(&self) -> u64 {
        self.device().capacity_bytes()
    }

    fn queue_count(&self) -> u16 {
        self.device().queue_count()
    }

    fn max_in_flight(&self, data_len: u32) -> Result<u16, VirtioError> {
        self.device().max_in_flight(data_len)
    }

    fn max_request_bytes(&self) -> u32 {
        self.device().max_request_bytes()
    }

    fn can_flush(&self) -> bool {
        self.device().can_flush()
    }

    fn kicks(&self) -> u64 {
        self.device().kicks()
    }

    unsafe fn submit(
        &mut self,
        queue: u16,
        kind: u32,
        sector: u64,
        data: Option<Buffer>,
    ) -> Result<u16, VirtioError> {
        // SAFETY: passed on from our caller.
        unsafe { self.device_mut().submit(queue, kind, sector, data) }
    }

    fn kick(&mut self, queue: u16) -> Result<(), VirtioError> {
        self.device_mut().kick(queue)
    }

    fn poll(&mut self, queue: u16) -> Result<Option<Completion>, VirtioError> {
        self.device_mut().poll(queue)
    }
}
