//! The vhost-user device: receive queue 0 fed from the link, transmit
//! queue 1 drained to it. One worker thread serves both queues and the
//! link's file descriptor, so a frame's path never crosses threads.

use std::io;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::features;
use crate::frame::{check_chain_len, BadFrame, MAX_CHAIN_BYTES, NUM_BUFFERS_OFFSET, VNET_HDR_LEN};
use crate::link::Link;
use crate::stats::NetStats;

/// Queue indexes (virtio 1.x 5.1.2: receiveq1, transmitq1).
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
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
    memory: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    exit_event: (EventConsumer, EventNotifier),
    /// A frame read from the link that found no receive buffers yet,
    /// delivered when the driver adds some (`pending_len` 0: none).
    pending: Mutex<Pending>,
    /// Scratch space for a frame from the guest.
    tx_buffer: Mutex<Vec<u8>>,
}

struct Pending {
    buffer: Vec<u8>,
    len: usize,
}

/// What became of a frame offered to the receive queue.
enum Delivery {
    /// Written into the driver's buffers.
    Delivered,
    /// Not enough receive buffers; the frame waits.
    NoBuffers,
    /// Dropped: the driver's buffers cannot hold it (or are broken).
    Dropped,
}

impl NetBackend {
    pub fn new(link: Arc<Link>, queue_size: u16, stats: Arc<NetStats>) -> io::Result<Self> {
        Ok(NetBackend {
            shared: Arc::new(Shared {
                link,
                queue_size,
                stats,
                acked: AtomicU64::new(0),
                event_idx: AtomicBool::new(false),
                memory: RwLock::new(None),
                exit_event: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
                pending: Mutex::new(Pending {
                    buffer: vec![0; MAX_CHAIN_BYTES],
                    len: 0,
                }),
                tx_buffer: Mutex::new(vec![0; MAX_CHAIN_BYTES]),
            }),
        })
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.shared
            .memory
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sends every frame the driver queued on the transmit queue.
    fn process_tx(&self, vring: &VringRwLock) {
        let Some(atomic) = self.memory() else {
            log::warn!("transmit queue kicked before the memory table was set");
            return;
        };
        let mem = atomic.memory();
        let event_idx = self.shared.event_idx.load(Ordering::Acquire);
        let mut state = vring.get_mut();
        let mut buffer = self
            .shared
            .tx_buffer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if event_idx {
                if let Err(e) = state.disable_notification() {
                    log::warn!("transmit queue: cannot disable notifications: {e}");
                }
            }
            let mut sent_any = false;
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                let head = chain.head_index();
                match gather(chain, &mem, &mut buffer) {
                    Ok(len) => {
                        if let Err(e) = self.shared.link.send(&buffer[..len]) {
                            self.shared.stats.tx_link_error(&e);
                        } else {
                            self.shared.stats.tx_frame(len - VNET_HDR_LEN);
                        }
                    }
                    Err(bad) => self.shared.stats.tx_bad(head, bad),
                }
                if let Err(e) = state.add_used(head, 0) {
                    log::warn!("transmit queue: cannot return chain {head}: {e}");
                }
                sent_any = true;
            }
            if sent_any {
                signal_if_needed(&mut state, "transmit");
            }
            if !event_idx {
                return;
            }
            match state.enable_notification() {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    log::warn!("transmit queue: cannot enable notifications: {e}");
                    return;
                }
            }
        }
    }

    /// Moves frames from the link into the receive queue until the link
    /// has none or the driver's buffers run out.
    fn process_rx(&self, vring: &VringRwLock) {
        let Some(atomic) = self.memory() else {
            return;
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return;
        }
        let event_idx = self.shared.event_idx.load(Ordering::Acquire);
        let mergeable = features::mergeable_rx(self.shared.acked.load(Ordering::Acquire));
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut delivered_any = false;
        loop {
            if pending.len == 0 {
                let Pending { buffer, len } = &mut *pending;
                match self.shared.link.recv(buffer) {
                    Ok(Some(n)) if n > VNET_HDR_LEN => *len = n,
                    Ok(Some(n)) => {
                        log::warn!(
                            "dropped a {n}-byte frame from {}",
                            self.shared.link.describe()
                        );
                        continue;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log::warn!("cannot read from {}: {e}", self.shared.link.describe());
                        break;
                    }
                }
            }
            let len = pending.len;
            let frame = &mut pending.buffer[..len];
            match deliver(&mut state, &mem, frame, mergeable, &self.shared.stats) {
                Delivery::Delivered => {
                    self.shared.stats.rx_frame(len - VNET_HDR_LEN);
                    pending.len = 0;
                    delivered_any = true;
                }
                Delivery::Dropped => {
                    self.shared.stats.rx_dropped();
                    pending.len = 0;
                    delivered_any = true;
                }
                Delivery::NoBuffers => {
                    // Ask for a kick when buffers come; they may already have.
                    if event_idx && matches!(state.enable_notification(), Ok(true)) {
                        continue;
                    }
                    break;
                }
            }
        }
        if delivered_any {
            signal_if_needed(&mut state, "receive");
        }
    }
}

