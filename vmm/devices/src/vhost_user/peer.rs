//! [`AllowedBackend`]: whose process may serve a device. Guest memory
//! goes to whoever listens on the backend's socket, so before the first
//! message the frontend asks the kernel who that is (SO_PEERCRED) and
//! refuses anyone but pvstack's own user, root, or the uid `backend-uid=`
//! names: a socket path squatted by another local user gets nothing.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::error::{Error, Result};

/// The users whose backends may serve a device: pvstack's own effective
/// uid and root always, and one more if given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedBackend {
    /// Another uid allowed (`backend-uid=`).
    pub also_uid: Option<u32>,
}

/// Who is at the other end of a Unix socket, as the kernel recorded it
/// when the connection was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
}

impl AllowedBackend {
    /// Whether a backend running as `uid` may serve the device.
    pub fn allows(&self, uid: u32) -> bool {
        uid == 0 || uid == effective_uid() || Some(uid) == self.also_uid
    }

    /// Checks the process at the other end of `stream`, connected to the
    /// backend at `socket`, before anything is sent to it.
    pub fn check(&self, stream: &UnixStream, socket: &Path) -> Result<()> {
        let peer = peer_of(stream).map_err(|source| Error::Socket {
            socket: socket.to_path_buf(),
            what: "cannot learn who the backend is (SO_PEERCRED)",
            cause: source,
        })?;
        if self.allows(peer.uid) {
            return Ok(());
        }
        Err(Error::BackendNotAllowed {
            socket: socket.to_path_buf(),
            uid: peer.uid,
            pid: peer.pid,
            ours: effective_uid(),
        })
    }
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The credentials of the process at the other end of `stream`.
pub fn peer_of(stream: &UnixStream) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a ucred
    // that lives for the call; the fd is the stream's own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_uid_and_root_are_allowed_and_others_only_by_name() {
        let ours = effective_uid();
        let stranger = ours.wrapping_add(4242).max(1);
        let default = AllowedBackend::default();
        assert!(default.allows(ours));
        assert!(default.allows(0));
        assert!(!default.allows(stranger));
        let named = AllowedBackend {
            also_uid: Some(stranger),
        };
        assert!(named.allows(stranger));
        assert!(!named.allows(stranger + 1));
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = peer_of(&a).unwrap();
        assert_eq!(peer.uid, effective_uid());
        assert_eq!(peer.pid, std::process::id() as i32);
        AllowedBackend::default()
            .check(&a, Path::new("pair"))
            .unwrap();
    }
}
