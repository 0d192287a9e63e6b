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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::hub::Sink;

    const MEM_SIZE: usize = 0x20_0000;
    const QUEUE_SIZE: u16 = 16;
    /// Buffers sit above the rings the mock queue puts at address 0.
    const BUF: u64 = 0x10_0000;

    /// A sink that keeps what the hub shows.
    struct Collect(Arc<Mutex<Vec<u8>>>);

    impl Sink for Collect {
        fn write(&mut self, bytes: &[u8]) -> bool {
            self.0.lock().unwrap().extend_from_slice(bytes);
            true
        }
        fn name(&self) -> String {
            "test sink".into()
        }
    }

    /// A console backend with guest memory, one ready queue at `queue`
    /// (the other index unset), and what its hub shows.
    struct Scene {
        mem: GuestMemoryMmap,
        backend: ConsoleBackend,
        stats: Arc<ConsoleStats>,
        shown: Arc<Mutex<Vec<u8>>>,
    }

    impl Scene {
        fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let hub = Arc::new(Hub::new(None).unwrap());
            let shown = Arc::new(Mutex::new(Vec::new()));
            hub.attach(Box::new(Collect(shown.clone())), false);
            let stats = Arc::new(ConsoleStats::default());
            let backend = ConsoleBackend::new(hub, stats.clone()).unwrap();
            backend
                .update_memory(GuestMemoryAtomic::new(mem.clone()))
                .unwrap();
            Scene {
                mem,
                backend,
                stats,
                shown,
            }
        }

        /// Both vrings; `queue`'s is ready on `mock`'s rings.
        fn vrings(&self, queue: u16, mock: &MockSplitQueue<GuestMemoryMmap>) -> Vec<VringRwLock> {
            let vrings: Vec<VringRwLock> = (0..NUM_QUEUES)
                .map(|_| {
                    VringRwLock::new(GuestMemoryAtomic::new(self.mem.clone()), QUEUE_SIZE).unwrap()
                })
                .collect();
            let vring = &vrings[usize::from(queue)];
            vring.set_queue_size(QUEUE_SIZE);
            vring
                .set_queue_info(
                    mock.desc_table_addr().0,
                    mock.avail_addr().0,
                    mock.used_addr().0,
                )
                .unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            vrings
        }

        fn kick(&self, queue: u16, vrings: &[VringRwLock]) {
            self.backend
                .handle_event(queue, EventSet::IN, vrings, 0)
                .unwrap();
        }

        fn shown(&self) -> Vec<u8> {
            self.shown.lock().unwrap().clone()
        }
    }

    /// Descriptors `(addr, len)` as chains of `lens` descriptors each,
    /// device-writable with `writable`.
    fn chains(descs: &[(u64, u32)], lens: &[usize], writable: bool) -> Vec<RawDescriptor> {
        let mut raw = Vec::new();
        let mut at = 0;
        for &len in lens {
            for i in 0..len {
                let (addr, size) = descs[at + i];
                let next = i + 1 < len;
                let flags = if writable { VRING_DESC_F_WRITE } else { 0 }
                    | if next { VRING_DESC_F_NEXT } else { 0 };
                let index = (at + i + 1) as u16;
                raw.push(RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    size,
                    flags as u16,
                    if next { index } else { 0 },
                )));
            }
            at += len;
        }
        raw
    }

    /// The used ring's entries as `(head, len)`.
    fn used(mock: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let count = mock.used().idx().load();
        (0..count)
            .map(|i| {
                let elem = mock.used().ring().ref_at(usize::from(i)).unwrap().load();
                (elem.id(), elem.len())
            })
            .collect()
    }

    #[test]
    fn transmit_chains_reach_the_host_in_order_and_are_returned() {
        let scene = Scene::new();
        scene
            .mem
            .write_slice(b"hello, ", GuestAddress(BUF))
            .unwrap();
        scene
            .mem
            .write_slice(b"world", GuestAddress(BUF + 0x100))
            .unwrap();
        scene
            .mem
            .write_slice(b"!\n", GuestAddress(BUF + 0x200))
            .unwrap();
        let mock = MockSplitQueue::new(&scene.mem, QUEUE_SIZE);
        let descs = [(BUF, 7), (BUF + 0x100, 5), (BUF + 0x200, 2)];
        mock.add_desc_chains(&chains(&descs, &[2, 1], false), 0)
            .unwrap();
        let vrings = scene.vrings(TX_QUEUE, &mock);
        scene.kick(TX_QUEUE, &vrings);
        assert_eq!(scene.shown(), b"hello, world!\n");
        assert_eq!(used(&mock), [(0, 0), (2, 0)]);
    }

    #[test]
    fn transmit_skips_descriptors_outside_memory_and_cuts_oversize_chains() {
        let scene = Scene::new();
        scene.mem.write_slice(b"kept\n", GuestAddress(BUF)).unwrap();
        let big = vec![b'x'; MAX_CHAIN_OUTPUT + 100];
        scene
            .mem
            .write_slice(&big, GuestAddress(BUF + 0x1000))
            .unwrap();
        let mock = MockSplitQueue::new(&scene.mem, QUEUE_SIZE);
        let descs = [
            // A chain whose second descriptor lies past the end of guest
            // memory: skipped, the rest shown.
            (BUF, 5),
            (MEM_SIZE as u64 + 0x1000, 64),
            // A chain longer than one chain may show.
            (BUF + 0x1000, big.len() as u32),
        ];
        mock.add_desc_chains(&chains(&descs, &[2, 1], false), 0)
            .unwrap();
        let vrings = scene.vrings(TX_QUEUE, &mock);
        scene.kick(TX_QUEUE, &vrings);
        let shown = scene.shown();
        assert_eq!(&shown[..5], b"kept\n");
        assert_eq!(shown.len(), 5 + MAX_CHAIN_OUTPUT);
        assert_eq!(used(&mock), [(0, 0), (2, 0)], "both chains returned");
        let summary = scene.stats.summary(MAX_CHAIN_OUTPUT);
        assert!(summary.contains("guest output: 100 bytes"), "{summary}");
        assert!(summary.contains("1 descriptors outside"), "{summary}");
    }

    #[test]
    fn input_fills_receive_buffers_across_chains() {
        let scene = Scene::new();
        scene.backend.hub.input().push(b"hello");
        let mock = MockSplitQueue::new(&scene.mem, QUEUE_SIZE);
        // A 3-byte buffer, then a chain of a 1-byte and an 8-byte buffer.
        let descs = [(BUF, 3), (BUF + 0x100, 1), (BUF + 0x200, 8)];
        mock.add_desc_chains(&chains(&descs, &[1, 2], true), 0)
            .unwrap();
        let vrings = scene.vrings(RX_QUEUE, &mock);
        scene.kick(RX_QUEUE, &vrings);
        assert_eq!(used(&mock), [(0, 3), (1, 2)]);
        let mut got = [0u8; 3];
        scene.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(&got, b"hel");
        let mut got = [0u8; 1];
        scene
            .mem
            .read_slice(&mut got, GuestAddress(BUF + 0x100))
            .unwrap();
        assert_eq!(&got, b"l");
        scene
            .mem
            .read_slice(&mut got, GuestAddress(BUF + 0x200))
            .unwrap();
        assert_eq!(&got, b"o");
        assert!(scene.backend.hub.input().is_empty());
    }

    #[test]
    fn input_waits_when_the_receive_buffer_is_outside_memory() {
        let scene = Scene::new();
        scene.backend.hub.input().push(b"kept");
        let mock = MockSplitQueue::new(&scene.mem, QUEUE_SIZE);
        let descs = [(MEM_SIZE as u64 + 0x1000, 16)];
        mock.add_desc_chains(&chains(&descs, &[1], true), 0)
            .unwrap();
        let vrings = scene.vrings(RX_QUEUE, &mock);
        scene.kick(RX_QUEUE, &vrings);
        assert_eq!(used(&mock), [(0, 0)], "the bad buffer returned empty");
        assert!(
            !scene.backend.hub.input().is_empty(),
            "input is not lost to a bad buffer"
        );
        let summary = scene.stats.summary(MAX_CHAIN_OUTPUT);
        assert!(summary.contains("1 receive buffers unusable"), "{summary}");
    }

    #[test]
    fn output_waits_for_the_memory_table() {
        let hub = Arc::new(Hub::new(None).unwrap());
        let backend = ConsoleBackend::new(hub, Arc::default()).unwrap();
        // No memory table yet: nothing to read the rings with, no panic.
        backend
            .handle_event(TX_QUEUE, EventSet::IN, &[], 0)
            .unwrap();
    }
}
