//! The io_uring engine: every request the worker takes from the ring goes
//! to the kernel at once, so a queue has as many requests in flight as the
//! driver sends (at most the queue size), and they come back in the order
//! they complete.
//!
//! - Reads and writes go straight between the image and guest memory
//!   (readv/writev on the guest's buffers), unless the image is opened
//!   with O_DIRECT and the guest's buffers are not aligned as O_DIRECT
//!   asks: then they go through a bounce buffer of at most
//!   [`BOUNCE_CHUNK`] bytes, chunk after chunk, and a queue holds at most
//!   [`BOUNCE_BUDGET`] bounce buffers (a request that finds none waits for
//!   one). A short transfer is continued where it stopped.
//! - FLUSH is an fdatasync (IORING_OP_FSYNC with DATASYNC) started once
//!   every write given to the engine before the FLUSH has completed
//!   ([`FlushBarrier`]), so it covers them all, as the synchronous
//!   engine's does; requests behind it are not held up.
//! - GET_ID, DISCARD and WRITE_ZEROES are done on the spot (the last two
//!   with fallocate), as the synchronous engine does them; so are reads
//!   and writes of an image in memory (tmpfs, ramfs): they are a copy,
//!   and tmpfs has no non-blocking path, so io_uring would hand each to a
//!   kernel worker thread, a round trip dearer than the copy itself.
//!
//! Guest buffers are handed to the kernel as addresses in this process's
//! mapping of guest memory; each request keeps that mapping alive
//! ([`Job::memory`]) until its last transfer has completed, and the engine
//! waits for everything in the kernel before it is dropped.

use pvstack_logging::warn_limited;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use pvstack_block::bounce::{gather, scatter, AlignedBuffer, BOUNCE_CHUNK};
use pvstack_block::chain::finish;
use pvstack_block::config::SECTOR_SIZE;
use pvstack_block::execute::{execute, host_iovecs};
use pvstack_block::request::Operation;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::barrier::FlushBarrier;
use super::{Engine, EngineDisk, Finished, Job};

/// Bounce buffers one queue may hold at once (8 MiB with 1 MiB chunks).
pub const BOUNCE_BUDGET: usize = 8;
/// Most iovecs one readv/writev takes (UIO_MAXIOV); a request with more
/// continues like a short transfer.
const MAX_IOVECS: usize = 1024;

/// Whether io_uring can serve here: a ring can be set up and knows the
/// operations this engine submits. The error says why not, in one line.
pub fn probe() -> Result<(), String> {
    let ring = IoUring::new(2).map_err(|e| {
        let knob = "/proc/sys/kernel/io_uring_disabled";
        match std::fs::read_to_string(knob) {
            Ok(value) => format!("io_uring_setup: {e} ({knob} = {})", value.trim()),
            Err(_) => format!("io_uring_setup: {e}"),
        }
    })?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("cannot ask the kernel which io_uring operations it has: {e}"))?;
    for (code, name) in [
        (opcode::Readv::CODE, "READV"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::Fsync::CODE, "FSYNC"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("the kernel's io_uring has no {name}"));
        }
    }
    Ok(())
}

pub struct UringEngine {
    disk: EngineDisk,
    ring: IoUring,
    /// Signalled by the kernel when completions arrive (while enabled).
    completion_event: EventFd,
    /// Requests in flight; a slot's index is the user data of its
    /// operations in the ring.
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    /// Operations in the kernel (at most one per slot).
    in_kernel: usize,
    /// Queued in the submission ring, not yet handed to the kernel.
    unsubmitted: bool,
    finished: Vec<Finished>,
    spare_bounces: Vec<AlignedBuffer>,
    bounces_made: usize,
    /// Slots waiting for a bounce buffer, oldest first.
    awaiting_bounce: VecDeque<usize>,
    /// Writes in flight and the FLUSHes (slots) waiting for them.
    barrier: FlushBarrier<usize>,
}

