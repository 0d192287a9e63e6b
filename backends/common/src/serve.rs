use pvstack_logging::warn_limited;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::message_filter::{FilteredSocket, PassThrough};
use crate::{prepare_socket_path, Error, SocketArgs, StopSignal};

/// Serves vhost-user frontends on `args.socket` (through the message
/// filter, with only its own checks), one at a time, until
/// SIGTERM/SIGINT (returns Ok) or, with `--exit-on-disconnect`, until the first
/// frontend goes away (Ok after a clean disconnect, Err after a protocol
/// error). A frontend that breaks the protocol loses its connection; the next
/// one is served by a fresh backend from `new_backend`, because a
/// `VhostUserDaemon` keeps per-connection state (owner, features, vrings) that
/// must not leak into the next connection.
///
/// Must be called before the process starts any thread (see `StopSignal`)
/// but a filter's. The socket file is removed when this returns.
///
/// `attach` is called with each connection's daemon before it serves the
/// frontend: a backend with event sources of its own (a TAP device, a peer
/// socket) registers them there with its worker threads' epoll
/// (`VhostUserDaemon::get_epoll_handlers`).
pub fn serve_with<B, F, A>(
    device: &str,
    args: &SocketArgs,
    new_backend: F,
    attach: A,
) -> Result<(), Error>
where
    B: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    B::Vring: Clone + Send + Sync,
    F: FnMut() -> io::Result<B>,
    A: FnMut(&VhostUserDaemon<B>) -> io::Result<()>,
{
    let (_filtered, listener) = FilteredSocket::start(args, || Box::new(PassThrough))?;
    serve_on(device, args, listener, new_backend, attach)
}

/// A vhost-user listener on `path`, checked first as
/// [`prepare_socket_path`] does; the socket file goes when it drops.
pub fn listen(path: &Path) -> Result<Listener, Error> {
    prepare_socket_path(path)?;
    Listener::new(path, false).map_err(|source| Error::Listen {
        path: path.to_owned(),
        cause: source,
    })
}

/// As [`serve_with`], taking frontends from `listener` (a daemon behind a
/// [`crate::message_filter::FilteredSocket`]); `args.socket` names the device in
/// errors.
pub fn serve_on<B, F, A>(
    device: &str,
    args: &SocketArgs,
    mut listener: Listener,
    mut new_backend: F,
    mut attach: A,
) -> Result<(), Error>
where
    B: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    B::Vring: Clone + Send + Sync,
    F: FnMut() -> io::Result<B>,
    A: FnMut(&VhostUserDaemon<B>) -> io::Result<()>,
{
    let path = args.socket.as_path();
    let stop = StopSignal::install()?;
    log::info!("listening for a vhost-user frontend");

    loop {
        if !wait_for_frontend(&listener, &stop, path)? {
            return Ok(());
        }
        let backend = new_backend().map_err(|source| Error::NewBackend {
            path: path.to_owned(),
            cause: source,
        })?;
        let daemon_error = |e: vhost_user_backend::Error| Error::Daemon {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new(device.to_owned(), backend, memory).map_err(daemon_error)?;
        attach(&daemon).map_err(|source| Error::NewBackend {
            path: path.to_owned(),
            cause: source,
        })?;
        daemon.start(&mut listener).map_err(daemon_error)?;
        log::info!("frontend connected");
        stop.set_connection(daemon.shutdown_handle());
        if stop.requested() {
            daemon.request_shutdown();
        }
        let outcome = match daemon.wait() {
            // The frontend closing its end is the normal way a session ends.
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => Ok(()),
            other => other,
        };
        stop.set_connection(None);
        // Dropping the daemon stops and joins the backend's queue workers.
        drop(daemon);

        match &outcome {
            Ok(()) => log::info!("frontend disconnected"),
            Err(e) => warn_limited!("dropped the frontend connection: {e}"),
        }
        if stop.requested() {
            return Ok(());
        }
        if args.exit_on_disconnect {
            return outcome.map_err(daemon_error);
        }
        log::info!("listening for the next vhost-user frontend");
    }
}

/// Blocks until a frontend is waiting to be accepted (true) or a stop was
/// requested (false).
fn wait_for_frontend(listener: &Listener, stop: &StopSignal, path: &Path) -> Result<bool, Error> {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.wake_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        if stop.requested() {
            return Ok(false);
        }
        // SAFETY: `fds` is a valid array of two initialised pollfd structs
        // whose file descriptors outlive the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Poll {
                path: path.to_owned(),
                cause: e,
            });
        }
        if stop.requested() {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}
