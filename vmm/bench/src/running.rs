//! The child processes running now (a VM, the backend it talks to, fio),
//! so that SIGTERM can stop them all, and a wait that never lets a pid be
//! signalled after it was reaped (and perhaps reused).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::Mutex;

/// Pids of the children that are running and not yet reaped.
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn running() -> std::sync::MutexGuard<'static, Vec<u32>> {
    // A list of pids stays valid even if a holder panicked.
    RUNNING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts `command` with no signal blocked and records it as running
/// until [`wait`] reaps it.
///
/// pvstack blocks SIGTERM and SIGINT in every thread (it takes them with
/// sigwait), and a child inherits the mask: qemu-storage-daemon and fio,
/// which rely on handlers, would then never see SIGTERM.
pub fn spawn(command: &mut Command) -> std::io::Result<Child> {
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls sigemptyset and pthread_sigmask (async-signal-safe) on a local
    // set, and builds an io::Error from an errno, which does not allocate.
    unsafe {
        command.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            match libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) {
                0 => Ok(()),
                rc => Err(std::io::Error::from_raw_os_error(rc)),
            }
        });
    }
    let child = command.spawn()?;
    running().push(child.id());
    Ok(child)
}

/// Sends SIGTERM to every running child.
pub fn terminate_all() {
    for &pid in running().iter() {
        // SAFETY: kill has no memory-safety preconditions; the pid is a
        // child not yet reaped (see `wait`), so it is still ours.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
}

/// Waits for `child` to exit, takes it off the list, then reaps it: the
/// exit is awaited with WNOWAIT, so while the pid is on the list it names
/// this child (a zombie at worst) and never a reused pid.
pub fn wait(child: &mut Child) -> std::io::Result<ExitStatus> {
    let pid = child.id();
    loop {
        // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`, which outlives the call.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            // ECHILD: already reaped through `child`; nothing to wait for.
            break;
        }
    }
    running().retain(|&p| p != pid);
    child.wait()
}

/// Whether `child` has exited (reaping it if so, as [`wait`] would).
pub fn try_wait(child: &mut Child) -> std::io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes only into `info`, which outlives the call.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            child.id() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
        )
    };
    // SAFETY: si_pid is valid to read for a WEXITED waitid result; it
    // stays 0 when nothing has exited (WNOHANG).
    let exited = rc == 0 && unsafe { info.si_pid() } != 0;
    if rc != 0 || exited {
        return wait(child).map(Some);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_waited_child_leaves_the_list() {
        let mut child = spawn(&mut Command::new("true")).unwrap();
        assert!(running().contains(&child.id()));
        assert!(wait(&mut child).unwrap().success());
        assert!(!running().contains(&child.id()));
    }

    #[test]
    fn terminate_all_stops_a_running_child_even_if_the_parent_blocks_sigterm() {
        // SAFETY: plain data; all zeroes is a valid sigset_t before sigemptyset.
        let mut term: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid sets; this blocks SIGTERM in the test thread only.
        unsafe {
            libc::sigemptyset(&mut term);
            libc::sigaddset(&mut term, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &term, std::ptr::null_mut());
        }
        let mut child = spawn(Command::new("sleep").arg("600")).unwrap();
        assert_eq!(try_wait(&mut child).unwrap(), None);
        terminate_all();
        // A generous bound that only turns "SIGTERM was ignored" into a
        // failure instead of a 600 s wait.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(status) = try_wait(&mut child).unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = wait(&mut child);
                panic!("the child ignored SIGTERM: it inherited a blocked mask");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }
}
