//! [`VhostUserHandle`]: the whole conversation with one vhost-user backend.
//!
//! Two phases. [`VhostUserHandle::from_stream`] negotiates when the device
//! is created (ownership, features, protocol features, queue count), and
//! [`BackendConnection::start`] sets the backend up from a [`RingSetup`]
//! recorded when the driver set DRIVER_OK. `prepare` and `resume` here are
//! the one place that knows that sequence, so moving a device to a new or
//! restarted backend is a new handle plus `start` with the same, recorded
//! setup.

use std::fs::File;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::{debug, info};
use serde::{Deserialize, Serialize};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::connection::BackendConnection;
use super::peer::AllowedBackend;
use super::watchdog::ReplyWatchdog;
use crate::error::{Error, Result};
use crate::virtio::QueueConfig;

/// Protocol features the frontend uses when the backend offers them:
/// MQ (GET_QUEUE_NUM), CONFIG (GET_CONFIG), REPLY_ACK (every request
/// is acknowledged, so a failure is seen at the request that caused it)
/// and INFLIGHT_SHMFD (the backend logs unfinished requests in memory the
/// frontend keeps, so its successor can serve them again).
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD);

/// How long to wait for any one reply. Generous: a reply normally takes
/// microseconds; the limit only keeps a hung backend from hanging pvstack.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// One queue the backend serves.
#[derive(Debug)]
pub struct ActiveQueue {
    /// Queue index.
    pub index: u16,
    /// Size and ring addresses, as the driver programmed them.
    pub config: QueueConfig,
    /// Where the backend starts in the available ring: 0 at first; after
    /// [`VhostUserHandle::stop`], where the stopped backend left off.
    pub next_avail: u16,
    /// Signalled by KVM when the driver notifies this queue.
    pub kick: EventFd,
}

/// Everything a backend needs to serve the device's queues, recorded on
/// DRIVER_OK so it can be replayed to another backend connection.
#[derive(Debug)]
pub struct RingSetup {
    /// Virtio features the driver accepted.
    pub features: u64,
    /// Guest memory, whose regions' file descriptors the backend maps.
    pub memory: GuestMemoryMmap,
    /// The queues the driver made ready.
    pub queues: Vec<ActiveQueue>,
    /// Raises the device's interrupt (the irqfd), shared by all queues.
    pub call: EventFd,
    /// The inflight log of the backend serving the rings, when it keeps
    /// one: obtained from it on first start and handed to every backend
    /// that takes over after a crash, so requests it left are served again.
    pub inflight: Option<InflightLog>,
}

/// A backend's inflight log (GET_INFLIGHT_FD): the memory and its shape.
/// The frontend only keeps it; it never reads it.
pub struct InflightLog {
    file: File,
    shape: VhostUserInflight,
}

/// The shape of an inflight log (what GET_INFLIGHT_FD answered), as a
/// take-over hands it to the next pvstack with the log's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightShape {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl InflightLog {
    /// The memory the backend logs in.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its shape.
    pub fn shape(&self) -> InflightShape {
        InflightShape {
            mmap_size: self.shape.mmap_size,
            mmap_offset: self.shape.mmap_offset,
            num_queues: self.shape.num_queues,
            queue_size: self.shape.queue_size,
        }
    }

    /// A log handed over by another pvstack: its memory and shape.
    pub fn from_parts(file: File, shape: InflightShape) -> Self {
        InflightLog {
            file,
            shape: VhostUserInflight {
                mmap_size: shape.mmap_size,
                mmap_offset: shape.mmap_offset,
                num_queues: shape.num_queues,
                queue_size: shape.queue_size,
            },
        }
    }
}

impl std::fmt::Debug for InflightLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (size, queues, queue_size) = (
            self.shape.mmap_size,
            self.shape.num_queues,
            self.shape.queue_size,
        );
        write!(
            f,
            "InflightLog({size} bytes for {queues} queues of {queue_size})"
        )
    }
}

/// A negotiated connection to one vhost-user backend.
pub struct VhostUserHandle {
    socket: PathBuf,
    /// A duplicate of the connection, to watch it for hang-up and to end it.
    stream: UnixStream,
    watchdog: ReplyWatchdog,
    frontend: Frontend,
    backend_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    queue_num: u64,
}

