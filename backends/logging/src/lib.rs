//! Guards what a guest or a peer can make a pvstack process write.
//!
//! A guest is hostile by definition and a peer (a vhost-user frontend, a
//! client) may be: neither may grow a log without bound nor reach the
//! operator's terminal with escape sequences that make it answer, retitle
//! itself or touch the clipboard.
//!
//! - [`RateLimit`] and the [`warn_limited!`], [`info_limited!`] and
//!   [`error_limited!`] macros: a log line a guest or peer can trigger is
//!   written at most [`BURST`] times per [`INTERVAL`] at each call site;
//!   the next line written there first says how many were suppressed.
//! - [`TerminalGuard`]: a byte-stream filter for guest output bound for a
//!   terminal, passing text and the escape sequences a console needs and
//!   dropping the rest.

mod rate;
mod terminal;

pub use rate::{Admit, RateLimit, BURST, INTERVAL};
pub use terminal::TerminalGuard;

/// The `log` crate, for the macros.
#[doc(hidden)]
pub use log;
