//! Self-describing 4 KiB blocks for `blk-swap-verify`: each holds its
//! block number and the sequence number of the write that put it there,
//! then a pattern derived from both. The guest checks what it reads back
//! with [`check`], and a host test checks the disk image the same way.

use crate::checksum::Fnv1a64;
use crate::pattern;

/// Bytes per block.
pub const BLOCK_SIZE: usize = 4096;
/// What the host writes at the start of the block after the verified ones
/// to end a `blk-swap-verify stop=1` run.
pub const STOP_MARKER: &[u8] = b"PVSTACK-STOP";
/// Header: block number and sequence number, little-endian u64 each.
const HEADER: usize = 16;

fn seed(block: u64, seq: u64) -> u64 {
    block.rotate_left(40) ^ seq ^ 0x5eb1_0c4e_5eb1_0c4e
}

/// Fills `buf` (one block) with write `seq` of block `block`.
pub fn fill(block: u64, seq: u64, buf: &mut [u8]) {
    let buf = &mut buf[..BLOCK_SIZE];
    buf[..8].copy_from_slice(&block.to_le_bytes());
    buf[8..HEADER].copy_from_slice(&seq.to_le_bytes());
    pattern::fill(seed(block, seq), 0, &mut buf[HEADER..]);
}

/// The sequence number in `buf` (block `block` as read from the disk) if
/// the block is intact: its header names `block` and its pattern matches.
/// An all-zero block (never written) is sequence 0.
pub fn check(block: u64, buf: &[u8]) -> Option<u64> {
    let buf = buf.get(..BLOCK_SIZE)?;
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&buf[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let (found, seq) = (word(0), word(8));
    if found == 0 && seq == 0 {
        return buf.iter().all(|&b| b == 0).then_some(0);
    }
    let intact = found == block && pattern::mismatches(seed(block, seq), 0, &buf[HEADER..]) == 0;
    intact.then_some(seq)
}

/// The checksum of a table of per-block sequence numbers, as
/// `blk-swap-verify` prints it: FNV-1a over the little-endian u64s.
pub fn table_fnv(seqs: impl IntoIterator<Item = u64>) -> u64 {
    let mut hasher = Fnv1a64::new();
    for seq in seqs {
        hasher.update(&seq.to_le_bytes());
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_check_their_own_number_and_sequence() {
        let mut buf = [0u8; BLOCK_SIZE];
        assert_eq!(check(3, &buf), Some(0));
        fill(3, 77, &mut buf);
        assert_eq!(check(3, &buf), Some(77));
        assert_eq!(check(4, &buf), None);
        buf[100] ^= 1;
        assert_eq!(check(3, &buf), None);
        assert_eq!(check(3, &buf[..100]), None);
    }

    #[test]
    fn table_checksum_depends_on_order() {
        assert_ne!(table_fnv([1, 2]), table_fnv([2, 1]));
        assert_eq!(table_fnv([]), Fnv1a64::new().finish());
    }
}
