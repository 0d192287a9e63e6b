//! Making a thread of a running process execute one system call of the
//! test's choosing, with ptrace: how the sandbox tests show that a filter
//! kills, logs or allows exactly what its list says, in the real binary.
//!
//! The thread is stopped (PTRACE_INTERRUPT) while it waits in a system
//! call, its registers are pointed at that call's `syscall` instruction
//! with the chosen number and arguments, and it runs that one call; then
//! its registers are put back with the interrupted call set to restart,
//! as the kernel would have done, and it is let go.

use std::io;

/// What the injected system call came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// It returned this value (a negative errno on failure).
    Returned(i64),
    /// The process died of this signal.
    Killed(i32),
}

/// The kernel's restart codes for an interrupted system call.
const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;

fn ptrace(request: libc::c_uint, tid: i32, addr: u64, data: u64) -> io::Result<i64> {
    // SAFETY: ptrace requests on a thread this test traces; the addresses
    // passed are either 0, locations in the tracee (checked by the kernel)
    // or pointers to live locals for GETREGS/SETREGS.
    let rc = unsafe {
        libc::ptrace(
            request,
            tid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    if rc == -1 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(0) {
            return Err(err);
        }
    }
    Ok(rc)
}

/// Waits for the next stop or the death of `tid`: Ok(status) if stopped,
/// Err(signal) if the process died.
fn wait_stop(tid: i32) -> Result<i32, i32> {
    let mut status = 0;
    // SAFETY: waitpid on a traced thread with a pointer to a local.
    let rc = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
    assert_eq!(rc, tid, "waitpid({tid}): {}", io::Error::last_os_error());
    if libc::WIFSTOPPED(status) {
        Ok(status)
    } else if libc::WIFSIGNALED(status) {
        Err(libc::WTERMSIG(status))
    } else {
        panic!("thread {tid} exited with status {status:#x}");
    }
}

fn get_regs(tid: i32) -> libc::user_regs_struct {
    // SAFETY: plain data; all zero is a valid value.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    ptrace(
        libc::PTRACE_GETREGS,
        tid,
        0,
        std::ptr::addr_of_mut!(regs) as u64,
    )
    .expect("PTRACE_GETREGS");
    regs
}

fn set_regs(tid: i32, regs: &libc::user_regs_struct) {
    ptrace(
        libc::PTRACE_SETREGS,
        tid,
        0,
        std::ptr::addr_of!(*regs) as u64,
    )
    .expect("PTRACE_SETREGS");
}

/// Writes `bytes` into the tracee at `addr`, a word at a time.
fn poke(tid: i32, addr: u64, bytes: &[u8]) {
    for (i, chunk) in bytes.chunks(8).enumerate() {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        ptrace(
            libc::PTRACE_POKEDATA,
            tid,
            addr + 8 * i as u64,
            u64::from_ne_bytes(word),
        )
        .unwrap_or_else(|e| panic!("writing the tracee's memory at {addr:#x}: {e}"));
    }
}

/// Attaches to `tid` and stops it while it waits in a system call; its
/// registers then, or Err(signal) if the process died. A thread caught
/// in user space (between two calls, or about to restart one, e.g. right
/// after an earlier injection) is let go and caught again a little later.
fn stop_in_syscall(tid: i32) -> Result<libc::user_regs_struct, i32> {
    for _ in 0..1000 {
        ptrace(
            libc::PTRACE_SEIZE,
            tid,
            0,
            libc::PTRACE_O_TRACESYSGOOD as u64,
        )
        .unwrap_or_else(|e| panic!("PTRACE_SEIZE {tid}: {e}"));
        ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0).expect("PTRACE_INTERRUPT");
        wait_stop(tid)?;
        let regs = get_regs(tid);
        if (regs.orig_rax as i64) >= 0 {
            return Ok(regs);
        }
        ptrace(libc::PTRACE_DETACH, tid, 0, 0).expect("PTRACE_DETACH");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("thread {tid} was never caught in a system call");
}

/// Runs system call `nr` with `args` in thread `tid` (waiting in a system
/// call). `data`, if given, is copied below the thread's stack pointer
/// first and `args[data_arg]` points at it (e.g. a path for openat).
pub fn inject_syscall(
    tid: i32,
    nr: i64,
    mut args: [u64; 6],
    data: Option<(&[u8], usize)>,
) -> Injected {
    let saved = match stop_in_syscall(tid) {
        Ok(saved) => saved,
        Err(signal) => return Injected::Killed(signal),
    };
    let mut regs = saved;
    if let Some((bytes, arg)) = data {
        // Below the red zone, in the stack the thread has already used.
        let addr = (saved.rsp - 512) & !0xf;
        poke(tid, addr, bytes);
        args[arg] = addr;
    }
    regs.rip = saved.rip - 2;
    regs.rax = nr as u64;
    regs.orig_rax = u64::MAX;
    regs.rdi = args[0];
    regs.rsi = args[1];
    regs.rdx = args[2];
    regs.r10 = args[3];
    regs.r8 = args[4];
    regs.r9 = args[5];
    set_regs(tid, &regs);
    // Entry, then exit of the injected call (or the process's death).
    for _ in 0..2 {
        ptrace(libc::PTRACE_SYSCALL, tid, 0, 0).expect("PTRACE_SYSCALL");
        if let Err(signal) = wait_stop(tid) {
            return Injected::Killed(signal);
        }
    }
    let result = get_regs(tid).rax as i64;
    let mut restore = saved;
    match saved.rax as i64 {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            restore.rax = saved.orig_rax;
            restore.rip = saved.rip - 2;
            restore.orig_rax = u64::MAX;
        }
        ERESTART_RESTARTBLOCK => {
            restore.rax = libc::SYS_restart_syscall as u64;
            restore.rip = saved.rip - 2;
            restore.orig_rax = u64::MAX;
        }
        _ => {}
    }
    set_regs(tid, &restore);
    ptrace(libc::PTRACE_DETACH, tid, 0, 0).expect("PTRACE_DETACH");
    Injected::Returned(result)
}

/// The threads of process `pid` whose name (comm) starts with `prefix`.
pub fn threads_named(pid: u32, prefix: &str) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's task list")
        .filter_map(|entry| {
            let tid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            comm.starts_with(prefix).then_some(tid)
        })
        .collect()
}
