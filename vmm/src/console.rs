//! Where the guest's console output goes: pvstack's stdout or a file.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use crate::error::{Error, Result};

/// The console sink the CONSOLE_WRITE hypercall writes to, unbuffered.
pub struct Console {
    out: Mutex<Box<dyn Write + Send>>,
}

impl Console {
    /// Console output to pvstack's stdout.
    pub fn stdout() -> Console {
        Console::from_writer(Box::new(std::io::stdout()))
    }

    /// Console output to `path`, created or truncated.
    pub fn file(path: &Path) -> Result<Console> {
        let file = File::create(path).map_err(|source| Error::File {
            action: "create console log",
            path: path.to_path_buf(),
            cause: source,
        })?;
        Ok(Console::from_writer(Box::new(file)))
    }

    /// Console output appended to `path` (a restored or taken-over VM
    /// continues the log its earlier life wrote).
    pub fn append(path: &Path) -> Result<Console> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| Error::File {
                action: "open console log",
                path: path.to_path_buf(),
                cause: source,
            })?;
        Ok(Console::from_writer(Box::new(file)))
    }

    /// Console output to any writer.
    pub fn from_writer(out: Box<dyn Write + Send>) -> Console {
        Console {
            out: Mutex::new(out),
        }
    }

    /// Writes and flushes `bytes`.
    pub fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        // A vCPU thread that panicked mid-write leaves the sink usable.
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(bytes)?;
        out.flush()
    }
}