fn signal_if_needed(state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>, queue: &str) {
    match state.needs_notification() {
        Ok(true) => {
            if let Err(e) = state.signal_used_queue() {
                log::warn!("{queue} queue: cannot signal the driver: {e}");
            }
        }
        Ok(false) => {}
        Err(e) => log::warn!("{queue} queue: cannot read the used event: {e}"),
    }
}

/// Copies a transmit chain (header + frame) into `buffer`, checking every
/// descriptor; returns the length.
fn gather<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    buffer: &mut [u8],
) -> Result<usize, BadFrame>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mut len = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err(BadFrame::WriteOnlyDescriptor);
        }
        let desc_len = desc.len() as usize;
        let end = len + desc_len;
        if end > buffer.len() {
            return Err(BadFrame::TooLong(end));
        }
        mem.read_slice(&mut buffer[len..end], desc.addr())
            .map_err(|_| outside(&desc))?;
        len = end;
    }
    check_chain_len(len)?;
    Ok(len)
}

fn outside(desc: &Descriptor) -> BadFrame {
    BadFrame::OutsideMemory {
        addr: desc.addr().0,
        len: desc.len(),
    }
}

/// Writes `frame` (header + frame) into receive chains: one chain, or with
/// MRG_RXBUF as many as it takes, recording their count in the header's
/// `num_buffers`.
fn deliver(
    state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
    mem: &vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap>,
    frame: &mut [u8],
    mergeable: bool,
    stats: &NetStats,
) -> Delivery {
    let start = state.get_queue().next_avail();
    // Filled in below when the frame spans several chains.
    frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
    let mut used: Vec<(u16, u32)> = Vec::new();
    let mut num_buffers_at: Option<GuestAddress> = None;
    let mut written = 0usize;
    let mut broken = false;
    while written < frame.len() {
        if !mergeable && !used.is_empty() {
            break;
        }
        let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
            state.get_queue_mut().set_next_avail(start);
            return Delivery::NoBuffers;
        };
        let head = chain.head_index();
        let mut chain_len = 0u32;
        for desc in chain {
            if written == frame.len() {
                break;
            }
            if !desc.is_write_only() {
                broken = true;
                break;
            }
            let n = (desc.len() as usize).min(frame.len() - written);
            if mem
                .write_slice(&frame[written..written + n], desc.addr())
                .is_err()
            {
                broken = true;
                break;
            }
            if written <= NUM_BUFFERS_OFFSET && NUM_BUFFERS_OFFSET + 2 <= written + n {
                num_buffers_at = Some(GuestAddress(
                    desc.addr().0 + (NUM_BUFFERS_OFFSET - written) as u64,
                ));
            }
            written += n;
            chain_len += n as u32;
        }
        used.push((head, chain_len));
        if broken {
            stats.rx_bad_buffer(head);
            break;
        }
    }
    let complete = written == frame.len() && !broken;
    if complete && used.len() > 1 {
        match num_buffers_at {
            Some(addr) => {
                let count = used.len() as u16;
                if mem.write_obj(count.to_le(), addr).is_err() {
                    stats.rx_bad_buffer(used[0].0);
                }
            }
            // The header itself was split across descriptors: unusual
            // enough to drop rather than patch byte by byte.
            None => return finish(state, &used, false),
        }
    }
    finish(state, &used, complete)
}

/// Returns the chains used for one frame: with their lengths if it was
/// delivered, empty if it was dropped.
fn finish(
    state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
    used: &[(u16, u32)],
    complete: bool,
) -> Delivery {
    for &(head, len) in used {
        let len = if complete { len } else { 0 };
        if let Err(e) = state.add_used(head, len) {
            log::warn!("receive queue: cannot return chain {head}: {e}");
        }
    }
    if complete {
        Delivery::Delivered
    } else {
        Delivery::Dropped
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
        *self
            .shared
            .memory
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(mem);
        Ok(())
    }

    /// Both queues and the link in one worker.
    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << NUM_QUEUES) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = &self.shared.exit_event;
        match (consumer.try_clone(), notifier.try_clone()) {
            (Ok(c), Ok(n)) => Some((c, n)),
            (Err(e), _) | (_, Err(e)) => {
                log::error!("cannot clone the worker's exit event: {e}");
                None
            }
        }
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
