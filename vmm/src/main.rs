//! The `pvstack` command. Exit status: see `EXIT_STATUS_HELP`.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use pvstack::api::{client, Request};
use pvstack::check::{check_host, Verdict};
use pvstack::cli::{
    CheckArgs, CtlArgs, CtlCommand, DeviceCommand, RestoreArgs, RunArgs, TakeOverArgs,
};
use pvstack::lifecycle::VmEnd;

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;

const EXIT_STATUS_HELP: &str = "\
Exit status of `pvstack run`: the guest's EXIT code (0..=255), or 0 when a
Linux guest powers off; 1 if pvstack failed, the guest crashed (the crash
report with the exit reason and the vCPU registers goes to stderr) or a
Linux guest rebooted (pvstack does not restart guests; a kernel that panics
with panic=N reboots too); 2 for bad usage; 128+N when stopped by signal N
(143 for SIGTERM, 130 for SIGINT), like a shell.
`pvstack check`: 0 if pvstack can run on this host, 1 if not.
Logging goes to stderr at level info (flavour, boot time); set RUST_LOG to
change it, e.g. RUST_LOG=warn.";

/// pvstack: a thin KVM VMM with a paravirtual hypercall ABI, running its
/// own no_std guest (or another ELF) at native speed, or a stock Linux
/// kernel on VMX/SVM hosts.
#[derive(Debug, Parser)]
#[command(name = "pvstack", version, after_help = EXIT_STATUS_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a VM and run the guest until it exits.
    Run(RunArgs),
    /// Bring back a VM from a snapshot (`pvstack ctl snapshot`) and run it,
    /// with the snapshot's devices and options unless overridden.
    Restore(RestoreArgs),
    /// Take over a running VM from another pvstack (internal: `pvstack
    /// ctl upgrade` starts it).
    #[command(hide = true)]
    TakeOver(TakeOverArgs),
    /// Report whether this host can run pvstack (like virt-host-validate).
    Check(CheckArgs),
    /// Send one request to a running VM's control API and print the JSON
    /// response (exit status 0 if it succeeded, 1 if not).
    Ctl(CtlArgs),
    /// Run the same guest block workloads on every disk mode (emulated
    /// legacy controller, emulated virtio, vhost-user, vhost-user with
    /// polling, qemu-storage-daemon, and fio on the host as the ceiling),
    /// interleaved, several times each, and print medians with min and max.
    Bench(pvstack_bench::BenchArgs),
}

