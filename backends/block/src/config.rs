//! What a virtio-blk device built on this engine offers: its virtio
//! feature bits and configuration space, and the limits requests are
//! checked against.

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::ByteValued;

/// Size of a virtio-blk sector: the unit of request offsets and of capacity.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of the device ID returned by GET_ID.
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// Segments accepted in one DISCARD or WRITE_ZEROES request.
pub const MAX_RANGE_SEGMENTS: u32 = 32;
/// Sectors one DISCARD or WRITE_ZEROES segment may cover (2 GiB - 512).
pub const MAX_RANGE_SECTORS: u32 = u32::MAX / SECTOR_SIZE as u32;

/// The queue size seg_max is sized for when queues may be larger (QEMU's
/// default for virtio-blk and vhost-user-blk devices).
pub const SEG_MAX_QUEUE_SIZE: u16 = 128;

/// The seg_max to advertise for queues of up to `max_queue_size` entries:
/// what one chain on a queue of `min(max_queue_size, 128)` entries carries
/// besides the header and the status. A driver reads seg_max before it sets
/// a queue's size, and may set any size up to the largest (Linux sets less
/// when it cannot allocate the ring; a vhost-user backend learns the size
/// only when the rings start), so seg_max is sized for the queue drivers
/// commonly run, not for the largest one allowed. On a smaller queue a
/// driver still sends seg_max segments in one indirect table
/// (VIRTIO_RING_F_INDIRECT_DESC, always offered). Never 0: drivers read it
/// as 1 anyway.
pub fn seg_max(max_queue_size: u16) -> u32 {
    u32::from(
        max_queue_size
            .min(SEG_MAX_QUEUE_SIZE)
            .saturating_sub(2)
            .max(1),
    )
}

/// The disk as the guest sees it, and the limits requests are checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLimits {
    /// Image size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Writes, discards and write-zeroes are refused.
    pub readonly: bool,
    /// Data descriptors accepted in one request (advertised as seg_max).
    pub max_segments: u32,
}

/// virtio feature bits the device offers. Indirect descriptors need nothing
/// from the device's user: the queue resolves them while the chain is
/// walked, and `request` bounds and checks the result.
pub fn virtio_features(readonly: bool) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | 1 << bit);
    if readonly {
        bits |= 1 << VIRTIO_BLK_F_RO;
    }
    bits
}

/// The virtio-blk config space; the bindings struct is packed, so its bytes
/// are exactly the wire layout.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ConfigSpace(virtio_blk_config);

// SAFETY: virtio_blk_config is `repr(C, packed)` and made only of integers,
// so it has no padding and every bit pattern is a valid value.
unsafe impl ByteValued for ConfigSpace {}

/// The config space bytes: capacity, blk_size, seg_max, num_queues and the
/// discard/write-zeroes limits, little-endian as virtio 1.x requires.
pub fn config_space(limits: &DiskLimits, num_queues: u16, blk_size: u32) -> Vec<u8> {
    let config = virtio_blk_config {
        capacity: limits.capacity_sectors.to_le(),
        seg_max: limits.max_segments.to_le(),
        blk_size: blk_size.to_le(),
        num_queues: num_queues.to_le(),
        max_discard_sectors: MAX_RANGE_SECTORS.to_le(),
        max_discard_seg: MAX_RANGE_SEGMENTS.to_le(),
        discard_sector_alignment: (blk_size / SECTOR_SIZE as u32).max(1).to_le(),
        max_write_zeroes_sectors: MAX_RANGE_SECTORS.to_le(),
        max_write_zeroes_seg: MAX_RANGE_SEGMENTS.to_le(),
        write_zeroes_may_unmap: 1,
        ..Default::default()
    };
    ConfigSpace(config).as_slice().to_vec()
}

/// The slice of the config space a driver (or a vhost-user GET_CONFIG) asks
/// for; bytes past the end of the struct read as zero (a driver may ask for
/// a newer, longer layout).
pub fn config_window(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut window = vec![0u8; size as usize];
    let start = (offset as usize).min(space.len());
    let end = (offset as usize)
        .saturating_add(size as usize)
        .min(space.len());
    window[..end - start].copy_from_slice(&space[start..end]);
    window
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DiskLimits {
        DiskLimits {
            capacity_sectors: 0x1_0000_0001,
            readonly: false,
            max_segments: 126,
        }
    }

    #[test]
    fn config_space_has_the_virtio_layout() {
        let space = config_space(&limits(), 4, 512);
        let u32_at = |o: usize| u32::from_le_bytes(space[o..o + 4].try_into().unwrap());
        assert_eq!(
            u64::from_le_bytes(space[0..8].try_into().unwrap()),
            0x1_0000_0001
        );
        assert_eq!(u32_at(12), 126, "seg_max");
        assert_eq!(u32_at(20), 512, "blk_size");
        assert_eq!(u16::from_le_bytes([space[34], space[35]]), 4, "num_queues");
        assert_eq!(u32_at(36), MAX_RANGE_SECTORS, "max_discard_sectors");
        assert_eq!(u32_at(40), MAX_RANGE_SEGMENTS, "max_discard_seg");
        assert_eq!(u32_at(48), MAX_RANGE_SECTORS, "max_write_zeroes_sectors");
        assert_eq!(space[56], 1, "write_zeroes_may_unmap");
    }

    #[test]
    fn config_window_pads_past_the_end() {
        let space = config_space(&limits(), 1, 512);
        let window = config_window(&space, 32, 400);
        assert_eq!(window.len(), 400);
        assert_eq!(&window[..space.len() - 32], &space[32..]);
        assert!(window[space.len() - 32..].iter().all(|&b| b == 0));
        assert!(config_window(&space, 10_000, 8).iter().all(|&b| b == 0));
    }

    #[test]
    fn seg_max_fits_a_queue_of_128_or_the_largest_queue_if_smaller() {
        assert_eq!(seg_max(256), 126);
        assert_eq!(seg_max(128), 126);
        assert_eq!(seg_max(32768), 126);
        assert_eq!(seg_max(64), 62);
        assert_eq!(seg_max(2), 1);
        assert_ne!(
            virtio_features(false) & (1 << VIRTIO_RING_F_INDIRECT_DESC),
            0
        );
    }

    #[test]
    fn readonly_sets_the_ro_bit_only_when_asked() {
        assert_eq!(virtio_features(false) & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(virtio_features(true) & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(virtio_features(false) & (1 << VIRTIO_F_VERSION_1), 0);
    }
}
