//! pvstack-net's network engine as a library: the TAP device ([`tap`]) and
//! peer socket ([`peer`]) a guest's frames travel over ([`link`]), the
//! virtio-net header and frame checks ([`frame`]), the features offered
//! ([`features`]) and the code that moves frames between virtqueues and a
//! link ([`datapath`]).
//!
//! The `pvstack-net` vhost-user backend runs the data path in its own
//! process; pvstack's in-VMM emulated virtio-net baseline runs the very
//! same code inside the VMM, so the two differ only in where the queues are
//! processed.

pub mod datapath;
pub mod error;
pub mod features;
pub mod frame;
pub mod link;
pub mod peer;
pub mod stats;
pub mod syscalls;
pub mod tap;

pub use error::Error;