impl VhostUserHandle {
    /// Connects to the backend listening on `socket` and, if `allowed`
    /// lets its user serve the device, negotiates.
    pub fn connect(socket: &Path, allowed: AllowedBackend) -> Result<Self> {
        let stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
            socket: socket.to_path_buf(),
            cause: source,
        })?;
        Self::from_stream(stream, socket, allowed)
    }

    /// Negotiates over an established connection to the backend at
    /// `socket`, once `allowed` has checked who the backend is: SET_OWNER,
    /// GET_FEATURES, GET/SET_PROTOCOL_FEATURES and, with MQ, GET_QUEUE_NUM.
    pub fn from_stream(stream: UnixStream, socket: &Path, allowed: AllowedBackend) -> Result<Self> {
        allowed.check(&stream, socket)?;
        let mut handle = Self::unnegotiated(stream, socket)?;
        handle.negotiate(true)?;
        Ok(handle)
    }

    /// Takes over a connection another pvstack set up and handed over
    /// (its rings may be running): asks the backend again what it offers
    /// and acknowledges the same protocol features, which only informs
    /// this process's side of the conversation; SET_OWNER is not repeated
    /// (the session is owned already).
    pub fn adopt(stream: UnixStream, socket: &Path) -> Result<Self> {
        let mut handle = Self::unnegotiated(stream, socket)?;
        handle.negotiate(false)?;
        Ok(handle)
    }

    fn unnegotiated(stream: UnixStream, socket: &Path) -> Result<Self> {
        let socket = socket.to_path_buf();
        let socket_error = |what, source| Error::Socket {
            socket: socket.clone(),
            what,
            cause: source,
        };
        let duplicate = || {
            stream
                .try_clone()
                .map_err(|e| socket_error("cannot duplicate the socket", e))
        };
        let watchdog = ReplyWatchdog::new(duplicate()?, REPLY_TIMEOUT)
            .map_err(|e| socket_error("cannot start the reply watchdog", e))?;
        let stream_copy = duplicate()?;
        Ok(VhostUserHandle {
            socket,
            stream: stream_copy,
            watchdog,
            frontend: Frontend::from_stream(stream, 1),
            backend_features: 0,
            protocol_features: VhostUserProtocolFeatures::empty(),
            queue_num: 1,
        })
    }

    fn negotiate(&mut self, claim: bool) -> Result<()> {
        if claim {
            self.step("SET_OWNER", |f| f.set_owner())?;
        }
        self.backend_features = self.step("GET_FEATURES", |f| f.get_features())?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.backend_features & protocol_bit == 0 {
            return Err(
                self.incompatible("it does not offer VHOST_USER_F_PROTOCOL_FEATURES".to_string())
            );
        }
        let offered = self.step("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
        self.protocol_features = offered & WANTED_PROTOCOL_FEATURES;
        let acked = self.protocol_features;
        self.step("SET_PROTOCOL_FEATURES", |f| f.set_protocol_features(acked))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if acked.contains(VhostUserProtocolFeatures::MQ) {
            self.queue_num = self.step("GET_QUEUE_NUM", |f| f.get_queue_num())?;
        }
        info!(
            "vhost-user backend {}: features {:#x}, protocol features {:#x}, {} queues",
            self.socket.display(),
            self.backend_features,
            acked.bits(),
            self.queue_num
        );
        Ok(())
    }

    /// Gives the backend `setup`'s inflight log, asking it for a new one
    /// first if there is none.
    fn share_inflight_log(&mut self, setup: &mut RingSetup) -> Result<()> {
        let log = match setup.inflight.take() {
            Some(log) => log,
            None => {
                let wanted = VhostUserInflight {
                    num_queues: setup.queues.iter().map(|q| q.index + 1).max().unwrap_or(0),
                    queue_size: setup
                        .queues
                        .iter()
                        .map(|q| q.config.size)
                        .max()
                        .unwrap_or(0),
                    ..Default::default()
                };
                let (shape, file) = self.step("GET_INFLIGHT_FD", |f| f.get_inflight_fd(&wanted))?;
                InflightLog { file, shape }
            }
        };
        let shared = self.step("SET_INFLIGHT_FD", |f| {
            f.set_inflight_fd(&log.shape, log.file.as_raw_fd())
        });
        setup.inflight = Some(log);
        shared
    }

    /// Runs one request, naming the socket and the request if it fails.
    fn step<T>(
        &mut self,
        step: &'static str,
        request: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T> {
        let armed = self.watchdog.arm();
        let result = request(&mut self.frontend);
        drop(armed);
        if result.is_err() {
            // The reply may have been cut short or followed by more bytes
            // than it declared: nothing read from this socket afterwards
            // could be trusted to start at a message boundary, so the
            // backend is not spoken to again. Its supervisor sees the
            // hang-up and reconnects.
            self.shut_down();
        }
        result.map_err(|source| {
            if self.watchdog.fired() {
                Error::NoReply {
                    socket: self.socket.clone(),
                    step,
                    timeout: self.watchdog.timeout(),
                }
            } else {
                Error::VhostUser {
                    socket: self.socket.clone(),
                    step,
                    cause: source,
                }
            }
        })
    }

    /// [`Self::step`] for a request sent without NEED_REPLY, so this side
    /// does not wait for its acknowledgement. Only for a request that an
    /// answered one follows on this connection: a backend handles a
    /// connection's requests in order and ends the connection at one it
    /// fails (vhost-user-backend and libvhost-user both do), so that
    /// answer vouches for this request too. The backend can then handle
    /// the whole run in one wake-up instead of one round trip each.
    fn unanswered_step(
        &mut self,
        step: &'static str,
        request: impl FnOnce(&mut Frontend) -> vhost::Result<()>,
    ) -> Result<()> {
        let acked = self
            .protocol_features
            .contains(VhostUserProtocolFeatures::REPLY_ACK);
        if acked {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        }
        let result = self.step(step, request);
        if acked {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        result
    }

    fn incompatible(&self, reason: String) -> Error {
        Error::Incompatible {
            socket: self.socket.clone(),
            reason,
        }
    }
}

impl BackendConnection for VhostUserHandle {
    /// The socket the backend listens on.
    fn socket(&self) -> &Path {
        &self.socket
    }

    /// Virtio features the backend offers (including
    /// VHOST_USER_F_PROTOCOL_FEATURES, which is not for the driver).
    fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Whether the backend keeps an inflight log (INFLIGHT_SHMFD), so a
    /// restarted one serves exactly the requests its predecessor left.
    fn keeps_inflight_log(&self) -> bool {
        self.protocol_features
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    /// Most queues the backend serves.
    fn queue_num(&self) -> u64 {
        self.queue_num
    }

    /// The first `len` bytes of the device's configuration space (GET_CONFIG).
    fn get_config(&mut self, len: u32) -> Result<Vec<u8>> {
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return Err(self.incompatible(
                "it does not offer the CONFIG protocol feature, so the device's configuration cannot be read".to_string(),
            ));
        }
        let request = vec![0u8; len as usize];
        let (_, config) = self.step("GET_CONFIG", |f| {
            f.get_config(0, len, VhostUserConfigFlags::empty(), &request)
        })?;
        Ok(config)
    }

    /// The part of the setup that does not depend on where the rings
    /// stand, so a swap can do it while the old backend still serves:
    /// the inflight log (GET_INFLIGHT_FD when `setup` has none yet, then
    /// SET_INFLIGHT_FD), SET_FEATURES, SET_MEM_TABLE, and per queue
    /// SET_VRING_NUM and _CALL (the call fd goes before the kick so that
    /// nothing the backend completes on its first kick goes unsignalled).
    fn prepare(&mut self, setup: &mut RingSetup) -> Result<()> {
        // A driver that readied no queue has nothing to log.
        if self.keeps_inflight_log() && !setup.queues.is_empty() {
            self.share_inflight_log(setup)?;
        }
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = setup.features | (self.backend_features & protocol_bit);
        self.step("SET_FEATURES", |f| f.set_features(features))?;
        let regions = memory_regions(&setup.memory)?;
        self.step("SET_MEM_TABLE", |f| f.set_mem_table(&regions))?;
        for queue in &setup.queues {
            let index = usize::from(queue.index);
            self.step("SET_VRING_NUM", |f| {
                f.set_vring_num(index, queue.config.size)
            })?;
            self.step("SET_VRING_CALL", |f| f.set_vring_call(index, &setup.call))?;
        }
        Ok(())
    }

    /// Starts the prepared backend where `setup`'s queues stand: per queue
    /// SET_VRING_BASE, _ADDR (after which the backend reads the used
    /// ring's index, so every earlier request must be complete), _KICK and
    /// _ENABLE, only the last answered, then one kick.
    fn resume(&mut self, setup: &RingSetup) -> Result<()> {
        for queue in &setup.queues {
            let index = usize::from(queue.index);
            let addresses = ring_addresses(&setup.memory, queue)?;
            self.unanswered_step("SET_VRING_BASE", |f| {
                f.set_vring_base(index, queue.next_avail)
            })?;
            self.unanswered_step("SET_VRING_ADDR", |f| f.set_vring_addr(index, &addresses))?;
            self.unanswered_step("SET_VRING_KICK", |f| f.set_vring_kick(index, &queue.kick))?;
            self.step("SET_VRING_ENABLE", |f| f.set_vring_enable(index, true))?;
            // A kick the driver sent while no backend watched this queue
            // may have been consumed by the previous backend as it
            // stopped; one more kick makes the new backend look at the
            // ring, and costs an empty look if nothing is waiting.
            queue.kick.write(1).map_err(|source| Error::EventFd {
                what: format!("queue {index} kick"),
                cause: source,
            })?;
        }
        debug!(
            "vhost-user backend {}: started {} queues",
            self.socket.display(),
            setup.queues.len()
        );
        Ok(())
    }

    /// Stops the backend's rings (SET_VRING_ENABLE 0, then GET_VRING_BASE,
    /// which the backend answers once it has stopped taking requests) and
    /// records in `setup` where each queue left off, so `start` can resume
    /// there. Requests it took may still be completing
    /// ([`super::watch::RingWatch::drain`] waits for them).
    fn stop(&mut self, setup: &mut RingSetup) -> Result<()> {
        for queue in &mut setup.queues {
            let index = usize::from(queue.index);
            self.unanswered_step("SET_VRING_ENABLE", |f| f.set_vring_enable(index, false))?;
            let base = self.step("GET_VRING_BASE", |f| f.get_vring_base(index))?;
            // The ring index is 16 bits wide; the upper bits carry only
            // packed-ring wrap state, which this frontend never negotiates.
            queue.next_avail = base as u16;
        }
        debug!(
            "vhost-user backend {}: stopped {} queues",
            self.socket.display(),
            setup.queues.len()
        );
        Ok(())
    }

    /// SET_FEATURES with what the driver accepted, on an adopted
    /// connection whose rings run: the backend already serves them, and
    /// this side of the conversation must know the features (VRING_ENABLE
    /// needs VHOST_USER_F_PROTOCOL_FEATURES acknowledged).
    fn acknowledge_features(&mut self, features: u64) -> Result<()> {
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = features | (self.backend_features & protocol_bit);
        self.step("SET_FEATURES", |f| f.set_features(features))
    }

    /// A duplicate of the connection's socket, to watch for hang-up.
    fn watch_fd(&self) -> Result<OwnedFd> {
        let stream = self.stream.try_clone().map_err(|source| Error::Socket {
            socket: self.socket.clone(),
            what: "cannot duplicate the socket to watch it",
            cause: source,
        })?;
        Ok(stream.into())
    }

    /// Ends the connection now, even while a duplicate of its socket
    /// (a watcher's) is still open, so the backend sees the hang-up.
    fn shut_down(&self) {
        if let Err(e) = self.stream.shutdown(Shutdown::Both) {
            debug!(
                "vhost-user backend {}: shutdown: {e}",
                self.socket.display()
            );
        }
    }
}

/// The memory table: every region with the file descriptor that backs it.
fn memory_regions(memory: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>> {
    memory
        .iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|_| {
                Error::MemoryNotShareable {
                    addr: vm_memory::GuestMemoryRegion::start_addr(region).0,
                }
            })
        })
        .collect()
}

