//! What pvstack's vhost-user backends (block, net, console) share: the
//! command-line flags every backend has, logging that names the device and
//! socket on every line, the listen/serve/listen-again loop around
//! vhost-user-backend's `VhostUserDaemon`, and clean shutdown on SIGTERM/SIGINT.
//!
//! A backend binary does:
//! ```ignore
//! let args = Args::parse();                       // flattens `SocketArgs`
//! init_logging("pvstack-blk", &args.socket.socket);
//! let result = serve("pvstack-blk", &args.socket, || MyBackend::new(...));
//! exit_status("pvstack-blk", result)
//! ```

mod cli;
mod error;
mod logging;
mod serve;
mod signals;
mod socket_path;

pub use cli::{exit_status, SocketArgs, EXIT_FAILURE};
pub use error::Error;
pub use logging::init_logging;
pub use serve::{serve, serve_with};
pub use signals::StopSignal;
pub use socket_path::prepare_socket_path;
