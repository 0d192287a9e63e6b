//! Frame sizes and the virtio-net header (virtio 1.x section 5.1.6).

/// Bytes of `struct virtio_net_hdr_mrg_rxbuf`, the header in front of every
/// frame once VIRTIO_F_VERSION_1 is negotiated (with or without MRG_RXBUF).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Smallest frame accepted from the guest: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Largest frame accepted from the guest: a 64 KiB TSO packet with its
/// Ethernet header (and a VLAN tag).
pub const MAX_FRAME_LEN: usize = 65535 + 18;
/// Largest header + frame a chain may carry.
pub const MAX_CHAIN_BYTES: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// Why a frame from the guest was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadFrame {
    /// The chain holds fewer bytes than a header and an Ethernet header.
    TooShort(usize),
    /// The chain holds more than [`MAX_CHAIN_BYTES`].
    TooLong(usize),
    /// A descriptor the device may only write (the driver must give
    /// read-only buffers to transmit).
    WriteOnlyDescriptor,
    /// A descriptor points outside guest memory.
    OutsideMemory { addr: u64, len: u32 },
    /// The chain breaks off after a descriptor that says another follows:
    /// it loops, leaves its table or guest memory, or nests indirect tables.
    BrokenChain,
}

impl std::fmt::Display for BadFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadFrame::TooShort(len) => write!(
                f,
                "{len} bytes, less than a virtio-net header and an Ethernet header"
            ),
            BadFrame::TooLong(len) => write!(f, "{len} bytes, more than {MAX_CHAIN_BYTES}"),
            BadFrame::WriteOnlyDescriptor => write!(f, "a device-writable descriptor"),
            BadFrame::OutsideMemory { addr, len } => {
                write!(f, "{len} bytes at {addr:#x} lie outside guest memory")
            }
            BadFrame::BrokenChain => write!(f, "a descriptor chain that breaks off"),
        }
    }
}

/// Checks the length of a header + frame from the guest.
pub fn check_chain_len(len: usize) -> Result<(), BadFrame> {
    if len < VNET_HDR_LEN + MIN_FRAME_LEN {
        return Err(BadFrame::TooShort(len));
    }
    if len > MAX_CHAIN_BYTES {
        return Err(BadFrame::TooLong(len));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_lengths() {
        assert_eq!(check_chain_len(0), Err(BadFrame::TooShort(0)));
        assert_eq!(check_chain_len(25), Err(BadFrame::TooShort(25)));
        assert_eq!(check_chain_len(26), Ok(()));
        assert_eq!(check_chain_len(MAX_CHAIN_BYTES), Ok(()));
        assert_eq!(
            check_chain_len(MAX_CHAIN_BYTES + 1),
            Err(BadFrame::TooLong(MAX_CHAIN_BYTES + 1))
        );
    }
}
