//! The control API (documented in vmm/API.md): `pvstack run --api-socket`
//! serves it ([`server`]), `pvstack ctl` is its client ([`client`]), and
//! both speak the messages of [`protocol`].

pub mod client;
mod line;
pub mod protocol;
pub mod server;

pub use line::LineSource;
pub use protocol::{Reply, Request, Response, API_VERSION};
pub use server::{ApiDevice, ApiServer, RunningApi, VmControl};
