//! Running pvstack-blk (and other workspace binaries) as real processes from
//! integration tests: finding the binary, scratch directories, waiting for the
//! socket, stopping with SIGTERM and collecting the exit status and log.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Upper bound on waits that only exist so a broken run cannot hang forever.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// Path of a binary built in the same Cargo profile as the running test
/// (target/<profile>/deps/<test> -> target/<profile>/<name>). Panics, naming
/// the build command, if it is missing.
pub fn target_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` (same profile as the tests) first",
        path.display()
    );
    path
}

/// A fresh, empty directory for one test.
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvstack-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A running pvstack-blk whose stderr (its log) goes to a file.
pub struct BlkProcess {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl BlkProcess {
    /// Starts `pvstack-blk --socket SOCKET ARGS...` and waits until it listens.
    pub fn start(socket: &Path, args: &[&str]) -> BlkProcess {
        let log = socket.with_extension("log");
        let stderr = File::create(&log).expect("create backend log");
        let child = Command::new(target_binary("pvstack-blk"))
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

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let listening = std::fs::symlink_metadata(&self.socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if listening {
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
                "pvstack-blk never created {}",
                self.socket.display()
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
        wait_with_guard(&mut self.child, "pvstack-blk")
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill() with a pid we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM): {}", std::io::Error::last_os_error());
        self.wait()
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

/// Waits for `child`, killing it and panicking if it outlives `HANG_GUARD`.
pub fn wait_with_guard(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {HANG_GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
