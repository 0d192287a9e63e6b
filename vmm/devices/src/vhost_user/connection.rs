//! [`BackendConnection`]: what a [`super::VhostUserDevice`] needs of the
//! connection to its backend. [`super::VhostUserHandle`] is the one that
//! speaks vhost-user; the device's swap, reconnect and rewind logic is
//! written against this trait, so it can be driven step by step in tests
//! with connections whose replies the test chooses.

use std::os::fd::OwnedFd;
use std::path::Path;

use super::handle::RingSetup;
use crate::error::{Error, Result};

/// A negotiated connection to one backend.
pub trait BackendConnection: Send {
    /// The socket the backend listens on.
    fn socket(&self) -> &Path;

    /// Virtio features the backend offers (including
    /// VHOST_USER_F_PROTOCOL_FEATURES, which is not for the driver).
    fn backend_features(&self) -> u64;

    /// Most queues the backend serves.
    fn queue_num(&self) -> u64;

    /// Whether the backend keeps an inflight log (INFLIGHT_SHMFD), so a
    /// restarted one serves exactly the requests its predecessor left.
    fn keeps_inflight_log(&self) -> bool;

    /// The first `len` bytes of the device's configuration space.
    fn get_config(&mut self, len: u32) -> Result<Vec<u8>>;

    /// The part of the ring setup that does not depend on where the rings
    /// stand (memory table, ring sizes, interrupts, inflight log), so a
    /// swap can do it while the old backend still serves.
    fn prepare(&mut self, setup: &mut RingSetup) -> Result<()>;

    /// Starts the prepared backend where `setup`'s queues stand.
    fn resume(&mut self, setup: &RingSetup) -> Result<()>;

    /// Stops the backend's rings and records in `setup` where each queue
    /// left off. Requests the backend took may still be completing: see
    /// [`super::watch::RingWatch::drain`].
    fn stop(&mut self, setup: &mut RingSetup) -> Result<()>;

    /// A duplicate of the connection's socket, to watch for hang-up.
    fn watch_fd(&self) -> Result<OwnedFd>;

    /// Ends the connection now, so the backend (and any watcher) sees the
    /// hang-up.
    fn shut_down(&self);

    /// Tells this side of an adopted connection (see
    /// `VhostUserHandle::adopt`) which features the driver took for the
    /// running rings, without touching the rings.
    fn acknowledge_features(&mut self, _features: u64) -> Result<()> {
        Ok(())
    }

    /// Sets the backend up to serve `setup`'s queues.
    fn start(&mut self, setup: &mut RingSetup) -> Result<()> {
        self.prepare(setup)?;
        self.resume(setup)
    }

    /// Checks that this (new) backend can take over the rings of `setup`
    /// from another: it offers every feature the driver accepted and
    /// serves enough queues.
    fn check_takeover(&self, setup: &RingSetup) -> Result<()> {
        let missing = setup.features & !self.backend_features();
        if missing != 0 {
            return Err(Error::MissingFeatures {
                socket: self.socket().to_path_buf(),
                missing,
            });
        }
        let needed = setup
            .queues
            .iter()
            .map(|q| u64::from(q.index) + 1)
            .max()
            .unwrap_or(0);
        if self.queue_num() < needed {
            return Err(Error::TooFewQueues {
                socket: self.socket().to_path_buf(),
                serves: self.queue_num(),
                needed,
            });
        }
        Ok(())
    }
}