fn main() -> ExitCode {
    // Before any thread exists, so every thread inherits the mask.
    if let Err(e) = pvstack::signals::block_termination() {
        eprintln!("pvstack: error: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match cli.command {
        Command::Run(args) => run_command(&args),
        Command::Restore(args) => vm_command(|| pvstack::snapshot::restore::restore(&args)),
        Command::TakeOver(args) => vm_command(|| pvstack::snapshot::takeover::take_over(&args)),
        Command::Check(args) => check_command(&args),
        Command::Ctl(args) => ctl_command(args),
        Command::Bench(args) => bench_command(&args),
    }
}

fn bench_command(args: &pvstack_bench::BenchArgs) -> ExitCode {
    match pvstack_bench::run(args, pvstack::signals::wait_for_termination) {
        Ok(pvstack_bench::BenchEnd::Done) => ExitCode::SUCCESS,
        Ok(pvstack_bench::BenchEnd::Signal(signal)) => {
            ExitCode::from(128u8.saturating_add(signal as u8))
        }
        Err(e) => {
            eprintln!("pvstack: error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn ctl_command(args: CtlArgs) -> ExitCode {
    let request = match args.command {
        CtlCommand::Info => Request::Info {},
        CtlCommand::Pause => Request::Pause {},
        CtlCommand::Resume => Request::Resume {},
        CtlCommand::Shutdown => Request::Shutdown {},
        CtlCommand::Device(DeviceCommand::Swap {
            id,
            socket,
            pause_vcpus,
        }) => Request::DeviceSwap {
            id,
            socket: socket.display().to_string(),
            pause_vcpus,
        },
        CtlCommand::Device(DeviceCommand::Reconnect { id }) => Request::DeviceReconnect { id },
        CtlCommand::Snapshot { to, resume } => Request::Snapshot {
            to: absolute(&to).display().to_string(),
            resume,
        },
        CtlCommand::Upgrade { binary } => Request::Upgrade {
            binary: absolute(&binary).display().to_string(),
        },
    };
    match client::call(&args.api_socket, &request) {
        Ok(response) => {
            match serde_json::to_string(&response) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("pvstack: error: {e}"),
            }
            if response.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => {
            eprintln!("pvstack: error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run_command(args: &RunArgs) -> ExitCode {
    if let Err(usage) = args.validate() {
        eprintln!("pvstack: error: {usage}");
        return ExitCode::from(EXIT_USAGE);
    }
    vm_command(|| pvstack::run::run(args))
}

/// Runs a VM with `run` (which builds it) and turns how it ended into
/// the exit status.
fn vm_command(run: impl FnOnce() -> pvstack::Result<VmEnd>) -> ExitCode {
    if let Err(e) = pvstack::signals::handle_termination() {
        eprintln!("pvstack: error: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    match run() {
        Ok(end) => exit_status(end),
        Err(e) => {
            eprintln!("pvstack: error: {e}");
            ExitCode::from(if e.is_usage() {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            })
        }
    }
}

/// `path` relative to the current directory made absolute: the VM's
/// process may run elsewhere.
fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn check_command(args: &CheckArgs) -> ExitCode {
    let items = check_host(&args.kvm_device);
    for item in &items {
        println!("{item}");
    }
    if items.iter().any(|i| i.verdict == Verdict::Fail) {
        println!("pvstack cannot run on this host");
        ExitCode::from(EXIT_FAILURE)
    } else {
        println!("pvstack can run on this host");
        ExitCode::SUCCESS
    }
}

/// Help and version go out as clap prints them; real usage errors become
/// one line and exit status 2.
fn usage_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        _ => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("bad usage");
            eprintln!("pvstack: {}", first.trim());
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn exit_status(end: VmEnd) -> ExitCode {
    match end {
        VmEnd::GuestExit(code) => ExitCode::from(code),
        VmEnd::Crash(report) => {
            eprint!("{report}");
            ExitCode::from(EXIT_FAILURE)
        }
        VmEnd::Signal(signal) => ExitCode::from(128u8.saturating_add(signal as u8)),
        VmEnd::Shutdown | VmEnd::PowerOff => ExitCode::SUCCESS,
        VmEnd::Reset { how, report } => {
            if let Some(report) = report {
                eprint!("{report}");
            }
            eprintln!(
                "pvstack: the guest reset the machine ({how}); pvstack does not restart guests"
            );
            ExitCode::from(EXIT_FAILURE)
        }
        VmEnd::Failed(e) => {
            eprintln!("pvstack: error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use pvstack::kvm_flavour::Privilege;
    use pvstack_protocols::boot::CMDLINE_MAX;

    #[test]
    fn guest_args_are_bounded() {
        let parse = |args: String| {
            let cli = Cli::try_parse_from(["pvstack", "run", "--guest-args", &args]).unwrap();
            let Command::Run(run) = cli.command else {
                panic!("not run")
            };
            run.validate()
        };
        assert!(parse("a".repeat(CMDLINE_MAX)).is_ok());
        let linux_only = Cli::try_parse_from(["pvstack", "run", "--cmdline", "quiet"]).unwrap();
        let Command::Run(run) = linux_only.command else {
            panic!("not run")
        };
        assert!(run
            .validate()
            .unwrap_err()
            .contains("--cmdline is for a Linux kernel"));
        assert!(parse("a".repeat(CMDLINE_MAX + 1))
            .unwrap_err()
            .contains("1025 bytes"));
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "pvstack",
            "run",
            "--cpus",
            "2",
            "--guest-privilege",
            "kernel",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!((args.cpus, args.memory), (2, 256 << 20));
        assert_eq!(args.guest_privilege, Some(Privilege::Kernel));
        assert!(Cli::try_parse_from(["pvstack", "run", "--cpus", "0"]).is_err());
        assert!(Cli::try_parse_from(["pvstack", "run", "--cpus", "65"]).is_err());
    }
}
