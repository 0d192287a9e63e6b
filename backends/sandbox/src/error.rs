use std::io;
use std::path::PathBuf;

/// Why a process could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the {list} seccomp filter: {message}")]
    BuildFilter { list: String, message: String },
    #[error("cannot install the {list} seccomp filter: {message}")]
    InstallFilter { list: String, message: String },
    #[error("cannot read {path}: {cause}")]
    ReadStatus {
        path: &'static str,
        cause: io::Error,
    },
    #[error("no user `{0}` on this host")]
    UnknownUser(String),
    #[error("cannot look up user `{name}`: {cause}")]
    LookUpUser { name: String, cause: io::Error },
    #[error("--user {0}: running as uid {1}, which cannot switch users (only root can)")]
    CannotSwitch(String, u32),
    #[error("cannot drop privileges ({step}): {cause}")]
    Drop {
        step: &'static str,
        cause: io::Error,
    },
    #[error("cannot hand {path} to uid {uid}: {cause}")]
    Chown {
        path: PathBuf,
        uid: u32,
        cause: io::Error,
    },
    #[error("cannot restrict file access with Landlock ({what}): {message}")]
    Landlock { what: String, message: String },
}
