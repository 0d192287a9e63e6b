//! The vhost-user backends the benchmark starts for one run each, in the
//! image's private directory: pvstack-blk (for `vhost-user` and
//! `vhost-user-poll`, so it can be given `--direct` on a disk) and
//! qemu-storage-daemon configured at its best for the storage (`qsd`).

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::running;

/// How long a backend may take to listen. Generous: it normally takes
/// milliseconds; this only turns a hang into an error.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long pvstack-blk (`--exit-on-disconnect`) may take to exit after
/// its VM went away, and any backend after SIGTERM, before the next step.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// The log line pvstack-blk prints once it accepts a frontend.
const PVSTACK_BLK_LISTENING: &str = "listening for a vhost-user frontend";

/// How qemu-storage-daemon is configured for the benchmark: its fastest
/// settings for the storage the image is on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QsdConfig {
    /// The file driver's `aio=`: io_uring where this QEMU has it, else
    /// `native` (O_DIRECT) or `threads`.
    pub aio: &'static str,
    /// `cache.direct=on` (O_DIRECT) on a disk.
    pub cache_direct: bool,
    /// The export runs in an iothread that busy-polls for up to this long
    /// before it sleeps (`--object iothread,poll-max-ns=`; QEMU grows and
    /// shrinks the window adaptively up to this bound).
    pub iothread_poll_max_ns: u64,
}

/// The iothread's polling bound: QEMU's own default (32 µs), set
/// explicitly. In a side-by-side check on this project's machines (4K
/// random reads on an ext4 file with O_DIRECT, QD1 and QD32, three
/// alternating rounds) it did as well as or better than 0 (no polling) and
/// 100 µs (pvstack-blk's `vhost-user-poll` window).
const QSD_POLL_MAX_NS: u64 = 32_768;

