//! The vhost-user device: what the frontend negotiates, and the per-queue
//! workers that pop descriptor chains, run them and return them.

use pvstack_logging::warn_limited;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pvstack_backend_common::inflight::{chain_at, InflightRegion, InflightSlot, QueueLog};
use pvstack_backend_common::{clone_exit_event, signal_if_needed, GuestMemorySlot};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use pvstack_block::answer::{answer, Disk, Outcome};
use pvstack_block::config::{self, DiskLimits, ID_BYTES};
use pvstack_block::image::DiskImage;

use crate::vhost_features;

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
    /// Where the inflight log of this connection comes from, and the
    /// connection's number there.
    inflight: Arc<InflightSlot>,
    connection: u64,
    /// One exit event per worker thread (= per queue).
    exit_events: Vec<(EventConsumer, EventNotifier)>,
    /// Requests answered with an error status.
    rejected: AtomicU64,
    /// Chains without a usable status byte, returned with nothing written.
    unanswerable: AtomicU64,
    /// Chains returned to the driver.
    served: AtomicU64,
    /// Chains a previous backend took and did not return, served again.
    resubmitted: AtomicU64,
    /// Interrupts raised (call eventfd writes).
    signalled: AtomicU64,
}

impl Drop for Shared {
    /// The connection's totals (`pvstack bench` reads this line).
    fn drop(&mut self) {
        log::info!(
            "served {} requests, raised {} interrupts ({} of the requests left by a previous backend)",
            self.served.load(Ordering::Relaxed),
            self.signalled.load(Ordering::Relaxed),
            self.resubmitted.load(Ordering::Relaxed)
        );
        // The whole count of what the rate-limited lines may have left out.
        let (rejected, unanswerable) = (
            self.rejected.load(Ordering::Relaxed),
            self.unanswerable.load(Ordering::Relaxed),
        );
        if rejected + unanswerable > 0 {
            log::info!("rejected {rejected} requests, returned {unanswerable} chains unanswered");
        }
    }
}

