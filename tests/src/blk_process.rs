//! Running pvstack-blk as a real process in integration tests: start it,
//! wait until it listens, stop it with SIGTERM, and read its log.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{binary, send_signal, wait_or_kill, HANG_TIMEOUT};

/// A running pvstack-blk whose stderr (its log) goes to a file.
pub struct BlkProcess {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl BlkProcess {
    /// Starts `pvstack-blk --socket SOCKET ARGS...` and waits until it
    /// listens; its log is SOCKET with the extension `log`.
    pub fn start(socket: &Path, args: &[&str]) -> BlkProcess {
        Self::start_logging_to(socket, socket.with_extension("log"), args)
    }

    /// As [`start`](Self::start), logging to the file `log`.
    pub fn start_logging_to(socket: &Path, log: PathBuf, args: &[&str]) -> BlkProcess {
        let stderr = File::create(&log).expect("create backend log");
        let child = Command::new(binary("pvstack-blk"))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn pvstack-blk");
        let mut process = BlkProcess {
            child,
            socket: socket.to_owned(),
            log,
        };
        process.wait_for_socket();
        process
    }

    /// Waits for the backend's "listening" log line (the socket file alone
    /// proves nothing when a stale one was there before).
    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + HANG_TIMEOUT;
        loop {
            let socket_ready = std::fs::symlink_metadata(&self.socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if socket_ready && self.log().contains("listening for a vhost-user frontend") {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("poll pvstack-blk") {
                panic!(
                    "pvstack-blk exited ({status}) before listening:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "pvstack-blk never listened on {}:\n{}",
                self.socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("poll pvstack-blk").is_none()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for it to exit by itself.
    pub fn wait(&mut self) -> ExitStatus {
        wait_or_kill(&mut self.child).unwrap_or_else(|| {
            panic!(
                "pvstack-blk still ran after {HANG_TIMEOUT:?}:\n{}",
                self.log()
            )
        })
    }

    /// SIGKILLs it and reaps it: a backend crash.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL pvstack-blk");
        self.child.wait().expect("reap pvstack-blk");
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
            "pvstack-blk after SIGTERM: {status}; log:\n{}",
            self.log()
        );
    }
}

impl Drop for BlkProcess {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
