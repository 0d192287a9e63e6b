//! [`RateLimit`]: at most [`BURST`] log lines per [`INTERVAL`] from one
//! call site, and a count of those it held back.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines one call site may write per [`INTERVAL`].
pub const BURST: u32 = 10;
/// The window [`BURST`] counts in.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Write it, after saying that `suppressed` lines from the same call
    /// site were held back before it (when not 0).
    Write { suppressed: u64 },
    /// Hold it back (it is counted).
    Suppress,
}

/// The budget of one call site; a `static` in each [`warn_limited!`]
/// (and its siblings) expansion.
#[derive(Debug, Default)]
pub struct RateLimit {
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// When the current window began; None before the first line.
    start: Option<Instant>,
    written: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new() -> Self {
        RateLimit {
            window: Mutex::new(Window {
                start: None,
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be written now.
    pub fn admit(&self) -> Admit {
        self.admit_at(Instant::now())
    }

    /// Whether a line may be written at `now`.
    pub fn admit_at(&self, now: Instant) -> Admit {
        // The window is plain counters: whatever a panicking holder left is usable.
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let mut carried = 0;
        let expired = window
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= INTERVAL);
        if expired {
            carried = std::mem::take(&mut window.suppressed);
            window.start = Some(now);
            window.written = 0;
        }
        if window.written < BURST {
            window.written += 1;
            Admit::Write {
                suppressed: carried,
            }
        } else {
            window.suppressed += 1;
            Admit::Suppress
        }
    }
}

/// Logs at `level` through the call site's own [`RateLimit`]: at most
/// [`BURST`] lines per [`INTERVAL`], the first line after a pause saying
/// how many were suppressed. For every line a guest or a peer can
/// trigger.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::RateLimit = $crate::RateLimit::new();
        if $crate::log::log_enabled!($level) {
            if let $crate::Admit::Write { suppressed } = LIMIT.admit() {
                if suppressed > 0 {
                    $crate::log::log!(
                        $level,
                        "{} more lines like the next one were suppressed",
                        suppressed
                    );
                }
                $crate::log::log!($level, $($arg)+);
            }
        }
    }};
}

/// [`log_limited!`] at warn level.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::log::Level::Warn, $($arg)+) };
}

/// [`log_limited!`] at info level.
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::log::Level::Info, $($arg)+) };
}

/// [`log_limited!`] at error level.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::log::Level::Error, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_burst_per_interval_then_the_count_of_what_was_held_back() {
        let limit = RateLimit::new();
        let t0 = Instant::now();
        assert_eq!(limit.admit_at(t0), Admit::Write { suppressed: 0 });
        for _ in 1..BURST {
            assert_eq!(limit.admit_at(t0), Admit::Write { suppressed: 0 });
        }
        for _ in 0..25 {
            assert_eq!(limit.admit_at(t0 + INTERVAL / 2), Admit::Suppress);
        }
        // A new window: the first line carries the count, once.
        let t1 = t0 + INTERVAL;
        assert_eq!(limit.admit_at(t1), Admit::Write { suppressed: 25 });
        assert_eq!(limit.admit_at(t1), Admit::Write { suppressed: 0 });
        // A clock that seems to go back does not open a window.
        for _ in 2..BURST {
            limit.admit_at(t1);
        }
        assert_eq!(limit.admit_at(t0), Admit::Suppress);
    }

    /// Collects what the macros log.
    struct Collect(Mutex<Vec<String>>);

    impl log::Log for Collect {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            let line = format!("{} {}", record.level(), record.args());
            self.0.lock().unwrap().push(line);
        }
        fn flush(&self) {}
    }

    static LINES: Collect = Collect(Mutex::new(Vec::new()));

    #[test]
    fn each_call_site_has_its_own_budget() {
        log::set_logger(&LINES).unwrap();
        log::set_max_level(log::LevelFilter::Info);
        for i in 0..100 {
            warn_limited!("bad descriptor {i}");
            info_limited!("other site {i}");
        }
        let lines = LINES.0.lock().unwrap().clone();
        let warns = lines.iter().filter(|l| l.starts_with("WARN ")).count();
        let infos = lines.iter().filter(|l| l.starts_with("INFO ")).count();
        assert_eq!(
            (warns, infos),
            (BURST as usize, BURST as usize),
            "{lines:?}"
        );
        assert_eq!(lines[0], "WARN bad descriptor 0");
        assert!(
            lines.contains(&"INFO other site 9".to_string()),
            "{lines:?}"
        );
    }
}
