//! [`AllowedBackend`]: whose process may serve a device. Guest memory
//! goes to whoever listens on the backend's socket, so before the first
//! message the frontend asks the kernel who that is (SO_PEERCRED) and
//! refuses anyone but pvstack's own user, root, or the uid `backend-uid=`
//! names: a socket path squatted by another local user gets nothing.
//! Every vhost-user device kind (block, net, console) takes the same
//! option ([`AllowedBackend::from_option`]) and every connection, first,
//! reconnect or swap, passes the same check
//! ([`super::VhostUserHandle::from_stream`]). The rule itself is the one
//! the backends apply to their frontends ([`pvstack_backend_common::peer`]).

use std::os::unix::net::UnixStream;
use std::path::Path;

use pvstack_backend_common::peer::{parse_uid, TrustedUsers};

use crate::error::{Error, Result};

/// The option of `--blk`, `--net` and `--console` that names another user
/// whose backend may serve the device.
pub const BACKEND_UID_KEY: &str = "backend-uid";

/// The users whose backends may serve a device: pvstack's own effective
/// uid and root always, and one more if given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedBackend {
    /// Another uid allowed (`backend-uid=`).
    pub also_uid: Option<u32>,
}

impl AllowedBackend {
    /// The value of a device option list's `backend-uid=`, if given.
    pub fn from_option(value: Option<&str>) -> std::result::Result<Self, String> {
        let also_uid = value
            .map(|uid| parse_uid(uid).map_err(|why| format!("{BACKEND_UID_KEY}: {why}")))
            .transpose()?;
        Ok(AllowedBackend { also_uid })
    }

    fn trusted(&self) -> TrustedUsers {
        TrustedUsers::new(self.also_uid)
    }

    /// Checks the process at the other end of `stream`, connected to the
    /// backend at `socket`, before anything is sent to it.
    pub fn check(&self, stream: &UnixStream, socket: &Path) -> Result<()> {
        let checked = self
            .trusted()
            .check(stream)
            .map_err(|source| Error::Socket {
                socket: socket.to_path_buf(),
                what: "cannot learn who the backend is (SO_PEERCRED)",
                cause: source,
            })?;
        checked
            .map(drop)
            .map_err(|untrusted| Error::BackendNotAllowed {
                socket: socket.to_path_buf(),
                uid: untrusted.peer.uid,
                pid: untrusted.peer.pid,
                ours: untrusted.ours,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Who is allowed is TrustedUsers' rule, tested where it lives
    // (pvstack_backend_common::peer); what is tested here is what the VMM
    // adds: `backend-uid=` becomes that rule's `also`.
    #[test]
    fn the_backend_uid_is_the_rules_other_user() {
        assert_eq!(AllowedBackend::default().trusted(), TrustedUsers::new(None));
        let named = AllowedBackend {
            also_uid: Some(65534),
        };
        assert_eq!(named.trusted(), TrustedUsers::new(Some(65534)));
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        AllowedBackend::default()
            .check(&a, Path::new("pair"))
            .unwrap();
    }

    #[test]
    fn the_option_takes_a_numeric_uid() {
        assert_eq!(
            AllowedBackend::from_option(None),
            Ok(AllowedBackend::default())
        );
        assert_eq!(
            AllowedBackend::from_option(Some("65534")),
            Ok(AllowedBackend {
                also_uid: Some(65534)
            })
        );
        let err = AllowedBackend::from_option(Some("nobody")).unwrap_err();
        assert!(
            err.contains("backend-uid") && err.contains("numeric uid"),
            "{err}"
        );
    }
}
