//! The vhost-user device: receive queue 0 fed from the link, transmit
//! queue 1 drained to it. One worker thread serves both queues and the
//! link's file descriptor, so a frame's path never crosses threads. After
//! draining the transmit queue the worker keeps polling it for an
//! adaptive window (`pvstack_backend_common::poll`) with the guest's
//! transmit kicks off, so a guest sending a stream of frames rarely kicks.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pvstack_backend_common::poll::AdaptivePoll;
use pvstack_backend_common::{avail_pending, clone_exit_event, signal_if_needed, GuestMemorySlot};
use pvstack_net::datapath::{notify_on_more_buffers, receive, transmit, Delivery, RxPending};
use pvstack_net::features;
use pvstack_net::frame::MAX_CHAIN_BYTES;
use pvstack_net::link::Link;
use pvstack_net::stats::NetStats;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Queue indexes (virtio 1.x 5.1.2: receiveq1, transmitq1).
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
pub const NUM_QUEUES: usize = 2;
/// `handle_event`'s id for the link's file descriptor (0..=NUM_QUEUES are
/// the queues' kicks and the exit event).
pub const LINK_EVENT: u64 = NUM_QUEUES as u64 + 1;

/// One connection's network device; the daemon hands clones to its worker.
#[derive(Clone)]
pub struct NetBackend {
    shared: Arc<Shared>,
}

struct Shared {
    link: Arc<Link>,
    queue_size: u16,
    stats: Arc<NetStats>,
    acked: AtomicU64,
    event_idx: AtomicBool,
    memory: GuestMemorySlot,
    exit_event: (EventConsumer, EventNotifier),
    /// A frame read from the link that found no receive buffers yet,
    /// delivered when the driver adds some.
    pending: Mutex<RxPending>,
    /// Scratch space for a frame from the guest.
    tx_buffer: Mutex<Vec<u8>>,
    /// How long the worker polls the transmit queue after draining it.
    tx_poll: Mutex<AdaptivePoll>,
}

impl Drop for Shared {
    /// What polling did on this connection.
    fn drop(&mut self) {
        let poll = self
            .tx_poll
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .report();
        log::info!("connection ended; transmit queue {poll}");
    }
}

impl NetBackend {
    /// `poll_max` bounds the transmit queue's polling window (zero never
    /// polls).
    pub fn new(
        link: Arc<Link>,
        queue_size: u16,
        stats: Arc<NetStats>,
        poll_max: Duration,
    ) -> io::Result<Self> {
        Ok(NetBackend {
            shared: Arc::new(Shared {
                link,
                queue_size,
                stats,
                acked: AtomicU64::new(0),
                event_idx: AtomicBool::new(false),
                memory: GuestMemorySlot::default(),
                exit_event: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
                pending: Mutex::new(RxPending::default()),
                tx_buffer: Mutex::new(vec![0; MAX_CHAIN_BYTES]),
                tx_poll: Mutex::new(AdaptivePoll::new(poll_max)),
            }),
        })
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.shared.memory.get()
    }

    /// Sends every frame the driver queued on the transmit queue, then
    /// polls it for the adaptive window with kicks off; before it returns
    /// it turns kicks back on and looks once more, so no kick is lost with
    /// or without EVENT_IDX.
    fn process_tx(&self, vring: &VringRwLock) {
        let Some(atomic) = self.memory() else {
            log::warn!("transmit queue kicked before the memory table was set");
            return;
        };
        let mem = atomic.memory();
        let event_idx = self.shared.event_idx.load(Ordering::Acquire);
        let mut scratch = self
            .shared
            .tx_buffer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut poll = self
            .shared
            .tx_poll
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        poll.woke();
        // Without EVENT_IDX and without polling, kicks stay on throughout.
        let toggle = event_idx || !poll.max().is_zero();
        if toggle {
            set_tx_notification(vring, false);
        }
        loop {
            let sent = transmit(
                vring.get_mut().get_queue_mut(),
                &*mem,
                &self.shared.link,
                &mut scratch,
                &self.shared.stats,
            );
            if sent {
                signal_if_needed(vring, TX_QUEUE);
                continue;
            }
            if poll.poll(|| avail_pending(vring, &mem, TX_QUEUE)) {
                continue;
            }
            if !toggle {
                return;
            }
            // Kicks on, then one more look (afresh: a stopped queue has
            // nothing to take).
            set_tx_notification(vring, true);
            if !avail_pending(vring, &mem, TX_QUEUE) {
                return;
            }
            set_tx_notification(vring, false);
        }
    }

