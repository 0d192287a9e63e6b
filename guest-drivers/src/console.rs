//! Console output: [`println!`](crate::println) formats into a line buffer
//! that is written with one `CONSOLE_WRITE` hypercall per line (each call is
//! an exit to the VMM, so writing piece by piece would be slow).

use crate::hypercall::Hypercall;
use crate::sync::SpinLock;
use core::fmt::{self, Write};

/// Longest piece written in one hypercall; longer lines are split.
const LINE_MAX: usize = 256;

/// Collects text and hands it out a line (or a full buffer) at a time.
pub struct LineBuffer {
    bytes: [u8; LINE_MAX],
    len: usize,
}

impl LineBuffer {
    /// An empty buffer.
    pub const fn new() -> Self {
        LineBuffer {
            bytes: [0; LINE_MAX],
            len: 0,
        }
    }

    /// Appends `text`, calling `flush` with each completed line (newline
    /// included) and whenever the buffer fills up.
    pub fn push(&mut self, text: &str, mut flush: impl FnMut(&[u8])) {
        for &byte in text.as_bytes() {
            self.bytes[self.len] = byte;
            self.len += 1;
            if byte == b'\n' || self.len == LINE_MAX {
                flush(&self.bytes[..self.len]);
                self.len = 0;
            }
        }
    }

    /// Hands out whatever is buffered.
    pub fn flush(&mut self, mut flush: impl FnMut(&[u8])) {
        if self.len > 0 {
            flush(&self.bytes[..self.len]);
            self.len = 0;
        }
    }
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self::new()
    }
}

/// A line-buffered writer on the hypercall console.
pub struct Console {
    hypercall: Hypercall,
    line: LineBuffer,
}

impl Console {
    /// A console writing through `hypercall`.
    pub const fn new(hypercall: Hypercall) -> Self {
        Console {
            hypercall,
            line: LineBuffer::new(),
        }
    }

    /// Writes out a partial line.
    pub fn flush(&mut self) {
        let hypercall = &mut self.hypercall;
        // A console that fails has nowhere to report it; drop the text.
        self.line.flush(|bytes| {
            let _ = hypercall.console_write(bytes);
        });
    }
}

impl Write for Console {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let hypercall = &mut self.hypercall;
        self.line.push(text, |bytes| {
            let _ = hypercall.console_write(bytes);
        });
        Ok(())
    }
}

/// The console every vCPU prints to; `None` until [`init`].
static CONSOLE: SpinLock<Option<Console>> = SpinLock::new(None);

/// Enables [`print`] (before this, printing does nothing).
///
/// # Safety
/// As for [`Hypercall::new`]: only inside the pvstack guest.
pub unsafe fn init() {
    // SAFETY: the caller guarantees we run inside the pvstack guest.
    *CONSOLE.lock() = Some(Console::new(unsafe { Hypercall::new() }));
}

/// Prints `args` (buffered up to the end of the line).
pub fn print(args: fmt::Arguments<'_>) {
    if let Some(console) = CONSOLE.lock().as_mut() {
        let _ = console.write_fmt(args);
    }
}

/// Prints to the console; see [`print`].
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// Prints a line to the console; see [`print`].
#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn flushes_per_line_and_when_full() {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut line = LineBuffer::new();
        line.push("ab", |b| out.push(b.to_vec()));
        assert!(out.is_empty());
        line.push("c\nde\n", |b| out.push(b.to_vec()));
        assert_eq!(out, [b"abc\n".to_vec(), b"de\n".to_vec()]);
        out.clear();
        let long = "x".repeat(LINE_MAX + 10);
        line.push(&long, |b| out.push(b.to_vec()));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), LINE_MAX);
        line.flush(|b| out.push(b.to_vec()));
        assert_eq!(out[1].len(), 10);
    }
}
