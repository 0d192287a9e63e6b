//! `mode=emulated`: virtio-net over virtio-mmio with its queues processed
//! inside the VMM, the baseline pvstack-net is measured against.
//! QueueNotify is not bound to an ioeventfd, so every kick exits to the
//! VMM and the vCPU thread that took the exit serves the queue; frames
//! arriving on the TAP (which the VMM opens itself) are put in the receive
//! queue by a VMM thread. Frames are moved by `pvstack_net::datapath`, the
//! code pvstack-net runs, so the two modes differ only in where the queues
//! are processed.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use log::info;
use pvstack_logging::warn_limited;
use pvstack_net::datapath::{notify_on_more_buffers, receive, transmit, Delivery, RxPending};
use pvstack_net::features as backend_features;
use pvstack_net::frame::MAX_CHAIN_BYTES;
use pvstack_net::link::Link;
use pvstack_net::stats::NetStats;
use pvstack_net::tap::Tap;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};
use crate::virtio::{clone_eventfd, read_config_bytes, Activation, QueueConfig, VirtioDevice};

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;

/// The queues while the driver runs the device.
struct Running {
    rx: Queue,
    tx: Queue,
    call: EventFd,
    mergeable: bool,
    pending: RxPending,
    scratch: Vec<u8>,
}

/// What the vCPU threads and the receive thread share.
struct Shared {
    name: String,
    memory: GuestMemoryMmap,
    link: Link,
    stats: NetStats,
    running: Mutex<Option<Running>>,
    /// The receive queue ran out of buffers: the receive thread waits for
    /// the driver's next receive kick instead of watching the TAP.
    rx_blocked: AtomicBool,
    /// Wakes the receive thread (a receive kick, or the end).
    wake: EventFd,
    stop: AtomicBool,
}

/// virtio-net served inside the VMM.
pub struct EmulatedNet {
    features: u64,
    config: Vec<u8>,
    queue_max_sizes: Vec<u16>,
    shared: Arc<Shared>,
    rx_thread: Option<JoinHandle<()>>,
}

impl EmulatedNet {
    /// A NIC on TAP `tap` (opened, or created, by the VMM) with the
    /// features of pvstack-net on that TAP that `passed_on` lets through,
    /// queues of up to `queue_size` and configuration space `config`.
    pub fn new(
        name: String,
        tap: &str,
        passed_on: u64,
        queue_size: u16,
        config: Vec<u8>,
        memory: GuestMemoryMmap,
    ) -> Result<Self> {
        let tap = Tap::open(tap).map_err(|e| Error::InvalidOption {
            option: "net",
            value: format!("tap={tap}"),
            reason: e.to_string(),
        })?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
            what: format!("{name} receive wake-ups"),
            cause: source,
        })?;
        let link = Link::Tap(tap);
        let features = backend_features::offered(link.offloads()) & passed_on;
        let shared = Arc::new(Shared {
            name: name.clone(),
            memory,
            link,
            stats: NetStats::default(),
            running: Mutex::new(None),
            rx_blocked: AtomicBool::new(false),
            wake,
            stop: AtomicBool::new(false),
        });
        let thread_shared = Arc::clone(&shared);
        let rx_thread = std::thread::Builder::new()
            .name(format!("{name}-rx"))
            .spawn(move || receive_loop(&thread_shared))
            .map_err(|source| Error::Thread {
                what: format!("{name} receive thread"),
                cause: source,
            })?;
        Ok(EmulatedNet {
            features,
            config,
            queue_max_sizes: vec![queue_size; 2],
            shared,
            rx_thread: Some(rx_thread),
        })
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drains the TAP into the receive queue; returns whether it ran out
    /// of buffers.
    fn serve_rx(&self, running: &mut Running) -> bool {
        let mem = &self.memory;
        loop {
            let (returned, outcome) = receive(
                &mut running.rx,
                mem,
                &self.link,
                &mut running.pending,
                running.mergeable,
                &self.stats,
            );
            if returned {
                signal(&self.name, &mut running.rx, mem, &running.call);
            }
            let Delivery::NoBuffers { posted } = outcome else {
                return false;
            };
            match notify_on_more_buffers(&mut running.rx, mem, posted) {
                Ok(true) => continue,
                _ => return true,
            }
        }
    }

    fn serve_tx(&self, running: &mut Running) {
        let mem = &self.memory;
        loop {
            if let Err(e) = running.tx.disable_notification(mem) {
                warn_limited!(
                    "{}: transmit queue: cannot disable notifications: {e}",
                    self.name
                );
            }
            if transmit(
                &mut running.tx,
                mem,
                &self.link,
                &mut running.scratch,
                &self.stats,
            ) {
                signal(&self.name, &mut running.tx, mem, &running.call);
            }
            match running.tx.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    warn_limited!(
                        "{}: transmit queue: cannot enable notifications: {e}",
                        self.name
                    );
                    return;
                }
            }
        }
    }
}

