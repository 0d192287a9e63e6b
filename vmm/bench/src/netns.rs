//! The benchmark's network namespace: made for one `pvstack bench` with a
//! persistent TAP whose host side is [`NET_HOST`], so the VMs and the host
//! sinks meet there and never touch the host's real networks. Removed when
//! dropped, so also after an error or SIGTERM.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::workload::NET_HOST;
use crate::error::{Error, Result};

/// The TAP every benchmark VM's NIC is attached to (one VM runs at a time).
pub const TAP: &str = "pvbtap0";

/// A network namespace that exists while this value does.
pub struct BenchNetns {
    name: String,
}

impl BenchNetns {
    /// Creates `pvbench-<pid>` with its loopback up and [`TAP`] configured.
    pub fn create() -> Result<BenchNetns> {
        let name = format!("pvbench-{}", std::process::id());
        ip(&name, &["netns", "add", &name])?;
        let ns = BenchNetns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        // Persistent, so its address survives the VMs (and pvstack-nets)
        // that attach to it in turn.
        ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"])?;
        ns.ip(&["addr", "add", &format!("{NET_HOST}/24"), "dev", TAP])?;
        ns.ip(&["link", "set", TAP, "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its file in /run/netns, for [`enter`].
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`.
    fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&self.name, &full)
    }
}

impl Drop for BenchNetns {
    fn drop(&mut self) {
        if let Err(e) = ip(&self.name, &["netns", "del", &self.name]) {
            log::warn!("{e}");
        }
    }
}

/// Runs `ip ARGS...`; a failure names the command and what ip said.
fn ip(ns: &str, args: &[&str]) -> Result<()> {
    let failed = |reason: String| Error::Bench {
        what: format!("network namespace {ns}"),
        reason,
    };
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| failed(format!("cannot run ip (iproute2): {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(failed(format!(
        "`ip {}` failed: {} (net workloads need CAP_NET_ADMIN for the namespace and its TAP)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

/// Moves the calling thread into the namespace at `path`, so the sockets
/// it opens afterwards live there.
pub fn enter(path: &Path) -> std::result::Result<(), String> {
    let ns = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: setns on a namespace fd we own; it changes only this
    // thread's network namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!(
            "cannot enter {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
