//! Who is at the other end of a Unix socket, as the kernel recorded it
//! when the connection was made (SO_PEERCRED), and whether that user may
//! be dealt with: the user this process started as and root always, one
//! more user if named. A backend checks each frontend this way before it serves it
//! (`--frontend-uid`); pvstack checks each backend before it sends it
//! guest memory (`backend-uid=`): both sides share this one rule.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// The process at the other end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    pub pid: i32,
    pub uid: u32,
}

/// The users a process deals with over its sockets: the effective uid it
/// had when this was made, root, and `also` if given.
///
/// The uid is taken when this is made, not at each check: a backend makes
/// it before it drops to an unprivileged user shared with others (nobody
/// by default), and must go on serving only the user that started it, not
/// every process of the user it became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustedUsers {
    /// This process's effective uid when this was made.
    own: u32,
    /// Another uid allowed besides `own` and root.
    also: Option<u32>,
}

/// A peer [`TrustedUsers`] does not allow: says who it is and how to let
/// it in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Untrusted {
    pub peer: PeerCredentials,
    /// The uid this process serves as its own.
    pub ours: u32,
}

impl fmt::Display for Untrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} runs as uid {}, not as uid {} or root",
            self.peer.pid, self.peer.uid, self.ours
        )
    }
}

impl TrustedUsers {
    /// This process's user as it is now, root, and `also`.
    pub fn new(also: Option<u32>) -> Self {
        TrustedUsers {
            own: effective_uid(),
            also,
        }
    }

    /// Whether a peer running as `uid` is allowed.
    pub fn allows(&self, uid: u32) -> bool {
        uid == 0 || uid == self.own || Some(uid) == self.also
    }

    /// Checks the process at the other end of `socket` (a connected Unix
    /// stream socket). The outer error: its credentials could not be read.
    pub fn check(&self, socket: &impl AsFd) -> io::Result<Result<PeerCredentials, Untrusted>> {
        let peer = peer_credentials(socket)?;
        Ok(if self.allows(peer.uid) {
            Ok(peer)
        } else {
            Err(Untrusted {
                peer,
                ours: self.own,
            })
        })
    }
}

/// This process's effective uid.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Parses a numeric uid given on the command line (`--frontend-uid`,
/// `backend-uid=`).
pub fn parse_uid(text: &str) -> Result<u32, String> {
    text.parse::<u32>()
        .map_err(|_| format!("{text:?} is not a numeric uid"))
}

/// The credentials of the process at the other end of `socket`.
pub fn peer_credentials(socket: &impl AsFd) -> io::Result<PeerCredentials> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a ucred
    // that lives for the call; the descriptor is borrowed for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCredentials {
        pid: cred.pid,
        uid: cred.uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn our_own_uid_and_root_are_allowed_and_others_only_by_name() {
        let ours = effective_uid();
        let stranger = ours.wrapping_add(4242).max(1);
        let default = TrustedUsers::new(None);
        assert!(default.allows(ours));
        assert!(default.allows(0));
        assert!(!default.allows(stranger));
        let named = TrustedUsers::new(Some(stranger));
        assert!(named.allows(stranger));
        assert!(!named.allows(stranger + 1));
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = peer_credentials(&a).unwrap();
        assert_eq!(peer.uid, effective_uid());
        assert_eq!(peer.pid, std::process::id() as i32);
        assert_eq!(TrustedUsers::new(None).check(&a).unwrap(), Ok(peer));
    }

    #[test]
    fn an_untrusted_peer_is_named() {
        let refusal = Untrusted {
            peer: PeerCredentials { pid: 42, uid: 7 },
            ours: 1000,
        };
        assert_eq!(
            refusal.to_string(),
            "pid 42 runs as uid 7, not as uid 1000 or root"
        );
    }

    #[test]
    fn uids_are_numbers() {
        assert_eq!(parse_uid("65534"), Ok(65534));
        for bad in ["nobody", "-1", "", "4294967296"] {
            assert!(parse_uid(bad).is_err(), "{bad}");
        }
    }
}
