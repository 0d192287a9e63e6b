//! `stamp`: guest console output for pvstack-console's stamp filter, and
//! where the transmit chains cut it. Input: the number of cuts (this % 8),
//! the cut positions, then the output.

use super::Seed;
use crate::input::{Reader, Writer};

pub struct Input<'a> {
    pub cuts: Vec<u16>,
    pub output: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn read(r: &mut Reader<'a>) -> Self {
        let count = r.u8() % 8;
        let cuts = (0..count).map(|_| r.u16()).collect();
        Input {
            cuts,
            output: r.rest(),
        }
    }

    fn write(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.cuts.len() as u8);
        for &cut in &self.cuts {
            w.u16(cut);
        }
        w.bytes(self.output);
        w.into_bytes()
    }

    /// The output as the pieces it arrives in: cut at each position
    /// (modulo its length), in order.
    pub fn pieces(&self) -> Vec<&'a [u8]> {
        let len = self.output.len();
        let mut cuts: Vec<usize> = self
            .cuts
            .iter()
            .map(|&cut| usize::from(cut) % (len + 1))
            .collect();
        cuts.sort_unstable();
        let mut pieces = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([len]) {
            pieces.push(&self.output[start..cut]);
            start = cut;
        }
        pieces
    }
}

pub fn seeds() -> Vec<Seed> {
    let seed = |cuts: &[u16], output: &[u8]| {
        Input {
            cuts: cuts.to_vec(),
            output,
        }
        .write()
    };
    vec![
        (
            "stamped-lines",
            seed(
                &[3, 11, 20],
                b"\x1b_pvs;1;0\x1b\\hello\r\n\x1b_pvs;2;0\x1b\\world\r\n",
            ),
        ),
        (
            "lost-lines",
            seed(&[], b"\x1b_pvs;9;3\x1b\\a\n\x1b_pvs;12;0\x1b\\b\n\x1b_pvs;12;0\x1b\\c\n"),
        ),
        (
            "other-escapes",
            seed(
                &[1, 2],
                b"\x1b[1mbold\x1b[0m \x1b_other\x1b\\ \x1b\x1b[m \x1b_pvs;x;1\x1b\\ \x1b_pvs;5\x1b\\",
            ),
        ),
        (
            "overlong-apc",
            seed(&[30], &[b"\x1b_pvs;".as_slice(), &[b'9'; 60], b"\x1b\\"].concat()),
        ),
    ]
}
