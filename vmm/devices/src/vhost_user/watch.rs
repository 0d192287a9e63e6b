//! [`RingWatch`]: the ring indices of a device's queues, read from guest
//! memory without the device's lock, so that waiting for a backend (for
//! its taken requests to complete, or for its first completion after a
//! start) never holds up a vCPU that touches the device.

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::handle::{ActiveQueue, RingSetup};
use crate::error::{Error, Result};

/// Offset of `idx` in the available and used rings (after 16-bit flags).
const RING_IDX_OFFSET: u64 = 2;
/// Pause between two looks at the rings.
const POLL_INTERVAL: Duration = Duration::from_micros(50);

/// One queue as a [`RingWatch`] sees it.
#[derive(Clone, Copy, Debug)]
struct WatchedQueue {
    index: u16,
    avail_ring: u64,
    used_ring: u64,
    /// Where the backend stopped, or starts, in the available ring.
    next_avail: u16,
}

/// A snapshot of where each queue of a [`RingSetup`] stands.
#[derive(Clone, Debug)]
pub struct RingWatch {
    memory: GuestMemoryMmap,
    queues: Vec<WatchedQueue>,
}

impl RingWatch {
    /// The queues of `rings`, with their current `next_avail`.
    pub fn of(rings: &RingSetup) -> Self {
        RingWatch {
            memory: rings.memory.clone(),
            queues: rings
                .queues
                .iter()
                .map(|queue| WatchedQueue {
                    index: queue.index,
                    avail_ring: queue.config.avail_ring,
                    used_ring: queue.config.used_ring,
                    next_avail: queue.next_avail,
                })
                .collect(),
        }
    }

    /// Waits until the backend that was stopped at `next_avail` has
    /// completed every request it took (a backend may answer
    /// GET_VRING_BASE while requests it has taken are still being served;
    /// pvstack-blk does), or `timeout` has passed: then the error says
    /// which queue is behind.
    pub fn drain(&self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        for queue in &self.queues {
            loop {
                let used = self.idx(queue, queue.used_ring, "used")?;
                if used == queue.next_avail {
                    break;
                }
                if started.elapsed() >= timeout {
                    return Err(Error::Drain {
                        queue: queue.index,
                        taken: queue.next_avail,
                        completed: used,
                        waited: timeout,
                    });
                }
                std::thread::sleep(POLL_INTERVAL);
            }
        }
        Ok(())
    }

    /// Waits until a backend that just started completes a request on
    /// each queue where requests were waiting, so the stall recorded is
    /// what the guest sees (the backend's threads must also be scheduled)
    /// rather than only the setup messages. Gives up quietly after
    /// `timeout`; the stall then says so.
    pub fn wait_for_service(&self, timeout: Duration) {
        let started = Instant::now();
        for queue in &self.queues {
            let waiting = || {
                let used = self.idx(queue, queue.used_ring, "used").ok()?;
                let avail = self.idx(queue, queue.avail_ring, "available").ok()?;
                Some(used == queue.next_avail && avail != queue.next_avail)
            };
            while waiting() == Some(true) && started.elapsed() < timeout {
                std::thread::sleep(POLL_INTERVAL);
            }
        }
    }

    fn idx(&self, queue: &WatchedQueue, ring: u64, name: &str) -> Result<u16> {
        ring_idx(&self.memory, queue.index, ring, name)
    }
}

/// The used ring's index of `queue`: how many requests the backend has
/// completed (modulo 2^16), as the driver sees it.
pub fn used_idx(memory: &GuestMemoryMmap, queue: &ActiveQueue) -> Result<u16> {
    ring_idx(memory, queue.index, queue.config.used_ring, "used")
}

/// The `idx` field of the ring at `ring` of queue `index` (both rings
/// start with 16-bit flags, then the index).
fn ring_idx(memory: &GuestMemoryMmap, index: u16, ring: u64, name: &str) -> Result<u16> {
    let addr = GuestAddress(ring.wrapping_add(RING_IDX_OFFSET));
    let idx: u16 = memory
        .load(addr, Ordering::Acquire)
        .map_err(|_| Error::InvalidQueue {
            queue: index,
            reason: format!("{name} ring index at {:#x} is not in guest RAM", addr.0),
        })?;
    // Ring entries are written before the index; read them only after.
    fence(Ordering::Acquire);
    Ok(u16::from_le(idx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::QueueConfig;
    use vmm_sys_util::eventfd::EventFd;

    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn rings(next_avail: u16) -> RingSetup {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        RingSetup {
            features: 0,
            memory,
            queues: vec![ActiveQueue {
                index: 0,
                config: QueueConfig {
                    max_size: 16,
                    size: 16,
                    ready: true,
                    desc_table: 0x1000,
                    avail_ring: AVAIL,
                    used_ring: USED,
                },
                next_avail,
                kick: EventFd::new(0).unwrap(),
            }],
            call: EventFd::new(0).unwrap(),
            inflight: None,
        }
    }

    #[test]
    fn a_drain_ends_when_the_used_ring_catches_up_or_names_the_queue_behind() {
        let rings = rings(5);
        rings
            .memory
            .write_obj(3u16, GuestAddress(USED + 2))
            .unwrap();
        let watch = RingWatch::of(&rings);
        let err = watch.drain(Duration::from_millis(20)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Drain {
                    queue: 0,
                    taken: 5,
                    completed: 3,
                    ..
                }
            ),
            "{err}"
        );
        rings
            .memory
            .write_obj(5u16, GuestAddress(USED + 2))
            .unwrap();
        watch.drain(Duration::ZERO).unwrap();
    }

    #[test]
    fn rings_outside_guest_ram_are_errors_not_panics() {
        let mut rings = rings(1);
        rings.queues[0].config.used_ring = 0x10_0000;
        let err = RingWatch::of(&rings).drain(Duration::ZERO).unwrap_err();
        assert!(matches!(err, Error::InvalidQueue { queue: 0, .. }), "{err}");
        // An address the driver chose at the very top wraps, and is read.
        rings.queues[0].config.used_ring = u64::MAX;
        RingWatch::of(&rings).wait_for_service(Duration::ZERO);
    }
}
