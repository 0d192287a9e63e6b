//! The vhost-user device: what the frontend negotiates, and the per-queue
//! workers that pop descriptor chains, run them and return them.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pvstack_backend_common::{clone_exit_event, signal_if_needed, GuestMemorySlot};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::answer::{answer, Disk, Outcome};
use crate::config::{self, DiskLimits, ID_BYTES};
use crate::image::DiskImage;

/// Settings from the command line that shape the device.
#[derive(Debug, Clone)]
pub struct BlkSettings {
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: [u8; ID_BYTES],
    /// After each batch, busy-poll the available ring this long before
    /// waiting for a kick again (with kicks suppressed meanwhile).
    pub poll: Option<Duration>,
}

/// One connection's block device. Cheap to clone: the daemon hands a clone
/// to every queue worker.
#[derive(Clone)]
pub struct BlkBackend {
    shared: Arc<Shared>,
}

struct Shared {
    image: Arc<DiskImage>,
    limits: DiskLimits,
    settings: BlkSettings,
    config_space: Vec<u8>,
    event_idx: AtomicBool,
    memory: GuestMemorySlot,
    /// One exit event per worker thread (= per queue).
    exit_events: Vec<(EventConsumer, EventNotifier)>,
    /// Requests answered with an error status.
    rejected: AtomicU64,
    /// Chains without a usable status byte, returned with nothing written.
    unanswerable: AtomicU64,
    /// Chains returned to the driver.
    served: AtomicU64,
    /// Interrupts raised (call eventfd writes).
    signalled: AtomicU64,
}

impl Drop for Shared {
    /// The connection's totals (`pvstack bench` reads this line).
    fn drop(&mut self) {
        log::info!(
            "served {} requests, raised {} interrupts",
            self.served.load(Ordering::Relaxed),
            self.signalled.load(Ordering::Relaxed)
        );
    }
}

impl BlkBackend {
    pub fn new(image: Arc<DiskImage>, settings: &BlkSettings) -> io::Result<Self> {
        let limits = DiskLimits {
            capacity_sectors: image.capacity_sectors(),
            readonly: image.is_readonly(),
            // Header and status take two of the queue's descriptors.
            max_segments: u32::from(settings.queue_size.saturating_sub(2).max(1)),
        };
        // O_DIRECT needs block-aligned I/O; a 4 KiB logical block makes the
        // guest issue it.
        let blk_size = if image.is_direct() { 4096 } else { 512 };
        let exit_events = (0..settings.num_queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(BlkBackend {
            shared: Arc::new(Shared {
                config_space: config::config_space(&limits, settings.num_queues, blk_size),
                image,
                limits,
                settings: settings.clone(),
                event_idx: AtomicBool::new(false),
                memory: GuestMemorySlot::default(),
                exit_events,
                rejected: AtomicU64::new(0),
                unanswerable: AtomicU64::new(0),
                served: AtomicU64::new(0),
                signalled: AtomicU64::new(0),
            }),
        })
    }

    /// Serves every available chain of one queue, re-checking after
    /// re-enabling notifications so no kick is lost with EVENT_IDX. With
    /// `--poll-us`, kicks stay suppressed (VRING_USED_F_NO_NOTIFY, or a
    /// stale avail_event with EVENT_IDX) while the ring is polled after
    /// each batch.
    fn process_queue(&self, vring: &VringRwLock, queue: usize) {
        let Some(mem) = self.memory() else {
            log::warn!("queue {queue} kicked before the memory table was set");
            return;
        };
        let event_idx = self.shared.event_idx.load(Ordering::Acquire);
        let poll = self.shared.settings.poll;
        loop {
            if event_idx || poll.is_some() {
                if let Err(e) = vring.disable_notification() {
                    log::warn!("queue {queue}: cannot disable notifications: {e}");
                }
            }
            let (chains, max_chain_len) = {
                let mut state = vring.get_mut();
                let queue_state = state.get_queue_mut();
                let max_chain_len = usize::from(queue_state.size());
                match queue_state.iter(mem.memory()) {
                    Ok(iter) => (iter.collect::<Vec<_>>(), max_chain_len),
                    Err(e) => {
                        log::warn!("queue {queue}: cannot read the available ring: {e}");
                        return;
                    }
                }
            };
            if !chains.is_empty() {
                for chain in chains {
                    let head = chain.head_index();
                    let used_len = self.serve_chain(chain, &mem.memory(), max_chain_len, queue);
                    if let Err(e) = vring.add_used(head, used_len) {
                        log::warn!("queue {queue}: cannot return chain {head}: {e}");
                    }
                    self.shared.served.fetch_add(1, Ordering::Relaxed);
                }
                if signal_if_needed(vring, queue) {
                    self.shared.signalled.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(poll) = poll {
                if poll_avail(vring, &mem.memory(), poll, queue) {
                    continue;
                }
            }
            if !event_idx && poll.is_none() {
                return;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    log::warn!("queue {queue}: cannot enable notifications: {e}");
                    return;
                }
            }
        }
    }

    /// Answers one chain; returns the used length.
    fn serve_chain<I>(
        &self,
        chain: I,
        mem: &GuestMemoryMmap,
        max_chain_len: usize,
        queue: usize,
    ) -> u32
    where
        I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let shared = &self.shared;
        let disk = Disk {
            image: &shared.image,
            limits: &shared.limits,
            serial: &shared.settings.serial,
        };
        let answer = answer(chain, mem, disk, max_chain_len);
        match answer.outcome {
            Outcome::Done => {}
            Outcome::Unanswerable(why) => {
                let count = shared.unanswerable.fetch_add(1, Ordering::Relaxed) + 1;
                log::warn!("queue {queue}: returned a chain unanswered ({count} so far): {why}");
            }
            Outcome::Rejected(rejection) => {
                let count = shared.rejected.fetch_add(1, Ordering::Relaxed) + 1;
                log::warn!("queue {queue}: rejected a request ({count} so far): {rejection}");
            }
            Outcome::Failed { operation, error } => log::warn!(
                "queue {queue}: {operation:?} on {} failed: {error}",
                shared.image.path().display()
            ),
        }
        answer.used_len
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.shared.memory.get()
    }
}

/// Spins for up to `poll` until the driver makes a chain available;
/// returns whether it did.
fn poll_avail(vring: &VringRwLock, mem: &GuestMemoryMmap, poll: Duration, queue: usize) -> bool {
    let deadline = Instant::now() + poll;
    loop {
        let state = vring.get_ref();
        let ring = state.get_queue();
        match ring.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) if idx.0 != ring.next_avail() => return true,
            Ok(_) => {}
            Err(e) => {
                log::warn!("queue {queue}: cannot read the available index: {e}");
                return false;
            }
        }
        drop(state);
        if Instant::now() >= deadline {
            return false;
        }
        std::hint::spin_loop();
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.settings.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shared.settings.queue_size)
    }

    fn features(&self) -> u64 {
        config::virtio_features(self.shared.limits.readonly)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        config::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config::config_window(&self.shared.config_space, offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.shared.memory.set(mem);
        Ok(())
    }

    /// One worker thread per queue.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.shared.settings.num_queues)
            .map(|q| 1u64 << q)
            .collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        clone_exit_event(self.shared.exit_events.get(thread_index)?, thread_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            log::warn!("queue {thread_id}: unexpected event set {evset:?}");
            return Ok(());
        }
        // Each worker owns exactly one queue: the vring at index 0 of its list.
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(vring, thread_id),
            None => log::warn!("queue {thread_id}: event for unknown vring {device_event}"),
        }
        Ok(())
    }
}
