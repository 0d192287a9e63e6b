//! [`TerminalGuard`]: guest output on its way to an operator's terminal,
//! with every escape sequence a console does not need dropped.
//!
//! A terminal acts on more than text: OSC sets titles, hyperlinks and the
//! clipboard (OSC 52), DCS/APC/PM/SOS carry strings for the terminal or a
//! multiplexer (`DCS tmux;` passes sequences through tmux), and requests
//! such as CSI 6n (cursor position), CSI c (device attributes), CSI 21 t
//! (window title), ESC Z or ENQ make it *type* an answer, which lands in
//! whatever reads the terminal next: the operator's shell once the guest
//! is gone. The guard passes text, UTF-8 and the controls and sequences
//! full-screen programs draw with (cursor movement, erasing, colours,
//! scroll regions, the alternate screen) and drops everything else,
//! whole: strings up to their terminator, CSI sequences by their final
//! byte and parameters, C1 controls in their 8-bit and UTF-8 forms.
//!
//! The input may be split anywhere: state carries over between calls.

const ESC: u8 = 0x1b;
const BEL: u8 = 0x07;
const CAN: u8 = 0x18;
const SUB: u8 = 0x1a;
/// Longest CSI sequence kept whole; a longer one is dropped.
const MAX_CSI: usize = 64;

/// C0 controls a console needs: BEL, BS, HT, LF, VT, FF, CR.
fn c0_allowed(byte: u8) -> bool {
    (BEL..=b'\r').contains(&byte)
}

/// Final bytes of the two-byte escapes passed on: save/restore cursor,
/// index, next line, reverse index, tab set, keypad modes, reset.
const ESCAPE_FINALS: &[u8] = b"78DEMH=>c";
/// Intermediates that begin a passed escape with one more byte: charset
/// designation (`ESC ( B`), line size/alignment (`ESC # 8`), `ESC % G`.
const ESCAPE_INTERMEDIATES: &[u8] = b"()*+-./#%";
/// CSI final bytes passed on (without intermediate bytes): editing,
/// cursor movement, erasing, tabs, scrolling, modes (parameters checked),
/// SGR, scroll region, save/restore cursor. Requests that make the
/// terminal answer (c, n, t, x, ...) and media copy (i) are not here.
const CSI_FINALS: &[u8] = b"@ABCDEFGHIJKLMPSTXZ`abdefghlmrsu";
/// Modes CSI ? ... h/l may set: cursor keys, reverse video, origin,
/// autowrap, blink, cursor visibility, alternate screens, bracketed paste.
/// Mouse and focus reporting are not among them.
const DEC_MODES: &[u32] = &[1, 5, 6, 7, 12, 25, 47, 1047, 1048, 1049, 2004];
/// Modes CSI ... h/l may set: insert, newline.
const ANSI_MODES: &[u32] = &[4, 20];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ground,
    /// After ESC.
    Escape,
    /// After ESC and an intermediate: one more byte ends it.
    EscapeTail {
        keep: bool,
    },
    /// Collecting a CSI sequence in `csi`.
    Csi,
    /// Dropping an over-long CSI sequence up to its final byte.
    CsiDiscard,
    /// Dropping an OSC, DCS, APC, PM or SOS string up to ST (or BEL).
    Str,
    /// ESC inside such a string: `\` ends it.
    StrEscape,
}

/// Filters guest output for a terminal; see the module documentation.
#[derive(Debug)]
pub struct TerminalGuard {
    state: State,
    /// The CSI sequence being collected, `ESC [` included.
    csi: Vec<u8>,
    /// A UTF-8 lead byte held back: 0xC2 may start an encoded C1 control.
    held: Option<u8>,
    /// Continuation bytes the current UTF-8 sequence still needs.
    utf8_pending: u8,
    neutralised: u64,
}

impl Default for TerminalGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl TerminalGuard {
    pub fn new() -> Self {
        TerminalGuard {
            state: State::Ground,
            csi: Vec::with_capacity(MAX_CSI),
            held: None,
            utf8_pending: 0,
            neutralised: 0,
        }
    }

