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
//! which bounds connections and time and checks memory tables
//! ([`mem_table`]). A backend that needs vhost-user messages
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
pub mod poll;
mod ring_requests;
mod serve;
mod signals;
mod socket_path;
mod vring;

pub use cli::{backend_main, exit_status, parse_queue_size, SocketArgs, EXIT_FAILURE};
pub use error::Error;
pub use logging::init_logging;
pub use memory::GuestMemorySlot;
pub use serve::{listen, serve_on, serve_with};
pub use signals::{block_stop_signals, StopSignal};
pub use socket_path::prepare_socket_path;
pub use vring::{avail_pending, clone_exit_event, signal_if_needed};
