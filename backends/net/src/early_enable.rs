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

use pvstack_backend_common::message_filter::{refuse, Filter, Message, Verdict};
use vhost::vhost_user::message::{FrontendReq, VhostUserVringState};
use vm_memory::ByteValued;

pub struct EarlyEnableFilter {
    /// Rings the device has: a state for any other is refused, so what is
    /// kept stays bounded.
    rings: u32,
    features_seen: bool,
    /// The last enable state asked for each ring before SET_FEATURES.
    deferred: BTreeMap<u32, u32>,
}

impl EarlyEnableFilter {
    /// For a device of `rings` rings.
    pub fn new(rings: u32) -> Self {
        EarlyEnableFilter {
            rings,
            features_seen: false,
            deferred: BTreeMap::new(),
        }
    }
}

impl Filter for EarlyEnableFilter {
    fn request(&mut self, message: Message) -> io::Result<Verdict> {
        let code = message.code();
        if code == FrontendReq::SET_VRING_ENABLE as u32 && !self.features_seen {
            let payload = message.payload();
            let state = payload.get(..size_of::<VhostUserVringState>());
            let Some(state) = state.and_then(VhostUserVringState::from_slice) else {
                return refuse(&message, &format!("a {}-byte ring state", payload.len()));
            };
            let (index, enable) = (state.index, state.num);
            if index >= self.rings {
                let why = format!("ring {index}: the device has {}", self.rings);
                return refuse(&message, &why);
            }
            self.deferred.insert(index, enable);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn enable(index: u32) -> Message {
        let state = VhostUserVringState::new(index, 1);
        let mut message = Message::request(FrontendReq::SET_VRING_ENABLE as u32, state.as_slice());
        message.set_need_reply();
        message
    }

    /// Only the device's rings are remembered: before, a frontend could
    /// make the filter keep a state for each of 2^32 ring indexes.
    #[test]
    fn early_states_are_kept_for_the_devices_rings_only() {
        let mut filter = EarlyEnableFilter::new(2);
        for index in [0, 1, 2, 1000, u32::MAX] {
            let verdict = filter.request(enable(index)).unwrap();
            let answer = verdict.to_frontend.expect("answered");
            let status = if index < 2 { 0u64 } else { 1 };
            assert_eq!(answer.payload(), &status.to_le_bytes(), "ring {index}");
        }
        assert_eq!(filter.deferred.len(), 2);
        let features = Message::request(FrontendReq::SET_FEATURES as u32, &0u64.to_le_bytes());
        let verdict = filter.request(features).unwrap();
        let passed: Vec<u32> = verdict.to_daemon.iter().map(Message::code).collect();
        let enable = FrontendReq::SET_VRING_ENABLE as u32;
        assert_eq!(passed, [FrontendReq::SET_FEATURES as u32, enable, enable]);
    }
}
