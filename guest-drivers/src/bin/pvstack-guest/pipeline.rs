//! Keeps several block requests in flight on several queues: the engine
//! behind `blk-verify` and `blk-bench`. Each slot owns a data buffer and is
//! tied to one queue; a [`Job`] decides what each free slot does next and
//! sees each completion.

use crate::{Env, Failure};
use pvstack_guest::block::BlockDevice;
use pvstack_guest::virtio::blk::{request, SECTOR_SIZE};
use pvstack_guest::virtio::queue::Buffer;
use pvstack_guest::virtio::VirtioError;

/// One read or write.
#[derive(Clone, Copy, Debug)]
pub struct Io {
    /// `request::IN` or `request::OUT`.
    pub kind: u32,
    /// Disk offset in bytes (sector aligned).
    pub offset: u64,
    /// Bytes (a multiple of the sector size, at most the slot buffer).
    pub len: u32,
}

/// What to do with the slots.
pub trait Job {
    /// The next request, with `buf` (the slot's buffer) filled for a write;
    /// `None` when there is nothing more to issue.
    fn next(&mut self, buf: &mut [u8]) -> Option<Io>;
    /// `io` finished with `status`; `buf` holds what a read returned.
    fn done(&mut self, io: &Io, status: u8, buf: &[u8]);
    /// Called once per turn of the polling loop, whether or not anything
    /// completed: room for work beside the disk.
    fn between(&mut self) {}
}

#[derive(Clone, Copy)]
struct Slot {
    queue: u16,
    buf: *mut u8,
    token: u16,
    io: Option<Io>,
}

/// Buffers for `depth` requests on each of the device's queues.
pub struct Slots {
    slots: &'static mut [Slot],
    buf_len: usize,
    /// The job has nothing more to issue.
    exhausted: bool,
    in_flight: usize,
}

impl Slots {
    /// `depth` slots per queue of `device`, each with a `buf_len`-byte buffer.
    pub fn new(
        env: &mut Env,
        device: &impl BlockDevice,
        depth: u16,
        buf_len: usize,
    ) -> Result<Self, Failure<'static>> {
        let count = usize::from(depth) * usize::from(device.queue_count());
        let empty = Slot {
            queue: 0,
            buf: core::ptr::null_mut(),
            token: 0,
            io: None,
        };
        let slots = env
            .memory
            .alloc_slice(count, empty)
            .ok_or(Failure::OutOfMemory)?;
        for (i, slot) in slots.iter_mut().enumerate() {
            slot.queue = (i % usize::from(device.queue_count())) as u16;
            slot.buf = env
                .memory
                .alloc(buf_len, 4096)
                .ok_or(Failure::OutOfMemory)?
                .as_mut_ptr();
        }
        Ok(Slots {
            slots,
            buf_len,
            exhausted: false,
            in_flight: 0,
        })
    }

    /// Runs `job` until it has nothing more to issue and every request has
    /// completed.
    pub fn run(
        &mut self,
        device: &mut impl BlockDevice,
        job: &mut impl Job,
    ) -> Result<(), VirtioError> {
        while !self.turn(device, job)? {}
        Ok(())
    }

    /// One turn of [`Self::run`]'s loop: issues what `job` has for the
    /// free slots, lets it work beside the disk, and hands it what
    /// completed. True once it has nothing more to issue and every request
    /// has completed: so another loop can drive this pipeline too.
    pub fn turn(
        &mut self,
        device: &mut impl BlockDevice,
        job: &mut impl Job,
    ) -> Result<bool, VirtioError> {
        let buf_len = self.buf_len;
        if !self.exhausted {
            for queue in 0..device.queue_count() {
                let mut added = false;
                for slot in self
                    .slots
                    .iter_mut()
                    .filter(|s| s.queue == queue && s.io.is_none())
                {
                    // SAFETY: the slot's buffer is bump memory only this
                    // slot uses, and the device is not using it (the
                    // slot is idle).
                    let buf = unsafe { core::slice::from_raw_parts_mut(slot.buf, buf_len) };
                    let Some(io) = job.next(buf) else {
                        self.exhausted = true;
                        break;
                    };
                    let data = Buffer {
                        addr: slot.buf as u64,
                        len: io.len,
                        device_writes: io.kind == request::IN,
                    };
                    // SAFETY: the buffer stays the device's until this
                    // slot's completion is polled below.
                    slot.token = unsafe {
                        device.submit(queue, io.kind, io.offset / SECTOR_SIZE, Some(data))?
                    };
                    slot.io = Some(io);
                    self.in_flight += 1;
                    added = true;
                }
                if added {
                    device.kick(queue)?;
                }
                if self.exhausted {
                    break;
                }
            }
        }
        if self.exhausted && self.in_flight == 0 {
            return Ok(true);
        }
        job.between();
        for queue in 0..device.queue_count() {
            while let Some(done) = device.poll(queue)? {
                let Some(slot) = self
                    .slots
                    .iter_mut()
                    .find(|s| s.queue == queue && s.io.is_some() && s.token == done.token)
                else {
                    continue;
                };
                let Some(io) = slot.io.take() else { continue };
                self.in_flight -= 1;
                // SAFETY: the device is done with the buffer (completion polled).
                let buf = unsafe { core::slice::from_raw_parts(slot.buf, buf_len) };
                job.done(&io, done.status, &buf[..io.len as usize]);
            }
        }
        Ok(false)
    }
}
