//! [`OptionList`]: a `key=value,flag,...` list, the form `--blk`, `--net`
//! and `--console` take, checked against the keys the option knows.

/// The keys of one option: those that take a value and those that do not.
#[derive(Clone, Copy, Debug)]
pub struct Keys<'k> {
    /// Keys written `key=value` (the value may hold `=` but not `,`).
    pub valued: &'k [&'k str],
    /// Keys written alone, e.g. `readonly`.
    pub flags: &'k [&'k str],
}

impl Keys<'_> {
    /// "socket, image or readonly": every key, for error messages.
    fn expected(&self) -> String {
        let all: Vec<&str> = self.valued.iter().chain(self.flags).copied().collect();
        match all.split_last() {
            Some((last, [])) => (*last).to_string(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => "nothing".to_string(),
        }
    }
}

/// A parsed list: each known key at most once, valued keys with a
/// non-empty value, flags without one.
#[derive(Clone, Debug)]
pub struct OptionList<'a> {
    values: Vec<(&'a str, &'a str)>,
    flags: Vec<&'a str>,
}

impl<'a> OptionList<'a> {
    /// Parses `text` against `keys`. The error says what is wrong in
    /// words a user can act on: an unknown key (with the keys expected), a
    /// key given twice, a missing or empty value, a value given to a flag.
    pub fn parse(text: &'a str, keys: Keys<'_>) -> Result<Self, String> {
        let mut list = OptionList {
            values: Vec::new(),
            flags: Vec::new(),
        };
        for item in text.split(',') {
            let (key, value) = match item.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (item, None),
            };
            if keys.flags.contains(&key) {
                if value.is_some() {
                    return Err(format!("{key} takes no value"));
                }
                if list.flags.contains(&key) {
                    return Err(format!("{key} given twice"));
                }
                list.flags.push(key);
                continue;
            }
            if !keys.valued.contains(&key) {
                return Err(format!(
                    "unknown key {key:?} (expected {})",
                    keys.expected()
                ));
            }
            let Some(value) = value.filter(|value| !value.is_empty()) else {
                return Err(format!("{key} needs a value ({key}=...)"));
            };
            if list.get(key).is_some() {
                return Err(format!("{key} given twice"));
            }
            list.values.push((key, value));
        }
        Ok(list)
    }

    /// The value of `key`, if it was given.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.values
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, value)| *value)
    }

    /// Whether the flag `key` was given.
    pub fn flag(&self, key: &str) -> bool {
        self.flags.contains(&key)
    }
}

/// Checks a device id (its name in logs and the control API): letters,
/// digits, `-`, `_` and `.` only.
pub fn check_id(id: &str) -> Result<(), String> {
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if id.chars().all(valid) {
        Ok(())
    } else {
        Err(format!(
            "id {id:?} may only hold letters, digits, '-', '_' and '.'"
        ))
    }
}

/// Smallest and largest split-ring sizes a device accepts.
pub const QUEUE_SIZES: std::ops::RangeInclusive<u16> = 2..=32768;

/// Parses a virtqueue size: a power of two in [`QUEUE_SIZES`].
pub fn parse_queue_size(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(n) if n.is_power_of_two() && QUEUE_SIZES.contains(&n) => Ok(n),
        _ => Err(format!(
            "queue-size must be a power of two in {}..={}, not {text:?}",
            QUEUE_SIZES.start(),
            QUEUE_SIZES.end()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: Keys = Keys {
        valued: &["socket", "id"],
        flags: &["readonly"],
    };

    #[test]
    fn values_and_flags_in_any_order() {
        let list = OptionList::parse("readonly,id=a,socket=/x=y.sock", KEYS).unwrap();
        assert_eq!(list.get("socket"), Some("/x=y.sock"));
        assert_eq!(list.get("id"), Some("a"));
        assert!(list.flag("readonly"));
        let list = OptionList::parse("socket=s", KEYS).unwrap();
        assert_eq!(list.get("id"), None);
        assert!(!list.flag("readonly"));
    }

    #[test]
    fn malformed_lists_are_explained() {
        let cases = [
            (
                "socket=s,colour=red",
                "unknown key \"colour\" (expected socket, id or readonly)",
            ),
            ("socket=s,", "unknown key \"\""),
            ("", "unknown key \"\""),
            ("socket", "socket needs a value (socket=...)"),
            ("socket=", "socket needs a value"),
            ("socket=a,socket=b", "socket given twice"),
            ("readonly,readonly", "readonly given twice"),
            ("readonly=yes", "readonly takes no value"),
        ];
        for (text, expected) in cases {
            let err = OptionList::parse(text, KEYS).unwrap_err();
            assert!(err.starts_with(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn ids_and_queue_sizes() {
        assert!(check_id("root-disk_1.0").is_ok());
        assert!(check_id("a b").unwrap_err().contains("may only hold"));
        assert_eq!(parse_queue_size("2"), Ok(2));
        assert_eq!(parse_queue_size("32768"), Ok(32768));
        for bad in ["0", "1", "100", "65536", "-8", "x"] {
            assert!(
                parse_queue_size(bad)
                    .unwrap_err()
                    .contains("power of two in 2..=32768"),
                "{bad}"
            );
        }
    }
}
