//! pvstack-console: serve a virtio console to a VMM over vhost-user.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{ArgGroup, Parser};
use pvstack_backend_common::message_filter::{FilteredSocket, PassThrough};
use pvstack_backend_common::{backend_main, block_stop_signals, serve_on, SocketArgs};
use pvstack_console::backend::{ConsoleBackend, INPUT_EVENT, MAX_CHAIN_OUTPUT};
use pvstack_console::error::Error;
use pvstack_console::host::{pty, server, stdio};
use pvstack_console::hub::Hub;
use pvstack_console::log_file::LogFile;
use pvstack_console::stats::ConsoleStats;
use pvstack_sandbox::{backend::SERVE, runtime::RUNTIME, SandboxArgs};
use vmm_sys_util::epoll::EventSet;

const DEVICE: &str = "pvstack-console";

/// Serve a virtio console to a VMM (pvstack, QEMU, ...) over vhost-user,
/// with the host side on stdio, a PTY, or a Unix socket console server.
/// Lines the pvstack guest lost while this backend was down are reported
/// as `[pvstack-console: N lines lost]`.
#[derive(Debug, Parser)]
#[command(name = DEVICE, version)]
#[command(group(ArgGroup::new("host").required(true).args(["stdio", "pty", "listen"])))]
struct Args {
    #[command(flatten)]
    socket: SocketArgs,

    #[command(flatten)]
    sandbox: SandboxArgs,

    /// Guest output to stdout, stdin to the guest.
    #[arg(long)]
    stdio: bool,

    /// Open a pseudo-terminal and print `pvstack-console: pty PATH` on
    /// stdout; open PATH with a terminal program to talk to the guest.
    #[arg(long)]
    pty: bool,

    /// Serve the console on a Unix socket at PATH: any number of clients
    /// attach and detach (e.g. `socat -,raw,echo=0 UNIX-CONNECT:PATH`);
    /// each first sees the last 64 KiB of output.
    #[arg(long, value_name = "PATH")]
    listen: Option<PathBuf>,

    /// Also append all guest output to FILE.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,

    /// Largest size of the --log file: when output would take it past
    /// this, it is renamed FILE.1 (replacing the previous one) and a new
    /// FILE starts. At least 4096.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u64).range(4096..))]
    log_max_bytes: u64,
}

fn main() -> ExitCode {
    backend_main(DEVICE, |args: &Args| &args.socket, run)
}

/// Set up: from here on the host side, the socket directories (and the
/// log's) and the allow-list are all this process has
/// (pvstack_sandbox::confine).
fn confine(args: &Args, filtered: &FilteredSocket) -> Result<(), Error> {
    let mut files = pvstack_sandbox::serving_files(&args.socket.socket);
    let mut sockets = filtered.paths().to_vec();
    if let Some(path) = &args.listen {
        sockets.push(path.clone());
        files.push(pvstack_sandbox::confine::directory_of(path));
    }
    if let Some(path) = &args.log {
        files.push(pvstack_sandbox::confine::directory_of(path));
    }
    pvstack_sandbox::confine_backend(
        &args.sandbox,
        &pvstack_sandbox::Confinement {
            program: DEVICE,
            syscalls: &[RUNTIME, SERVE, pvstack_console::syscalls::CONSOLE],
            sockets,
            files,
        },
    )?;
    Ok(())
}

fn run(args: &Args) -> Result<(), Error> {
    // Before the host side's threads start, so they inherit the mask and
    // only the signal thread of `serve_with` receives SIGTERM/SIGINT.
    block_stop_signals()?;
    let log = match &args.log {
        Some(path) => {
            Some(
                LogFile::open(path, args.log_max_bytes).map_err(|source| Error::Io {
                    what: format!("cannot open the log {}", path.display()),
                    cause: source,
                })?,
            )
        }
        None => None,
    };
    let hub = Arc::new(Hub::new(log).map_err(|source| Error::Io {
        what: "cannot create the input eventfd".into(),
        cause: source,
    })?);
    let host_error = |what: &str| {
        let what = what.to_string();
        move |source| Error::Io {
            what,
            cause: source,
        }
    };
    // Kept until the end so the listening socket's file is removed.
    let mut _server = None;
    if args.stdio {
        stdio::start(&hub).map_err(host_error("cannot start stdio"))?;
    } else if args.pty {
        pty::start(&hub).map_err(host_error("cannot open a PTY"))?;
    } else if let Some(path) = &args.listen {
        _server = Some(server::start(&hub, path, args.socket.socket_mode)?);
    }
    let (filtered, listener) = FilteredSocket::start(&args.socket, || Box::new(PassThrough))?;
    confine(args, &filtered)?;
    log::info!("serving a virtio console");
    let stats = Arc::new(ConsoleStats::default());
    serve_on(
        DEVICE,
        &args.socket,
        listener,
        || ConsoleBackend::new(Arc::clone(&hub), Arc::clone(&stats)),
        |daemon| {
            // One worker serves both queues; input wakes it too.
            let handlers = daemon.get_epoll_handlers();
            let worker = handlers
                .first()
                .ok_or_else(|| io::Error::other("the daemon has no worker"))?;
            worker.register_listener(
                hub.input().ready_fd().as_raw_fd(),
                EventSet::IN,
                INPUT_EVENT,
            )
        },
    )?;
    log::info!("stopped; {}", stats.summary(MAX_CHAIN_OUTPUT));
    Ok(())
}
