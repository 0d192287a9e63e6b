//! qemu-storage-daemon as the peer vhost-user-blk backend: QEMU's own
//! implementation serving an image file, started and stopped like
//! [`crate::blk_process::BlkProcess`].

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{send_signal, wait_or_kill, HANG_TIMEOUT};

/// A running qemu-storage-daemon exporting one image as vhost-user-blk.
pub struct QsdProcess {
    child: Child,
    log: PathBuf,
}

impl QsdProcess {
    /// Exports `image` (writable) on `socket` with `num_queues` queues and
    /// waits until it accepts a frontend. Panics, never skips, if
    /// qemu-storage-daemon is not installed (scripts/install-deps).
    pub fn start(image: &Path, socket: &Path, num_queues: u16) -> QsdProcess {
        let log = socket.with_extension("qsd.log");
        // qsd writes the pid file once every export is set up and listening.
        let pidfile = socket.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let stderr = File::create(&log).expect("create qemu-storage-daemon log");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={num_queues}",
                socket.display()
            ))
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start qemu-storage-daemon (install it with scripts/install-deps): {e}")
            });
        let mut process = QsdProcess { child, log };
        let deadline = Instant::now() + HANG_TIMEOUT;
        loop {
            let socket_ready = std::fs::symlink_metadata(socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if socket_ready && pidfile.is_file() {
                return process;
            }
            if let Some(status) = process.child.try_wait().expect("poll qemu-storage-daemon") {
                panic!(
                    "qemu-storage-daemon exited ({status}) before listening:\n{}",
                    process.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon never listened on {}:\n{}",
                socket.display(),
                process.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything it printed on stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("poll qemu-storage-daemon")
            .is_none()
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        send_signal(&self.child, libc::SIGTERM);
        wait_or_kill(&mut self.child).unwrap_or_else(|| {
            panic!(
                "qemu-storage-daemon still ran after {HANG_TIMEOUT:?}:\n{}",
                self.log()
            )
        })
    }
}

impl Drop for QsdProcess {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
