//! Answering one descriptor chain: parse and check it, run it, write the
//! status byte. Shared by every place that serves a virtio-blk queue.

use std::io;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::{DiskLimits, ID_BYTES};
use crate::execute::execute;
use crate::image::DiskImage;
use crate::request::{self, Malformed, Operation, Parsed, Rejection};

/// The disk a queue serves, as the request engine needs it.
#[derive(Clone, Copy)]
pub struct Disk<'a> {
    pub image: &'a DiskImage,
    pub limits: &'a DiskLimits,
    pub serial: &'a [u8; ID_BYTES],
}

/// How a chain was answered, for the caller's logs and counters.
#[derive(Debug)]
pub enum Outcome {
    /// Carried out; status OK.
    Done,
    /// Refused with the rejection's status.
    Rejected(Rejection),
    /// The image operation failed; status IOERR.
    Failed {
        operation: Operation,
        error: io::Error,
    },
    /// No status byte to write; returned with nothing written.
    Unanswerable(Malformed),
}

/// One answered chain.
#[derive(Debug)]
pub struct Answer {
    /// The used length to put in the used ring.
    pub used_len: u32,
    pub outcome: Outcome,
}

/// Parses, checks and runs one chain and writes its status byte.
/// `max_chain_len` is the queue size (longer chains are refused).
pub fn answer<I>(chain: I, mem: &GuestMemoryMmap, disk: Disk<'_>, max_chain_len: usize) -> Answer
where
    I: IntoIterator<Item = Descriptor>,
{
    match request::parse(chain, mem, disk.limits, max_chain_len) {
        Parsed::Unanswerable(why) => Answer {
            used_len: 0,
            outcome: Outcome::Unanswerable(why),
        },
        Parsed::Rejected { rejection, status } => Answer {
            used_len: write_status(mem, status, rejection.status()),
            outcome: Outcome::Rejected(rejection),
        },
        Parsed::Request { operation, status } => {
            match execute(&operation, disk.image, mem, disk.serial) {
                Ok(written) => Answer {
                    used_len: written + write_status(mem, status, VIRTIO_BLK_S_OK as u8),
                    outcome: Outcome::Done,
                },
                Err(error) => Answer {
                    used_len: write_status(mem, status, VIRTIO_BLK_S_IOERR as u8),
                    outcome: Outcome::Failed { operation, error },
                },
            }
        }
    }
}

/// Writes the status byte (already checked to be inside guest memory);
/// returns its contribution to the used length.
fn write_status(mem: &GuestMemoryMmap, status: GuestAddress, value: u8) -> u32 {
    match mem.write_obj(value, status) {
        Ok(()) => 1,
        Err(e) => {
            log::warn!("cannot write the status byte at {:#x}: {e}", status.0);
            0
        }
    }
}
