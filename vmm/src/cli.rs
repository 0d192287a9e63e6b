//! The options of `pvstack run`, `pvstack check` and `pvstack ctl`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use pvstack_backend_common::parse_socket_mode;
use pvstack_devices::{BlkSpec, ConsoleSpec, NetSpec};
use pvstack_protocols::boot::CMDLINE_MAX;
use pvstack_protocols::layout;

use crate::kvm_flavour::Privilege;
use crate::sandbox::SandboxOptions;
use crate::snapshot::memfile::MemoryMode;

/// What pvstack's own guest runs without --guest-args.
pub const DEFAULT_GUEST_ARGS: &str = "hello";

/// Options of `pvstack run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub sandbox: SandboxOptions,

    /// The guest kernel, one of: pvstack's own guest ELF (static x86-64,
    /// loaded at or above 0x200000); a Linux bzImage; an ELF vmlinux with
    /// a PVH entry note. Which one it is is detected. Without it, the
    /// built-in pvstack-guest runs. A Linux kernel needs a VMX or SVM
    /// host (see `pvstack check`).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Linux only: the initial ramdisk, loaded as high in guest memory as
    /// the kernel allows.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Linux only: the kernel command line, e.g. "console=ttyS0" with
    /// --serial, "console=hvc0" with --console (default: empty).
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,

    /// Guest RAM: bytes, or with a suffix K, M, G (powers of 1024), e.g.
    /// 256M, 1G, 4096K; a multiple of 4K between 4M and 63G, and no more
    /// than the host's RAM.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_memory_size)]
    pub memory: u64,

    /// Back guest RAM with the host's reserved 2 MiB huge pages (a
    /// hugetlbfs memfd, MFD_HUGETLB) instead of ordinary shared memory,
    /// all taken when the VM is created: --memory must be whole 2 MiB
    /// pages and the host must have that many free (reserve them with
    /// `sysctl vm.nr_hugepages=N`), or pvstack stops with one line. A
    /// snapshot of such a VM restores into ordinary memory.
    #[arg(long)]
    pub hugepages: bool,

    /// Number of vCPUs. pvstack's own guest starts on vCPU 0 and starts
    /// the others with a hypercall; Linux brings them all up.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(layout::MAX_VCPUS)))]
    pub cpus: u32,

    /// pvstack's own guest's command line: a workload and its arguments,
    /// e.g. "hello" (the default), "exit 7", "selftest", "compute",
    /// "fault". (A Linux kernel's is --cmdline.)
    #[arg(long, value_name = "WORKLOAD ARGS")]
    pub guest_args: Option<String>,

    /// Privilege level of the guest's code. Default: user (CPL3) on PVM
    /// hosts, where only CPL3 runs natively; kernel (CPL0) on VMX/SVM. A
    /// Linux kernel always runs at CPL0; on a PVM host pvstack refuses to
    /// start one unless this is `kernel`.
    #[arg(long, value_name = "LEVEL")]
    pub guest_privilege: Option<Privilege>,

    /// Write pvstack's own guest's hypercall console to FILE instead of
    /// stdout (a Linux guest has none: its consoles are --serial and
    /// --console).
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,

    /// Largest size of the --console-log file (the guest fills it): output
    /// that would take it past this first moves it to FILE.1, replacing
    /// the one before. Sizes as for --memory (64M, 1G, bytes).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_log_size)]
    pub console_log_max_bytes: u64,

    /// The KVM device node.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,

    /// A virtio block device served by a vhost-user backend; repeat for
    /// several disks (disk 0, 1, ... in the guest). Either an already
    /// running backend, `socket=PATH`, or `image=PATH` to start pvstack-blk
    /// on the image for the life of the VM. Options, comma separated:
    /// `id=ID` (default blkN), `num-queues=N` (default: all the backend
    /// serves), `queue-size=N` (power of two), `readonly`,
    /// `reconnect-timeout=SECS` (how long to keep reconnecting after the
    /// backend hangs up; default: for ever), `backend-uid=UID` (a user
    /// besides pvstack's own and root whose backend may get guest memory;
    /// a backend running as anyone else is refused). With `image=`,
    /// `mode=MODE` picks where requests are served: `vhost-user` (default),
    /// `vhost-user-poll` (pvstack-blk busy-polls the queue between
    /// batches, so a busy guest rarely kicks), or the baselines in the VMM,
    /// `emulated-virtio` (every kick exits to the VMM) and
    /// `emulated-legacy` (a register-level controller; every data word
    /// exits). `pvstack bench` compares them.
    /// Example: --blk image=disk.img,num-queues=2
    #[arg(long = "blk", value_name = "SPEC")]
    pub blk: Vec<BlkSpec>,

    /// A virtio-net device; repeat for several NICs (net 0, 1, ... in the
    /// guest, in the slots after the disks). Either an already running
    /// vhost-user backend, `socket=PATH` (e.g. pvstack-net in peer mode),
    /// or `tap=NAME` to start pvstack-net on that TAP for the life of the
    /// VM (`mode=emulated`: the VMM serves the queues and the TAP itself,
    /// the baseline). Options: `id=ID` (default netN), `mac=MAC`,
    /// `mtu=N` (default 1500), `queue-size=N`, `backend-uid=UID` (as for
    /// --blk: a user besides pvstack's own and root whose backend may get
    /// guest memory).
    /// Example: --net tap=tap0,mac=52:54:00:12:34:56
    #[arg(long = "net", value_name = "SPEC")]
    pub net: Vec<NetSpec>,

    /// The guest's interactive console, besides the hypercall console
    /// (which keeps early and crash output): a virtio-console served by
    /// pvstack-console over vhost-user, either already running,
    /// `socket=PATH`, or started for the life of the VM on `stdio`, a new
    /// `pty` (its path is printed), or `unix=PATH` (a console server that
    /// clients attach to, e.g. `socat -,raw,echo=0 UNIX-CONNECT:PATH`,
    /// mode 0600); or `uart`, the same as --serial. `socket=PATH` takes
    /// `backend-uid=UID` as --blk does.
    #[arg(long, value_name = "SPEC")]
    pub console: Option<ConsoleSpec>,

    /// An emulated 16550 UART (every register access traps to the VMM).
    /// For pvstack's own guest, a UART in a device slot (MMIO), output to
    /// stdout: the console baseline. For a Linux guest, the PC's COM1 at
    /// I/O port 0x3f8, IRQ 4 (ttyS0: pass console=ttyS0), output to
    /// stdout and input from stdin.
    #[arg(long)]
    pub serial: bool,

    /// Serve the control API (vmm/API.md) on a Unix socket at PATH, which
    /// must not exist yet; `pvstack ctl --api-socket PATH` talks to it.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Permissions (octal) of the --api-socket file. The default, 600,
    /// lets only pvstack's user (and root) control the VM; e.g. 660
    /// shares it with the group.
    #[arg(long, value_name = "MODE", default_value = "600", value_parser = parse_socket_mode)]
    pub api_socket_mode: u32,
}

