//! pvstack-console: a vhost-user virtio-console backend. The guest's
//! output goes through a [`hub::Hub`] to stdio, a PTY or the clients of a
//! Unix socket console server, with a bounded history for late clients
//! and an optional log kept to a size ([`log_file`]); host input is held (bounded) until the guest
//! posts receive buffers. Lines the guest lost while this backend was
//! down are reported ([`stamp`]).

pub mod backend;
pub mod error;
pub mod history;
pub mod host;
pub mod hub;
pub mod input;
pub mod log_file;
pub mod stamp;
pub mod stats;
pub mod syscalls;
