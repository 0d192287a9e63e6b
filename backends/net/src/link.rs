//! Where frames go to and come from: a TAP device or a peer socket.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use crate::features::LinkOffloads;
use crate::frame::VNET_HDR_LEN;
use crate::peer::PeerSocket;
use crate::tap::Tap;

/// The other end of the guest's wire.
pub enum Link {
    /// Frames carry the virtio-net header.
    Tap(Tap),
    /// Bare Ethernet frames.
    Peer(PeerSocket),
}

impl Link {
    /// Offloads the link can carry.
    pub fn offloads(&self) -> LinkOffloads {
        match self {
            Link::Tap(tap) => LinkOffloads {
                host: true,
                guest: tap.offloads_supported(),
            },
            Link::Peer(_) => LinkOffloads {
                host: false,
                guest: false,
            },
        }
    }

    /// Names the link in logs.
    pub fn describe(&self) -> String {
        match self {
            Link::Tap(tap) => format!("TAP {}", tap.name()),
            Link::Peer(peer) => format!("peer {}", peer.remote().display()),
        }
    }

    /// Applies the driver's accepted guest offloads (`TUN_F_*`).
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        match self {
            Link::Tap(tap) => tap.set_offload(flags),
            Link::Peer(_) => Ok(()),
        }
    }

    /// Receives one frame into `buf` as header + frame (the header zeroed
    /// for a peer link) and returns its length; `Ok(None)` if none waits.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self {
            Link::Tap(tap) => tap.recv(buf),
            Link::Peer(peer) => {
                buf[..VNET_HDR_LEN].fill(0);
                Ok(peer
                    .recv(&mut buf[VNET_HDR_LEN..])?
                    .map(|len| len + VNET_HDR_LEN))
            }
        }
    }

    /// Sends header + frame.
    pub fn send(&self, chain: &[u8]) -> io::Result<()> {
        match self {
            Link::Tap(tap) => tap.send(chain),
            Link::Peer(peer) => peer.send(&chain[VNET_HDR_LEN..]),
        }
    }
}

impl AsRawFd for Link {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Link::Tap(tap) => tap.as_raw_fd(),
            Link::Peer(peer) => peer.as_raw_fd(),
        }
    }
}
