//! `--listen PATH`: a console server on a Unix socket. Any number of
//! clients attach (`socat - UNIX-CONNECT:PATH`) and detach at will; each
//! first gets the recent output, then everything new; input from any of
//! them goes to the guest.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::hub::{Hub, Sink};

/// How long one write to a client may block before the client is
/// detached: a client that stops reading must not stall the guest for
/// longer than this.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Socket send buffer asked for per client, so that a client that is
/// briefly slow (a busy terminal) does not hold up the guest at all.
const CLIENT_SEND_BUFFER: libc::c_int = 1 << 20;

struct Client {
    stream: UnixStream,
    id: u64,
}

impl Sink for Client {
    fn write(&mut self, bytes: &[u8]) -> bool {
        match self.stream.write_all(bytes) {
            Ok(()) => true,
            Err(e) => {
                log::info!("client {}: {e}; detaching it", self.id);
                // Ends the client's input thread too.
                let _ = self.stream.shutdown(Shutdown::Both);
                false
            }
        }
    }

    fn name(&self) -> String {
        format!("client {}", self.id)
    }
}

/// Removes the listening socket's file when the server goes away.
pub struct ServerSocket {
    path: PathBuf,
}

impl Drop for ServerSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `path` (replacing a stale socket, like the vhost-user
/// socket) with a socket file of permissions `mode` (`--socket-mode`),
/// and serves clients on a thread of its own.
pub fn start(hub: &Arc<Hub>, path: &Path, mode: u32) -> Result<ServerSocket, crate::error::Error> {
    pvstack_backend_common::prepare_socket_path(path)?;
    let listener = pvstack_backend_common::listen_with_mode(path, mode).map_err(|source| {
        crate::error::Error::Io {
            what: format!("cannot listen on {}", path.display()),
            cause: source,
        }
    })?;
    log::info!("console server listening on {}", path.display());
    let hub = Arc::clone(hub);
    std::thread::Builder::new()
        .name("console server".into())
        .spawn(move || accept_clients(&hub, &listener))
        .map_err(|source| crate::error::Error::Io {
            what: "cannot start the console server thread".into(),
            cause: source,
        })?;
    Ok(ServerSocket {
        path: path.to_path_buf(),
    })
}

fn accept_clients(hub: &Arc<Hub>, listener: &UnixListener) {
    for (id, stream) in (1u64..).zip(listener.incoming()) {
        match stream.and_then(|stream| attach(hub, stream, id)) {
            Ok(()) => {}
            Err(e) => log::warn!("cannot attach client {id}: {e}"),
        }
    }
}

/// Asks for a larger send buffer on `stream` (the kernel may give less).
fn enlarge_send_buffer(stream: &UnixStream) -> io::Result<()> {
    let size = CLIENT_SEND_BUFFER;
    // SAFETY: setsockopt reads size_of::<c_int>() bytes from `size`, which
    // lives for the call; the descriptor is an open socket.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn attach(hub: &Arc<Hub>, stream: UnixStream, id: u64) -> io::Result<()> {
    stream.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT))?;
    enlarge_send_buffer(&stream)?;
    let reader = stream.try_clone()?;
    let closer = stream.try_clone()?;
    hub.attach(Box::new(Client { stream, id }), true);
    super::spawn_input(hub, reader, format!("client {id}"), move || {
        // The client hung up: make its sink fail on the next output.
        let _ = closer.shutdown(Shutdown::Both);
    })
}
