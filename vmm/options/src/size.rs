//! Byte sizes such as `256M`, `1G`, `4096K` or a plain byte count.

/// Parses a byte size: a decimal number with an optional binary suffix
/// `K`, `M` or `G` (either case). The error says what was expected.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'k' | 'K')) => (&text[..i], 10),
        Some((i, 'm' | 'M')) => (&text[..i], 20),
        Some((i, 'g' | 'G')) => (&text[..i], 30),
        _ => (text, 0),
    };
    // u64's parser accepts a leading '+'; a size never has one.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "'{text}' is not a size like 256M, 1G, 4096K or a byte count"
        ));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is too large"))?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_binary_and_case_blind() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn malformed_and_overflowing_sizes_are_refused() {
        for bad in ["", "M", "1.5G", "-1M", "+1M", "12T", "1 G", "0x10"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains("is not a size"), "{bad:?}: {err}");
        }
        assert!(parse_size("99999999999999999999")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("17179869184G")
            .unwrap_err()
            .contains("too large"));
    }
}
