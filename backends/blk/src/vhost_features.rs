//! What pvstack-blk offers a vhost-user frontend besides the device's own
//! features (`pvstack_block::config`).

use pvstack_block::config;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};

/// The virtio-blk features, plus VHOST_USER_F_PROTOCOL_FEATURES.
pub fn virtio_features(readonly: bool) -> u64 {
    config::virtio_features(readonly) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// vhost-user protocol features offered to the frontend. INFLIGHT_SHMFD's
/// messages are answered by the filter pvstack-blk puts in front of
/// vhost-user-backend's daemon.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}