/// Options of `pvstack ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The socket `pvstack run --api-socket` serves.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,

    #[command(subcommand)]
    pub command: CtlCommand,
}

/// What to ask the running VM.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Print the VM's state, vCPUs, memory and devices with their backend
    /// socket, state and swap/reconnect counters.
    Info,
    /// Stop running the vCPUs.
    Pause,
    /// Run the vCPUs again.
    Resume,
    /// End the VM (pvstack run exits with status 0).
    Shutdown,
    /// Operate on one device.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Pause the VM, stop its backends' rings and write its state and RAM
    /// to DIR (created if missing; never overwritten), then resume with
    /// --resume or stay paused (`resume` continues it). `pvstack restore
    /// --from DIR` brings it back.
    Snapshot {
        /// The directory to write the snapshot to.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Resume the VM (and its backends' rings) after writing.
        #[arg(long)]
        resume: bool,
    },
    /// Replace the running pvstack with the one at --binary without
    /// stopping the guest: the new process takes over guest memory, the
    /// devices' eventfds and backend connections, the API socket and the
    /// VM's state; this one exits once the new one runs the guest. On any
    /// failure before that, this one resumes the guest and says why.
    Upgrade {
        /// The pvstack binary to run the VM from now on.
        #[arg(long, value_name = "PATH")]
        binary: PathBuf,
    },
}

/// Device operations.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Move device ID to the vhost-user backend listening on --socket; a
    /// backend that cannot take over is refused and the old one keeps serving.
    Swap {
        /// The device, e.g. blk0.
        id: String,
        /// The new backend's socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Stop the vCPUs from when the new backend is connected until it
        /// serves: the guest's requests on the device wait through the
        /// stall anyway, and a guest that polls would keep a CPU from the
        /// backends that need it then (a shorter, steadier stall on a host
        /// with few CPUs; the whole guest waits for it).
        #[arg(long)]
        pause_vcpus: bool,
    },
    /// Disconnect device ID from its backend and connect again.
    Reconnect {
        /// The device, e.g. blk0.
        id: String,
    },
}