struct InFlight {
    head: u16,
    status: GuestAddress,
    operation: Operation,
    memory: Arc<GuestMemoryMmap>,
    /// A write's number in the barrier.
    write_number: Option<u64>,
    transfer: Transfer,
}

enum Transfer {
    /// Straight between the image and guest memory; `first` is the first
    /// iovec not yet fully moved.
    Direct {
        iovecs: Vec<libc::iovec>,
        first: usize,
        offset: u64,
        done: u64,
        total: u64,
    },
    /// Through a bounce buffer (`None` while waiting for one), a chunk at
    /// a time: `chunk` bytes from request byte `done`, of which
    /// `chunk_done` have moved.
    Bounced {
        bounce: Option<AlignedBuffer>,
        offset: u64,
        total: usize,
        done: usize,
        chunk: usize,
        chunk_done: usize,
    },
    Flush,
}

// SAFETY: the raw pointers in `Transfer::Direct`'s iovecs point into the
// guest memory mapping that `InFlight::memory` (an Arc) keeps alive; they
// are plain addresses handed to the kernel, never dereferenced by this
// process, so moving them between threads (under the queue's lock) is
// sound.
unsafe impl Send for UringEngine {}

impl UringEngine {
    /// An engine for a queue of up to `queue_size` entries: that many
    /// requests in flight at most.
    pub fn new(disk: EngineDisk, queue_size: u16) -> io::Result<Self> {
        let entries = u32::from(queue_size).next_power_of_two();
        let ring = IoUring::new(entries)?;
        let completion_event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter()
            .register_eventfd(completion_event.as_raw_fd())?;
        let slots = usize::from(queue_size);
        Ok(UringEngine {
            disk,
            ring,
            completion_event,
            slots: (0..slots).map(|_| None).collect(),
            free_slots: (0..slots).rev().collect(),
            in_kernel: 0,
            unsubmitted: false,
            finished: Vec::new(),
            spare_bounces: Vec::new(),
            bounces_made: 0,
            awaiting_bounce: VecDeque::new(),
            barrier: FlushBarrier::default(),
        })
    }

    /// Runs `job` to its end now, as the synchronous engine does.
    fn run_inline(&mut self, job: Job) {
        let result = execute(
            &job.operation,
            &self.disk.image,
            &job.memory,
            &self.disk.serial,
        );
        self.finish_now(job, result);
    }

    /// Answers `job` at once with `result`.
    fn finish_now(&mut self, job: Job, result: io::Result<u32>) {
        let answer = finish(&job.memory, job.status, job.operation, result);
        self.finished.push(Finished {
            head: job.head,
            answer,
        });
    }

    /// Starts a read or write (`sector`: where on the disk).
    fn start_transfer(&mut self, job: Job, sector: u64, writing: bool) {
        let buffers = job.operation.buffers();
        let iovecs = match host_iovecs(&job.memory, buffers) {
            Ok(iovecs) => iovecs,
            Err(e) => return self.finish_now(job, Err(e)),
        };
        let Some(slot) = self.free_slots.pop() else {
            // The worker takes no more chains than there are slots.
            let busy = io::Error::other("more requests in flight than the queue has entries");
            return self.finish_now(job, Err(busy));
        };
        let offset = sector * SECTOR_SIZE;
        let total: u64 = buffers.iter().map(|b| u64::from(b.len)).sum();
        let direct = self.disk.image.takes_directly(&iovecs);
        let transfer = if direct {
            Transfer::Direct {
                iovecs,
                first: 0,
                offset,
                done: 0,
                total,
            }
        } else {
            Transfer::Bounced {
                bounce: None,
                offset,
                total: total as usize,
                done: 0,
                chunk: 0,
                chunk_done: 0,
            }
        };
        let write_number = writing.then(|| self.barrier.write_started());
        self.slots[slot] = Some(InFlight {
            head: job.head,
            status: job.status,
            operation: job.operation,
            memory: job.memory,
            write_number,
            transfer,
        });
        if direct {
            self.advance(slot);
        } else if !self.awaiting_bounce.is_empty() || self.start_bounced(slot) {
            self.awaiting_bounce.push_back(slot);
        }
    }

