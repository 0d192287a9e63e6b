//! Exit counters, summed over all vCPUs, as the COUNTERS hypercall reports
//! them.

use std::sync::atomic::{AtomicU64, Ordering};

use pvstack_protocols::boot::Counters;

/// Why `KVM_RUN` returned, as far as the counters care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    Hypercall,
    Mmio,
    Pio,
    Other,
}

/// Counters every vCPU thread bumps after each `KVM_RUN` return.
#[derive(Debug, Default)]
pub struct ExitCounters {
    exits: AtomicU64,
    hypercall: AtomicU64,
    mmio: AtomicU64,
    pio: AtomicU64,
    other: AtomicU64,
}

impl ExitCounters {
    /// Counts one exit of `kind`.
    pub fn record(&self, kind: ExitKind) {
        // Relaxed: the counts are statistics, not synchronisation.
        self.exits.fetch_add(1, Ordering::Relaxed);
        let counter = match kind {
            ExitKind::Hypercall => &self.hypercall,
            ExitKind::Mmio => &self.mmio,
            ExitKind::Pio => &self.pio,
            ExitKind::Other => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts as the guest sees them.
    pub fn snapshot(&self) -> Counters {
        Counters {
            exits: self.exits.load(Ordering::Relaxed),
            hypercall_exits: self.hypercall.load(Ordering::Relaxed),
            mmio_exits: self.mmio.load(Ordering::Relaxed),
            pio_exits: self.pio.load(Ordering::Relaxed),
            other_exits: self.other.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exit_counts_once_in_total_and_once_by_kind() {
        let counters = ExitCounters::default();
        for kind in [
            ExitKind::Hypercall,
            ExitKind::Hypercall,
            ExitKind::Mmio,
            ExitKind::Other,
        ] {
            counters.record(kind);
        }
        let c = counters.snapshot();
        assert_eq!(
            (
                c.exits,
                c.hypercall_exits,
                c.mmio_exits,
                c.pio_exits,
                c.other_exits
            ),
            (4, 2, 1, 0, 1)
        );
    }
}
