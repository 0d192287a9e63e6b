//! How a queue's requests are carried out: one [`Engine`] interface, two
//! implementations.
//!
//! - [`sync::SyncEngine`] runs each request to its end before it takes
//!   the next (positioned reads and writes, `fdatasync`), the way
//!   pvstack's in-VMM emulated disk does, with the same code
//!   (`pvstack_block::chain`).
//! - [`uring::UringEngine`] submits every request it is given to an
//!   io_uring at once, so a queue has as many requests in flight as the
//!   driver sends, and hands them back as they complete, in any order.
//!
//! A queue's worker checks each chain (`pvstack_block::chain::look`),
//! gives the engine what is left to run ([`Job`]), and returns what the
//! engine reports [`Finished`] to the used ring. Both engines keep the
//! same promise about FLUSH: it covers every write the worker gave the
//! engine before it (so, in particular, every write the driver saw
//! completed before it sent the FLUSH).

mod barrier;
pub mod sync;
pub mod uring;

use std::os::fd::RawFd;
use std::sync::Arc;

use pvstack_block::chain::Answer;
use pvstack_block::config::ID_BYTES;
use pvstack_block::image::DiskImage;
use pvstack_block::request::Operation;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::Error;

/// A checked request for an engine to carry out.
pub struct Job {
    /// The chain's head, to return it to the used ring with.
    pub head: u16,
    pub operation: Operation,
    /// Where its status byte goes.
    pub status: GuestAddress,
    /// The guest memory the request was checked against; an engine keeps
    /// it (and so its mappings) alive until the request is finished.
    pub memory: Arc<GuestMemoryMmap>,
}

/// A request an engine is done with: its status byte is written.
#[derive(Debug)]
pub struct Finished {
    pub head: u16,
    pub answer: Answer,
}

/// Carries out one queue's requests. Only the queue's worker uses it (or
/// the thread that stops the queue, under the same lock).
pub trait Engine: Send {
    /// Starts `job`. It is reported by a later [`Engine::reap`], finished.
    fn submit(&mut self, job: Job);

    /// Hands the kernel what was submitted, then moves every request that
    /// has finished into `finished`. With `wait`, blocks until at least
    /// one request finishes if none has and some are in flight.
    fn reap(&mut self, finished: &mut Vec<Finished>, wait: bool);

    /// Requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;

    /// How many more requests may be submitted now.
    fn room(&self) -> usize;

    /// Whether a request has finished since the last [`Engine::reap`]; cheap
    /// enough to poll.
    fn has_finished(&mut self) -> bool;

    /// An eventfd that becomes readable when requests finish, for the
    /// worker to sleep on; `None` for an engine that finishes everything
    /// before `submit` returns.
    fn completion_fd(&self) -> Option<RawFd>;

    /// Turns the completion eventfd's signalling on (before the worker
    /// sleeps) or off (while it polls). Makes no system call, so the
    /// worker can flip it for every look at its ring.
    fn notify_completions(&mut self, on: bool);

    /// Consumes what the completion eventfd has signalled, so a
    /// level-triggered wait does not wake the worker for it again; once
    /// per wake-up is enough (a signal left over causes one spurious
    /// wake-up, which consumes it).
    fn consume_completion_signal(&mut self);
}

/// Which engine `--engine` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    /// io_uring where it works, else the synchronous engine.
    Auto,
    /// io_uring, or refuse to start.
    IoUring,
    /// One request at a time per queue, with plain system calls.
    Sync,
}

/// The engine a backend runs, as chosen at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Sync,
    IoUring,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Sync => "sync",
            EngineKind::IoUring => "io-uring",
        })
    }
}

/// Resolves `--engine`: `auto` takes io_uring if a ring can be set up
/// and does what the engine needs, logging why not otherwise;
/// `io-uring` where it cannot be had is an error.
pub fn choose(choice: EngineChoice) -> Result<EngineKind, Error> {
    match choice {
        EngineChoice::Sync => Ok(EngineKind::Sync),
        EngineChoice::IoUring => uring::probe()
            .map(|()| EngineKind::IoUring)
            .map_err(Error::IoUringUnavailable),
        EngineChoice::Auto => match uring::probe() {
            Ok(()) => Ok(EngineKind::IoUring),
            Err(why) => {
                log::warn!("io_uring is not available ({why}); serving with the sync engine");
                Ok(EngineKind::Sync)
            }
        },
    }
}

/// What every engine needs to know about the disk.
#[derive(Clone)]
pub struct EngineDisk {
    pub image: Arc<DiskImage>,
    pub serial: [u8; ID_BYTES],
}

/// A new engine of `kind` for a queue of up to `queue_size` entries.
pub fn new_engine(
    kind: EngineKind,
    disk: &EngineDisk,
    queue_size: u16,
) -> std::io::Result<Box<dyn Engine>> {
    Ok(match kind {
        EngineKind::Sync => Box::new(sync::SyncEngine::new(disk.clone())),
        EngineKind::IoUring => Box::new(uring::UringEngine::new(disk.clone(), queue_size)?),
    })
}
