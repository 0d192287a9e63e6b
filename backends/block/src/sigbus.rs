//! Surviving a file that shrinks under a shared mapping of it.
//!
//! Touching a page of a file mapping past the file's end raises SIGBUS,
//! which kills the process by default; so does a page the file system
//! cannot supply (a full tmpfs, for a write into a hole). Whoever may
//! write an image may also truncate it, under a backend that serves it
//! through a mapping ([`crate::mapped`]). A mapping [`guard`] registers its address range;
//! the SIGBUS handler (installed once, process-wide, on the first guard)
//! puts a private zero page over the faulting page of a registered
//! mapping, so the interrupted copy completes, and marks that mapping
//! [`Guard::shrunk`]. Its owner then fails what the copy was for and stops
//! using the mapping. A SIGBUS anywhere else gets the default action, as
//! if no handler were there.
//!
//! The handler makes one system call (mmap) and otherwise only reads and
//! writes atomics, so it is safe in a signal handler; the registry is a
//! fixed table for the same reason.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

/// Mappings guarded at once (one per open image; a backend opens one).
const SLOTS: usize = 16;

struct Slot {
    claimed: AtomicBool,
    start: AtomicUsize,
    /// Zero while the slot guards nothing.
    len: AtomicUsize,
    shrunk: AtomicBool,
}

impl Slot {
    const fn free() -> Slot {
        Slot {
            claimed: AtomicBool::new(false),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            shrunk: AtomicBool::new(false),
        }
    }
}

static GUARDED: [Slot; SLOTS] = [const { Slot::free() }; SLOTS];
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// A mapping's registration with the SIGBUS handler; released when dropped.
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Guard {
    /// Whether a page of the mapping was found missing, past the file's
    /// end or not to be had (and replaced by a zero page): what was
    /// copied since may be wrong.
    pub fn shrunk(&self) -> bool {
        GUARDED[self.slot].shrunk.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let slot = &GUARDED[self.slot];
        slot.len.store(0, Ordering::Release);
        slot.shrunk.store(false, Ordering::Relaxed);
        slot.claimed.store(false, Ordering::Release);
    }
}

/// Guards the mapping of `len` bytes at `start` until the guard is dropped
/// (before the mapping is unmapped).
pub fn guard(start: *mut u8, len: usize) -> io::Result<Guard> {
    install()?;
    let slot = GUARDED
        .iter()
        .position(|slot| {
            slot.claimed
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
        .ok_or_else(|| io::Error::other(format!("more than {SLOTS} images mapped at once")))?;
    let entry = &GUARDED[slot];
    entry.shrunk.store(false, Ordering::Relaxed);
    entry.start.store(start as usize, Ordering::Relaxed);
    entry.len.store(len, Ordering::Release);
    Ok(Guard { slot })
}

fn install() -> io::Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        PAGE_SIZE.store(usize::try_from(page).unwrap_or(4096), Ordering::Relaxed);
        // SAFETY: sigaction is plain old data; all zeroes is a valid value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: installs a handler that only makes async-signal-safe
        // calls; the mask is initialised before use.
        let installed = unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) == 0
        };
        INSTALLED.store(installed, Ordering::Release);
    });
    if INSTALLED.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(io::Error::other("cannot install the SIGBUS handler"))
    }
}

extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo.
    let (code, address) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // si_code > 0: a fault the kernel raised, not a signal someone sent.
    if code > 0 && replace_faulting_page(address) {
        return;
    }
    // Not ours: the default action. A fault happens again on return and
    // kills the process; a sent signal is raised again.
    // SAFETY: signal and raise are async-signal-safe.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        if code <= 0 {
            libc::raise(libc::SIGBUS);
        }
    }
}

/// Puts a private zero page over the page at `address` if a guarded
/// mapping holds it, marking that mapping shrunk; whether it did.
fn replace_faulting_page(address: usize) -> bool {
    let page_size = PAGE_SIZE.load(Ordering::Relaxed);
    for slot in &GUARDED {
        let len = slot.len.load(Ordering::Acquire);
        let start = slot.start.load(Ordering::Relaxed);
        if len == 0 || address < start || address - start >= len {
            continue;
        }
        let page = address & !(page_size - 1);
        // SAFETY: the page lies in a mapping its guard's owner keeps
        // mapped; MAP_FIXED replaces just that page of it.
        let mapped = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return false;
        }
        slot.shrunk.store(true, Ordering::Release);
        return true;
    }
    false
}
