//! The vhost-user side of devices: what a device needs of its backend
//! ([`connection`]), the vhost-user conversation with one ([`handle`]), a virtio device whose queues a backend serves
//! ([`device`]) and what creating one of any kind takes ([`create`]), backend processes that pvstack starts itself
//! ([`process`]), and the thread that reconnects a device whose backend
//! hung up ([`supervisor`]), swaps and reconnects that never hold the
//! device's lock while they wait for a backend ([`control`], with
//! [`watch`] reading the rings meanwhile), a driver's reset that stops the
//! backend without holding up the vCPU ([`reset`]), whose backend may get
//! guest memory ([`peer`]), and a bound on how long a
//! backend may take to reply ([`watchdog`]). Every vhost-user device type (block, net,
//! console) is a [`VhostUserDevice`] with its own [`DeviceShape`].

pub mod connection;
pub mod control;
pub mod create;
pub mod device;
pub mod handle;
pub mod peer;
pub mod process;
pub mod reset;
pub mod stall;
pub mod supervisor;
pub mod watch;
mod watchdog;

pub use connection::BackendConnection;
pub use create::BackendSpec;
pub use device::{
    BackendState, BackendStats, BackendStatus, ConfigSource, DeviceShape, Reconnector,
    RingPosition, VhostUserDevice,
};
pub use handle::{ActiveQueue, InflightLog, InflightShape, RingSetup, VhostUserHandle};
pub use peer::AllowedBackend;
pub use process::BackendProcess;
pub use stall::StallStats;
pub use supervisor::{ReconnectPolicy, SharedVhostUserDevice};
