//! [`BackendProcess`]: a backend that pvstack starts itself (`--blk
//! image=...`), listening on a socket in a private directory, and that
//! never outlives pvstack.

use std::ffi::OsString;
use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use pvstack_sandbox::{SeccompMode, User};

use crate::error::{Error, Result};

/// How long a started backend may take to accept connections. Generous:
/// it normally takes milliseconds; this only bounds a backend that hangs.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a backend may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Interval between checks while waiting for a backend.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// What every backend child is told: `--seccomp` and `--user`.
struct ChildSandbox {
    seccomp: SeccompMode,
    user: Option<User>,
}

static CHILD_SANDBOX: OnceLock<ChildSandbox> = OnceLock::new();

/// Sets what the backend children pvstack starts from now on are told:
/// the seccomp mode and the user to switch to (their socket directory is
/// then handed to that user). The first call wins; without one, children
/// get their defaults and keep pvstack's user.
pub fn set_child_sandbox(seccomp: SeccompMode, user: Option<User>) {
    let _ = CHILD_SANDBOX.set(ChildSandbox { seccomp, user });
}

/// A running backend process that pvstack started.
#[derive(Debug)]
pub struct BackendProcess {
    program: PathBuf,
    child: Child,
    socket_dir: PathBuf,
    socket: PathBuf,
}

impl BackendProcess {
    /// Starts `program --socket SOCKET args...`, with SOCKET in a fresh
    /// private directory, and returns it with a connection to SOCKET once
    /// the backend accepts one. The backend gets SIGTERM when the thread
    /// that called this ends (PR_SET_PDEATHSIG), so call it from a thread
    /// that lives as long as the VM.
    pub fn start(program_name: &str, args: &[OsString]) -> Result<(Self, UnixStream)> {
        Self::start_with_stdin(program_name, args, Stdio::null())
    }

    /// As [`Self::start`], with the child's stdin given (`Stdio::inherit()`
    /// for a backend that reads pvstack's own stdin, such as a console).
    pub fn start_with_stdin(
        program_name: &str,
        args: &[OsString],
        stdin: Stdio,
    ) -> Result<(Self, UnixStream)> {
        let program = find_program(program_name)?;
        let socket_dir = create_socket_dir(program_name)?;
        let socket = socket_dir.join("vhost-user.sock");
        let mut command = Command::new(&program);
        command.arg("--socket").arg(&socket).args(args).stdin(stdin);
        if let Some(sandbox) = CHILD_SANDBOX.get() {
            command.arg("--seccomp").arg(sandbox.seccomp.to_string());
            if let Some(user) = &sandbox.user {
                // The child binds its sockets as pvstack's user, then
                // needs to enter the directory as its own.
                std::os::unix::fs::chown(&socket_dir, Some(user.uid), Some(user.gid)).map_err(
                    |source| Error::SocketDir {
                        dir: socket_dir.clone(),
                        cause: source,
                    },
                )?;
                command.arg("--user").arg(&user.spec);
            }
        }
        tie_to_this_thread(&mut command);
        let child = command.spawn().map_err(|source| Error::Child {
            program: program.clone(),
            what: "cannot start it",
            cause: source,
        })?;
        info!(
            "started {} (pid {}) on {}",
            program.display(),
            child.id(),
            socket.display()
        );
        let mut process = BackendProcess {
            program,
            child,
            socket_dir,
            socket,
        };
        let stream = process.wait_until_accepting()?;
        Ok((process, stream))
    }

    /// The socket the backend listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The backend's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connects to the backend's socket as soon as it accepts, or fails
    /// if the backend exits first.
    fn wait_until_accepting(&mut self) -> Result<UnixStream> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(stream) => return Ok(stream),
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(source) => {
                    return Err(Error::Connect {
                        socket: self.socket.clone(),
                        cause: source,
                    })
                }
            }
            let exited = self.child.try_wait().map_err(|source| Error::Child {
                program: self.program.clone(),
                what: "cannot check whether it is running",
                cause: source,
            })?;
            if let Some(status) = exited {
                self.explain_sigsys(status);
                return Err(Error::ChildExited {
                    program: self.program.clone(),
                    status,
                    socket: self.socket.clone(),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::ChildTimeout {
                    program: self.program.clone(),
                    socket: self.socket.clone(),
                    seconds: STARTUP_TIMEOUT.as_secs(),
                });
            }
            sleep(POLL_INTERVAL);
        }
    }

    /// A child ended by its seccomp filter wrote the system call on its
    /// stderr (pvstack's); say which child that line was from.
    fn explain_sigsys(&self, status: std::process::ExitStatus) {
        if status.signal() == Some(libc::SIGSYS) {
            error!(
                "{} (pid {}) died of SIGSYS: its seccomp filter caught a system call outside its allow-list (named in its last line above)",
                self.program.display(),
                self.child.id()
            );
        }
    }

    /// SIGTERM, a grace period, then SIGKILL; always reaps the child.
    fn stop(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            debug!("{} had already exited ({status})", self.program.display());
            self.explain_sigsys(status);
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child, which has not been reaped
        // (try_wait above found it running), so the pid is still its own.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    info!("{} (pid {pid}) exited ({status})", self.program.display());
                    self.explain_sigsys(status);
                    return;
                }
                Ok(None) => sleep(POLL_INTERVAL),
                Err(_) => break,
            }
        }
        warn!(
            "{} (pid {pid}) did not exit on SIGTERM; killing it",
            self.program.display()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.stop();
        if let Err(err) = std::fs::remove_dir_all(&self.socket_dir) {
            warn!("cannot remove {}: {err}", self.socket_dir.display());
        }
    }
}

