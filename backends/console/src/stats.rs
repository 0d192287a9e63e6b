//! What pvstack-console counts of what the guest sent it that it could
//! not use, and the (rate-limited) log lines about it.

use std::sync::atomic::{AtomicU64, Ordering};

use pvstack_logging::warn_limited;

/// Counters shared by every connection of the process.
#[derive(Debug, Default)]
pub struct ConsoleStats {
    /// Output bytes beyond a chain's limit, dropped.
    cut_bytes: AtomicU64,
    /// Transmit descriptors outside guest memory, skipped.
    bad_descriptors: AtomicU64,
    /// Receive buffers input could not be written to.
    bad_receive_buffers: AtomicU64,
}

impl ConsoleStats {
    /// A transmit chain held `bytes` more than `limit`.
    pub fn cut(&self, bytes: usize, limit: usize) {
        let total = self.cut_bytes.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        warn_limited!(
            "dropped {bytes} bytes of a transmit chain beyond its {limit}-byte limit ({total} so far)"
        );
    }

    /// A transmit descriptor of `len` bytes at `addr` lies outside guest memory.
    pub fn bad_descriptor(&self, addr: u64, len: u32) {
        let count = self.bad_descriptors.fetch_add(1, Ordering::Relaxed) + 1;
        warn_limited!(
            "skipped a transmit descriptor of {len} bytes at {addr:#x} outside guest memory ({count} so far)"
        );
    }

    /// Input could not be written to the receive buffer at `addr`.
    pub fn bad_receive_buffer(&self, addr: u64, error: &dyn std::fmt::Display) {
        let count = self.bad_receive_buffers.fetch_add(1, Ordering::Relaxed) + 1;
        warn_limited!("receive buffer at {addr:#x}: {error} ({count} so far)");
    }

    /// One line with every counter.
    pub fn summary(&self, limit: usize) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "guest output: {} bytes beyond the {limit}-byte limit of a chain dropped, \
             {} descriptors outside guest memory skipped; {} receive buffers unusable",
            get(&self.cut_bytes),
            get(&self.bad_descriptors),
            get(&self.bad_receive_buffers)
        )
    }
}
