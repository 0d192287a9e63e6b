//! The vhost-user virtio-console device (one port, no MULTIPORT): the
//! transmit queue's buffers go to the [`Hub`]; host input fills the
//! receive queue's buffers as they are posted. One worker thread serves
//! both queues and the input event, so each queue has one user.

use std::io;
use std::sync::Arc;

use pvstack_backend_common::{clone_exit_event, signal_if_needed, GuestMemorySlot};
use pvstack_logging::warn_limited;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::hub::Hub;
use crate::stats::ConsoleStats;

/// The receive queue (host to guest).
pub const RX_QUEUE: u16 = 0;
/// The transmit queue (guest to host).
pub const TX_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
/// Largest queue size offered.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// The epoll id of the input event: ids up to the queue count belong to
/// the queues and the exit event.
pub const INPUT_EVENT: u64 = NUM_QUEUES as u64 + 1;
/// `struct virtio_console_config` (cols, rows, max_nr_ports, emerg_wr):
/// all zero, as no feature that gives them meaning is offered.
const CONFIG_SPACE: [u8; 12] = [0; 12];
/// The most output one transmit chain may carry; bytes beyond it are
/// dropped and counted. Drivers write a page or a few at a time (Linux's
/// virtio_console at most 32 KiB per buffer), while a chain may claim up
/// to 4 GiB.
pub const MAX_CHAIN_OUTPUT: usize = 64 * 1024;

/// One connection's console device. Cheap to clone; the hub outlives it.
#[derive(Clone)]
pub struct ConsoleBackend {
    hub: Arc<Hub>,
    stats: Arc<ConsoleStats>,
    memory: Arc<GuestMemorySlot>,
    /// Ends the worker thread when the connection's daemon is dropped.
    exit: Arc<(EventConsumer, EventNotifier)>,
}

impl ConsoleBackend {
    /// A device whose host side is `hub`, counting what it drops in `stats`.
    pub fn new(hub: Arc<Hub>, stats: Arc<ConsoleStats>) -> io::Result<Self> {
        Ok(ConsoleBackend {
            hub,
            stats,
            memory: Arc::default(),
            exit: Arc::new(new_event_consumer_and_notifier(EventFlag::NONBLOCK)?),
        })
    }

    fn memory(&self) -> Option<GuestMemoryMmap> {
        self.memory.get().map(|m| (*m.memory()).clone())
    }

    /// Sends every transmit buffer the guest posted to the hub.
    fn transmit(&self, vring: &VringRwLock, mem: &GuestMemoryMmap) {
        let mut data = Vec::with_capacity(MAX_CHAIN_OUTPUT);
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            data.clear();
            let mut cut = 0;
            for desc in chain.readable() {
                cut += self.gather(&mut data, mem, &desc);
            }
            if cut > 0 {
                self.stats.cut(cut, MAX_CHAIN_OUTPUT);
            }
            // Shown before it is returned: output the guest sees consumed
            // has left this process (or is re-sent after a restart).
            self.hub.output(&data);
            if let Err(e) = vring.add_used(head, 0) {
                warn_limited!("cannot return transmit buffer {head}: {e}");
            }
        }
        signal_if_needed(vring, TX_QUEUE);
    }

    /// Appends what `desc` holds to `data`, up to [`MAX_CHAIN_OUTPUT`] in
    /// all; returns how many of its bytes did not fit. The address is
    /// checked before anything is allocated for it.
    fn gather(&self, data: &mut Vec<u8>, mem: &GuestMemoryMmap, desc: &Descriptor) -> usize {
        let len = desc.len() as usize;
        if !mem.check_range(desc.addr(), len) {
            self.stats.bad_descriptor(desc.addr().0, desc.len());
            return 0;
        }
        let take = len.min(MAX_CHAIN_OUTPUT - data.len());
        let start = data.len();
        data.resize(start + take, 0);
        if let Err(e) = mem.read_slice(&mut data[start..], desc.addr()) {
            // Checked above; only a memory table replaced meanwhile gets here.
            warn_limited!("transmit buffer at {:#x}: {e}", desc.addr().0);
            data.truncate(start);
        }
        len - take
    }

    /// Fills receive buffers with waiting input, as long as both last.
    fn receive(&self, vring: &VringRwLock, mem: &GuestMemoryMmap) {
        let mut filled = false;
        while !self.hub.input().is_empty() {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain.writable() {
                let mut offset = 0u32;
                while offset < desc.len() {
                    let addr = desc.addr().unchecked_add(u64::from(offset));
                    let room = (desc.len() - offset) as usize;
                    let n = self.hub.input().drain_into(|bytes| {
                        let n = bytes.len().min(room);
                        match mem.write_slice(&bytes[..n], addr) {
                            Ok(()) => n,
                            Err(e) => {
                                self.stats.bad_receive_buffer(addr.0, &e);
                                0
                            }
                        }
                    });
                    if n == 0 {
                        break;
                    }
                    offset += n as u32;
                }
                written += offset;
                if offset < desc.len() {
                    break;
                }
            }
            if let Err(e) = vring.add_used(head, written) {
                warn_limited!("cannot return receive buffer {head}: {e}");
            }
            filled = true;
        }
        if filled {
            signal_if_needed(vring, RX_QUEUE);
        }
    }

    /// Serves the transmit queue and, for `receive`, waiting input. Input
    /// that cannot go in yet (no memory table, receive queue not set up)
    /// waits in the hub: the driver's next receive-queue kick, or the
    /// queue being enabled, brings the worker back for it.
    fn serve(&self, vrings: &[VringRwLock], receive: bool, transmit: bool) {
        let Some(mem) = self.memory() else {
            if transmit {
                warn_limited!("transmit queue kicked before the memory table was set");
            }
            return;
        };
        let ready = |queue: u16| {
            vrings.get(usize::from(queue)).filter(|vring| {
                let state = vring.get_ref();
                state.is_enabled() && state.get_queue().ready()
            })
        };
        if transmit {
            if let Some(vring) = ready(TX_QUEUE) {
                self.transmit(vring, &mem);
            }
        }
        if receive {
            // Input waits in the hub until the driver has set the queue up.
            if let Some(vring) = ready(RX_QUEUE) {
                self.receive(vring, &mem);
            }
        }
    }
}

impl VhostUserBackend for ConsoleBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {
        // VIRTIO_RING_F_EVENT_IDX is not offered.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = (offset as usize).min(CONFIG_SPACE.len());
        let end = start.saturating_add(size as usize).min(CONFIG_SPACE.len());
        CONFIG_SPACE[start..end].to_vec()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.memory.set(mem);
        Ok(())
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        clone_exit_event(&self.exit, thread_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        match u64::from(device_event) {
            // The driver posted receive buffers.
            e if e == u64::from(RX_QUEUE) => self.serve(vrings, true, false),
            e if e == INPUT_EVENT => {
                // Cleared whether or not the input can go in now: the
                // eventfd is level-triggered, and left readable it would
                // wake this worker in a loop until the guest is ready.
                self.hub.input().clear_ready();
                self.serve(vrings, true, false);
            }
            e if e == u64::from(TX_QUEUE) => self.serve(vrings, false, true),
            other => warn_limited!("event for unknown source {other}"),
        }
        Ok(())
    }
}
