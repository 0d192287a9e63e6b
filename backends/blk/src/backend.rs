//! The vhost-user device: what the frontend negotiates, and the per-queue
//! workers that take descriptor chains from the ring, have an engine
//! (`crate::engine`) carry them out and return them as they finish,
//! polling adaptively (`pvstack_backend_common::poll`) before they sleep.

use pvstack_logging::warn_limited;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use pvstack_backend_common::inflight::{chain_at, InflightRegion, InflightSlot, QueueLog};
use pvstack_backend_common::poll::{AdaptivePoll, PollReport};
use pvstack_backend_common::{avail_pending, clone_exit_event, signal_if_needed, GuestMemorySlot};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use pvstack_block::chain::{look, Looked, Outcome};
use pvstack_block::config::{self, DiskLimits, ID_BYTES};
use pvstack_block::image::DiskImage;

use crate::engine::{new_engine, Engine, EngineDisk, EngineKind, Finished, Job};
use crate::vhost_features;

/// Settings from the command line that shape the device.
#[derive(Debug, Clone)]
pub struct BlkSettings {
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: [u8; ID_BYTES],
    /// What carries out each queue's requests.
    pub engine: EngineKind,
    /// The bound of each worker's adaptive polling window (`--poll-us`);
    /// zero never polls.
    pub poll_max: Duration,
}

