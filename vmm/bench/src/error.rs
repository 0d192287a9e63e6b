//! Why `pvstack bench` could not measure or report.

use std::path::PathBuf;

/// A failed measurement, report or set-up step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A measurement or report failed.
    #[error("bench {what}: {reason}")]
    Bench { what: String, reason: String },
    /// A file could not be created, read or written.
    #[error("cannot {action} {path}: {cause}")]
    File {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot {what}: {cause}")]
    Os {
        what: &'static str,
        cause: std::io::Error,
    },
}

/// Short for results with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
