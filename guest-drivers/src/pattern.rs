//! The deterministic disk data pattern: the byte at disk offset `X` under
//! seed `S` is a pure function of `(S, X)`, so the guest can write it, read
//! it back and check it, and the host can check the image file, each
//! working on any piece of the disk independently.

use crate::rng::splitmix64;

/// The 8 pattern bytes of the aligned 8-byte word that holds disk offset
/// `word * 8`.
fn word(seed: u64, word: u64) -> [u8; 8] {
    splitmix64(seed ^ word.wrapping_mul(0xd6e8_feb8_6659_fd93)).to_le_bytes()
}

/// The pattern byte at disk offset `offset`.
pub fn byte_at(seed: u64, offset: u64) -> u8 {
    word(seed, offset / 8)[(offset % 8) as usize]
}

/// Fills `buf` with the pattern of the disk bytes starting at `offset`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for_each_piece(offset, buf.len(), |index, piece_offset, range| {
        buf[index..index + range.len()].copy_from_slice(&word(seed, piece_offset / 8)[range]);
    });
}

/// Number of bytes of `buf` (holding the disk bytes from `offset`) that
/// differ from the pattern.
pub fn mismatches(seed: u64, offset: u64, buf: &[u8]) -> u64 {
    let mut count = 0;
    for_each_piece(offset, buf.len(), |index, piece_offset, range| {
        let expected = &word(seed, piece_offset / 8)[range.clone()];
        let actual = &buf[index..index + range.len()];
        if expected != actual {
            count += expected.iter().zip(actual).filter(|(e, a)| e != a).count() as u64;
        }
    });
    count
}

/// Splits `len` bytes from disk offset `offset` at 8-byte word boundaries
/// and calls `f(index in buffer, disk offset of the word, byte range within the word)`.
fn for_each_piece(offset: u64, len: usize, mut f: impl FnMut(usize, u64, core::ops::Range<usize>)) {
    let mut index = 0;
    while index < len {
        let disk = offset + index as u64;
        let start = (disk % 8) as usize;
        let end = (start + (len - index)).min(8);
        f(index, disk - start as u64, start..end);
        index += end - start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    #[test]
    fn fill_matches_byte_at_for_any_alignment() {
        for offset in [0u64, 1, 7, 8, 4093, 1 << 33] {
            let mut buf = vec![0u8; 77];
            fill(9, offset, &mut buf);
            for (i, &b) in buf.iter().enumerate() {
                assert_eq!(b, byte_at(9, offset + i as u64));
            }
            assert_eq!(mismatches(9, offset, &buf), 0);
        }
    }

    #[test]
    fn pieces_agree_with_the_whole() {
        let mut whole = vec![0u8; 4096];
        fill(3, 512, &mut whole);
        let mut piece = vec![0u8; 100];
        fill(3, 512 + 1001, &mut piece);
        assert_eq!(&whole[1001..1101], &piece[..]);
    }

    #[test]
    fn mismatches_counts_changed_bytes_and_seeds_differ() {
        let mut buf = vec![0u8; 64];
        fill(5, 10, &mut buf);
        buf[3] ^= 1;
        buf[40] ^= 0xff;
        assert_eq!(mismatches(5, 10, &buf), 2);
        assert!(mismatches(6, 10, &buf) > 32);
    }
}
