//! The crate's error type: every variant names the thing that failed (the
//! socket, the file, the device, the protocol step) so that a one-line
//! message tells the user what to fix.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Errors from building and running devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device option on the command line is malformed (a usage error).
    #[error("invalid --{option} value {value:?}: {reason}")]
    InvalidOption {
        /// The command-line option, without dashes (`blk`).
        option: &'static str,
        /// The whole value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting to a backend's socket failed.
    #[error("vhost-user socket {socket}: cannot connect: {cause}")]
    Connect { socket: PathBuf, cause: io::Error },
    /// The process listening on a backend's socket runs as a user that
    /// may not get guest memory.
    #[error("vhost-user socket {socket}: refused: the backend (pid {pid}) runs as uid {uid}, not as pvstack's uid {ours} or root; add backend-uid={uid} to trust it")]
    BackendNotAllowed {
        socket: PathBuf,
        uid: u32,
        pid: i32,
        ours: u32,
    },
    /// Configuring the connection to a backend failed.
    #[error("vhost-user socket {socket}: {what}: {cause}")]
    Socket {
        socket: PathBuf,
        what: &'static str,
        cause: io::Error,
    },
    /// One step of the vhost-user conversation failed.
    #[error("vhost-user backend {socket}: {step} failed: {cause}")]
    VhostUser {
        socket: PathBuf,
        /// The request that failed (`GET_FEATURES`, `SET_MEM_TABLE`, ...).
        step: &'static str,
        cause: vhost::Error,
    },
    /// The backend did not answer a request in time; the connection was
    /// shut down.
    #[error("vhost-user backend {socket}: no reply to {step} within {timeout:?}")]
    NoReply {
        socket: PathBuf,
        step: &'static str,
        timeout: std::time::Duration,
    },
    /// The backend answered, but cannot serve this device as asked.
    #[error("vhost-user backend {socket}: {reason}")]
    Incompatible { socket: PathBuf, reason: String },
    /// The backend lacks virtio features the device needs (a swap or
    /// reconnect target that cannot take over the driver's rings).
    #[error("vhost-user backend {socket}: it lacks features the device needs (missing bits {missing:#x})")]
    MissingFeatures { socket: PathBuf, missing: u64 },
    /// The backend serves fewer queues than the device needs.
    #[error("vhost-user backend {socket}: it serves {serves} queues, the device needs {needed}")]
    TooFewQueues {
        socket: PathBuf,
        serves: u64,
        needed: u64,
    },
    /// Creating an eventfd failed.
    #[error("cannot create the eventfd for {what}: {cause}")]
    EventFd { what: String, cause: io::Error },
    /// Binding a queue's notify register to its ioeventfd failed.
    #[error("cannot register the ioeventfd of queue {queue} at MMIO {addr:#x}: {cause}")]
    IoEvent {
        queue: u16,
        addr: u64,
        cause: kvm_ioctls::Error,
    },
    /// Binding the device's interrupt eventfd to its GSI failed.
    #[error("cannot register the irqfd for GSI {gsi}: {cause}")]
    IrqFd { gsi: u32, cause: kvm_ioctls::Error },
    /// A guest memory region is not backed by a file descriptor, so a
    /// backend process cannot map it.
    #[error("guest memory region at {addr:#x} has no file descriptor to share with a backend")]
    MemoryNotShareable { addr: u64 },
    /// The driver programmed a queue the device cannot use.
    #[error("queue {queue}: {reason}")]
    InvalidQueue { queue: u16, reason: String },
    /// A stopped backend did not complete the requests it had taken.
    #[error("queue {queue}: the backend took requests up to {taken} but completed only up to {completed} within {waited:?}")]
    Drain {
        queue: u16,
        taken: u16,
        completed: u16,
        waited: std::time::Duration,
    },
    /// A disk image cannot be used.
    #[error("image {path}: {cause}")]
    Image { path: PathBuf, cause: io::Error },
    /// The image of a disk the VMM serves itself cannot be opened.
    #[error(transparent)]
    DiskImage(#[from] pvstack_block::Error),
    /// The backend program is neither next to pvstack nor on PATH.
    #[error("{program} not found next to {exe_dir} or on PATH")]
    ProgramNotFound { program: String, exe_dir: PathBuf },
    /// Creating the private directory for a child backend's socket failed.
    #[error("cannot create the socket directory {dir}: {cause}")]
    SocketDir { dir: PathBuf, cause: io::Error },
    /// Starting or watching a child backend failed.
    #[error("{program}: {what}: {cause}")]
    Child {
        program: PathBuf,
        what: &'static str,
        cause: io::Error,
    },
    /// A child backend exited before it accepted our connection.
    #[error("{program} exited ({status}) before accepting connections on {socket}")]
    ChildExited {
        program: PathBuf,
        status: ExitStatus,
        socket: PathBuf,
    },
    /// A child backend never opened its socket.
    #[error("{program} did not accept connections on {socket} within {seconds} s")]
    ChildTimeout {
        program: PathBuf,
        socket: PathBuf,
        seconds: u64,
    },
    /// Starting a device's helper thread failed.
    #[error("cannot start the {what} thread: {cause}")]
    Thread { what: String, cause: io::Error },
    /// A device cannot be put back in the state a snapshot or a take-over
    /// recorded.
    #[error("{device}: cannot restore the device: {reason}")]
    Restore { device: String, reason: String },
}

impl Error {
    /// Whether the error is the user's command line (exit status 2) rather
    /// than a runtime failure (exit status 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::InvalidOption { .. })
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