/// `handle_event`'s id for a worker's engine completions (0 is the
/// worker's queue, `num_queues` the daemon's exit and enable events).
fn completion_event(num_queues: u16) -> u64 {
    u64::from(num_queues) + 1
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
    /// What each queue's worker keeps between events.
    workers: Vec<Mutex<QueueWorker>>,
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

/// One queue's engine and polling state, used by its worker thread (and
/// by the daemon's thread when it stops the queue).
struct QueueWorker {
    engine: Box<dyn Engine>,
    poll: AdaptivePoll,
    /// The queue's vring, once its worker has seen it: stopping the queue
    /// returns what is still in flight there.
    vring: Option<VringRwLock>,
    /// Scratch list of finished requests.
    finished: Vec<Finished>,
}

impl Drop for Shared {
    /// The connection's totals (`pvstack bench` reads this line; fields
    /// are only ever appended).
    fn drop(&mut self) {
        let poll = self
            .workers
            .iter()
            .map(|worker| lock(worker).poll.report())
            .reduce(PollReport::merge)
            .unwrap_or_default();
        log::info!(
            "served {} requests, raised {} interrupts ({} of the requests left by a previous backend); engine {}, {poll}",
            self.served.load(Ordering::Relaxed),
            self.signalled.load(Ordering::Relaxed),
            self.resubmitted.load(Ordering::Relaxed),
            self.settings.engine,
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

/// A worker's state, whatever a panicking holder left (its fields stay
/// consistent: each is updated whole).
fn lock(worker: &Mutex<QueueWorker>) -> MutexGuard<'_, QueueWorker> {
    worker.lock().unwrap_or_else(PoisonError::into_inner)
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
        let disk = EngineDisk {
            image: Arc::clone(&image),
            serial: settings.serial,
        };
        let workers = (0..settings.num_queues)
            .map(|_| {
                Ok(Mutex::new(QueueWorker {
                    engine: new_engine(settings.engine, &disk, settings.queue_size)?,
                    poll: AdaptivePoll::new(settings.poll_max),
                    vring: None,
                    finished: Vec::new(),
                }))
            })
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
                workers,
                rejected: AtomicU64::new(0),
                unanswerable: AtomicU64::new(0),
                served: AtomicU64::new(0),
                resubmitted: AtomicU64::new(0),
                signalled: AtomicU64::new(0),
            }),
        })
    }

    /// Registers each queue's engine completions with the epoll of the
    /// daemon's worker for that queue, so a worker sleeps on its kick and
    /// its completions alike.
    pub fn register_completions(&self, daemon: &VhostUserDaemon<BlkBackend>) -> io::Result<()> {
        let handlers = daemon.get_epoll_handlers();
        let event = completion_event(self.shared.settings.num_queues);
        for (queue, (worker, handler)) in self.shared.workers.iter().zip(&handlers).enumerate() {
            if let Some(fd) = lock(worker).engine.completion_fd() {
                handler
                    .register_listener(fd, EventSet::IN, event)
                    .map_err(|e| {
                        io::Error::other(format!(
                            "queue {queue}: cannot watch the engine's completions: {e}"
                        ))
                    })?;
            }
        }
        Ok(())
    }

    /// Serves queue `queue` after a kick or a completion until there is
    /// nothing to do: takes every available chain (as many as the engine
    /// has room for) and hands it to the engine, returns what the engine
    /// finished, and polls the ring and the engine for the adaptive
    /// window with guest kicks and completion wake-ups off
    /// (VRING_USED_F_NO_NOTIFY, or a stale avail_event with EVENT_IDX).
    /// Before it sleeps it turns both back on and looks once more, so no
    /// kick and no completion is missed.
    fn serve_queue(&self, vring: &VringRwLock, queue: usize) {
        let Some(memory) = self.memory() else {
            warn_limited!("queue {queue}: kicked before the memory table was set");
            return;
        };
        let Some(worker) = self.shared.workers.get(queue) else {
            return;
        };
        let mut worker = lock(worker);
        let worker = &mut *worker;
        worker.vring.get_or_insert_with(|| vring.clone());
        worker.poll.woke();
        let region = self.inflight_region();
        let log = region.as_ref().and_then(|region| region.queue(queue));
        if let Some(log) = log.as_ref().filter(|log| log.recovery_due()) {
            self.resubmit(vring, worker, log, &memory.memory().into_inner(), queue);
        }
        worker.engine.notify_completions(false);
        worker.engine.consume_completion_signal();
        self.set_notification(vring, false, queue);
        loop {
            let took = self.take_available(vring, worker, log.as_ref(), &memory, queue);
            let returned = self.return_finished(vring, worker, log.as_ref(), queue, false);
            if took || returned {
                continue;
            }
            let QueueWorker { engine, poll, .. } = &mut *worker;
            let mem = memory.memory();
            // Work: a finished request, or a chain the engine has room for.
            let work = |engine: &mut Box<dyn Engine>| {
                engine.has_finished() || (engine.room() > 0 && avail_pending(vring, &mem, queue))
            };
            if poll.poll(|| work(engine)) {
                continue;
            }
            // Going to sleep: wake-ups on, then one more look (the ring is
            // looked at afresh: a stopped queue has nothing to take).
            engine.notify_completions(true);
            self.set_notification(vring, true, queue);
            if work(engine) {
                engine.notify_completions(false);
                self.set_notification(vring, false, queue);
                continue;
            }
            return;
        }
    }

    /// Turns guest kicks on or off.
    fn set_notification(&self, vring: &VringRwLock, on: bool, queue: usize) {
        let result = if on {
            vring.enable_notification().map(|_| ())
        } else {
            vring.disable_notification()
        };
        if let Err(e) = result {
            warn_limited!("queue {queue}: cannot change notifications: {e}");
        }
    }

    /// Takes the available chains (no more than the engine has room for)
    /// and starts them; returns whether it took any.
    fn take_available(
        &self,
        vring: &VringRwLock,
        worker: &mut QueueWorker,
        log: Option<&QueueLog<'_>>,
        memory: &GuestMemoryAtomic<GuestMemoryMmap>,
        queue: usize,
    ) -> bool {
        let room = worker.engine.room();
        if room == 0 {
            return false;
        }
        let mem = memory.memory().into_inner();
        let (chains, queue_size) = {
            let mut state = vring.get_mut();
            if !state.is_enabled() || !state.get_queue().ready() {
                return false;
            }
            let ring = state.get_queue_mut();
            let queue_size = ring.size();
            match ring.iter(Arc::clone(&mem)) {
                Ok(iter) => (iter.take(room).collect::<Vec<_>>(), queue_size),
                Err(e) => {
                    warn_limited!("queue {queue}: cannot read the available ring: {e}");
                    return false;
                }
            }
        };
        if chains.is_empty() {
            return false;
        }
        if let Some(log) = log {
            chains
                .iter()
                .for_each(|chain| log.taken(chain.head_index()));
        }
        for chain in chains {
            let head = chain.head_index();
            self.start(vring, worker, log, head, chain, &mem, queue_size, queue);
        }
        true
    }

    /// Checks the chain at `head` and gives it to the engine, or returns
    /// it at once if it is refused.
    #[allow(clippy::too_many_arguments)]
    fn start<I>(
        &self,
        vring: &VringRwLock,
        worker: &mut QueueWorker,
        log: Option<&QueueLog<'_>>,
        head: u16,
        chain: I,
        mem: &Arc<GuestMemoryMmap>,
        queue_size: u16,
        queue: usize,
    ) where
        I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        match look(chain, mem, &self.shared.limits, queue_size) {
            Looked::Answered(answer) => {
                self.account(answer.outcome, queue);
                self.give_back(vring, log, head, answer.used_len, queue);
            }
            Looked::Run { operation, status } => worker.engine.submit(Job {
                head,
                operation,
                status,
                memory: Arc::clone(mem),
            }),
        }
    }

    /// Returns to the used ring what the engine finished (with `wait`,
    /// waiting for at least one if any is in flight) and signals the
    /// driver; returns whether anything was returned.
    fn return_finished(
        &self,
        vring: &VringRwLock,
        worker: &mut QueueWorker,
        log: Option<&QueueLog<'_>>,
        queue: usize,
        wait: bool,
    ) -> bool {
        worker.engine.reap(&mut worker.finished, wait);
        if worker.finished.is_empty() {
            return false;
        }
        for finished in worker.finished.drain(..) {
            self.account(finished.answer.outcome, queue);
            self.give_back(vring, log, finished.head, finished.answer.used_len, queue);
        }
        self.signal(vring, queue);
        true
    }

    /// Counts and logs how a request ended.
    fn account(&self, outcome: Outcome, queue: usize) {
        let shared = &self.shared;
        match outcome {
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

    /// Starts again, oldest first, the chains the log says a previous
    /// backend took from this queue and never returned, and moves the
    /// queue past them in the available ring (the frontend restarts a
    /// crashed backend at the used ring's index). They finish, in any
    /// order, like any other request.
    fn resubmit(
        &self,
        vring: &VringRwLock,
        worker: &mut QueueWorker,
        log: &QueueLog<'_>,
        mem: &Arc<GuestMemoryMmap>,
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
        self.shared
            .resubmitted
            .fetch_add(heads.len() as u64, Ordering::Relaxed);
        for head in heads {
            match chain_at(mem, table, size, head) {
                Ok(chain) => self.start(vring, worker, Some(log), head, chain, mem, size, queue),
                Err(why) => {
                    let count = self.shared.unanswerable.fetch_add(1, Ordering::Relaxed) + 1;
                    warn_limited!(
                        "queue {queue}: returned a chain unanswered ({count} so far): {why}"
                    );
                    self.give_back(vring, Some(log), head, 0, queue);
                }
            }
        }
        self.signal(vring, queue);
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.shared.memory.get()
    }

    fn inflight_region(&self) -> Option<Arc<InflightRegion>> {
        self.shared.inflight.region(self.shared.connection)
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

    /// Returns, before the daemon answers GET_VRING_BASE, every request
    /// the queue's engine still has in flight, so the frontend finds the
    /// used ring caught up with the base it is given.
    fn stop_vring(&self, index: u32) -> io::Result<()> {
        let queue = index as usize;
        let Some(worker) = self.shared.workers.get(queue) else {
            return Ok(());
        };
        let mut worker = lock(worker);
        let worker = &mut *worker;
        let Some(vring) = worker.vring.clone() else {
            return Ok(());
        };
        let region = self.inflight_region();
        let log = region.as_ref().and_then(|region| region.queue(queue));
        while worker.engine.in_flight() > 0 {
            self.return_finished(&vring, worker, log.as_ref(), queue, true);
        }
        Ok(())
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
        // Each worker owns exactly one queue: the vring at index 0 of its
        // list; its kick is event 0, its engine's completions another.
        let known = device_event == 0
            || u64::from(device_event) == completion_event(self.shared.settings.num_queues);
        match vrings.first() {
            Some(vring) if known => self.serve_queue(vring, thread_id),
            _ => warn_limited!("queue {thread_id}: event for unknown source {device_event}"),
        }
        Ok(())
    }
}