    /// Sequences and controls dropped so far.
    pub fn neutralised(&self) -> u64 {
        self.neutralised
    }

    /// Filters `input`, appending what may reach the terminal to `out`.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &byte in input {
            self.byte(byte, out);
        }
    }

    fn byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        match self.state {
            State::Ground => self.ground(byte, out),
            State::Escape => self.escape(byte, out),
            State::EscapeTail { keep } => {
                self.state = State::Ground;
                if !(0x20..0x7f).contains(&byte) {
                    // The escape breaks off (what was passed of it is
                    // inert on its own); the byte counts as text.
                    self.ground(byte, out);
                } else if keep {
                    out.push(byte);
                }
            }
            State::Csi => self.csi(byte, out),
            State::CsiDiscard => match byte {
                0x40..=0x7e | CAN | SUB => self.state = State::Ground,
                ESC => self.state = State::Escape,
                _ => {}
            },
            State::Str => match byte {
                ESC => self.state = State::StrEscape,
                BEL | CAN | SUB => self.state = State::Ground,
                _ => {}
            },
            State::StrEscape => {
                self.state = State::Ground;
                if byte != b'\\' {
                    // ESC ends the string and starts a new escape.
                    self.escape(byte, out);
                }
            }
        }
    }

    fn drop_sequence(&mut self, then: State) {
        self.neutralised += 1;
        self.state = then;
    }

    fn ground(&mut self, byte: u8, out: &mut Vec<u8>) {
        if let Some(lead) = self.held.take() {
            match byte {
                // U+0080..U+009F: C1 controls some terminals obey.
                0x80..=0x9f => {
                    self.neutralised += 1;
                    self.utf8_pending = 0;
                    return;
                }
                0xa0..=0xbf => {
                    out.extend_from_slice(&[lead, byte]);
                    self.utf8_pending = 0;
                    return;
                }
                // An invalid sequence: the terminal shows a replacement.
                _ => {
                    out.push(lead);
                    self.utf8_pending = 0;
                }
            }
        }
        match byte {
            ESC => self.state = State::Escape,
            0x00..=0x1f if c0_allowed(byte) => out.push(byte),
            0x00..=0x1f => self.neutralised += 1,
            0x20..=0x7f => {
                self.utf8_pending = 0;
                out.push(byte);
            }
            0x80..=0xbf if self.utf8_pending > 0 => {
                self.utf8_pending -= 1;
                out.push(byte);
            }
            // A stray byte in 0x80..0x9f is an 8-bit C1 control to a
            // terminal not in UTF-8 mode (0x9b is CSI, 0x9d OSC, ...).
            0x80..=0x9f => self.neutralised += 1,
            0xa0..=0xbf => out.push(byte),
            0xc2 => self.held = Some(byte),
            _ => {
                self.utf8_pending = match byte {
                    0xc3..=0xdf => 1,
                    0xe0..=0xef => 2,
                    0xf0..=0xf4 => 3,
                    _ => 0,
                };
                out.push(byte);
            }
        }
    }

    fn escape(&mut self, byte: u8, out: &mut Vec<u8>) {
        self.utf8_pending = 0;
        match byte {
            b'[' => {
                self.csi.clear();
                self.csi.extend_from_slice(&[ESC, b'[']);
                self.state = State::Csi;
            }
            // OSC, DCS, APC, PM, SOS, and GNU screen's title string.
            b']' | b'P' | b'_' | b'^' | b'X' | b'k' => self.drop_sequence(State::Str),
            // The first escape breaks off; the second begins.
            ESC => self.drop_sequence(State::Escape),
            CAN | SUB => self.drop_sequence(State::Ground),
            _ if ESCAPE_FINALS.contains(&byte) => {
                out.extend_from_slice(&[ESC, byte]);
                self.state = State::Ground;
            }
            _ if ESCAPE_INTERMEDIATES.contains(&byte) => {
                out.extend_from_slice(&[ESC, byte]);
                self.state = State::EscapeTail { keep: true };
            }
            0x20..=0x2f => self.drop_sequence(State::EscapeTail { keep: false }),
            // ESC Z (identify), single and locking shifts, the rest.
            _ => self.drop_sequence(State::Ground),
        }
    }

    fn csi(&mut self, byte: u8, out: &mut Vec<u8>) {
        match byte {
            0x20..=0x3f if self.csi.len() < MAX_CSI => self.csi.push(byte),
            0x20..=0x3f => self.drop_sequence(State::CsiDiscard),
            0x40..=0x7e => {
                self.csi.push(byte);
                self.state = State::Ground;
                if csi_allowed(&self.csi[2..]) {
                    out.extend_from_slice(&self.csi);
                } else {
                    self.neutralised += 1;
                }
            }
            ESC => self.drop_sequence(State::Escape),
            CAN | SUB => self.drop_sequence(State::Ground),
            // Terminals obey C0 controls inside a sequence.
            0x00..=0x1f if c0_allowed(byte) => out.push(byte),
            0x00..=0x1f | 0x7f => {}
            _ => {
                self.drop_sequence(State::Ground);
                self.ground(byte, out);
            }
        }
    }
}

