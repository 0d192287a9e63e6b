//! [`LoggedProcess`]: a process a test starts (pvstack-blk,
//! qemu-storage-daemon, pvstack-net, a pvstack VM) with its output in a log
//! file: waited for until it listens on its socket or prints what the test
//! waits for, stopped with SIGTERM or SIGKILL, and killed if the test drops
//! it while it still runs; [`Background`], one whose output ends up as a
//! [`Finished`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{send_signal, wait_or_kill, Finished, HANG_TIMEOUT};

/// A running child process whose stdout and stderr go to a file.
pub struct LoggedProcess {
    /// Names it in panic messages.
    name: String,
    child: Child,
    log: PathBuf,
}

impl LoggedProcess {
    /// Spawns `command` with no stdin and stdout and stderr into the file
    /// `log` (created afresh). `name` names the process in panics.
    pub fn spawn(name: &str, command: &mut Command, log: PathBuf) -> io::Result<LoggedProcess> {
        let stdout = File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create the log {}: {e}", log.display()));
        let stderr = stdout
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot duplicate the log {}: {e}", log.display()));
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()?;
        Ok(LoggedProcess {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Waits until `socket` is a socket and `ready` holds (a socket file
    /// alone proves nothing when a stale one was there before); panics
    /// with the log if the process exits first or after [`HANG_TIMEOUT`].
    pub fn wait_until_listening(&mut self, socket: &Path, ready: impl Fn(&Self) -> bool) {
        let what = format!("listening on {}", socket.display());
        self.wait_until(&what, |process| {
            let socket_ready = std::fs::symlink_metadata(socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            socket_ready && ready(process)
        });
    }

    /// Waits until its log contains `needle`; panics with the log if the
    /// process exits first or after [`HANG_TIMEOUT`].
    pub fn wait_for_output(&mut self, needle: &str) {
        self.wait_for_output_count(needle, 1);
    }

    /// Waits until its log contains `needle` at least `count` times;
    /// panics with the log if the process exits first or after
    /// [`HANG_TIMEOUT`].
    pub fn wait_for_output_count(&mut self, needle: &str, count: usize) {
        self.wait_until(&format!("printing {needle:?} {count} times"), |process| {
            process.log().matches(needle).count() >= count
        });
    }

    /// Polls `done` until it holds; `what` names the wait in the panic if
    /// the process exits first or after [`HANG_TIMEOUT`].
    fn wait_until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + HANG_TIMEOUT;
        while !done(self) {
            if let Some(status) = self.child.try_wait().expect("waitpid works") {
                panic!(
                    "{} exited ({status}) before {what}:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} was not {what} after {HANG_TIMEOUT:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything it wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("waitpid works").is_none()
    }

    /// Waits for it to exit by itself.
    pub fn wait(&mut self) -> ExitStatus {
        wait_or_kill(&mut self.child).unwrap_or_else(|| {
            panic!(
                "{} still ran after {HANG_TIMEOUT:?}:\n{}",
                self.name,
                self.log()
            )
        })
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        send_signal(&self.child, libc::SIGTERM);
        self.wait()
    }

    /// Sends SIGTERM and asserts that it exits with status 0 (showing its
    /// log if not).
    pub fn terminate_cleanly(&mut self) {
        let status = self.terminate();
        assert_eq!(
            status.code(),
            Some(0),
            "{} after SIGTERM: {status}; log:\n{}",
            self.name,
            self.log()
        );
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs it and reaps it: a crash.
    pub fn kill(&mut self) {
        self.child
            .kill()
            .unwrap_or_else(|e| panic!("SIGKILL {}: {e}", self.name));
        self.child
            .wait()
            .unwrap_or_else(|e| panic!("reap {}: {e}", self.name));
    }
}

impl Drop for LoggedProcess {
    fn drop(&mut self) {
        // Not `is_running`: no panic while a failing test unwinds.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A process running in the background with its output (stdout and
/// stderr) in a file; a [`LoggedProcess`] that ends in a [`Finished`].
pub struct Background(LoggedProcess);

impl Background {
    /// Starts `command` with stdout and stderr going to `log`.
    pub fn start(name: &str, mut command: Command, log: &Path) -> Background {
        let process = LoggedProcess::spawn(name, &mut command, log.to_path_buf())
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Background(process)
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        self.0.log()
    }

    /// Waits until its output contains `needle`; panics if it exits first.
    pub fn wait_for(&mut self, needle: &str) {
        self.0.wait_for_output(needle);
    }

    /// Waits for it to exit by itself; its status and output.
    pub fn finish(mut self) -> Finished {
        let status = self.0.wait();
        self.finished(status)
    }

    /// SIGTERM, then waits.
    pub fn terminate(mut self) -> Finished {
        let status = self.0.terminate();
        self.finished(status)
    }

    fn finished(&self, status: ExitStatus) -> Finished {
        Finished {
            status,
            stdout: self.output(),
            stderr: String::new(),
        }
    }
}
