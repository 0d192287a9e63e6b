//! What `--seccomp on` does with a system call outside the allow-list:
//! the filter returns SECCOMP_RET_TRAP, so the kernel skips the call and
//! sends SIGSYS to the thread that made it; this handler writes one line
//! naming the thread and the system call to stderr and then lets SIGSYS's
//! default action end the whole process. A process killed outright
//! (SECCOMP_RET_KILL_PROCESS) could not say why, and the kernel's audit
//! record is rate-limited, needs /dev/kmsg and gives only a number.
//!
//! Everything here runs in a signal handler: no allocation, no locks, only
//! async-signal-safe system calls (prctl, write, tgkill), all in
//! [`crate::runtime::RUNTIME`], so the filter itself lets them through.

use std::ffi::c_void;
use std::io;
use std::sync::OnceLock;

use syscalls::Sysno;

/// Names the process in the line (the program given to the first
/// process-wide filter).
static PROGRAM: OnceLock<String> = OnceLock::new();

/// Installs the handler for the whole process; `program` names it in the
/// line (the first name given stays).
pub fn install(program: &str) -> io::Result<()> {
    let _ = PROGRAM.set(program.to_owned());
    // SAFETY: sigaction is plain data; all zero is a valid start.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    // RESETHAND: the handler's own raise() then meets the default action
    // (end the process); NODEFER: that SIGSYS is not held back while the
    // handler runs.
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
    // SAFETY: the action is initialised above and its handler is an
    // extern "C" function with the SA_SIGINFO signature.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let number = unsafe { trapped_syscall(info) };
    let mut line = Line::default();
    line.push(PROGRAM.get().map_or("pvstack", String::as_str).as_bytes());
    line.push(b": seccomp: thread ");
    let mut thread = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr()) };
    let len = thread.iter().position(|&b| b == 0).unwrap_or(thread.len());
    line.push(&thread[..len]);
    line.push(b" made system call ");
    let name = usize::try_from(number)
        .ok()
        .and_then(Sysno::new)
        .map_or("(unknown)", |sysno| sysno.name());
    line.push(name.as_bytes());
    line.push(b" (");
    line.push_number(number);
    line.push(b"), outside its allow-list: ending the process (SIGSYS)\n");
    // SAFETY: write and raise are async-signal-safe; the buffer is live.
    unsafe {
        libc::write(2, line.bytes.as_ptr().cast(), line.len);
        libc::raise(libc::SIGSYS);
    }
}

/// The system call number of a SIGSYS from seccomp: `si_syscall`, which
/// the libc crate does not name. In the kernel's siginfo the SIGSYS
/// fields follow the three ints (signo, errno, code) and padding to 8
/// bytes: `void *_call_addr; int _syscall; unsigned int _arch;`.
///
/// # Safety
/// `info` points to the siginfo the kernel passed the handler.
unsafe fn trapped_syscall(info: *const libc::siginfo_t) -> i32 {
    const SI_SYSCALL_OFFSET: usize = 16 + std::mem::size_of::<*const c_void>();
    // SAFETY: siginfo_t is 128 bytes; the offset is inside it and aligned
    // for an i32.
    unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    }
}

/// A fixed buffer for the line: no allocation in a signal handler.
struct Line {
    bytes: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            bytes: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    /// Appends what fits.
    fn push(&mut self, text: &[u8]) {
        let n = text.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
    }

    fn push_number(&mut self, number: i32) {
        if number < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 10];
        let mut rest = number.unsigned_abs();
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.push(&digits[start..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_holds_numbers_and_stops_at_its_end() {
        let mut line = Line::default();
        line.push(b"n=");
        line.push_number(0);
        line.push(b",");
        line.push_number(-41);
        line.push(b",");
        line.push_number(i32::MAX);
        assert_eq!(&line.bytes[..line.len], b"n=0,-41,2147483647");
        line.push(&[b'x'; 300]);
        assert_eq!(line.len, 256);
    }
}
