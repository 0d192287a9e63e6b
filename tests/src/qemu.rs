//! Booting a stock Linux guest under QEMU (software emulation) with
//! vhost-user devices served by pvstack's backends: QEMU is the peer frontend
//! and Linux's virtio drivers the peer guest drivers.
//!
//! The kernel and initramfs come from scripts/fetch-linux-guest (run here if
//! they are missing). The guest runs a shell script passed base64-encoded on
//! the kernel command line; its output is the serial console. A run that
//! hangs is killed after `crate::HANG_TIMEOUT`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::run_to_end;

/// Guest RAM; shared with the backends through a memfd.
const GUEST_MEMORY: &str = "256M";

/// The kernel and initramfs built by scripts/fetch-linux-guest.
pub struct LinuxGuestAssets {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Returns the assets, running scripts/fetch-linux-guest first (it does
/// nothing when they exist and are current). Panics (never skips) if they
/// cannot be made.
pub fn linux_guest_assets() -> LinuxGuestAssets {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts");
    let assets = LinuxGuestAssets {
        kernel: scripts.join("assets/vmlinuz"),
        initramfs: scripts.join("assets/initramfs.cpio.gz"),
    };
    let fetch = scripts.join("fetch-linux-guest");
    let output = Command::new(&fetch)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", fetch.display()));
    assert!(
        output.status.success(),
        "{} failed ({}): {}{}",
        fetch.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        assets.kernel.is_file(),
        "{} missing after fetch-linux-guest",
        assets.kernel.display()
    );
    assert!(
        assets.initramfs.is_file(),
        "{} missing after fetch-linux-guest",
        assets.initramfs.display()
    );
    assets
}

/// A guest script line that prints the kernel log as the section `dmesg`
/// (see [`GuestRun::assert_clean_kernel_log`]).
pub const KERNEL_LOG_SECTION: &str = "echo BEGIN dmesg; busybox dmesg; echo END dmesg";

/// Kernel log lines that mean a driver or the block layer hit trouble: a
/// WARN() splat (Linux's virtio ring warns, then stalls, on a request
/// longer than the ring without indirect descriptors), a failed request.
const KERNEL_LOG_TROUBLE: [&str; 3] = ["WARNING", "Call Trace", "I/O error"];

/// What a guest run printed on its serial console, and how its script ended.
pub struct GuestRun {
    pub console: String,
    /// The script's exit status as reported by /init ("PVTEST-EXIT n";
    /// "NESTED-EXIT n" in the L1 of [`crate::nested`]).
    pub script_status: Option<i32>,
}

impl GuestRun {
    /// Lines strictly between the lines `BEGIN name` and `END name`.
    pub fn section(&self, name: &str) -> Vec<&str> {
        let begin = format!("BEGIN {name}");
        let end = format!("END {name}");
        let lines: Vec<&str> = self.console.lines().map(str::trim_end).collect();
        let start = lines
            .iter()
            .position(|l| l.ends_with(&begin))
            .unwrap_or_else(|| panic!("no `{begin}` on the console:\n{}", self.console));
        let stop = lines[start..]
            .iter()
            .position(|l| *l == end)
            .unwrap_or_else(|| panic!("no `{end}` on the console:\n{}", self.console));
        lines[start + 1..start + stop].to_vec()
    }

    /// Checks the guest's kernel log (printed by [`KERNEL_LOG_SECTION`])
    /// holds `expected` and nothing of [`KERNEL_LOG_TROUBLE`].
    pub fn assert_clean_kernel_log(&self, expected: &str) {
        let log = self.section("dmesg");
        assert!(
            log.iter().any(|line| line.contains(expected)),
            "no {expected:?} in the guest's kernel log:\n{}",
            log.join("\n")
        );
        let trouble: Vec<&str> = log
            .iter()
            .copied()
            .filter(|line| KERNEL_LOG_TROUBLE.iter().any(|t| line.contains(t)))
            .collect();
        assert!(
            trouble.is_empty(),
            "the guest's kernel log shows trouble:\n{}\nwhole log:\n{}",
            trouble.join("\n"),
            log.join("\n")
        );
    }
}

/// Boots the Linux guest with one `vhost-user-blk-pci` device per socket (in
/// order: /dev/vda, /dev/vdb, ...), runs `script` with busybox sh and returns
/// the console output once the guest has powered off.
pub fn run_linux_guest(
    assets: &LinuxGuestAssets,
    blk_sockets: &[(&Path, u16)],
    script: &str,
) -> GuestRun {
    let mut command = guest_command(assets, script);
    for (index, (socket, num_queues)) in blk_sockets.iter().enumerate() {
        command
            .arg("-chardev")
            .arg(format!("socket,id=blk{index},path={}", socket.display()))
            .arg("-device")
            .arg(format!(
                "vhost-user-blk-pci,chardev=blk{index},num-queues={num_queues}"
            ));
    }
    run_guest(&mut command)
}

/// Boots the Linux guest with one `virtio-net-pci` NIC on a `-netdev
/// vhost-user` per (socket, MAC) (eth0, eth1, ...), runs `script` and
/// returns the console output once the guest has powered off.
pub fn run_linux_guest_net(
    assets: &LinuxGuestAssets,
    nics: &[(&Path, &str)],
    script: &str,
) -> GuestRun {
    let mut command = guest_command(assets, script);
    for (index, (socket, mac)) in nics.iter().enumerate() {
        command
            .arg("-chardev")
            .arg(format!("socket,id=net{index},path={}", socket.display()))
            .arg("-netdev")
            .arg(format!("vhost-user,id=nd{index},chardev=net{index}"))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=nd{index},mac={mac}"));
    }
    run_guest(&mut command)
}

/// QEMU with the kernel, initramfs, shared guest memory and `script`, no
/// devices yet.
fn guest_command(assets: &LinuxGuestAssets, script: &str) -> Command {
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-accel", "tcg", "-m", GUEST_MEMORY, "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={GUEST_MEMORY},share=on"
        ))
        .args(["-numa", "node,memdev=mem"])
        .arg("-kernel")
        .arg(&assets.kernel)
        .arg("-initrd")
        .arg(&assets.initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 pvtest={}",
            base64(script.as_bytes())
        ));
    command
}

/// Runs QEMU until the guest powers off.
fn run_guest(command: &mut Command) -> GuestRun {
    let finished = run_to_end(command);
    let console = finished.stdout;
    assert!(
        finished.status.success(),
        "QEMU failed ({}); console:\n{console}\nstderr:\n{}",
        finished.status,
        finished.stderr
    );
    let script_status = console
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("PVTEST-EXIT ")?.parse().ok());
    GuestRun {
        console,
        script_status,
    }
}

/// Standard base64 (RFC 4648, padded): the kernel command line carries the
/// guest script in it so that spaces and quotes survive.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> shift & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }
}