/// Raises the interrupt if the driver wants one for `queue`.
fn signal(name: &str, queue: &mut Queue, mem: &GuestMemoryMmap, call: &EventFd) {
    match queue.needs_notification(mem) {
        Ok(true) => {
            if let Err(e) = call.write(1) {
                warn_limited!("{name}: cannot raise the interrupt: {e}");
            }
        }
        Ok(false) => {}
        Err(e) => warn_limited!("{name}: cannot read the used event: {e}"),
    }
}

/// The receive thread: waits for frames on the TAP (while the driver has
/// buffers) and puts them in the receive queue.
fn receive_loop(shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        let watch_tap = !shared.rx_blocked.load(Ordering::Acquire);
        let mut fds = [
            libc::pollfd {
                fd: shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: shared.link.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let count = if watch_tap { 2 } else { 1 };
        // SAFETY: `fds` holds `count` initialised pollfd structs whose
        // descriptors outlive the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), count, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                warn_limited!("{}: receive thread: poll failed: {e}", shared.name);
                return;
            }
            continue;
        }
        if fds[0].revents != 0 {
            let _ = shared.wake.read();
        }
        if watch_tap && fds[1].revents != 0 {
            let mut running = shared.lock();
            match running.as_mut() {
                Some(running) => {
                    let blocked = shared.serve_rx(running);
                    shared.rx_blocked.store(blocked, Ordering::Release);
                }
                // Frames before the driver is ready wait until it is.
                None => shared.rx_blocked.store(true, Ordering::Release),
            }
        }
    }
}

/// The queue the driver programmed ([`QueueConfig::build_queue`]), which
/// both of the NIC's queues need enabled.
fn queue(
    index: u16,
    config: &QueueConfig,
    event_idx: bool,
    memory: &GuestMemoryMmap,
) -> Result<Queue> {
    if !config.ready {
        return Err(Error::InvalidQueue {
            queue: index,
            reason: "the driver did not enable it".to_string(),
        });
    }
    config.build_queue(index, event_idx, memory)
}

impl VirtioDevice for EmulatedNet {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation<'_>) -> Result<()> {
        let shared = &self.shared;
        let event_idx = activation.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let config = |index: u16| {
            activation
                .queues
                .get(usize::from(index))
                .ok_or_else(|| Error::InvalidQueue {
                    queue: index,
                    reason: "missing".to_string(),
                })
        };
        let rx = queue(RX_QUEUE, config(RX_QUEUE)?, event_idx, &shared.memory)?;
        let tx = queue(TX_QUEUE, config(TX_QUEUE)?, event_idx, &shared.memory)?;
        let call = clone_eventfd(
            &activation.events.call,
            format!("{} interrupts", shared.name),
        )?;
        let flags = backend_features::tun_offload_flags(activation.features);
        if let Err(e) = shared.link.set_offload(flags) {
            warn_limited!("{}: cannot set TAP offloads {flags:#x}: {e}", shared.name);
        }
        *shared.lock() = Some(Running {
            rx,
            tx,
            call,
            mergeable: backend_features::mergeable_rx(activation.features),
            pending: RxPending::default(),
            scratch: vec![0; MAX_CHAIN_BYTES],
        });
        info!("{}: driver started the NIC, served in the VMM", shared.name);
        shared.rx_blocked.store(false, Ordering::Release);
        if let Err(e) = shared.wake.write(1) {
            warn_limited!("{}: cannot wake the receive thread: {e}", shared.name);
        }
        Ok(())
    }

    fn reset(&mut self) {
        *self.shared.lock() = None;
    }

    fn interrupt_status(&self) -> u32 {
        if self.shared.lock().is_some() {
            VIRTIO_MMIO_INT_VRING
        } else {
            0
        }
    }

    fn process_notification(&mut self, queue: u16) -> bool {
        let shared = &self.shared;
        let mut running = shared.lock();
        let Some(running) = running.as_mut() else {
            warn_limited!("{}: notification while the NIC is not running", shared.name);
            return true;
        };
        match queue {
            TX_QUEUE => shared.serve_tx(running),
            RX_QUEUE => {}
            other => {
                warn_limited!(
                    "{}: notification for queue {other}, which does not exist",
                    shared.name
                );
                return true;
            }
        }
        // A receive kick brings buffers; a transmit kick may have answers
        // waiting on the TAP.
        let blocked = shared.serve_rx(running);
        shared.rx_blocked.store(blocked, Ordering::Release);
        if !blocked {
            if let Err(e) = shared.wake.write(1) {
                warn_limited!("{}: cannot wake the receive thread: {e}", shared.name);
            }
        }
        true
    }
}

impl Drop for EmulatedNet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        if let Some(thread) = self.rx_thread.take() {
            let _ = thread.join();
        }
        info!("{}: {}", self.shared.name, self.shared.stats.summary());
    }
}
