use std::fmt::Display;
use std::path::PathBuf;
use std::process::ExitCode;

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

    /// Exit after the first frontend disconnects instead of listening for the
    /// next one.
    #[arg(long)]
    pub exit_on_disconnect: bool,
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
