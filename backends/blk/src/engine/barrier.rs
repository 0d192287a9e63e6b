//! [`FlushBarrier`]: which FLUSHes may start, for an engine that has many
//! writes in flight at once.
//!
//! A FLUSH covers every write given to the engine before it, so its
//! fdatasync may start only once each of those writes has completed (an
//! fdatasync does not cover a write still on its way to the disk). Writes
//! and FLUSHes that come after it are not held up.

use std::collections::{BTreeSet, VecDeque};

/// Writes in flight, by number in the order they were given, and the
/// FLUSHes waiting for some of them.
#[derive(Debug, Default)]
pub struct FlushBarrier<T> {
    next_write: u64,
    writes_in_flight: BTreeSet<u64>,
    /// (first write number the FLUSH does not cover, its token), oldest first.
    flushes_waiting: VecDeque<(u64, T)>,
}

impl<T> FlushBarrier<T> {
    /// A write was given to the engine; returns its number.
    pub fn write_started(&mut self) -> u64 {
        let number = self.next_write;
        self.next_write += 1;
        self.writes_in_flight.insert(number);
        number
    }

    /// A FLUSH (known by `token`) was given to the engine: returns it if
    /// it may start now, else keeps it until the writes before it are done.
    pub fn flush(&mut self, token: T) -> Option<T> {
        if self.writes_in_flight.is_empty() {
            Some(token)
        } else {
            self.flushes_waiting.push_back((self.next_write, token));
            None
        }
    }

    /// Write `number` completed (well or not); returns the FLUSHes that
    /// may start now, oldest first.
    pub fn write_done(&mut self, number: u64) -> Vec<T> {
        self.writes_in_flight.remove(&number);
        let oldest = self.writes_in_flight.first().copied();
        let mut ready = Vec::new();
        while let Some((covers, _)) = self.flushes_waiting.front() {
            if oldest.is_some_and(|oldest| oldest < *covers) {
                break;
            }
            if let Some((_, token)) = self.flushes_waiting.pop_front() {
                ready.push(token);
            }
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_with_no_write_in_flight_starts_at_once() {
        let mut barrier = FlushBarrier::default();
        assert_eq!(barrier.flush('a'), Some('a'));
        let w = barrier.write_started();
        assert!(barrier.write_done(w).is_empty());
        assert_eq!(barrier.flush('b'), Some('b'));
    }

    #[test]
    fn a_flush_waits_for_every_write_before_it_in_any_completion_order() {
        let mut barrier = FlushBarrier::default();
        let w0 = barrier.write_started();
        let w1 = barrier.write_started();
        assert_eq!(barrier.flush('f'), None);
        // A write after the FLUSH does not hold it up.
        let w2 = barrier.write_started();
        assert!(barrier.write_done(w1).is_empty());
        assert_eq!(barrier.write_done(w0), ['f']);
        assert!(barrier.write_done(w2).is_empty());
    }

    #[test]
    fn flushes_start_in_order_as_their_writes_complete() {
        let mut barrier = FlushBarrier::default();
        let w0 = barrier.write_started();
        assert_eq!(barrier.flush(1), None);
        let w1 = barrier.write_started();
        assert_eq!(barrier.flush(2), None);
        assert_eq!(barrier.flush(3), None);
        // The second and third wait for w1 too.
        assert_eq!(barrier.write_done(w0), [1]);
        assert_eq!(barrier.write_done(w1), [2, 3]);
        // w1 done before w0: all three start with w0.
        let w0 = barrier.write_started();
        assert_eq!(barrier.flush(4), None);
        let w1 = barrier.write_started();
        assert_eq!(barrier.flush(5), None);
        assert!(barrier.write_done(w1).is_empty());
        assert_eq!(barrier.write_done(w0), [4, 5]);
    }
}