/// Checks that every ring of `setup` lies in guest RAM (what the driver
/// programmed), before a backend is asked to serve them.
pub fn check_rings(setup: &RingSetup) -> Result<()> {
    for queue in &setup.queues {
        ring_addresses(&setup.memory, queue)?;
    }
    Ok(())
}

/// The queue's rings as addresses in this process, which is what
/// SET_VRING_ADDR carries (the backend translates them through the memory
/// table's `userspace_addr`). Every ring must lie in guest RAM.
fn ring_addresses(memory: &GuestMemoryMmap, queue: &ActiveQueue) -> Result<VringConfigData> {
    let config = &queue.config;
    let rings = [config.desc_table, config.avail_ring, config.used_ring];
    let names = ["descriptor table", "available ring", "used ring"];
    let mut host = [0u64; 3];
    for (((&addr, len), name), host) in rings
        .iter()
        .zip(config.ring_sizes())
        .zip(names)
        .zip(&mut host)
    {
        let in_ram =
            usize::try_from(len).is_ok_and(|len| memory.check_range(GuestAddress(addr), len));
        let pointer = memory.get_host_address(GuestAddress(addr));
        match pointer {
            Ok(pointer) if in_ram => *host = pointer as u64,
            _ => {
                return Err(Error::InvalidQueue {
                    queue: queue.index,
                    reason: format!("{name} at {addr:#x} ({len} bytes) is not in guest RAM"),
                })
            }
        }
    }
    Ok(VringConfigData {
        queue_max_size: config.max_size,
        queue_size: config.size,
        flags: 0,
        desc_table_addr: host[0],
        used_ring_addr: host[2],
        avail_ring_addr: host[1],
        log_addr: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::FileOffset;

    fn queue(desc: u64, avail: u64, used: u64) -> ActiveQueue {
        ActiveQueue {
            index: 1,
            config: QueueConfig {
                max_size: 256,
                size: 16,
                ready: true,
                desc_table: desc,
                avail_ring: avail,
                used_ring: used,
            },
            next_avail: 0,
            kick: EventFd::new(0).unwrap(),
        }
    }

    #[test]
    fn ring_addresses_translate_and_refuse_outside_ram() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x4000)]).unwrap();
        let base = memory.get_host_address(GuestAddress(0x1000)).unwrap() as u64;
        let data = ring_addresses(&memory, &queue(0x1000, 0x2000, 0x3000)).unwrap();
        assert_eq!(data.desc_table_addr, base);
        assert_eq!(data.avail_ring_addr, base + 0x1000);
        assert_eq!(data.used_ring_addr, base + 0x2000);
        assert_eq!(data.queue_size, 16);
        // Not in RAM at all, and starting in RAM but running past its end.
        let err = ring_addresses(&memory, &queue(0x1000, 0x2000, 0x9000))
            .err()
            .unwrap();
        assert!(err.to_string().contains("used ring at 0x9000"), "{err}");
        let err = ring_addresses(&memory, &queue(0x4fc0, 0x2000, 0x3000))
            .err()
            .unwrap();
        assert!(err.to_string().contains("descriptor table"), "{err}");
    }

    #[test]
    fn memory_table_needs_file_backed_regions() {
        let anonymous = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            memory_regions(&anonymous),
            Err(Error::MemoryNotShareable { addr: 0 })
        ));
        let file = memfd::MemfdOptions::default()
            .create("handle-test")
            .expect("memfd_create")
            .into_file();
        file.set_len(0x1000).unwrap();
        let backed = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0x2000),
            0x1000,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        let regions = memory_regions(&backed).unwrap();
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].guest_phys_addr, 0x2000);
        assert_eq!(regions[0].memory_size, 0x1000);
        assert!(regions[0].mmap_handle >= 0);
    }
}