impl BlkBackend {
    /// A backend for one frontend connection, logging inflight requests in
    /// the region that connection's frontend gives `inflight`.
    pub fn new(
        image: Arc<DiskImage>,
        settings: &BlkSettings,
        inflight: Arc<InflightSlot>,
    ) -> io::Result<Self> {
        let limits = DiskLimits {
            capacity_sectors: image.capacity_sectors(),
            readonly: image.is_readonly(),
            max_segments: config::seg_max(settings.queue_size),
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
                connection: inflight.attach(),
                inflight,
                exit_events,
                rejected: AtomicU64::new(0),
                unanswerable: AtomicU64::new(0),
                served: AtomicU64::new(0),
                resubmitted: AtomicU64::new(0),
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
            warn_limited!("queue {queue} kicked before the memory table was set");
            return;
        };
        let region = self.inflight_region();
        let log = region.as_ref().and_then(|region| region.queue(queue));
        if let Some(log) = log.as_ref().filter(|log| log.recovery_due()) {
            self.resubmit(vring, log, &mem.memory(), queue);
        }
        let event_idx = self.shared.event_idx.load(Ordering::Acquire);
        let poll = self.shared.settings.poll;
        loop {
            if event_idx || poll.is_some() {
                if let Err(e) = vring.disable_notification() {
                    warn_limited!("queue {queue}: cannot disable notifications: {e}");
                }
            }
            let (chains, queue_size): (Vec<_>, u16) = {
                let mut state = vring.get_mut();
                let queue_state = state.get_queue_mut();
                let queue_size = queue_state.size();
                match queue_state.iter(mem.memory()) {
                    Ok(iter) => (iter.collect::<Vec<_>>(), queue_size),
                    Err(e) => {
                        warn_limited!("queue {queue}: cannot read the available ring: {e}");
                        return;
                    }
                }
            };
            if !chains.is_empty() {
                if let Some(log) = &log {
                    chains
                        .iter()
                        .for_each(|chain| log.taken(chain.head_index()));
                }
                for chain in chains {
                    let head = chain.head_index();
                    let used_len = self.serve_chain(chain, &mem.memory(), queue_size, queue);
                    self.give_back(vring, log.as_ref(), head, used_len, queue);
                }
                self.signal(vring, queue);
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
                    warn_limited!("queue {queue}: cannot enable notifications: {e}");
                    return;
                }
            }
        }
    }

    /// Returns a served chain to the driver, logging it done.
    fn give_back(
        &self,
        vring: &VringRwLock,
        log: Option<&QueueLog<'_>>,
        head: u16,
        used_len: u32,
        queue: usize,
    ) {
        if let Some(log) = log {
            log.returning(head);
        }
        if let Err(e) = vring.add_used(head, used_len) {
            warn_limited!("queue {queue}: cannot return chain {head}: {e}");
        }
        if let Some(log) = log {
            log.returned(head, vring.get_ref().get_queue().next_used());
        }
        self.shared.served.fetch_add(1, Ordering::Relaxed);
    }

    fn signal(&self, vring: &VringRwLock, queue: usize) {
        if signal_if_needed(vring, queue) {
            self.shared.signalled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Serves again, oldest first, the chains the log says a previous
    /// backend took from this queue and never returned, and moves the
    /// queue past them in the available ring (the frontend restarts a
    /// crashed backend at the used ring's index).
    fn resubmit(
        &self,
        vring: &VringRwLock,
        log: &QueueLog<'_>,
        mem: &GuestMemoryMmap,
        queue: usize,
    ) {
        let used_idx = match vring.queue_used_idx() {
            Ok(idx) => idx,
            Err(e) => {
                warn_limited!("queue {queue}: cannot read the used index to recover: {e}");
                return;
            }
        };
        let heads = match log.recover(used_idx) {
            Ok(heads) => heads,
            Err(why) => {
                warn_limited!("queue {queue}: ignoring the inflight log: {why}");
                return;
            }
        };
        if heads.is_empty() {
            return;
        }
        log::info!(
            "queue {queue}: serving {} requests a previous backend took and did not complete",
            heads.len()
        );
        let (table, size) = {
            let state = vring.get_ref();
            let ring = state.get_queue();
            (GuestAddress(ring.desc_table()), ring.size())
        };
        vring.set_queue_next_avail(used_idx.wrapping_add(heads.len() as u16));
        for head in heads {
            let used_len = match chain_at(mem, table, size, head) {
                Ok(chain) => self.serve_chain(chain, mem, size, queue),
                Err(why) => {
                    let count = self.shared.unanswerable.fetch_add(1, Ordering::Relaxed) + 1;
                    warn_limited!(
                        "queue {queue}: returned a chain unanswered ({count} so far): {why}"
                    );
                    0
                }
            };
            self.give_back(vring, Some(log), head, used_len, queue);
            self.shared.resubmitted.fetch_add(1, Ordering::Relaxed);
        }
        self.signal(vring, queue);
    }

    /// Answers one chain of a queue of `queue_size` entries; returns the
    /// used length.
    fn serve_chain<I>(&self, chain: I, mem: &GuestMemoryMmap, queue_size: u16, queue: usize) -> u32
    where
        I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let shared = &self.shared;
        let disk = Disk {
            image: &shared.image,
            limits: &shared.limits,
            serial: &shared.settings.serial,
        };
        let answer = answer(chain, mem, disk, queue_size);
        match answer.outcome {
            Outcome::Done => {}
            Outcome::Unanswerable(why) => {
                let count = shared.unanswerable.fetch_add(1, Ordering::Relaxed) + 1;
                warn_limited!("queue {queue}: returned a chain unanswered ({count} so far): {why}");
            }
            Outcome::Rejected(rejection) => {
                let count = shared.rejected.fetch_add(1, Ordering::Relaxed) + 1;
                warn_limited!("queue {queue}: rejected a request ({count} so far): {rejection}");
            }
            Outcome::Failed { operation, error } => warn_limited!(
                "queue {queue}: {operation:?} on {} failed: {error}",
                shared.image.path().display()
            ),
        }
        answer.used_len
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.shared.memory.get()
    }

    fn inflight_region(&self) -> Option<Arc<InflightRegion>> {
        self.shared.inflight.region(self.shared.connection)
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
                warn_limited!("queue {queue}: cannot read the available index: {e}");
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
        vhost_features::virtio_features(self.shared.limits.readonly)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        vhost_features::protocol_features()
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
            warn_limited!("queue {thread_id}: unexpected event set {evset:?}");
            return Ok(());
        }
        // Each worker owns exactly one queue: the vring at index 0 of its list.
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(vring, thread_id),
            None => warn_limited!("queue {thread_id}: event for unknown vring {device_event}"),
        }
        Ok(())
    }
}
