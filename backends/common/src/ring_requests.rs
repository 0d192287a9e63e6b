//! Ring requests checked before the daemon sees them: vhost-user-backend
//! refuses a queue size of 0 or above the device's maximum, but takes any
//! other (virtio-queue then ignores a size that is not a power of two
//! with an error line per request, and the ring keeps its old size).

use vhost::vhost_user::message::FrontendReq;

use crate::message_filter::Message;

/// The largest split ring (virtio 1.x 2.7: Queue Size is a power of two
/// up to 32768).
const MAX_QUEUE_SIZE: u32 = 32768;

/// `Err` says why a SET_VRING_NUM is refused; other requests pass.
pub fn check_ring_request(message: &Message) -> Result<(), String> {
    if message.code() != FrontendReq::SET_VRING_NUM as u32 {
        return Ok(());
    }
    let payload = message.payload();
    let [i0, i1, i2, i3, n0, n1, n2, n3] = payload else {
        return Err(format!("a {}-byte ring state", payload.len()));
    };
    let (index, size) = (
        u32::from_le_bytes([*i0, *i1, *i2, *i3]),
        u32::from_le_bytes([*n0, *n1, *n2, *n3]),
    );
    if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
        return Err(format!(
            "ring {index}: a size of {size} (a power of two up to {MAX_QUEUE_SIZE})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_num(index: u32, size: u32) -> Message {
        let mut payload = index.to_le_bytes().to_vec();
        payload.extend_from_slice(&size.to_le_bytes());
        Message::request(FrontendReq::SET_VRING_NUM as u32, &payload)
    }

    #[test]
    fn queue_sizes_must_be_powers_of_two_up_to_32768() {
        for size in [1, 2, 256, 32768] {
            check_ring_request(&set_num(0, size)).unwrap();
        }
        for size in [0, 3, 100, 65535, 65536, u32::MAX] {
            let why = check_ring_request(&set_num(1, size)).unwrap_err();
            assert!(why.contains(&format!("ring 1: a size of {size}")), "{why}");
        }
        let short = Message::request(FrontendReq::SET_VRING_NUM as u32, &[0; 4]);
        assert!(check_ring_request(&short).is_err());
        let other = Message::request(FrontendReq::GET_FEATURES as u32, &[]);
        check_ring_request(&other).unwrap();
    }
}
