//! Network test plumbing: a network namespace per test (so TAP devices and
//! addresses never touch the host's real networks), pvstack-net processes,
//! and pvstack VMs that run in the background while the test talks to them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use crate::process::Background;
use crate::{binary, guest_image, pvstack};

/// A network namespace that exists for the life of this value.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates namespace `pvst-<pid>-<tag>` with its loopback up.
    pub fn new(tag: &str) -> NetNs {
        let name = format!("pvst-{}-{tag}", std::process::id());
        // A namespace left by a crashed run of the same pid is removed.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        run_ok(ns.command("ip").args(["link", "set", "lo", "up"]));
        ns
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Gives `dev` the address `cidr` and brings it up.
    pub fn configure(&self, dev: &str, cidr: &str) {
        run_ok(self.command("ip").args(["addr", "add", cidr, "dev", dev]));
        run_ok(self.command("ip").args(["link", "set", dev, "up"]));
    }

    /// Runs `f` on a thread that has entered the namespace, so the sockets
    /// it opens live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            // SAFETY: setns on a valid namespace fd; it changes only this
            // thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `command`, panicking with its output if it fails.
pub fn run_ok(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `pvstack-net --socket SOCKET ARGS...` (inside `ns` if given), once it listens.
pub fn start_net_backend(ns: Option<&NetNs>, socket: &Path, args: &[&str]) -> Background {
    let program = binary("pvstack-net");
    let mut command = match ns {
        Some(ns) => ns.command(&program),
        None => Command::new(&program),
    };
    command
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env("RUST_LOG", "info");
    let mut backend = Background::start("pvstack-net", command, &socket.with_extension("log"));
    backend.wait_for("listening for a vhost-user frontend");
    backend
}

/// `pvstack run` of the guest with `--net SPEC`s and `guest_args` (inside
/// `ns` if given), in the background; console and log go to `log`.
pub fn start_vm(ns: Option<&NetNs>, nets: &[String], guest_args: &str, log: &Path) -> Background {
    let program = pvstack();
    let mut command = match ns {
        Some(ns) => ns.command(&program),
        None => Command::new(&program),
    };
    command
        .arg("run")
        .arg("--kernel")
        .arg(guest_image())
        .arg("--guest-args")
        .arg(guest_args)
        .env("RUST_LOG", "warn");
    for net in nets {
        command.arg("--net").arg(net);
    }
    Background::start("pvstack", command, log)
}