    /// Starts a FLUSH in a slot: now if no write given before it is still
    /// in flight, else once they have completed.
    fn start_flush(&mut self, job: Job) {
        let Some(slot) = self.free_slots.pop() else {
            let busy = io::Error::other("more requests in flight than the queue has entries");
            return self.finish_now(job, Err(busy));
        };
        self.slots[slot] = Some(InFlight {
            head: job.head,
            status: job.status,
            operation: job.operation,
            memory: job.memory,
            write_number: None,
            transfer: Transfer::Flush,
        });
        if let Some(slot) = self.barrier.flush(slot) {
            self.push_fsync(slot);
        }
    }

    fn push_fsync(&mut self, slot: usize) {
        let fd = types::Fd(self.disk.image.file().as_raw_fd());
        let entry = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        // SAFETY: fsync reads and writes no memory of ours.
        unsafe { self.push(entry, slot) };
    }

    /// Queues `entry` for slot `slot`, handing the kernel what is queued
    /// if the submission ring is full.
    ///
    /// # Safety
    /// Every buffer `entry` names must stay valid until its completion is
    /// reaped.
    unsafe fn push(&mut self, entry: squeue::Entry, slot: usize) {
        let entry = entry.user_data(slot as u64);
        loop {
            // SAFETY: passed on from our caller.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // Never with at most one operation per slot and a ring at
            // least as large as the slots; handled all the same.
            if let Err(e) = self.ring.submit() {
                warn_limited!("io_uring: cannot submit: {e}");
            }
        }
        self.in_kernel += 1;
        self.unsubmitted = true;
    }

    /// Moves slot `slot` on: submits its next transfer, or finishes it
    /// when everything has moved.
    fn advance(&mut self, slot: usize) {
        let fd = types::Fd(self.disk.image.file().as_raw_fd());
        let Some(request) = self.slots[slot].as_mut() else {
            return;
        };
        let writing = request.write_number.is_some();
        match &mut request.transfer {
            Transfer::Direct {
                iovecs,
                first,
                offset,
                done,
                total,
            } => {
                if *done == *total {
                    let used = if writing { 0 } else { *total as u32 };
                    return self.complete(slot, Ok(used));
                }
                let batch = &iovecs[*first..iovecs.len().min(*first + MAX_IOVECS)];
                let (ptr, count, at) = (batch.as_ptr(), batch.len() as u32, *offset + *done);
                let entry = if writing {
                    opcode::Writev::new(fd, ptr, count).offset(at).build()
                } else {
                    opcode::Readv::new(fd, ptr, count).offset(at).build()
                };
                // SAFETY: the iovecs live in the slot until it completes;
                // they point into guest memory the slot's `memory` keeps
                // mapped, buffers the driver gave the device for this
                // request.
                unsafe { self.push(entry, slot) };
            }
            Transfer::Bounced {
                bounce,
                offset,
                total,
                done,
                chunk,
                chunk_done,
            } => {
                let Some(buffer) = bounce.as_mut() else {
                    return;
                };
                if *chunk_done == *chunk {
                    // The chunk in flight has fully moved: a read's bytes
                    // go to the guest; then on to the next chunk.
                    if !writing && *chunk > 0 {
                        let copied = scatter(
                            &request.memory,
                            request.operation.buffers(),
                            *done,
                            &buffer.as_slice()[..*chunk],
                        );
                        if let Err(e) = copied {
                            return self.complete(slot, Err(e));
                        }
                    }
                    *done += *chunk;
                    if *done == *total {
                        let used = if writing { 0 } else { *total as u32 };
                        return self.complete(slot, Ok(used));
                    }
                    *chunk = (*total - *done).min(BOUNCE_CHUNK);
                    *chunk_done = 0;
                    if writing {
                        let copied = gather(
                            &request.memory,
                            request.operation.buffers(),
                            *done,
                            &mut buffer.as_mut_slice()[..*chunk],
                        );
                        if let Err(e) = copied {
                            return self.complete(slot, Err(e));
                        }
                    }
                }
                let iov = buffer.iovec(*chunk);
                // SAFETY: `chunk_done` < `chunk` <= the buffer's length.
                let ptr = unsafe { iov.iov_base.cast::<u8>().add(*chunk_done) };
                let len = (*chunk - *chunk_done) as u32;
                let at = *offset + (*done + *chunk_done) as u64;
                let entry = if writing {
                    opcode::Write::new(fd, ptr, len).offset(at).build()
                } else {
                    opcode::Read::new(fd, ptr, len).offset(at).build()
                };
                // SAFETY: the bounce buffer stays in the slot, untouched,
                // until the operation completes.
                unsafe { self.push(entry, slot) };
            }
            Transfer::Flush => {}
        }
    }