    /// Moves frames from the link into the receive queue until the link
    /// has none or the driver's buffers run out.
    fn process_rx(&self, vring: &VringRwLock) {
        let Some(atomic) = self.memory() else {
            return;
        };
        let mem = atomic.memory();
        {
            let state = vring.get_ref();
            if !state.is_enabled() || !state.get_queue().ready() {
                return;
            }
        }
        let event_idx = self.shared.event_idx.load(Ordering::Acquire);
        let mergeable = features::mergeable_rx(self.shared.acked.load(Ordering::Acquire));
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            let (returned, outcome) = receive(
                vring.get_mut().get_queue_mut(),
                &*mem,
                &self.shared.link,
                &mut pending,
                mergeable,
                &self.shared.stats,
            );
            if returned {
                signal_if_needed(vring, RX_QUEUE);
            }
            let Delivery::NoBuffers { posted } = outcome else {
                return;
            };
            // Out of buffers: ask for a kick when the driver adds some
            // (they may already have come). Without EVENT_IDX kicks on
            // this queue are never turned off.
            if !event_idx {
                return;
            }
            let more = notify_on_more_buffers(vring.get_mut().get_queue_mut(), &*mem, posted);
            if !matches!(more, Ok(true)) {
                return;
            }
        }
    }
}

/// Turns the driver's transmit kicks on or off.
fn set_tx_notification(vring: &VringRwLock, on: bool) {
    let result = if on {
        vring.enable_notification().map(|_| ())
    } else {
        vring.disable_notification()
    };
    if let Err(e) = result {
        log::warn!("transmit queue: cannot change notifications: {e}");
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shared.queue_size)
    }

    fn features(&self) -> u64 {
        features::offered(self.shared.link.offloads())
    }

    fn acked_features(&self, acked: u64) {
        self.shared.acked.store(acked, Ordering::Release);
        let flags = features::tun_offload_flags(acked);
        match self.shared.link.set_offload(flags) {
            Ok(()) => log::info!(
                "driver accepted features {acked:#x}; {} offloads {flags:#x}",
                self.shared.link.describe()
            ),
            Err(e) => log::error!(
                "cannot set offloads {flags:#x} on {}: {e}; large frames to the guest will fail",
                self.shared.link.describe()
            ),
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        features::protocol()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Release);
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.shared.memory.set(mem);
        Ok(())
    }

    /// Both queues and the link in one worker.
    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << NUM_QUEUES) - 1]
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        clone_exit_event(&self.shared.exit_event, thread_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            log::warn!("event {device_event}: unexpected event set {evset:?}");
            return Ok(());
        }
        let (Some(rx), Some(tx)) = (
            vrings.get(usize::from(RX_QUEUE)),
            vrings.get(usize::from(TX_QUEUE)),
        ) else {
            return Ok(());
        };
        match u64::from(device_event) {
            e if e == u64::from(RX_QUEUE) || e == LINK_EVENT => self.process_rx(rx),
            e if e == u64::from(TX_QUEUE) => {
                self.process_tx(tx);
                // Replies to what was just sent may already wait.
                self.process_rx(rx);
            }
            _ => log::warn!("event for unknown source {device_event}"),
        }
        Ok(())
    }
}
