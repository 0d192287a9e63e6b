//! [`DiskStats`]: what an in-VMM disk counts, for benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};

/// Requests served and interrupts raised by a disk the VMM serves itself.
#[derive(Debug, Default)]
pub struct DiskStats {
    requests: AtomicU64,
    interrupts: AtomicU64,
}

impl DiskStats {
    /// Counts one answered request.
    pub fn request(&self) {
        // Relaxed: statistics, not synchronisation.
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one interrupt raised.
    pub fn interrupt(&self) {
        self.interrupts.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Interrupts raised so far.
    pub fn interrupts(&self) -> u64 {
        self.interrupts.load(Ordering::Relaxed)
    }

    /// The line logged when the VM has ended (`pvstack bench` reads it from
    /// the VMM's log): `NAME: served N requests, raised M interrupts`.
    pub fn summary(&self, name: &str) -> String {
        format!(
            "{name}: served {} requests, raised {} interrupts",
            self.requests(),
            self.interrupts()
        )
    }
}
