//! Small pieces of a vhost-user backend's worker that every device needs.

use pvstack_logging::warn_limited;
use std::fmt::Display;
use std::sync::atomic::Ordering;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

/// Signals the driver that `vring`'s used ring moved, if it asked to be
/// told (used-event index or flags); returns whether it was signalled.
/// Failures are logged, naming the queue `queue`: the driver then sees the
/// completions on its next poll.
pub fn signal_if_needed(vring: &VringRwLock, queue: impl Display) -> bool {
    match vring.needs_notification() {
        Ok(true) => match vring.signal_used_queue() {
            Ok(()) => true,
            Err(e) => {
                warn_limited!("queue {queue}: cannot signal the driver: {e}");
                false
            }
        },
        Ok(false) => false,
        Err(e) => {
            warn_limited!("queue {queue}: cannot read the used event: {e}");
            false
        }
    }
}

/// A copy of the exit event pair of worker `worker`, for
/// `VhostUserBackend::exit_event`; `None` (logged) if the file descriptors
/// cannot be duplicated.
pub fn clone_exit_event(
    event: &(EventConsumer, EventNotifier),
    worker: usize,
) -> Option<(EventConsumer, EventNotifier)> {
    let (consumer, notifier) = event;
    match (consumer.try_clone(), notifier.try_clone()) {
        (Ok(consumer), Ok(notifier)) => Some((consumer, notifier)),
        (Err(e), _) | (_, Err(e)) => {
            log::error!("cannot clone the exit event of worker {worker}: {e}");
            None
        }
    }
}

/// Whether the driver has made chains available on `vring` that the
/// backend has not taken (false while the queue is stopped or disabled):
/// what a polling worker looks at. Failures are logged, naming the queue.
pub fn avail_pending(vring: &VringRwLock, mem: &GuestMemoryMmap, queue: impl Display) -> bool {
    let state = vring.get_ref();
    let ring = state.get_queue();
    if !state.is_enabled() || !ring.ready() {
        return false;
    }
    match ring.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => idx.0 != ring.next_avail(),
        Err(e) => {
            warn_limited!("queue {queue}: cannot read the available index: {e}");
            false
        }
    }
}
