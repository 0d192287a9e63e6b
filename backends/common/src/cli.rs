use std::fmt::Display;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::logging::init_logging;
use crate::peer::{parse_uid, TrustedUsers};
use crate::socket_file::parse_socket_mode;

/// Exit status for a runtime failure (clap itself exits 2 on usage errors,
/// so backends put every argument check in a clap value parser).
pub const EXIT_FAILURE: u8 = 1;

/// The flags every pvstack backend takes; `#[command(flatten)]` them into
/// the backend's own clap `Parser`.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArgs {
    /// Path of the Unix socket to listen on for the vhost-user frontend (the
    /// VMM). A stale socket file left by a previous run is replaced; any other
    /// kind of file there is refused.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// Permissions (octal) of every socket this backend makes: the
    /// vhost-user socket, and pvstack-console's --listen or pvstack-net's
    /// --peer-bind socket. The default, 600, lets only this user (and root)
    /// connect; e.g. 660 shares them with the group.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "600",
        value_parser = parse_socket_mode
    )]
    pub socket_mode: u32,

    /// Also serve frontends running as this user. By default a frontend
    /// is served only if it runs as the user that started this backend
    /// (before any --user switch) or as root; any
    /// other is refused (one log line) before it can send anything, and
    /// the backend goes on listening.
    #[arg(long, value_name = "UID", value_parser = parse_uid)]
    pub frontend_uid: Option<u32>,

    /// Exit after the first frontend disconnects instead of listening for the
    /// next one.
    #[arg(long)]
    pub exit_on_disconnect: bool,

    /// Seconds a frontend has from connecting to SET_OWNER, and for each
    /// message once its first bytes arrived; a slower one is disconnected
    /// (it would hold the one frontend the backend serves at a time).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value = "10",
        value_parser = parse_timeout
    )]
    pub negotiation_timeout: Duration,
}

impl SocketArgs {
    /// The users whose frontends this backend serves: its own user as it
    /// is now, so call this before dropping privileges.
    pub fn trusted_frontends(&self) -> TrustedUsers {
        TrustedUsers::new(self.frontend_uid)
    }
}

/// clap value parser for `--negotiation-timeout`: 1 to 3600 seconds.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    match text.parse::<u64>() {
        Ok(seconds @ 1..=3600) => Ok(Duration::from_secs(seconds)),
        _ => Err(format!(
            "`{text}` is not a number of seconds from 1 to 3600"
        )),
    }
}

/// clap value parser for `--queue-size`: a power of two from 2 to 32768.
pub fn parse_queue_size(text: &str) -> Result<u16, String> {
    let size: u16 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number from 2 to 32768"))?;
    if size < 2 || !size.is_power_of_two() {
        return Err(format!("{size} is not a power of two from 2 to 32768"));
    }
    Ok(size)
}

/// The whole `main` of a backend called `program`: parses its flags `A`,
/// sets up logging that names the socket `socket_of` picks from them, runs
/// `run` and turns its result into the exit status ([`exit_status`]).
pub fn backend_main<A, E>(
    program: &str,
    socket_of: fn(&A) -> &SocketArgs,
    run: impl FnOnce(&A) -> Result<(), E>,
) -> ExitCode
where
    A: clap::Parser,
    E: Display,
{
    let args = A::parse();
    init_logging(program, &socket_of(&args).socket);
    exit_status(program, run(&args))
}

/// Turns a backend's final result into its exit status, printing a failure as
/// one line `PROGRAM: error: MESSAGE` on stderr.
pub fn exit_status<E: Display>(program: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Printed, not logged: the one line a user or test must see,
            // whatever RUST_LOG says.
            eprintln!("{program}: error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("1"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_timeout("3600"), Ok(Duration::from_secs(3600)));
        for bad in ["0", "3601", "-1", "1.5", ""] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn queue_sizes() {
        assert_eq!(parse_queue_size("2"), Ok(2));
        assert_eq!(parse_queue_size("32768"), Ok(32768));
        assert!(parse_queue_size("1").is_err());
        assert!(parse_queue_size("96").is_err());
        assert!(parse_queue_size("65536").is_err());
        assert!(parse_queue_size("x").is_err());
    }
}