    /// Gives slot `slot` a bounce buffer if one can be had now: a spare
    /// one, or a new one while the queue holds fewer than
    /// [`BOUNCE_BUDGET`]. Ok(false): none now (the slot waits).
    fn lend_bounce(&mut self, slot: usize) -> io::Result<bool> {
        let buffer = match self.spare_bounces.pop() {
            Some(buffer) => buffer,
            None if self.bounces_made < BOUNCE_BUDGET => {
                let buffer = AlignedBuffer::chunk()?;
                self.bounces_made += 1;
                buffer
            }
            None => return Ok(false),
        };
        if let Some(InFlight {
            transfer: Transfer::Bounced { bounce, .. },
            ..
        }) = self.slots[slot].as_mut()
        {
            *bounce = Some(buffer);
        }
        Ok(true)
    }

    /// Starts slot `slot`'s bounced transfer if it gets a bounce buffer;
    /// returns whether it must wait for one.
    fn start_bounced(&mut self, slot: usize) -> bool {
        match self.lend_bounce(slot) {
            Ok(true) => {
                self.advance(slot);
                false
            }
            Ok(false) => true,
            Err(e) => {
                self.complete(slot, Err(e));
                false
            }
        }
    }

    /// Handles the completion of slot `slot`'s operation, `result` bytes
    /// moved or a negative errno.
    fn completed(&mut self, slot: usize, result: i32) {
        self.in_kernel -= 1;
        let Some(request) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            warn_limited!("io_uring: a completion for an empty slot {slot}");
            return;
        };
        if result < 0 {
            return self.complete(slot, Err(io::Error::from_raw_os_error(-result)));
        }
        let moved = result as usize;
        let eof = || {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image ended before the request's last sector",
            )
        };
        match &mut request.transfer {
            Transfer::Flush => return self.complete(slot, Ok(0)),
            Transfer::Direct {
                iovecs,
                first,
                done,
                total,
                ..
            } => {
                if moved == 0 && *done < *total {
                    return self.complete(slot, Err(eof()));
                }
                *done += moved as u64;
                consume(iovecs, first, moved);
            }
            Transfer::Bounced {
                chunk, chunk_done, ..
            } => {
                if moved == 0 && *chunk_done < *chunk {
                    return self.complete(slot, Err(eof()));
                }
                *chunk_done += moved;
            }
        }
        self.advance(slot);
    }

    /// Finishes slot `slot` with `result`: writes its status, frees the
    /// slot and its bounce buffer, and starts what waited on it.
    fn complete(&mut self, slot: usize, result: io::Result<u32>) {
        let Some(request) = self.slots[slot].take() else {
            return;
        };
        self.free_slots.push(slot);
        let answer = finish(&request.memory, request.status, request.operation, result);
        self.finished.push(Finished {
            head: request.head,
            answer,
        });
        if let Transfer::Bounced {
            bounce: Some(buffer),
            ..
        } = request.transfer
        {
            self.spare_bounces.push(buffer);
            while let Some(waiting) = self.awaiting_bounce.pop_front() {
                if self.start_bounced(waiting) {
                    self.awaiting_bounce.push_front(waiting);
                    break;
                }
            }
        }
        if let Some(number) = request.write_number {
            for flush in self.barrier.write_done(number) {
                self.push_fsync(flush);
            }
        }
    }

    /// Hands the kernel what is queued; with `wait`, also waits for one
    /// completion.
    fn enter(&mut self, wait: bool) {
        if !self.unsubmitted && !wait {
            return;
        }
        let result = if wait {
            self.ring.submit_and_wait(1)
        } else {
            self.ring.submit()
        };
        match result {
            Ok(_) => self.unsubmitted = false,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => warn_limited!("io_uring: cannot submit: {e}"),
        }
    }

    /// Reaps every completion in the ring.
    fn drain(&mut self) {
        let mut completions = Vec::new();
        completions.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data() as usize, cqe.result())),
        );
        for (slot, result) in completions {
            self.completed(slot, result);
        }
    }
}

