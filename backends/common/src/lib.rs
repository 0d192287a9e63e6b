//! What pvstack's vhost-user backends (block, net, console) share: the
//! command-line flags every backend has, logging that names the device and
//! socket on every line, the listen/serve/listen-again loop around
//! vhost-user-backend's `VhostUserDaemon`, and clean shutdown on SIGTERM/SIGINT.
//!
//! A backend binary does:
//! ```text
//! fn main() -> ExitCode {
//!     // Args: a clap Parser that flattens `SocketArgs`.
//!     backend_main("pvstack-blk", |args: &Args| &args.socket, run)
//! }
//! fn run(args: &Args) -> Result<(), Error> {
//!     serve_with("pvstack-blk", &args.socket, || MyBackend::new(...), |_daemon| Ok(()))?;
//!     Ok(())
//! }
//! ```
//!
//! Every frontend reaches the daemon through a [`message_filter::FilteredSocket`],
//! which refuses frontends of other users ([`peer`]), bounds connections
//! and time and checks memory tables ([`mem_table`]). Every socket a
//! backend makes is 0600 unless `--socket-mode` says otherwise
//! ([`listen_with_mode`]). pvstack itself uses [`peer`] and the socket
//! helpers too, so both ends of a connection apply the same rules. A backend that needs vhost-user messages
//! vhost-user-backend does not handle gives it a filter of its own and
//! serves with [`serve_on`]; [`inflight`] is such a filter and the log it
//! manages.

mod cli;
mod error;
pub mod fds;
pub mod inflight;
mod logging;
pub mod mem_table;
mod memory;
pub mod message_filter;
pub mod peer;
pub mod poll;
mod ring_requests;
mod serve;
mod signals;
mod socket_file;
mod socket_path;
mod vring;

pub use cli::{backend_main, exit_status, parse_queue_size, SocketArgs, EXIT_FAILURE};
pub use error::Error;
pub use logging::init_logging;
pub use memory::GuestMemorySlot;
pub use serve::{listen, serve_on, serve_with};
pub use signals::{block_stop_signals, StopSignal};
pub use socket_file::{
    bind_datagram_with_mode, listen_with_mode, parse_socket_mode, DEFAULT_SOCKET_MODE,
};
pub use socket_path::prepare_socket_path;
pub use vring::{avail_pending, clone_exit_event, signal_if_needed};
