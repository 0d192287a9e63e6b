//! The virtio-net features pvstack-net offers, and the TAP offloads that
//! follow from what the driver accepted.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Offered on every link. MAC, MTU and STATUS concern the configuration
/// space, which the VMM serves; they are offered so that a frontend may
/// pass them on (vhost-user hands the backend every accepted feature).
const ALWAYS: [u32; 7] = [
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
];

/// Guest-to-host offloads: the TAP takes partially checksummed and GSO
/// frames as they are, so these need nothing but a TAP.
const HOST_OFFLOADS: [u32; 4] = [
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
];

/// Host-to-guest offloads: offered only if the kernel accepts TUNSETOFFLOAD.
const GUEST_OFFLOADS: [u32; 4] = [
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
];

/// What the link can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkOffloads {
    /// Frames to the link may be partially checksummed or GSO.
    pub host: bool,
    /// Frames from the link may be (TUNSETOFFLOAD works).
    pub guest: bool,
}

/// Virtio features offered to the frontend.
pub fn offered(offloads: LinkOffloads) -> u64 {
    let mut features = ALWAYS.iter().fold(0, |acc, &f| acc | bit(f));
    if offloads.host {
        features |= HOST_OFFLOADS.iter().fold(0, |acc, &f| acc | bit(f));
    }
    if offloads.guest {
        features |= GUEST_OFFLOADS.iter().fold(0, |acc, &f| acc | bit(f));
    }
    features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// vhost-user protocol features offered. MQ so that a frontend learns the
/// queue count (two: receive and transmit) from GET_QUEUE_NUM. Not
/// CONFIG: QEMU would then take the net configuration space (MAC) from
/// the backend instead of its own.
pub fn protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
}

/// The `TUN_F_*` flags for the guest offloads the driver accepted.
pub fn tun_offload_flags(acked: u64) -> libc::c_uint {
    let mut flags = 0;
    if acked & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
        flags |= libc::TUN_F_CSUM;
        if acked & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if acked & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
            flags |= libc::TUN_F_TSO6;
        }
        if acked & bit(VIRTIO_NET_F_GUEST_ECN) != 0 {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

/// Whether the driver accepted MRG_RXBUF (a frame may span receive chains).
pub fn mergeable_rx(acked: u64) -> bool {
    acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_the_link() {
        let none = offered(LinkOffloads {
            host: false,
            guest: false,
        });
        assert_eq!(none & bit(VIRTIO_NET_F_CSUM), 0);
        assert_ne!(none & bit(VIRTIO_F_VERSION_1), 0);
        let all = offered(LinkOffloads {
            host: true,
            guest: true,
        });
        assert_ne!(all & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_ne!(all & bit(VIRTIO_NET_F_HOST_TSO6), 0);
    }

    #[test]
    fn tso_needs_guest_checksum() {
        assert_eq!(tun_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        let flags = tun_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4));
        assert_eq!(flags, libc::TUN_F_CSUM | libc::TUN_F_TSO4);
    }
}