/// Marks `moved` more bytes of `iovecs` (from `first` on) as transferred.
fn consume(iovecs: &mut [libc::iovec], first: &mut usize, mut moved: usize) {
    while moved > 0 && *first < iovecs.len() {
        let iov = &mut iovecs[*first];
        let step = moved.min(iov.iov_len);
        // SAFETY: `step` <= iov_len, so the new base stays inside (or one
        // past the end of) the same buffer.
        iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(step) }.cast();
        iov.iov_len -= step;
        moved -= step;
        if iov.iov_len == 0 {
            *first += 1;
        }
    }
}

impl Engine for UringEngine {
    fn submit(&mut self, job: Job) {
        match &job.operation {
            Operation::Read { .. } | Operation::Write { .. } if self.disk.image.is_in_memory() => {
                self.run_inline(job)
            }
            &Operation::Read { sector, .. } => self.start_transfer(job, sector, false),
            &Operation::Write { sector, .. } => self.start_transfer(job, sector, true),
            Operation::Flush => self.start_flush(job),
            Operation::GetId { .. } | Operation::Discard(_) | Operation::WriteZeroes(_) => {
                let result = execute(
                    &job.operation,
                    &self.disk.image,
                    &job.memory,
                    &self.disk.serial,
                );
                self.finish_now(job, result);
            }
        }
    }

    fn reap(&mut self, finished: &mut Vec<Finished>, wait: bool) {
        loop {
            let must_wait = wait && self.finished.is_empty() && self.in_kernel > 0;
            self.enter(must_wait);
            self.drain();
            // Continued transfers were queued while draining.
            if self.unsubmitted {
                self.enter(false);
                continue;
            }
            if !must_wait || !self.finished.is_empty() {
                break;
            }
        }
        finished.append(&mut self.finished);
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len() + self.finished.len()
    }

    fn room(&self) -> usize {
        self.free_slots.len()
    }

    fn has_finished(&mut self) -> bool {
        !self.finished.is_empty() || !self.ring.completion().is_empty()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.completion_event.as_raw_fd())
    }

    fn notify_completions(&mut self, on: bool) {
        let completion = self.ring.completion();
        if on {
            completion.enable_eventfd();
        } else {
            completion.disable_eventfd();
        }
    }

    fn consume_completion_signal(&mut self) {
        // EAGAIN: nothing was signalled.
        let _ = self.completion_event.read();
    }
}

impl Drop for UringEngine {
    /// Waits for every operation in the kernel: until then it may still
    /// write into a bounce buffer or through an iovec this engine owns.
    fn drop(&mut self) {
        while self.in_kernel > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    log::error!(
                        "io_uring: cannot wait for {} operations: {e}",
                        self.in_kernel
                    );
                    // Leak what the kernel may still use rather than free it.
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
            }
            let reaped = self.ring.completion().count();
            self.in_kernel = self.in_kernel.saturating_sub(reaped);
        }
    }
}
