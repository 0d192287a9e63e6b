//! pvstack-net: a vhost-user network device backend. The guest's frames go
//! to a TAP device (or, in peer mode, to another pvstack-net over a Unix
//! datagram socket) and frames from there land in the guest's receive
//! buffers, read and written directly in the memory the VMM shares.

mod backend;
mod early_enable;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pvstack_backend_common::{
    backend_main,
    message_filter::{FilteredSocket, PassThrough},
    parse_queue_size, prepare_socket_path, serve_on, SocketArgs,
};
use pvstack_sandbox::{backend::SERVE, runtime::RUNTIME, SandboxArgs};
use vmm_sys_util::epoll::EventSet;

use pvstack_net::link::Link;
use pvstack_net::peer::PeerSocket;
use pvstack_net::stats::NetStats;
use pvstack_net::tap::{self, Tap};
use pvstack_net::Error;

use crate::backend::{NetBackend, LINK_EVENT, NUM_QUEUES};
use crate::early_enable::EarlyEnableFilter;

const DEVICE: &str = "pvstack-net";

/// Serve a virtio-net device to a VMM (pvstack, QEMU, ...) over vhost-user.
/// Exactly one of --tap or --peer-bind/--peer-connect picks the other end
/// of the guest's wire.
#[derive(Debug, Parser)]
#[command(name = DEVICE, version)]
struct Args {
    #[command(flatten)]
    socket: SocketArgs,

    #[command(flatten)]
    sandbox: SandboxArgs,

    /// TAP device to attach to, created if it does not exist (needs
    /// CAP_NET_ADMIN in the current network namespace); 1-15 bytes.
    #[arg(long, value_name = "NAME", value_parser = parse_tap_name,
          required_unless_present = "peer_bind", conflicts_with_all = ["peer_bind", "peer_connect"])]
    tap: Option<String>,

    /// Peer mode: bind this Unix datagram socket and exchange bare
    /// Ethernet frames with the pvstack-net bound at --peer-connect (two
    /// VMs back to back, no TAP).
    #[arg(long, value_name = "PATH", requires = "peer_connect")]
    peer_bind: Option<PathBuf>,

    /// Peer mode: the other pvstack-net's --peer-bind path.
    #[arg(long, value_name = "PATH", requires = "peer_bind")]
    peer_connect: Option<PathBuf>,

    /// Largest queue size the frontend may set (a power of two, 2-32768).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,

    /// Have the vhost-user message filter in front of the backend answer
    /// SET_VRING_ENABLE messages arriving before SET_FEATURES instead of
    /// passing them on. Needed for QEMU's `-netdev vhost-user`,
    /// which sends them early (the vhost crate drops such a connection)
    /// and sends them again once the device runs. Not needed for pvstack.
    #[arg(long)]
    filter_early_vring_enable: bool,

    /// Bound of the transmit queue's adaptive polling window, in
    /// microseconds: after draining the queue the worker keeps polling it,
    /// with the guest's kicks off, for a window that doubles while frames
    /// come back sooner than N and halves down to zero while they do not.
    /// An idle guest costs nothing. 0 never polls.
    #[arg(long, value_name = "N", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    poll_us: u32,
}

/// Set up: from here on the link, the socket directory (and the peer
/// socket's) and the allow-list are all this process has
/// (pvstack_sandbox::confine).
fn confine(args: &Args, filtered: &FilteredSocket) -> Result<(), Error> {
    let mut files = pvstack_sandbox::serving_files(&args.socket.socket);
    let mut sockets = filtered.paths().to_vec();
    if let Some(local) = &args.peer_bind {
        // Removed at exit.
        sockets.push(local.clone());
        files.push(pvstack_sandbox::confine::directory_of(local));
    }
    pvstack_sandbox::confine_backend(
        &args.sandbox,
        &pvstack_sandbox::Confinement {
            program: DEVICE,
            syscalls: &[RUNTIME, SERVE, pvstack_net::syscalls::NET],
            sockets,
            files,
        },
    )?;
    Ok(())
}

fn parse_tap_name(text: &str) -> Result<String, String> {
    tap::validate_name(text)?;
    Ok(text.to_string())
}

fn main() -> ExitCode {
    backend_main(DEVICE, |args: &Args| &args.socket, run)
}

fn open_link(args: &Args) -> Result<Link, Error> {
    match (&args.tap, &args.peer_bind, &args.peer_connect) {
        (Some(name), _, _) => Ok(Link::Tap(Tap::open(name)?)),
        (None, Some(local), Some(remote)) => Ok(Link::Peer(PeerSocket::bind(
            local,
            remote,
            args.socket.socket_mode,
        )?)),
        // clap's required_unless_present/requires rule the rest out.
        _ => unreachable!("clap enforces --tap or both --peer-* flags"),
    }
}

fn run(args: &Args) -> Result<(), Error> {
    // Checked before the link exists, so a bad socket path creates no TAP.
    prepare_socket_path(&args.socket.socket)?;
    let link = Arc::new(open_link(args)?);
    let stats = Arc::new(NetStats::default());
    log::info!(
        "serving {} ({} offloads), queues of up to {} entries",
        link.describe(),
        match link.offloads() {
            o if o.host && o.guest => "checksum and TSO both ways",
            o if o.host => "checksum and TSO from the guest only",
            _ => "no",
        },
        args.queue_size
    );
    let link_fd = link.as_raw_fd();
    let early_enable = args.filter_early_vring_enable;
    let (filtered, listener) = FilteredSocket::start(&args.socket, move || {
        if early_enable {
            Box::new(EarlyEnableFilter::new(NUM_QUEUES as u32))
        } else {
            Box::new(PassThrough)
        }
    })?;
    confine(args, &filtered)?;
    serve_on(
        DEVICE,
        &args.socket,
        listener,
        || {
            NetBackend::new(
                Arc::clone(&link),
                args.queue_size,
                Arc::clone(&stats),
                Duration::from_micros(u64::from(args.poll_us)),
            )
        },
        |daemon| {
            // Edge-triggered: the worker reads the link until it is empty
            // or the guest's buffers run out; in the latter case the
            // driver's next receive-queue kick resumes it.
            let handlers = daemon.get_epoll_handlers();
            let worker = handlers
                .first()
                .ok_or_else(|| std::io::Error::other("the daemon has no worker thread"))?;
            worker.register_listener(link_fd, EventSet::IN | EventSet::EDGE_TRIGGERED, LINK_EVENT)
        },
    )?;
    log::info!("stopped; {}", stats.summary());
    Ok(())
}