impl QsdConfig {
    /// The best configuration this qemu-storage-daemon accepts for
    /// `image` (`direct`: on a disk that takes O_DIRECT): io_uring if a
    /// trial start with it listens, else the fallback, logged.
    pub fn choose(program: &Path, dir: &Path, image: &Path, direct: bool) -> Result<QsdConfig> {
        let uring = QsdConfig {
            aio: "io_uring",
            cache_direct: direct,
            iothread_poll_max_ns: QSD_POLL_MAX_NS,
        };
        let trial = Backend::start_qsd(program, dir, image, &uring, 1);
        match trial {
            Ok(backend) => {
                backend.stop();
                Ok(uring)
            }
            // QEMU's words when it lacks io_uring or cannot set one up.
            Err(e)
                if ["io_uring was specified", "use io_uring"]
                    .iter()
                    .any(|words| e.to_string().contains(words)) =>
            {
                let fallback = if direct { "native" } else { "threads" };
                log::warn!("qemu-storage-daemon: no aio=io_uring ({e}); using aio={fallback}");
                Ok(QsdConfig {
                    aio: fallback,
                    ..uring
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The command line that exports `image` on `socket` with `queues`
    /// queues and writes `pidfile` once it listens.
    fn args(&self, image: &Path, socket: &Path, pidfile: &Path, queues: u16) -> Vec<OsString> {
        let on_off = |on: bool| if on { "on" } else { "off" };
        let mut blockdev = OsString::from("driver=file,node-name=disk,filename=");
        blockdev.push(qemu_escape(image));
        blockdev.push(format!(
            ",aio={},cache.direct={}",
            self.aio,
            on_off(self.cache_direct)
        ));
        let mut export = OsString::from(
            "type=vhost-user-blk,id=export,node-name=disk,iothread=iothread0,writable=on,\
             addr.type=unix,addr.path=",
        );
        export.push(qemu_escape(socket));
        export.push(format!(",num-queues={queues}"));
        vec![
            "--object".into(),
            format!(
                "iothread,id=iothread0,poll-max-ns={}",
                self.iothread_poll_max_ns
            )
            .into(),
            "--blockdev".into(),
            blockdev,
            "--export".into(),
            export,
            "--pidfile".into(),
            pidfile.into(),
        ]
    }
}

/// A path as a QEMU option value: a comma is written twice.
fn qemu_escape(path: &Path) -> OsString {
    let mut bytes = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        bytes.push(b);
        if b == b',' {
            bytes.push(b',');
        }
    }
    OsString::from_vec(bytes)
}

/// One running backend, stopped (and reaped) when dropped.
pub struct Backend {
    name: &'static str,
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    /// pvstack-blk exits by itself when its VM disconnects.
    exits_on_disconnect: bool,
}

impl Backend {
    /// Starts pvstack-blk on `image` with `queues` queues, `--direct` if
    /// `direct`, busy-polling `poll_us` µs after each batch (0: not).
    pub fn start_pvstack_blk(
        program: &Path,
        dir: &Path,
        image: &Path,
        direct: bool,
        poll_us: u32,
        queues: u16,
        confined: bool,
    ) -> Result<Backend> {
        let socket = dir.join("pvstack-blk.sock");
        let mut command = Command::new(program);
        command
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(image)
            .args(["--num-queues", &queues.to_string()])
            .arg("--exit-on-disconnect")
            .env("RUST_LOG", "info");
        if direct {
            command.arg("--direct");
        }
        if poll_us > 0 {
            command.args(["--poll-us", &poll_us.to_string()]);
        }
        if !confined {
            command.args(["--seccomp", "off"]);
        } else if let Some(user) = sandbox_user(dir)? {
            // As pvstack runs its own children: switched to 65534:65534 once
            // set up, in a directory handed to it.
            command.args(["--user", user]);
        }
        let mut backend = Backend::spawn("pvstack-blk", command, socket, dir)?;
        backend.exits_on_disconnect = true;
        backend.wait_until(|log| log.contains(PVSTACK_BLK_LISTENING))?;
        Ok(backend)
    }

    /// Starts qemu-storage-daemon exporting `image` with `queues` queues.
    pub fn start_qsd(
        program: &Path,
        dir: &Path,
        image: &Path,
        config: &QsdConfig,
        queues: u16,
    ) -> Result<Backend> {
        let socket = dir.join("qsd.sock");
        let pidfile = dir.join("qsd.pid");
        remove_if_there(&pidfile)?;
        let mut command = Command::new(program);
        command.args(config.args(image, &socket, &pidfile, queues));
        let mut backend = Backend::spawn("qemu-storage-daemon", command, socket, dir)?;
        // qsd writes the pid file once every export listens.
        backend.wait_until(|_| pidfile.is_file())?;
        Ok(backend)
    }

    fn spawn(
        name: &'static str,
        mut command: Command,
        socket: PathBuf,
        dir: &Path,
    ) -> Result<Backend> {
        remove_if_there(&socket)?;
        let log = dir.join(format!("{name}.log"));
        let log_file = File::create(&log).map_err(|source| Error::File {
            action: "create the backend log",
            path: log.clone(),
            cause: source,
        })?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = running::spawn(&mut command).map_err(|e| Error::Bench {
            what: name.to_string(),
            reason: format!(
                "cannot start {}: {e}",
                command.get_program().to_string_lossy()
            ),
        })?;
        Ok(Backend {
            name,
            child: Some(child),
            socket,
            log,
            exits_on_disconnect: false,
        })
    }

    /// The socket a VM connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its pid, for CPU accounting.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the socket exists and `ready` holds for the log text;
    /// an error with the backend's last log line if it exits first or
    /// takes too long.
    fn wait_until(&mut self, ready: impl Fn(&str) -> bool) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if self.socket.exists() && ready(&self.log_text()) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = running::try_wait(child) {
                    self.child = None;
                    return Err(self.failed(&format!("exited ({status}) before it listened")));
                }
            }
            if Instant::now() >= deadline {
                return Err(self.failed(&format!(
                    "did not listen on {} within {} s",
                    self.socket.display(),
                    STARTUP_TIMEOUT.as_secs()
                )));
            }
            sleep(POLL_INTERVAL);
        }
    }

    fn failed(&self, what: &str) -> Error {
        let log = self.log_text();
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no log output");
        Error::Bench {
            what: self.name.to_string(),
            reason: format!("{what}: {}", last.trim()),
        }
    }

    /// Lets the backend finish after its VM went away (pvstack-blk exits
    /// by itself and logs its totals; qsd gets SIGTERM) and returns its log.
    pub fn finish(mut self) -> String {
        self.end();
        self.log_text()
    }

    /// Stops it now.
    pub fn stop(mut self) {
        self.exits_on_disconnect = false;
        self.end();
    }

    fn end(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.exits_on_disconnect && wait_for_exit(&mut child, STOP_TIMEOUT) {
            return;
        }
        // SAFETY: kill has no memory-safety preconditions; the child is not
        // reaped yet (wait_for_exit reaps only what exited), so the pid is
        // still its own.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        if !wait_for_exit(&mut child, STOP_TIMEOUT) {
            log::warn!(
                "{} (pid {}) ignored SIGTERM; killing it",
                self.name,
                child.id()
            );
            let _ = child.kill();
            let _ = running::wait(&mut child);
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.exits_on_disconnect = false;
        self.end();
    }
}

/// Whether `child` exited (and was reaped) within `timeout`.
fn wait_for_exit(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match running::try_wait(child) {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() < deadline => sleep(POLL_INTERVAL),
            _ => return false,
        }
    }
}

fn remove_if_there(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::File {
            action: "remove the stale",
            path: path.to_path_buf(),
            cause: source,
        }),
    }
}

/// The user a confined pvstack-blk switches to, with `dir` handed to it:
/// nobody (by number) when the bench runs as root, none otherwise (only root can
/// switch).
fn sandbox_user(dir: &Path) -> Result<Option<&'static str>> {
    const USER: &str = pvstack_sandbox::user::DEFAULT_USER;
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let user = pvstack_sandbox::User::parse(USER).map_err(|reason| Error::Bench {
        what: "vhost-user".into(),
        reason,
    })?;
    std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid)).map_err(|e| Error::Bench {
        what: "vhost-user".into(),
        reason: format!("cannot hand {} to {user}: {e}", dir.display()),
    })?;
    Ok(Some(USER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qsd_command_line_is_its_best_for_the_storage() {
        let config = QsdConfig {
            aio: "io_uring",
            cache_direct: true,
            iothread_poll_max_ns: 100_000,
        };
        let args = config.args(
            Path::new("/d/a,b.img"),
            Path::new("/d/qsd.sock"),
            Path::new("/d/qsd.pid"),
            2,
        );
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[1], "iothread,id=iothread0,poll-max-ns=100000");
        assert_eq!(
            args[3],
            "driver=file,node-name=disk,filename=/d/a,,b.img,aio=io_uring,cache.direct=on"
        );
        assert!(args[5].contains("iothread=iothread0"), "{}", args[5]);
        assert!(
            args[5].ends_with("addr.path=/d/qsd.sock,num-queues=2"),
            "{}",
            args[5]
        );
        assert_eq!(args[6..], ["--pidfile", "/d/qsd.pid"]);
    }
}
