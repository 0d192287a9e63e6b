//! The sequence stamp the guest puts before each console output line so
//! that the console backend can tell when lines were lost (pvstack-console
//! strips it and prints `[pvstack-console: N lines lost]`): an APC escape
//! sequence, which terminals ignore, `ESC _ pvs;SEQ;LOST ESC \`. SEQ
//! numbers the line from 1; LOST counts lines dropped just before it.

use core::fmt::{self, Write};

/// Writes the stamp of line `seq` with `lost` lines dropped before it.
pub fn write_stamp(out: &mut impl Write, seq: u64, lost: u64) -> fmt::Result {
    write!(out, "\x1b_pvs;{seq};{lost}\x1b\\")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::String;

    #[test]
    fn stamp_format() {
        let mut out = String::new();
        write_stamp(&mut out, 42, 3).unwrap();
        assert_eq!(out, "\x1b_pvs;42;3\x1b\\");
    }
}
