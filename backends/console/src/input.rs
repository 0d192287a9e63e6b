//! [`InputQueue`]: host input waiting for the guest's receive buffers.
//!
//! Bounded: when the guest does not post receive buffers, writers block
//! (the client, PTY or stdin is simply not read further) instead of input
//! being dropped. Bytes leave in the order they were pushed; one push's
//! bytes are never interleaved with another's unless it is larger than the
//! whole queue.

use std::collections::VecDeque;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Bytes of input held for the guest at most.
pub const INPUT_CAPACITY: usize = 64 * 1024;

/// Host input on its way to the guest.
pub struct InputQueue {
    bytes: Mutex<VecDeque<u8>>,
    /// Signalled when bytes leave the queue.
    space: Condvar,
    /// Readable while input may be waiting: wakes the backend's worker.
    ready: EventFd,
    capacity: usize,
}

impl InputQueue {
    /// An empty queue holding at most `capacity` bytes.
    pub fn new(capacity: usize) -> io::Result<Self> {
        Ok(InputQueue {
            bytes: Mutex::new(VecDeque::with_capacity(capacity)),
            space: Condvar::new(),
            ready: EventFd::new(EFD_NONBLOCK)?,
            capacity,
        })
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<u8>> {
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues all of `data`, blocking while the queue is full.
    pub fn push(&self, mut data: &[u8]) {
        let mut bytes = self.lock();
        while !data.is_empty() {
            // Wait for room for the whole push (or for an empty queue, if
            // it is larger than the queue), so pushes do not interleave.
            let want = data.len().min(self.capacity);
            while self.capacity - bytes.len() < want {
                bytes = self
                    .space
                    .wait(bytes)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            let (now, rest) = data.split_at(want);
            bytes.extend(now);
            data = rest;
            if let Err(e) = self.ready.write(1) {
                log::warn!("cannot wake the queue worker for input: {e}");
            }
        }
    }

    /// Moves up to `max` bytes out of the queue with `take`, which returns
    /// how many it used; returns that count.
    pub fn drain_into(&self, take: impl FnOnce(&[u8]) -> usize) -> usize {
        let mut bytes = self.lock();
        let (front, _) = bytes.as_slices();
        let used = take(front).min(front.len());
        bytes.drain(..used);
        if used > 0 {
            self.space.notify_all();
        }
        used
    }

    /// Whether input is waiting.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The eventfd that is readable after a push.
    pub fn ready_fd(&self) -> &EventFd {
        &self.ready
    }

    /// Clears the eventfd. Call it before looking at the queue, so that a
    /// push after the look signals again.
    pub fn clear_ready(&self) {
        // EAGAIN just means nothing was signalled.
        let _ = self.ready.read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bytes_leave_in_order_and_full_queue_blocks() {
        let queue = Arc::new(InputQueue::new(4).unwrap());
        queue.push(b"ab");
        let pusher = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || queue.push(b"cdefgh"))
        };
        let mut out = Vec::new();
        while out.len() < 8 {
            queue.drain_into(|bytes| {
                let n = bytes.len().min(3);
                out.extend_from_slice(&bytes[..n]);
                n
            });
            std::thread::yield_now();
        }
        pusher.join().unwrap();
        assert_eq!(out, b"abcdefgh");
        assert!(queue.is_empty());
    }

    #[test]
    fn push_signals_ready() {
        let queue = InputQueue::new(16).unwrap();
        assert!(queue.ready_fd().read().is_err());
        queue.push(b"x");
        assert_eq!(queue.ready_fd().read().unwrap(), 1);
    }
}
