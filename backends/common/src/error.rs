use std::io;
use std::path::PathBuf;

/// Everything that can stop a backend's serving loop. Each variant names the
/// socket (or other resource) it concerns so the one-line message is enough.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("socket path {path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("socket {path} is in use: another process listens on it or is bound to it")]
    SocketInUse { path: PathBuf },
    #[error("cannot inspect socket path {path}: {cause}")]
    InspectSocket { path: PathBuf, cause: io::Error },
    #[error("cannot remove stale socket {path}: {cause}")]
    RemoveStaleSocket { path: PathBuf, cause: io::Error },
    #[error("cannot listen on {path}: {cause}")]
    Listen {
        path: PathBuf,
        cause: vhost::vhost_user::Error,
    },
    #[error("cannot wait for a frontend on {path}: {cause}")]
    Poll { path: PathBuf, cause: io::Error },
    #[error("cannot set up SIGTERM/SIGINT handling: {0}")]
    Signals(io::Error),
    #[error("vhost-user message filter on {path}: {what}: {cause}")]
    Filter {
        path: PathBuf,
        what: &'static str,
        cause: io::Error,
    },
    #[error("cannot create the backend for {path}: {cause}")]
    NewBackend { path: PathBuf, cause: io::Error },
    // vhost_user_backend::Error implements Display but not std::error::Error,
    // so it is carried as text.
    #[error("vhost-user daemon on {path}: {message}")]
    Daemon { path: PathBuf, message: String },
}
