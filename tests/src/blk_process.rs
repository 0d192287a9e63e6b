//! Running pvstack-blk as a real process in integration tests: start it,
//! wait until it listens, stop it with SIGTERM, and read its log (the
//! process handling is [`LoggedProcess`]'s).

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::binary;
use crate::process::LoggedProcess;

/// A running pvstack-blk whose stderr (its log) goes to a file.
pub struct BlkProcess(LoggedProcess);

impl BlkProcess {
    /// Starts `pvstack-blk --socket SOCKET ARGS...` and waits until it
    /// listens; its log is SOCKET with the extension `log`.
    pub fn start(socket: &Path, args: &[&str]) -> BlkProcess {
        Self::start_logging_to(socket, socket.with_extension("log"), args)
    }

    /// As [`start`](Self::start), logging to the file `log`.
    pub fn start_logging_to(socket: &Path, log: PathBuf, args: &[&str]) -> BlkProcess {
        Self::start_command(Command::new(binary("pvstack-blk")), socket, log, args)
    }

    /// As [`start`](Self::start), run as the user and group `uid` (with
    /// setpriv, so the test must run as root) rather than as the test's.
    pub fn start_as(uid: u32, socket: &Path, args: &[&str]) -> BlkProcess {
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg("--")
            .arg(binary("pvstack-blk"));
        Self::start_command(command, socket, socket.with_extension("log"), args)
    }

    /// Starts `command --socket SOCKET ARGS...`, a pvstack-blk, logging
    /// to `log`, and waits until it listens.
    fn start_command(
        mut command: Command,
        socket: &Path,
        log: PathBuf,
        args: &[&str],
    ) -> BlkProcess {
        command
            .arg("--socket")
            .arg(socket)
            .args(args)
            .env("RUST_LOG", "info");
        let mut process = LoggedProcess::spawn("pvstack-blk", &mut command, log)
            .unwrap_or_else(|e| panic!("cannot start pvstack-blk: {e}"));
        process.wait_until_listening(socket, |p| {
            p.log().contains("listening for a vhost-user frontend")
        });
        BlkProcess(process)
    }
}

impl Deref for BlkProcess {
    type Target = LoggedProcess;

    fn deref(&self) -> &LoggedProcess {
        &self.0
    }
}

impl DerefMut for BlkProcess {
    fn deref_mut(&mut self) -> &mut LoggedProcess {
        &mut self.0
    }
}
