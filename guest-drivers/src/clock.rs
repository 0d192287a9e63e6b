//! Timing with the TSC, which `rdtsc` reads natively without an exit.

use crate::hypercall::{Error, Hypercall};
use pvstack_protocols::boot::BootInfo;

/// The current TSC value.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects and runs at any privilege level
    // unless CR4.TSD is set, which the VMM does not set.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// How long to measure the TSC against `TIME_NS` when the VMM does not
/// know the TSC frequency.
const CALIBRATION_NS: u64 = 20_000_000;

/// Converts TSC ticks to time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    tsc_khz: u64,
}

impl Clock {
    /// A clock for a TSC running at `tsc_khz` (> 0).
    pub const fn from_khz(tsc_khz: u64) -> Self {
        Clock { tsc_khz }
    }

    /// The clock of this machine: `BootInfo::tsc_khz`, or measured against
    /// the `TIME_NS` hypercall when the VMM reports 0.
    pub fn new(boot: &BootInfo, hypercall: &mut Hypercall) -> Result<Self, Error> {
        if boot.tsc_khz != 0 {
            return Ok(Clock::from_khz(boot.tsc_khz));
        }
        let (start_ns, start_tsc) = (hypercall.time_ns()?, rdtsc());
        loop {
            let (now_ns, now_tsc) = (hypercall.time_ns()?, rdtsc());
            let ns = now_ns.saturating_sub(start_ns);
            if ns >= CALIBRATION_NS {
                let khz = (now_tsc - start_tsc) as u128 * 1_000_000 / ns as u128;
                return Ok(Clock::from_khz((khz as u64).max(1)));
            }
        }
    }

    /// TSC frequency in kHz.
    pub const fn tsc_khz(&self) -> u64 {
        self.tsc_khz
    }

    /// Microseconds in `ticks` TSC ticks.
    pub const fn ticks_to_us(&self, ticks: u64) -> u64 {
        (ticks as u128 * 1000 / self.tsc_khz as u128) as u64
    }

    /// TSC ticks in `us` microseconds.
    pub const fn us_to_ticks(&self, us: u64) -> u64 {
        (us as u128 * self.tsc_khz as u128 / 1000) as u64
    }

    /// Microseconds since the TSC read `start`.
    pub fn us_since(&self, start: u64) -> u64 {
        self.ticks_to_us(rdtsc().wrapping_sub(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip() {
        let clock = Clock::from_khz(2_500_000);
        assert_eq!(clock.ticks_to_us(2_500_000_000), 1_000_000);
        assert_eq!(clock.us_to_ticks(1_000_000), 2_500_000_000);
        assert_eq!(clock.ticks_to_us(clock.us_to_ticks(12_345)), 12_345);
    }

    #[test]
    fn tsc_moves_forward() {
        let start = rdtsc();
        crate::compute::compute(10_000);
        assert!(rdtsc() > start);
    }
}
