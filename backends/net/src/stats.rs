//! What pvstack-net counts: frames each way, and what it dropped and why.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::frame::BadFrame;

/// Counters shared by every connection of the process.
#[derive(Debug, Default)]
pub struct NetStats {
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    /// Frames from the guest dropped as malformed.
    tx_bad: AtomicU64,
    /// Frames the link refused (peer absent, TAP down).
    tx_link_errors: AtomicU64,
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    /// Frames from the link the guest's buffers could not take.
    rx_dropped: AtomicU64,
    /// Receive chains that were broken (read-only or outside memory).
    rx_bad_buffers: AtomicU64,
}

/// Logs the first few of a kind of drop, then every 1000th, so a guest
/// that keeps sending garbage cannot flood the log.
fn worth_logging(count: u64) -> bool {
    count <= 10 || count % 1000 == 0
}

impl NetStats {
    pub fn tx_frame(&self, bytes: usize) {
        self.tx_frames.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn tx_bad(&self, head: u16, why: BadFrame) {
        let count = self.tx_bad.fetch_add(1, Ordering::Relaxed) + 1;
        if worth_logging(count) {
            log::warn!("dropped a frame from the guest (chain {head}): {why}; {count} so far");
        }
    }

    pub fn tx_link_error(&self, error: &io::Error) {
        let count = self.tx_link_errors.fetch_add(1, Ordering::Relaxed) + 1;
        if worth_logging(count) {
            log::warn!("the link refused a frame: {error}; {count} so far");
        }
    }

    pub fn rx_frame(&self, bytes: usize) {
        self.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn rx_dropped(&self) {
        let count = self.rx_dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if worth_logging(count) {
            log::warn!("dropped a frame for the guest: its buffers cannot hold it; {count} so far");
        }
    }

    pub fn rx_bad_buffer(&self, head: u16) {
        let count = self.rx_bad_buffers.fetch_add(1, Ordering::Relaxed) + 1;
        if worth_logging(count) {
            log::warn!("receive chain {head} is not writable guest memory; {count} so far");
        }
    }

    /// One line with every counter.
    pub fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "tx_frames={} tx_bytes={} tx_bad={} tx_link_errors={} rx_frames={} rx_bytes={} \
             rx_dropped={} rx_bad_buffers={}",
            get(&self.tx_frames),
            get(&self.tx_bytes),
            get(&self.tx_bad),
            get(&self.tx_link_errors),
            get(&self.rx_frames),
            get(&self.rx_bytes),
            get(&self.rx_dropped),
            get(&self.rx_bad_buffers),
        )
    }
}
