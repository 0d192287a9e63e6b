//! The peer link: a Unix datagram socket joining two pvstack-net processes
//! back to back, so two VMs share a wire with no TAP device. Each process
//! binds its own path and sends every frame to the other's; a datagram is
//! exactly one Ethernet frame (no virtio-net header: the peer link offers
//! no offloads, so the header carries nothing).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// This end of a peer link.
pub struct PeerSocket {
    socket: UnixDatagram,
    local: PathBuf,
    remote: PathBuf,
}

impl PeerSocket {
    /// Binds `local` (replacing a stale socket file there, refusing any
    /// other kind of file) and sends to `remote`.
    pub fn bind(local: &Path, remote: &Path) -> Result<Self, Error> {
        let peer_error = |what: &'static str, source: io::Error| Error::Peer {
            path: local.to_path_buf(),
            what,
            cause: source,
        };
        match std::fs::symlink_metadata(local) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(local)
                .map_err(|source| peer_error("cannot remove the stale socket", source))?,
            Ok(_) => {
                return Err(Error::PeerNotASocket {
                    path: local.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(peer_error("cannot inspect the path", source)),
        }
        let socket =
            UnixDatagram::bind(local).map_err(|source| peer_error("cannot bind", source))?;
        socket
            .set_nonblocking(true)
            .map_err(|source| peer_error("cannot make it non-blocking", source))?;
        Ok(PeerSocket {
            socket,
            local: local.to_path_buf(),
            remote: remote.to_path_buf(),
        })
    }

    /// The path frames are sent to.
    pub fn remote(&self) -> &Path {
        &self.remote
    }

    /// Receives one frame; `Ok(None)` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.socket.recv(buf) {
            Ok(len) => Ok(Some(len)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends one frame to the peer. A peer that is not there (yet) or
    /// whose queue is full loses the frame, as a cable would.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        self.socket.send_to(frame, &self.remote).map(|_| ())
    }
}

impl AsRawFd for PeerSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl Drop for PeerSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.local);
    }
}