/// Makes the child `command` starts get SIGTERM when the calling thread
/// ends (PR_SET_PDEATHSIG), and start with no signal blocked: pvstack
/// blocks SIGTERM and SIGINT in every thread (a thread of its own waits
/// for them), the mask survives fork and exec, and std's `Command` leaves
/// it as it is, so without this a backend that does not set its own mask
/// would ignore both the operator's SIGTERM and the death signal.
fn tie_to_this_thread(command: &mut Command) {
    // SAFETY: getpid is async-signal-safe.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe calls (sigemptyset, sigprocmask, prctl,
    // getppid) on a set on its own stack, and builds io::Errors from an
    // errno, which does not allocate.
    unsafe {
        command.pre_exec(move || {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // pvstack may have died before the prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// `name` in the directory of the running executable, else on PATH.
fn find_program(name: &str) -> Result<PathBuf> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let beside = exe_dir.join(name);
    if beside.is_file() {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| Error::ProgramNotFound {
            program: name.to_string(),
            exe_dir,
        })
}

/// A new directory only this user can enter, for one backend's socket.
fn create_socket_dir(program_name: &str) -> Result<PathBuf> {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    loop {
        let dir = std::env::temp_dir().join(format!(
            "pvstack-{}-{program_name}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ));
        // Not recursive: fails if the directory exists, so nobody else's
        // directory is ever reused. One left behind by an earlier process
        // with the same pid (pids are reused) is skipped, not an error.
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                debug!("{} exists; trying the next name", dir.display());
            }
            Err(source) => return Err(Error::SocketDir { dir, cause: source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn socket_dirs_are_private_and_distinct() {
        let a = create_socket_dir("unit-test").unwrap();
        let b = create_socket_dir("unit-test").unwrap();
        assert_ne!(a, b);
        let mode = std::fs::metadata(&a).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::remove_dir(a).unwrap();
        std::fs::remove_dir(b).unwrap();
    }

    #[test]
    fn socket_dirs_left_behind_by_a_reused_pid_are_skipped() {
        // Stand-ins for directories an earlier process with this pid left.
        let probe = create_socket_dir("reused-pid").unwrap();
        let name = probe.file_name().unwrap().to_str().unwrap().to_string();
        let (prefix, seq) = name.rsplit_once('-').unwrap();
        let seq: u32 = seq.parse().unwrap();
        let stale: Vec<PathBuf> = (seq + 1..seq + 20)
            .map(|n| probe.with_file_name(format!("{prefix}-{n}")))
            .collect();
        for dir in &stale {
            std::fs::create_dir(dir).unwrap();
        }
        let fresh = create_socket_dir("reused-pid").unwrap();
        assert!(!stale.contains(&fresh), "{} was reused", fresh.display());
        for dir in stale.iter().chain([&probe, &fresh]) {
            std::fs::remove_dir(dir).unwrap();
        }
    }

    /// The signals blocked in the process running this, from
    /// /proc/self/status's SigBlk (a hex mask, bit N-1 for signal N).
    fn blocked_in(status: &str) -> u64 {
        let hex = status
            .lines()
            .find_map(|line| line.strip_prefix("SigBlk:"))
            .expect("a SigBlk line");
        u64::from_str_radix(hex.trim(), 16).expect("a hex mask")
    }

    #[test]
    fn children_start_with_no_signal_blocked() {
        // As pvstack's threads run: SIGTERM and SIGINT blocked.
        std::thread::spawn(|| {
            // SAFETY: a zeroed sigset_t initialised by sigemptyset, then
            // valid signal numbers added; this thread's own mask changes.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTERM);
                libc::sigaddset(&mut set, libc::SIGINT);
                assert_eq!(
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
                    0
                );
            }
            let ours = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            let term = 1u64 << (libc::SIGTERM - 1);
            assert_ne!(blocked_in(&ours) & term, 0, "the test blocks SIGTERM");
            let mut command = Command::new("cat");
            command.arg("/proc/self/status");
            tie_to_this_thread(&mut command);
            let output = command.output().expect("run cat");
            assert!(output.status.success(), "{output:?}");
            let theirs = String::from_utf8(output.stdout).unwrap();
            assert_eq!(blocked_in(&theirs), 0, "{theirs}");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn missing_program_is_named() {
        let err = find_program("pvstack-no-such-backend").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("pvstack-no-such-backend not found next to"),
            "{err}"
        );
    }

    #[test]
    fn program_that_exits_at_once_is_reported() {
        // `false` ignores its arguments and exits with status 1.
        let err = BackendProcess::start("false", &[]).unwrap_err();
        assert!(matches!(err, Error::ChildExited { .. }), "{err}");
        assert!(err.to_string().contains("exit status: 1"), "{err}");
    }
}
