//! [`Term`]: the shell's side of the virtio console. Output lines carry
//! the sequence stamp of `pvstack_guest::stamp`; when the transmit ring
//! stays full (the backend is gone), output is dropped and counted rather
//! than wedging the guest, and the next line that gets out says how many
//! lines were lost. Input is read through a small buffer that commands
//! such as `paste-check` share with the line editor.

use core::fmt::{self, Write};

use pvstack_guest::clock::{rdtsc, Clock};
use pvstack_guest::println;
use pvstack_guest::stamp::write_stamp;
use pvstack_guest::virtio::console::ConsoleDevice;
use pvstack_guest::virtio::VirtioError;

/// How long output waits for room in the transmit ring before it is dropped.
const STALL_LIMIT_US: u64 = 100_000;
/// Longest output line; longer ones are cut.
const LINE_MAX: usize = 8192;

/// A fixed buffer that `write!` fills, cutting what does not fit.
pub struct LineBuf {
    bytes: [u8; LINE_MAX],
    len: usize,
}

impl LineBuf {
    const fn new() -> Self {
        LineBuf {
            bytes: [0; LINE_MAX],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Write for LineBuf {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let n = text.len().min(LINE_MAX - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&text.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The transmit side: sends whole pieces of output or drops them.
struct Output {
    device: ConsoleDevice<'static>,
    clock: Clock,
    /// Lines dropped since the last line that got out.
    lost: u64,
    /// Lines dropped in all.
    lost_total: u64,
    /// The ring stayed full: drop at once until it has room again.
    dropping: bool,
}

impl Output {
    /// Sends `bytes` whole once the ring has room, or drops them if it
    /// stays full; returns whether they went out.
    fn send(&mut self, bytes: &[u8]) -> Result<bool, VirtioError> {
        let start = rdtsc();
        while self.device.tx_room()? < bytes.len() {
            if self.dropping || self.clock.us_since(start) > STALL_LIMIT_US {
                if !self.dropping {
                    // Once per stall, on the console that cannot fill up.
                    println!(
                        "shell: console output stalled for 100 ms; dropping lines until it drains"
                    );
                }
                self.dropping = true;
                self.lost += 1;
                self.lost_total += 1;
                return Ok(false);
            }
            core::hint::spin_loop();
        }
        self.dropping = false;
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = self.device.write(rest)?;
            rest = &rest[n..];
        }
        Ok(true)
    }
}

/// The console as the shell uses it.
pub struct Term {
    out: Output,
    /// Number of the last stamped line (sent or dropped).
    seq: u64,
    line: LineBuf,
    input: [u8; 4096],
    input_start: usize,
    input_end: usize,
}

impl Term {
    /// A terminal on `device`.
    pub fn new(device: ConsoleDevice<'static>, clock: Clock) -> Self {
        Term {
            out: Output {
                device,
                clock,
                lost: 0,
                lost_total: 0,
                dropping: false,
            },
            seq: 0,
            line: LineBuf::new(),
            input: [0; 4096],
            input_start: 0,
            input_end: 0,
        }
    }

    /// The console device (for its kick count).
    pub fn device(&self) -> &ConsoleDevice<'static> {
        &self.out.device
    }

    /// Lines dropped so far because the transmit ring stayed full.
    pub fn lost_total(&self) -> u64 {
        self.out.lost_total
    }

    /// Writes one stamped output line (the `\r\n` is added).
    pub fn line(&mut self, args: fmt::Arguments<'_>) -> Result<(), VirtioError> {
        self.seq += 1;
        self.line.len = 0;
        // Writing into a LineBuf cannot fail.
        let _ = write_stamp(&mut self.line, self.seq, self.out.lost);
        let _ = self.line.write_fmt(args);
        let _ = self.line.write_str("\r\n");
        if self.out.send(self.line.as_bytes())? {
            self.out.lost = 0;
        }
        Ok(())
    }

    /// Writes bytes that are not a whole line (prompt, echo), unstamped;
    /// if they are dropped, that counts as a lost line.
    pub fn raw(&mut self, bytes: &[u8]) -> Result<(), VirtioError> {
        self.out.send(bytes)?;
        Ok(())
    }

    /// Waits (up to `limit_us`) until the device has taken all output.
    pub fn drain(&mut self, limit_us: u64) -> Result<bool, VirtioError> {
        let start = rdtsc();
        while !self.out.device.tx_idle()? {
            if self.out.clock.us_since(start) > limit_us {
                return Ok(false);
            }
            core::hint::spin_loop();
        }
        Ok(true)
    }

    /// The next input byte; polls shared memory (no exits) until one comes.
    pub fn next_byte(&mut self) -> Result<u8, VirtioError> {
        while self.input_start == self.input_end {
            let n = self.out.device.read(&mut self.input)?;
            self.input_start = 0;
            self.input_end = n;
            if n == 0 {
                core::hint::spin_loop();
            }
        }
        let byte = self.input[self.input_start];
        self.input_start += 1;
        Ok(byte)
    }

    /// Input bytes already received and not yet taken.
    pub fn input_waiting(&self) -> usize {
        self.input_end - self.input_start
    }

    /// Up to `max` waiting input bytes, at least one (waits for it).
    pub fn next_bytes(&mut self, max: usize) -> Result<&[u8], VirtioError> {
        let first = self.next_byte()?;
        // Give the byte back: it is the first of the returned run.
        self.input_start -= 1;
        debug_assert_eq!(self.input[self.input_start], first);
        let n = (self.input_end - self.input_start).min(max);
        let run = &self.input[self.input_start..self.input_start + n];
        self.input_start += n;
        Ok(run)
    }
}

/// `outln!(term, ...)`: one stamped line on the console.
#[macro_export]
macro_rules! outln {
    ($term:expr) => { $term.line(format_args!("")) };
    ($term:expr, $($arg:tt)*) => { $term.line(format_args!($($arg)*)) };
}
