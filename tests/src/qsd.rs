//! qemu-storage-daemon as the peer vhost-user-blk backend: QEMU's own
//! implementation serving an image file, started and stopped like
//! [`crate::blk_process::BlkProcess`].

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::Command;

use crate::process::LoggedProcess;

/// A running qemu-storage-daemon exporting one image as vhost-user-blk.
pub struct QsdProcess(LoggedProcess);

impl QsdProcess {
    /// Exports `image` (writable) on `socket` with `num_queues` queues and
    /// waits until it accepts a frontend. Panics, never skips, if
    /// qemu-storage-daemon is not installed (scripts/install-deps).
    pub fn start(image: &Path, socket: &Path, num_queues: u16) -> QsdProcess {
        let log = socket.with_extension("qsd.log");
        // qsd writes the pid file once every export is set up and listening.
        let pidfile = socket.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut command = Command::new("qemu-storage-daemon");
        command
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
            .arg(&pidfile);
        let mut process = LoggedProcess::spawn("qemu-storage-daemon", &mut command, log)
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start qemu-storage-daemon (install it with scripts/install-deps): {e}"
                )
            });
        process.wait_until_listening(socket, |_| pidfile.is_file());
        QsdProcess(process)
    }
}

impl Deref for QsdProcess {
    type Target = LoggedProcess;

    fn deref(&self) -> &LoggedProcess {
        &self.0
    }
}

impl DerefMut for QsdProcess {
    fn deref_mut(&mut self) -> &mut LoggedProcess {
        &mut self.0
    }
}
