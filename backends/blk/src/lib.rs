//! pvstack-blk: a vhost-user virtio-blk backend. The request engine is
//! the `pvstack-block` crate (shared with pvstack's in-VMM emulated-virtio
//! disk); this crate is the vhost-user device around it ([`backend`]),
//! the engines that carry out a queue's requests ([`engine`]: io_uring,
//! or one system call at a time),
//! what it offers a frontend ([`vhost_features`]) and its errors.

pub mod backend;
pub mod engine;
pub mod error;
pub mod vhost_features;

pub use error::Error;
