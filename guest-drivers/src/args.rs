//! The guest command line: `WORKLOAD [POSITIONAL...] [key=value...]`.
//! Numbers are decimal or `0x` hex, optionally with a binary size suffix
//! (`K`, `M`, `G`: 4K = 4096).

use core::fmt;

/// A malformed command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgError<'a> {
    /// A `key=value` word whose key the workload does not know.
    UnknownKey(&'a str),
    /// More positional words than the workload takes.
    UnexpectedWord(&'a str),
    /// A required argument is absent.
    Missing(&'a str),
    /// A value that is not a number (or overflows).
    BadNumber { name: &'a str, value: &'a str },
    /// A value outside what the workload accepts.
    OutOfRange { name: &'a str, value: u64 },
    /// A value that is not one of the accepted words.
    BadChoice { name: &'a str, value: &'a str },
}

impl fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::UnknownKey(key) => write!(f, "unknown argument `{key}`"),
            ArgError::UnexpectedWord(word) => write!(f, "unexpected argument `{word}`"),
            ArgError::Missing(name) => write!(f, "missing argument `{name}`"),
            ArgError::BadNumber { name, value } => {
                write!(f, "`{name}`: `{value}` is not a number")
            }
            ArgError::OutOfRange { name, value } => write!(f, "`{name}`: {value} is out of range"),
            ArgError::BadChoice { name, value } => write!(f, "`{name}`: `{value}` is not accepted"),
        }
    }
}

/// The words after the workload name.
#[derive(Clone, Copy, Debug)]
pub struct Args<'a> {
    rest: &'a str,
}

/// Splits a command line into the workload name (empty if there is none)
/// and its arguments.
pub fn split(cmdline: &str) -> (&str, Args<'_>) {
    let cmdline = cmdline.trim_start();
    let (workload, rest) = cmdline
        .split_once(char::is_whitespace)
        .unwrap_or((cmdline, ""));
    (workload, Args { rest })
}

impl<'a> Args<'a> {
    fn words(&self) -> impl Iterator<Item = &'a str> {
        self.rest.split_whitespace()
    }

    /// The `index`-th word that is not `key=value`.
    pub fn positional(&self, index: usize) -> Option<&'a str> {
        self.words().filter(|w| !w.contains('=')).nth(index)
    }

    /// The value of the last `key=...` word.
    pub fn value(&self, key: &str) -> Option<&'a str> {
        self.words()
            .filter_map(|w| w.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .last()
    }

    /// The number given as `key=...`, if any.
    pub fn number(&self, key: &'a str) -> Result<Option<u64>, ArgError<'a>> {
        self.value(key).map(|v| parse_number(key, v)).transpose()
    }

    /// The number given as `key=...`, or `default`.
    pub fn number_or(&self, key: &'a str, default: u64) -> Result<u64, ArgError<'a>> {
        Ok(self.number(key)?.unwrap_or(default))
    }

    /// The `index`-th positional word as a number; `name` is for messages.
    pub fn positional_number(&self, index: usize, name: &'a str) -> Result<u64, ArgError<'a>> {
        let word = self.positional(index).ok_or(ArgError::Missing(name))?;
        parse_number(name, word)
    }

    /// Rejects keys that are in none of `key_sets` and more than
    /// `positionals` positional words.
    pub fn check(&self, key_sets: &[&[&str]], positionals: usize) -> Result<(), ArgError<'a>> {
        if let Some(extra) = self.positional(positionals) {
            return Err(ArgError::UnexpectedWord(extra));
        }
        match self
            .words()
            .filter_map(|w| w.split_once('='))
            .find(|(k, _)| !key_sets.iter().any(|keys| keys.contains(k)))
        {
            Some((key, _)) => Err(ArgError::UnknownKey(key)),
            None => Ok(()),
        }
    }
}

/// Parses `value` (decimal, `0x` hex, optional `K`/`M`/`G` suffix).
pub fn parse_number<'a>(name: &'a str, value: &'a str) -> Result<u64, ArgError<'a>> {
    let bad = ArgError::BadNumber { name, value };
    let (digits, shift) = match value.as_bytes().last() {
        Some(b'K' | b'k') => (&value[..value.len() - 1], 10),
        Some(b'M' | b'm') => (&value[..value.len() - 1], 20),
        Some(b'G' | b'g') => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    let number = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => digits.parse::<u64>(),
    }
    .map_err(|_| bad)?;
    number.checked_mul(1 << shift).ok_or(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_workload_positionals_and_keys() {
        let (workload, args) = split("  blk-checksum 4096 0x1000 disk=1 disk=2");
        assert_eq!(workload, "blk-checksum");
        assert_eq!(args.positional_number(0, "offset"), Ok(4096));
        assert_eq!(args.positional_number(1, "len"), Ok(4096));
        assert_eq!(args.positional(2), None);
        assert_eq!(args.number("disk"), Ok(Some(2)));
        assert_eq!(args.number("seed"), Ok(None));
        assert_eq!(split("hello").0, "hello");
        assert_eq!(split("").0, "");
    }

    #[test]
    fn numbers_take_suffixes_and_reject_garbage() {
        assert_eq!(parse_number("bs", "4K"), Ok(4096));
        assert_eq!(parse_number("bs", "1M"), Ok(1 << 20));
        assert_eq!(parse_number("bs", "0x10"), Ok(16));
        assert_eq!(parse_number("bs", "2g"), Ok(2 << 30));
        assert!(parse_number("bs", "4KB").is_err());
        assert!(parse_number("bs", "").is_err());
        assert!(parse_number("bs", "99999999999999999999").is_err());
        assert!(parse_number("bs", "17179869184G").is_err());
    }

    #[test]
    fn check_rejects_unknown_keys_and_extra_words() {
        let (_, args) = split("compute iterations=5");
        assert_eq!(args.check(&[&["seed"], &["iterations"]], 0), Ok(()));
        assert_eq!(
            args.check(&[&["seed"]], 0),
            Err(ArgError::UnknownKey("iterations"))
        );
        let (_, args) = split("exit 3 4");
        assert_eq!(args.check(&[], 1), Err(ArgError::UnexpectedWord("4")));
        assert_eq!(
            args.positional_number(5, "code"),
            Err(ArgError::Missing("code"))
        );
    }
}
