//! The vhost-user side of devices: the conversation with a backend
//! ([`handle`]), a virtio device whose queues a backend serves
//! ([`device`]) and backend processes that pvstack starts itself
//! ([`process`]). Every vhost-user device type (block now; net and console
//! later) is a [`VhostUserDevice`] with its own [`DeviceShape`].

pub mod device;
pub mod handle;
pub mod process;

pub use device::{DeviceShape, VhostUserDevice};
pub use handle::{ActiveQueue, RingSetup, VhostUserHandle};
pub use process::BackendProcess;
