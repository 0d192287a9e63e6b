//! pvstack-console's stamp filter on any guest output, cut anywhere: the
//! output shown must not depend on where the transmit chains cut the
//! stream (the filter keeps its state across pieces), the lines it
//! reports lost must be the same, and output without an escape passes
//! through untouched.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvstack_console::stamp::StampFilter;
use pvstack_fuzz::input::Reader;
use pvstack_fuzz::targets::stamp::Input;

fuzz_target!(|data: &[u8]| {
    let input = Input::read(&mut Reader::new(data));
    let mut whole = StampFilter::new();
    let mut shown_whole = Vec::new();
    whole.filter(input.output, &mut shown_whole);
    let mut cut = StampFilter::new();
    let mut shown_cut = Vec::new();
    for piece in input.pieces() {
        cut.filter(piece, &mut shown_cut);
    }
    assert_eq!(shown_cut, shown_whole, "output depends on where it was cut");
    assert_eq!(cut.lost_total(), whole.lost_total());
    if !input.output.contains(&0x1b) {
        assert_eq!(shown_whole, input.output);
    }
});
