//! [`StallStats`]: how long the guest's requests were held while a device
//! moved to another backend connection (a swap or a reconnect).

use std::time::Duration;

/// How many recent stalls the p99 is computed over.
const WINDOW: usize = 1024;

/// Stall durations of one kind of event, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StallStats {
    /// Events so far.
    pub count: u64,
    /// The most recent stall.
    pub last_us: u64,
    /// The longest stall.
    pub max_us: u64,
    /// The last [`WINDOW`] stalls, oldest overwritten first.
    recent: Vec<u64>,
}

impl StallStats {
    /// Records one stall.
    pub fn record(&mut self, stall: Duration) {
        let us = u64::try_from(stall.as_micros()).unwrap_or(u64::MAX);
        if self.recent.len() < WINDOW {
            self.recent.push(us);
        } else {
            // count >= WINDOW here, so this is the oldest slot.
            self.recent[(self.count % WINDOW as u64) as usize] = us;
        }
        self.count += 1;
        self.last_us = us;
        self.max_us = self.max_us.max(us);
    }

    /// The 99th percentile over the recent stalls (nearest rank), 0 if none.
    pub fn p99_us(&self) -> u64 {
        let mut sorted = self.recent.clone();
        sorted.sort_unstable();
        match sorted.len() {
            0 => 0,
            n => sorted[(n * 99).div_ceil(100) - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_max_and_p99() {
        let mut stats = StallStats::default();
        assert_eq!(stats.p99_us(), 0);
        for us in 1..=100 {
            stats.record(Duration::from_micros(us));
        }
        stats.record(Duration::from_micros(7));
        assert_eq!(stats.count, 101);
        assert_eq!(stats.last_us, 7);
        assert_eq!(stats.max_us, 100);
        // 101 samples: rank ceil(99.99) = 100 -> the 100th smallest is 99.
        assert_eq!(stats.p99_us(), 99);
    }

    #[test]
    fn window_keeps_the_recent_stalls() {
        let mut stats = StallStats::default();
        for _ in 0..WINDOW {
            stats.record(Duration::from_millis(50));
        }
        for _ in 0..WINDOW {
            stats.record(Duration::from_micros(10));
        }
        assert_eq!(stats.p99_us(), 10);
        assert_eq!(stats.max_us, 50_000);
    }
}
