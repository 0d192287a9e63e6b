//! The `pvstack` command. Exit status: see `cli::EXIT_STATUS_HELP`.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use pvstack::api::{client, Request};
use pvstack::check::{check_host, Verdict};
use pvstack::cli::{CheckArgs, Cli, Command, CtlArgs, CtlCommand, DeviceCommand, RunArgs};
use pvstack::lifecycle::VmEnd;

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;

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
        Command::Check(args) => check_command(&args),
        Command::Ctl(args) => ctl_command(args),
        Command::Bench(args) => bench_command(&args),
    }
}

fn bench_command(args: &pvstack::bench::BenchArgs) -> ExitCode {
    match pvstack::bench::run(args) {
        Ok(pvstack::bench::BenchEnd::Done) => ExitCode::SUCCESS,
        Ok(pvstack::bench::BenchEnd::Signal(signal)) => {
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
        CtlCommand::Device(DeviceCommand::Swap { id, socket }) => Request::DeviceSwap {
            id,
            socket: socket.display().to_string(),
        },
        CtlCommand::Device(DeviceCommand::Reconnect { id }) => Request::DeviceReconnect { id },
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
    if let Err(e) = pvstack::signals::handle_termination() {
        eprintln!("pvstack: error: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    match pvstack::run::run(args) {
        Ok(end) => exit_status(end),
        Err(e) => {
            eprintln!("pvstack: error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
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
        VmEnd::Shutdown => ExitCode::SUCCESS,
        VmEnd::Failed(e) => {
            eprintln!("pvstack: error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
