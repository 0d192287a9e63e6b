//! pvstack's virtio-blk request engine: checking a descriptor chain
//! ([`request`]), carrying it out against a raw image ([`execute`],
//! [`image`]) and answering it ([`chain`]), with the device's features,
//! configuration space and limits ([`config`]).
//!
//! The `pvstack-blk` vhost-user backend serves queues with it in its own
//! process; pvstack's in-VMM `emulated-virtio` block device serves them
//! with the very same code inside the VMM, so the two differ only in where
//! the queue is processed.

pub mod bounce;
pub mod chain;
pub mod config;
pub mod error;
pub mod execute;
pub mod image;
pub mod mapped;
pub mod request;
mod sigbus;
#[cfg(test)]
mod test_chains;

pub use error::Error;