/// Whether the CSI sequence `body` (parameters, intermediates, final
/// byte: what follows `ESC [`) may reach the terminal.
fn csi_allowed(body: &[u8]) -> bool {
    let Some((&last, rest)) = body.split_last() else {
        return false;
    };
    if !CSI_FINALS.contains(&last) || rest.iter().any(|b| (0x20..=0x2f).contains(b)) {
        return false;
    }
    let (private, params) = match rest.split_first() {
        Some((&marker @ (b'?' | b'>' | b'<' | b'='), params)) => (Some(marker), params),
        _ => (None, rest),
    };
    match (last, private) {
        (b'h' | b'l', Some(b'?')) => modes_within(params, DEC_MODES),
        (b'h' | b'l', None) => modes_within(params, ANSI_MODES),
        (b'h' | b'l', Some(_)) => false,
        // Private forms of the others (`CSI > 4 ; 1 m` and the like set
        // key modifiers) are left out; `CSI ? ... J/K` erase selectively.
        (b'J' | b'K', Some(b'?')) => true,
        (_, Some(_)) => false,
        _ => true,
    }
}

/// Whether every `;`-separated mode number in `params` is in `allowed`.
fn modes_within(params: &[u8], allowed: &[u32]) -> bool {
    params.split(|&b| b == b';').all(|mode| {
        std::str::from_utf8(mode)
            .ok()
            .and_then(|m| m.parse::<u32>().ok())
            .is_some_and(|m| allowed.contains(&m))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guarded(input: &[u8]) -> Vec<u8> {
        let mut guard = TerminalGuard::new();
        let mut out = Vec::new();
        guard.filter(input, &mut out);
        out
    }

    /// Byte by byte, as a stream split at every point would arrive.
    fn guarded_bytewise(input: &[u8]) -> Vec<u8> {
        let mut guard = TerminalGuard::new();
        let mut out = Vec::new();
        for byte in input {
            guard.filter(std::slice::from_ref(byte), &mut out);
        }
        out
    }

    fn both(input: &[u8]) -> Vec<u8> {
        let whole = guarded(input);
        assert_eq!(whole, guarded_bytewise(input), "split input differs");
        whole
    }

    /// Each input, whole and byte by byte, shows as its expected bytes.
    fn assert_shown(cases: &[(&[u8], &[u8])]) {
        for &(input, shown) in cases {
            assert_eq!(both(input), shown, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn text_utf8_and_console_controls_pass() {
        let text = "plain text, tabs\tand bells\x07\r\nüñíçødé € 😀 \x08x\x0c\x0b".as_bytes();
        assert_eq!(both(text), text);
    }

    #[test]
    fn drawing_sequences_pass() {
        for seq in [
            &b"\x1b[1;31mred\x1b[0m"[..],
            b"\x1b[H\x1b[2J\x1b[K\x1b[10;20H\x1b[3A\x1b[5C",
            b"\x1b[?25l\x1b[?25h\x1b[?1049h\x1b[?1049l\x1b[?2004h",
            b"\x1b[4h\x1b[4l\x1b[1;24r\x1b[s\x1b[u\x1b[?1J",
            b"\x1b7\x1b8\x1bM\x1bD\x1bE\x1b=\x1b>\x1bc",
            b"\x1b(B\x1b(0lqk\x1b(B\x1b#8",
            b"\x1b[38;2;10;20;30mrgb\x1b[m",
        ] {
            assert_eq!(both(seq), seq, "{}", String::from_utf8_lossy(seq));
        }
    }

    #[test]
    fn strings_for_the_terminal_are_dropped_whole() {
        let cases: [(&[u8], &[u8]); 8] = [
            (b"a\x1b]0;evil title\x07b", b"ab"),
            (b"a\x1b]52;c;ZXZpbA==\x1b\\b", b"ab"),
            (b"a\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\b", b"alinkb"),
            (b"a\x1bPtmux;\x1b\x1b]0;x\x07\x1b\\b", b"ab"),
            (b"a\x1bP$q m\x1b\\b", b"ab"),
            (b"a\x1b_other apc\x1b\\b", b"ab"),
            (b"a\x1b^privacy\x1b\\b\x1bXsos\x1b\\c", b"abc"),
            (b"a\x1bkscreen title\x1b\\b", b"ab"),
        ];
        assert_shown(&cases);
    }

    #[test]
    fn requests_that_make_the_terminal_answer_are_dropped() {
        let cases: [(&[u8], &[u8]); 10] = [
            (b"a\x1b[6nb", b"ab"),
            (b"a\x1b[?6nb", b"ab"),
            (b"a\x1b[5nb", b"ab"),
            (b"a\x1b[cb\x1b[0c\x1b[>c\x1b[=c", b"ab"),
            (b"a\x1b[21tb\x1b[14t", b"ab"),
            (b"a\x1b[1xb", b"ab"),
            (b"a\x1b[?2$pb", b"ab"),
            (b"a\x1bZb", b"ab"),
            (b"a\x05b", b"ab"),
            (b"a\x1b[5ib\x1b[4i", b"ab"),
        ];
        assert_shown(&cases);
    }

    #[test]
    fn reporting_and_unknown_modes_are_dropped() {
        assert_eq!(both(b"\x1b[?1000h\x1b[?1004h\x1b[?25;1000h\x1b[2h"), b"");
        assert_eq!(both(b"\x1b[?1;25h"), b"\x1b[?1;25h");
        assert_eq!(both(b"\x1b[>4;1m\x1b[ q"), b"");
    }

    #[test]
    fn c1_controls_are_dropped_in_8_bit_and_utf8_form() {
        assert_eq!(both(b"a\x9b6nb\x9d0;t\x07c"), b"a6nb0;t\x07c");
        assert_eq!(both("a\u{9b}6n\u{90}b".as_bytes()), b"a6nb");
        // Continuation bytes in 0x80..0x9f inside real characters stay.
        assert_eq!(both("€‚".as_bytes()), "€‚".as_bytes());
        assert_eq!(both("\u{a0}x".as_bytes()), "\u{a0}x".as_bytes());
    }

    #[test]
    fn broken_and_overlong_sequences_do_not_leak() {
        // A CSI interrupted by a new escape, cancelled, or overlong.
        assert_eq!(both(b"a\x1b[12\x1b[6nb"), b"ab");
        assert_eq!(both(b"a\x1b[12\x18b"), b"ab");
        let long = [&b"a\x1b["[..], &[b'1'; 200], b"nb"].concat();
        assert_eq!(both(&long), b"ab");
        // An unterminated string swallows what follows, as the terminal
        // itself would, until its terminator.
        assert_eq!(both(b"a\x1b]0;never ends\nb"), b"a");
        let mut guard = TerminalGuard::new();
        let mut out = Vec::new();
        guard.filter(b"x\x1b]0;t", &mut out);
        guard.filter(b"itle\x1b\\y\x1b[6n", &mut out);
        assert_eq!(out, b"xy");
        assert_eq!(guard.neutralised(), 2);
    }
}
