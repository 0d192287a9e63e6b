//! `--filter-early-vring-enable`: the message filter QEMU's
//! `-netdev vhost-user` needs.
//!
//! QEMU's virtio-net enables its queue pair (VHOST_USER_SET_VRING_ENABLE)
//! as soon as the guest driver accepts features, before it sends the
//! backend SET_FEATURES; the vhost crate refuses that message until
//! VHOST_USER_F_PROTOCOL_FEATURES is acked and drops the connection (and
//! QEMU 10 does not send it again when it starts the device). This filter
//! answers early SET_VRING_ENABLEs itself (when a reply is asked for),
//! keeps the last state asked for each ring, and hands those to the daemon
//! right after SET_FEATURES; every other message passes unchanged.

use std::collections::BTreeMap;
use std::io;

use pvstack_backend_common::filter::{Filter, Message, Verdict};
use vhost::vhost_user::message::{FrontendReq, VhostUserVringState};
use vm_memory::ByteValued;

#[derive(Default)]
pub struct EarlyEnableFilter {
    features_seen: bool,
    /// The last enable state asked for each ring before SET_FEATURES.
    deferred: BTreeMap<u32, u32>,
}

impl Filter for EarlyEnableFilter {
    fn request(&mut self, message: Message) -> io::Result<Verdict> {
        let code = message.code();
        if code == FrontendReq::SET_VRING_ENABLE as u32 && !self.features_seen {
            let payload = message.payload();
            let state = payload.get(..size_of::<VhostUserVringState>());
            if let Some(state) = state.and_then(VhostUserVringState::from_slice) {
                let (index, enable) = (state.index, state.num);
                self.deferred.insert(index, enable);
            }
            return Ok(Verdict::answer(
                message.wants_ack().then(|| Message::ack(code)),
            ));
        }
        let mut verdict = Verdict::forward(message);
        if code == FrontendReq::SET_FEATURES as u32 && !self.features_seen {
            self.features_seen = true;
            for (index, enable) in std::mem::take(&mut self.deferred) {
                log::info!("filter: ring {index}: passing the early SET_VRING_ENABLE {enable} after SET_FEATURES");
                let state = VhostUserVringState::new(index, enable);
                verdict.to_daemon.push(Message::request(
                    FrontendReq::SET_VRING_ENABLE as u32,
                    state.as_slice(),
                ));
            }
        }
        Ok(verdict)
    }
}
