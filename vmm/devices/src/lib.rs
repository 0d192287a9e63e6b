//! Devices of the pvstack VMM, kept apart from the VM and vCPU plumbing so
//! that each can be built and tested on its own: the MMIO bus that vCPU
//! exits are dispatched on ([`bus`]), the virtio-mmio transport
//! ([`virtio`]), the vhost-user frontend ([`vhost_user`]) and the block
//! device served by a backend process ([`blk`]).

pub mod bus;
pub mod error;
pub mod virtio;

pub use error::{Error, Result};
