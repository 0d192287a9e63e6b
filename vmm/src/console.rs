//! Where the guest's console output goes: pvstack's stdout or a file.
//! Both are the guest's to fill, so neither is trusted with its bytes as
//! they come: a terminal gets them through a [`TerminalGuard`] (no escape
//! sequence that makes it answer, retitle itself or touch the clipboard),
//! and a file is kept within a size ([`capped_file`]).

mod capped_file;

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;

use pvstack_logging::TerminalGuard;

pub use capped_file::CappedFile;

use crate::error::Result;

/// The size limit of a console log when none is given: 64 MiB, the
/// default of `--console-log-max-bytes`.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 64 << 20;

/// The console sink the CONSOLE_WRITE hypercall writes to, unbuffered.
pub struct Console {
    out: Mutex<Box<dyn Write + Send>>,
}

impl Console {
    /// Console output to pvstack's stdout (see [`guest_stdout`]).
    pub fn stdout() -> Console {
        Console::from_writer(guest_stdout())
    }

    /// Console output to `path`, created or truncated, kept within
    /// `max_bytes` (the older output rotated to `path.1`).
    pub fn file(path: &Path, max_bytes: u64) -> Result<Console> {
        Ok(Console::from_writer(Box::new(CappedFile::create(
            path, max_bytes,
        )?)))
    }

    /// Console output appended to `path` (a restored or taken-over VM
    /// continues the log its earlier life wrote), kept within
    /// [`DEFAULT_LOG_MAX_BYTES`] (the snapshot does not record the limit
    /// the VM's first life ran with).
    pub fn append(path: &Path) -> Result<Console> {
        Ok(Console::from_writer(Box::new(CappedFile::append(
            path,
            DEFAULT_LOG_MAX_BYTES,
        )?)))
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

/// pvstack's stdout for guest output (the hypercall console, a UART):
/// through a [`TerminalGuard`] when it is a terminal, as it is otherwise
/// (a file or pipe gets the guest's bytes unchanged).
pub fn guest_stdout() -> Box<dyn Write + Send> {
    let stdout = std::io::stdout();
    if stdout.is_terminal() {
        Box::new(Guarded::new(stdout))
    } else {
        Box::new(stdout)
    }
}

/// A writer whose bytes pass a [`TerminalGuard`] first.
pub struct Guarded<W> {
    out: W,
    guard: TerminalGuard,
    filtered: Vec<u8>,
}

impl<W: Write> Guarded<W> {
    pub fn new(out: W) -> Self {
        Guarded {
            out,
            guard: TerminalGuard::new(),
            filtered: Vec::new(),
        }
    }
}

impl<W: Write> Write for Guarded<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.filtered.clear();
        self.guard.filter(bytes, &mut self.filtered);
        self.out.write_all(&self.filtered)?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guarded_writer_drops_what_makes_a_terminal_answer_and_keeps_text() {
        let mut out = Guarded::new(Vec::new());
        // A title change (OSC 0), a cursor position request (CSI 6n), a
        // colour (SGR, kept), split across writes.
        out.write_all(b"a\x1b]0;owned\x07b\x1b[").unwrap();
        out.write_all(b"6nc\x1b[31mred\x1b[0m\r\n").unwrap();
        assert_eq!(out.out, b"abc\x1b[31mred\x1b[0m\r\n");
    }
}
