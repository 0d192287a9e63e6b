//! The `compute` workload's loop, shared with the host tests so that both
//! sides time exactly the same code and the ratio of their rates shows
//! whether the guest runs natively.

use core::hint::black_box;

/// Runs `iterations` rounds of a fixed integer mix and returns the result.
/// `black_box` keeps the compiler from folding or vectorising the loop, so
/// the time is proportional to `iterations` on any machine.
pub fn compute(iterations: u64) -> u64 {
    let mut x = black_box(0x0123_4567_89ab_cdef_u64);
    for i in 0..black_box(iterations) {
        x = (x ^ (x >> 29))
            .wrapping_mul(0xbf58_476d_1ce4_e5b9)
            .wrapping_add(i);
        x = black_box(x);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_pure_function_of_the_count() {
        assert_eq!(compute(1000), compute(1000));
        assert_ne!(compute(1000), compute(1001));
        assert_eq!(compute(0), 0x0123_4567_89ab_cdef);
    }
}
