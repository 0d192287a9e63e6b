//! [`History`]: the most recent guest output, so that a client attaching
//! late sees what came before it.

use std::collections::VecDeque;

/// A bounded byte history: appending past the capacity forgets the oldest bytes.
#[derive(Debug)]
pub struct History {
    bytes: VecDeque<u8>,
    capacity: usize,
}

impl History {
    /// An empty history that keeps at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        History {
            bytes: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Appends `data`, dropping the oldest bytes beyond the capacity.
    pub fn append(&mut self, data: &[u8]) {
        let keep = &data[data.len().saturating_sub(self.capacity)..];
        let overflow = (self.bytes.len() + keep.len()).saturating_sub(self.capacity);
        self.bytes.drain(..overflow);
        self.bytes.extend(keep);
    }

    /// The kept bytes, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_bytes() {
        let mut history = History::new(8);
        history.append(b"abc");
        history.append(b"defg");
        assert_eq!(history.contents(), b"abcdefg");
        history.append(b"hij");
        assert_eq!(history.contents(), b"cdefghij");
        history.append(b"0123456789");
        assert_eq!(history.contents(), b"23456789");
    }
}
