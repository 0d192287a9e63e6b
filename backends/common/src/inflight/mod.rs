//! Inflight I/O tracking, VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, for split
//! virtqueues: the backend logs in memory the frontend keeps which chains
//! it took from each queue and has not returned, so a backend started
//! after a crash serves exactly those again, oldest first, and carries on
//! behind them. vhost-user-backend does not handle the two messages
//! involved, so [`InflightFilter`] answers them in front of the daemon.

mod chain;
mod fd_messages;
mod region;

pub use chain::chain_at;
pub use fd_messages::{InflightFilter, InflightSlot};
pub use region::{create_region, queue_stride, region_size, InflightRegion, QueueLog};
