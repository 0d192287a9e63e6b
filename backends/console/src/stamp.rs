//! Output-loss accounting: [`StampFilter`] strips the sequence stamps the
//! pvstack guest puts before each output line and reports lines lost.
//!
//! The guest's console driver starts every line with an APC escape
//! sequence, `ESC _ pvs;SEQ;LOST ESC \`, where SEQ numbers the line and
//! LOST counts the lines the guest dropped just before it (its transmit
//! ring stayed full, e.g. while this backend was down). Terminals ignore
//! APC sequences, so even unfiltered output stays readable. The filter
//! removes the stamps and, when LOST is not 0 or SEQ skips numbers, puts
//! `[pvstack-console: N lines lost]` on a line of its own in their place.
//! Output without stamps (any other guest) passes through unchanged.

const ESC: u8 = 0x1b;
/// Longest stamp body kept; anything longer is not a stamp.
const MAX_STAMP: usize = 48;
const PREFIX: &[u8] = b"pvs;";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Text,
    /// Saw ESC in text.
    Escape,
    /// Inside `ESC _ ...`.
    Stamp,
    /// Saw ESC inside a stamp.
    StampEscape,
}

/// Removes stamps from a byte stream that may be split anywhere.
#[derive(Debug)]
pub struct StampFilter {
    state: State,
    body: Vec<u8>,
    last_seq: Option<u64>,
    lost_total: u64,
}

impl Default for StampFilter {
    fn default() -> Self {
        Self::new()
    }
}

impl StampFilter {
    /// A filter that has seen no stamp yet.
    pub fn new() -> Self {
        StampFilter {
            state: State::Text,
            body: Vec::new(),
            last_seq: None,
            lost_total: 0,
        }
    }

    /// Lines reported lost so far.
    pub fn lost_total(&self) -> u64 {
        self.lost_total
    }

    /// Filters `input`, appending what is to be shown to `out`.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        while let Some((&byte, after)) = rest.split_first() {
            if self.state == State::Text {
                // Plain text up to the next escape goes out in one piece.
                let run = rest.iter().position(|&b| b == ESC).unwrap_or(rest.len());
                out.extend_from_slice(&rest[..run]);
                let Some(after_escape) = rest.get(run + 1..) else {
                    break;
                };
                self.state = State::Escape;
                rest = after_escape;
                continue;
            }
            rest = after;
            match self.state {
                State::Text => out.push(byte),
                State::Escape if byte == b'_' => {
                    self.body.clear();
                    self.state = State::Stamp;
                }
                State::Escape if byte == ESC => out.push(ESC),
                State::Escape => {
                    out.extend_from_slice(&[ESC, byte]);
                    self.state = State::Text;
                }
                State::Stamp if byte == ESC => self.state = State::StampEscape,
                State::Stamp if self.body.len() < MAX_STAMP => self.body.push(byte),
                State::Stamp => {
                    self.pass_through(out);
                    out.push(byte);
                    self.state = State::Text;
                }
                State::StampEscape if byte == b'\\' => {
                    self.end_stamp(out);
                    self.state = State::Text;
                }
                State::StampEscape => {
                    self.pass_through(out);
                    out.push(ESC);
                    self.state = State::Text;
                    // The byte after the stray ESC starts over as text.
                    self.filter(&[byte], out);
                }
            }
        }
    }

    /// An APC sequence that is not (or not yet known to be) a stamp goes out as it came.
    fn pass_through(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[ESC, b'_']);
        out.append(&mut self.body);
    }

    fn end_stamp(&mut self, out: &mut Vec<u8>) {
        let Some((seq, lost)) = parse_stamp(&self.body) else {
            self.pass_through(out);
            out.extend_from_slice(&[ESC, b'\\']);
            return;
        };
        let skipped = match self.last_seq {
            Some(last) if seq > last => seq - last - 1,
            _ => 0,
        };
        let missing = lost.max(skipped);
        if missing > 0 {
            // The guest writes LOST: it may be any u64.
            self.lost_total = self.lost_total.saturating_add(missing);
            pvstack_logging::warn_limited!(
                "{missing} lines of guest output lost before line {seq}"
            );
            out.extend_from_slice(
                format!("[pvstack-console: {missing} lines lost]\r\n").as_bytes(),
            );
        }
        self.last_seq = Some(seq);
        self.body.clear();
    }
}

/// `pvs;SEQ;LOST` as numbers.
fn parse_stamp(body: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(body.strip_prefix(PREFIX)?).ok()?;
    let (seq, lost) = text.split_once(';')?;
    Some((seq.parse().ok()?, lost.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(filter: &mut StampFilter, input: &[u8]) -> String {
        let mut out = Vec::new();
        filter.filter(input, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn stamps_are_removed_even_when_split() {
        let mut filter = StampFilter::new();
        let input = b"\x1b_pvs;1;0\x1b\\hello\r\n\x1b_pvs;2;0\x1b\\world\r\n";
        let mut shown = String::new();
        for chunk in input.chunks(3) {
            shown += &run(&mut filter, chunk);
        }
        assert_eq!(shown, "hello\r\nworld\r\n");
        assert_eq!(filter.lost_total(), 0);
    }

    #[test]
    fn reported_and_skipped_lines_are_announced() {
        let mut filter = StampFilter::new();
        // The very first stamp of a fresh backend carries the guest's count.
        assert_eq!(
            run(&mut filter, b"\x1b_pvs;9;3\x1b\\a\n"),
            "[pvstack-console: 3 lines lost]\r\na\n"
        );
        assert_eq!(
            run(&mut filter, b"\x1b_pvs;12;0\x1b\\b\n"),
            "[pvstack-console: 2 lines lost]\r\nb\n"
        );
        assert_eq!(filter.lost_total(), 5);
    }

    /// A guest's LOST counts are any u64; their total stops at the top.
    #[test]
    fn lost_counts_near_the_top_do_not_overflow_the_total() {
        let mut filter = StampFilter::new();
        let huge = u64::MAX - 1;
        run(&mut filter, format!("\x1b_pvs;1;{huge}\x1b\\").as_bytes());
        run(&mut filter, format!("\x1b_pvs;2;{huge}\x1b\\").as_bytes());
        assert_eq!(filter.lost_total(), u64::MAX);
    }

    #[test]
    fn other_escapes_pass_through() {
        let mut filter = StampFilter::new();
        let text = b"\x1b[1mbold\x1b[0m \x1b_other\x1b\\ \x1b\x1b[m";
        assert_eq!(run(&mut filter, text).as_bytes(), text);
        let long = [b"\x1b_".as_slice(), &[b'x'; 60]].concat();
        assert_eq!(run(&mut filter, &long).as_bytes(), &long[..]);
    }
}
