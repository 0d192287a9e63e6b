//! [`InflightFilter`]: GET_INFLIGHT_FD and SET_INFLIGHT_FD, answered in
//! front of the vhost-user-backend daemon.

use pvstack_logging::warn_limited;
use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::message::{FrontendReq, VhostUserInflight};
use vm_memory::ByteValued;

use super::region::{create_region, region_size, InflightRegion};
use crate::message_filter::{Filter, Message, Verdict};

/// The inflight region the frontend gave the newest connection, shared by
/// the filters (which install regions) and the backends (whose workers log
/// in them).
///
/// Connections are numbered on both sides: the n-th [`InflightFilter`]
/// and the n-th backend to [`InflightSlot::attach`] serve the daemon's
/// n-th connection. A backend gets only its own connection's region, so
/// workers of a connection that is still winding down never log into the
/// region of the frontend that came next.
#[derive(Default)]
pub struct InflightSlot {
    /// The connection number of the region, and the region.
    region: Mutex<(u64, Option<Arc<InflightRegion>>)>,
    filters: AtomicU64,
    backends: AtomicU64,
}

impl InflightSlot {
    /// Numbers a new backend's connection, for [`Self::region`].
    pub fn attach(&self) -> u64 {
        self.backends.fetch_add(1, Ordering::Relaxed)
    }

    /// Connection `connection`'s region, if its frontend sent one.
    pub fn region(&self, connection: u64) -> Option<Arc<InflightRegion>> {
        let guard = self.region.lock().unwrap_or_else(PoisonError::into_inner);
        match &*guard {
            (owner, Some(region)) if *owner == connection => Some(Arc::clone(region)),
            _ => None,
        }
    }

    fn set(&self, connection: u64, region: Arc<InflightRegion>) {
        *self.region.lock().unwrap_or_else(PoisonError::into_inner) = (connection, Some(region));
    }
}

/// Answers the inflight messages of one frontend connection and makes each
/// started queue look at its ring once, so chains a crashed backend left
/// are served even if the driver sends no new kick.
pub struct InflightFilter {
    slot: Arc<InflightSlot>,
    connection: u64,
    max_queues: u16,
    max_queue_size: u16,
}

impl InflightFilter {
    /// For a new connection to a backend of `max_queues` queues of up to
    /// `max_queue_size` descriptors.
    pub fn new(slot: Arc<InflightSlot>, max_queues: u16, max_queue_size: u16) -> Self {
        let connection = slot.filters.fetch_add(1, Ordering::Relaxed);
        InflightFilter {
            slot,
            connection,
            max_queues,
            max_queue_size,
        }
    }

    /// GET_INFLIGHT_FD: a new zeroed region for the queues asked for. A
    /// request beyond the device gets a zero-sized answer without a file,
    /// which frontends treat as a failure.
    fn get(&self, message: &Message) -> io::Result<Message> {
        let code = message.code();
        let asked = inflight_payload(message)?;
        let (num_queues, queue_size) = (asked.num_queues, asked.queue_size);
        let answer = |size: usize, fds| {
            let info = VhostUserInflight {
                mmap_size: size as u64,
                mmap_offset: 0,
                num_queues,
                queue_size,
            };
            Message::reply(code, info.as_slice(), fds)
        };
        if !(1..=self.max_queues).contains(&num_queues)
            || !(1..=self.max_queue_size).contains(&queue_size)
        {
            warn_limited!(
                "GET_INFLIGHT_FD for {num_queues} queues of {queue_size}: the device has {} of up to {}",
                self.max_queues,
                self.max_queue_size
            );
            return Ok(answer(0, Vec::new()));
        }
        let file = create_region(num_queues, queue_size)?;
        log::info!("inflight region created for {num_queues} queues of {queue_size} descriptors");
        Ok(answer(
            region_size(num_queues, queue_size),
            vec![file.into()],
        ))
    }

    /// SET_INFLIGHT_FD: maps the region and gives it to the workers.
    fn set(&self, mut message: Message) -> io::Result<()> {
        let given = inflight_payload(&message)?;
        let (size, offset) = (given.mmap_size, given.mmap_offset);
        let (num_queues, queue_size) = (given.num_queues, given.queue_size);
        if num_queues > self.max_queues || queue_size > self.max_queue_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("SET_INFLIGHT_FD for {num_queues} queues of {queue_size}: the device has {} of up to {}", self.max_queues, self.max_queue_size),
            ));
        }
        let Some(fd) = message.take_fds().into_iter().next() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "SET_INFLIGHT_FD without a file descriptor",
            ));
        };
        let region = InflightRegion::map(File::from(fd), offset, size, num_queues, queue_size)?;
        self.slot.set(self.connection, Arc::new(region));
        log::info!("inflight region set for {num_queues} queues of {queue_size} descriptors");
        Ok(())
    }
}

impl Filter for InflightFilter {
    fn request(&mut self, message: Message) -> io::Result<Verdict> {
        let code = message.code();
        if code == FrontendReq::GET_INFLIGHT_FD as u32 {
            return Ok(Verdict::answer(Some(self.get(&message)?)));
        }
        if code == FrontendReq::SET_INFLIGHT_FD as u32 {
            let wants_ack = message.wants_ack();
            return match self.set(message) {
                Ok(()) => Ok(Verdict::answer(wants_ack.then(|| Message::ack(code)))),
                // With REPLY_ACK the frontend hears of the failure and the
                // connection lives on; without, it must end.
                Err(e) if wants_ack => {
                    warn_limited!("refused an inflight region: {e}");
                    let failure = Message::reply(code, &1u64.to_le_bytes(), Vec::new());
                    Ok(Verdict::answer(Some(failure)))
                }
                Err(e) => Err(e),
            };
        }
        if code == FrontendReq::SET_VRING_KICK as u32 && self.slot.region(self.connection).is_some()
        {
            if let Some(kick) = message.fds().first() {
                // An eventfd keeps its count until read, so the kick waits
                // for the daemon to start watching it.
                File::from(kick.try_clone()?).write_all(&1u64.to_ne_bytes())?;
            }
        }
        Ok(Verdict::forward(message))
    }
}

fn inflight_payload(message: &Message) -> io::Result<VhostUserInflight> {
    let payload = message.payload();
    // Some frontends send the C struct without its tail padding (20 bytes).
    let mut bytes = [0u8; size_of::<VhostUserInflight>()];
    let len = payload.len().min(bytes.len());
    if len < 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("an inflight message of {} bytes", payload.len()),
        ));
    }
    bytes[..len].copy_from_slice(&payload[..len]);
    Ok(*VhostUserInflight::from_slice(&bytes).expect("sized to the struct"))
}
