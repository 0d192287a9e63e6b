//! The peer link: a Unix datagram socket joining two pvstack-net processes
//! back to back, so two VMs share a wire with no TAP device. Each process
//! binds its own path and sends every frame to the other's; a datagram is
//! exactly one Ethernet frame (no virtio-net header: the peer link offers
//! no offloads, so the header carries nothing).
//!
//! Only the peer's frames are taken: any local process may send to the
//! bound path, so each datagram's sender must be the socket bound at the
//! peer's path. Its address, as the kernel reports senders, is learnt by
//! connecting to that path (and learnt again when a sender does not
//! match, as after the peer restarted). Both ends bind absolute paths: a
//! relative name is what any process could bind in another directory, so
//! a peer known only by one is not trusted.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use pvstack_backend_common::{bind_datagram_with_mode, prepare_socket_path};
use pvstack_logging::warn_limited;

use crate::error::Error;

/// This end of a peer link.
pub struct PeerSocket {
    socket: UnixDatagram,
    local: PathBuf,
    remote: PathBuf,
    /// The peer's address as its datagrams carry it, once known.
    peer_address: Mutex<Option<PathBuf>>,
    /// Datagrams from other senders, dropped.
    strangers: AtomicU64,
}

impl PeerSocket {
    /// Binds `local` (replacing a socket file nobody holds any more,
    /// refusing one a process is still bound to or listens on, and any
    /// other kind of file) with a socket file of permissions `mode`, so
    /// that by default only this user may send to it, and sends to
    /// `remote`.
    pub fn bind(local: &Path, remote: &Path, mode: u32) -> Result<Self, Error> {
        let peer_error = |what: &'static str, source: io::Error| Error::Peer {
            path: local.to_path_buf(),
            what,
            cause: source,
        };
        let local = std::path::absolute(local)
            .map_err(|source| peer_error("cannot make the path absolute", source))?;
        prepare_socket_path(&local)?;
        let socket = bind_datagram_with_mode(&local, mode)
            .map_err(|source| peer_error("cannot bind", source))?;
        socket
            .set_nonblocking(true)
            .map_err(|source| peer_error("cannot make it non-blocking", source))?;
        Ok(PeerSocket {
            socket,
            local,
            remote: remote.to_path_buf(),
            peer_address: Mutex::new(None),
            strangers: AtomicU64::new(0),
        })
    }

    /// The path frames are sent to.
    pub fn remote(&self) -> &Path {
        &self.remote
    }

    /// Datagrams dropped because they did not come from the peer.
    pub fn strangers(&self) -> u64 {
        self.strangers.load(Ordering::Relaxed)
    }

    /// Receives one frame from the peer; `Ok(None)` when none is waiting.
    /// Datagrams from anyone else are dropped and counted.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            let (len, sender) = match self.socket.recv_from(buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            if self.sent_by_peer(&sender) {
                return Ok(Some(len));
            }
            let count = self.strangers.fetch_add(1, Ordering::Relaxed) + 1;
            warn_limited!(
                "dropped a {len}-byte datagram from {}, not the peer {} ({count} so far)",
                sender
                    .as_pathname()
                    .map_or("an unnamed socket".into(), |p| p.display().to_string()),
                self.remote.display()
            );
        }
    }

    /// Whether `sender` is the socket bound at the peer's path.
    fn sent_by_peer(&self, sender: &SocketAddr) -> bool {
        let Some(sender) = sender.as_pathname() else {
            return false;
        };
        let mut known = self
            .peer_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if known.as_deref() == Some(sender) {
            return true;
        }
        // Unknown yet, or the peer came back: ask the kernel again.
        *known = self.probe_peer();
        known.as_deref() == Some(sender)
    }

    /// The address of the socket bound at the peer's path, if one is
    /// and it was bound by an absolute path.
    fn probe_peer(&self) -> Option<PathBuf> {
        let probe = UnixDatagram::unbound().ok()?;
        probe.connect(&self.remote).ok()?;
        let address = probe.peer_addr().ok()?;
        address
            .as_pathname()
            .filter(|path| path.is_absolute())
            .map(Path::to_path_buf)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pvstack-peer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Waits (briefly: the datagram is already queued) for a frame.
    fn recv_one(socket: &PeerSocket, buf: &mut [u8]) -> Option<usize> {
        for _ in 0..100 {
            if let Some(len) = socket.recv(buf).unwrap() {
                return Some(len);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        None
    }

    #[test]
    fn only_the_peers_frames_are_taken() {
        let dir = scratch("sender");
        let (a_path, b_path) = (dir.join("a.wire"), dir.join("b.wire"));
        let a = PeerSocket::bind(&a_path, &b_path, 0o600).unwrap();
        let stranger = UnixDatagram::bind(dir.join("stranger")).unwrap();
        stranger.send_to(b"not from b", &a_path).unwrap();
        UnixDatagram::unbound()
            .unwrap()
            .send_to(b"unnamed", &a_path)
            .unwrap();
        // B not there yet: nobody is the peer.
        let mut buf = [0u8; 64];
        assert_eq!(a.recv(&mut buf).unwrap(), None);
        let b = PeerSocket::bind(&b_path, &a_path, 0o600).unwrap();
        stranger.send_to(b"still not from b", &a_path).unwrap();
        b.send(b"from b").unwrap();
        assert_eq!(recv_one(&a, &mut buf), Some(6));
        assert_eq!(&buf[..6], b"from b");
        assert_eq!(a.strangers(), 3);
        // B restarts on the same path: its frames still pass.
        drop(b);
        let b = PeerSocket::bind(&b_path, &a_path, 0o600).unwrap();
        b.send(b"b again").unwrap();
        assert_eq!(recv_one(&a, &mut buf), Some(7));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_someone_is_bound_to_is_not_taken_over() {
        let dir = scratch("live");
        let path = dir.join("a.wire");
        let holder = UnixDatagram::bind(&path).unwrap();
        let err = PeerSocket::bind(&path, &dir.join("b.wire"), 0o600)
            .err()
            .unwrap();
        assert!(err.to_string().contains("in use"), "{err}");
        // The holder still receives what is sent to the path.
        UnixDatagram::unbound()
            .unwrap()
            .send_to(b"x", &path)
            .unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(holder.recv(&mut byte).unwrap(), 1);
        drop(holder);
        PeerSocket::bind(&path, &dir.join("b.wire"), 0o600).expect("a stale socket is replaced");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