/// Options of `pvstack restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub sandbox: SandboxOptions,

    /// The snapshot directory `pvstack ctl snapshot --to` wrote.
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,

    /// Serve disk ID from another backend than the snapshot's, e.g.
    /// `blk0=socket=/run/new.sock` or `blk1=image=disk.img`; repeatable.
    /// It must offer what the guest's driver accepted, with as many queues.
    #[arg(long = "blk", value_name = "ID=SPEC")]
    pub blk: Vec<String>,

    /// Serve NIC ID from another backend, e.g. `net0=socket=/run/n.sock`;
    /// the guest keeps its MAC.
    #[arg(long = "net", value_name = "ID=SPEC")]
    pub net: Vec<String>,

    /// Serve the virtio-console from another backend (as `run --console`).
    #[arg(long, value_name = "SPEC")]
    pub console: Option<ConsoleSpec>,

    /// Serve the control API on PATH instead of the snapshot's socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Permissions (octal) of the API socket instead of the snapshot's
    /// (600 unless `run --api-socket-mode` said otherwise).
    #[arg(long, value_name = "MODE", value_parser = parse_socket_mode)]
    pub api_socket_mode: Option<u32>,

    /// Append pvstack's own guest's console to FILE instead of the
    /// snapshot's --console-log.
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,

    /// How guest RAM comes back: `copy` (default) fills a new memfd with
    /// the data the snapshot holds, keeping the snapshot; `map` maps the
    /// snapshot's memory file itself as guest RAM: no copy and the same
    /// cost at any size, but the guest then writes into the snapshot,
    /// which is consumed (for a snapshot on tmpfs).
    #[arg(long, value_name = "MODE", default_value = "copy")]
    pub memory: MemoryMode,
}

/// Options of `pvstack take-over` (started by `pvstack ctl upgrade`).
#[derive(Debug, Args)]
pub struct TakeOverArgs {
    /// As the pvstack handing over was given.
    #[command(flatten)]
    pub sandbox: SandboxOptions,

    /// The Unix socket (an inherited file descriptor) the running pvstack
    /// hands the VM over on.
    #[arg(long, value_name = "N")]
    pub fd: i32,
}

/// Options of `pvstack check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The KVM device node to check.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
}

/// Parses a log size limit: a size as for memory, at least one byte.
pub fn parse_log_size(text: &str) -> Result<u64, String> {
    match pvstack_options::parse_size(text)? {
        0 => Err("a log size limit must be at least 1 byte".into()),
        bytes => Ok(bytes),
    }
}

/// Parses a memory size such as `256M`, `1G`, `4096K` or plain bytes, and
/// checks it against the layout's limits.
pub fn parse_memory_size(text: &str) -> Result<u64, String> {
    let bytes = pvstack_options::parse_size(text)?;
    if bytes == 0 {
        return Err("guest memory cannot be 0".into());
    }
    if bytes < layout::MIN_MEMORY {
        return Err(format!(
            "'{text}' is below the minimum of {}M",
            layout::MIN_MEMORY >> 20
        ));
    }
    if bytes > layout::MAX_MEMORY {
        return Err(format!(
            "'{text}' is above the maximum of {}G",
            layout::MAX_MEMORY >> 30
        ));
    }
    if bytes % 4096 != 0 {
        return Err(format!("'{text}' is not a multiple of 4K"));
    }
    Ok(bytes)
}

impl RunArgs {
    /// Checks what clap cannot check value by value; the message is a
    /// usage error.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(args) = &self.guest_args {
            if args.len() > CMDLINE_MAX {
                return Err(format!(
                    "--guest-args is {} bytes, longer than the guest command line limit of {CMDLINE_MAX}",
                    args.len()
                ));
            }
        }
        if self.kernel.is_none() {
            for (given, option) in [
                (self.initrd.is_some(), "--initrd"),
                (self.cmdline.is_some(), "--cmdline"),
            ] {
                if given {
                    return Err(format!(
                        "{option} is for a Linux kernel (--kernel); pvstack's own guest takes --guest-args"
                    ));
                }
            }
        }
        Ok(())
    }

    /// pvstack's own guest's command line.
    pub fn own_guest_args(&self) -> &str {
        self.guest_args.as_deref().unwrap_or(DEFAULT_GUEST_ARGS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_memory_size("256M"), Ok(256 << 20));
        assert_eq!(parse_memory_size("1G"), Ok(1 << 30));
        assert_eq!(parse_memory_size("1g"), Ok(1 << 30));
        assert_eq!(parse_memory_size("4096K"), Ok(4 << 20));
        assert_eq!(parse_memory_size("8388608"), Ok(8 << 20));
    }

    #[test]
    fn sizes_out_of_range_or_malformed() {
        assert!(parse_memory_size("0").unwrap_err().contains("cannot be 0"));
        assert!(parse_memory_size("0M").unwrap_err().contains("cannot be 0"));
        assert!(parse_memory_size("1M").unwrap_err().contains("minimum"));
        assert!(parse_memory_size("64G").unwrap_err().contains("maximum"));
        assert!(parse_memory_size("99999999999999999G")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_memory_size("4194305")
            .unwrap_err()
            .contains("multiple of 4K"));
        for bad in ["", "M", "12X", "-1M", "1.5G", "1 G"] {
            assert!(
                parse_memory_size(bad).unwrap_err().contains("not a size"),
                "{bad}"
            );
        }
    }
}
