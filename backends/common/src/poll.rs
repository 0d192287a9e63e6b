//! [`AdaptivePoll`]: how long a worker keeps looking at its rings after a
//! batch before it goes to sleep, adapted to how soon work came back (the
//! idea of QEMU's `poll-max-ns`, `poll-grow` and `poll-shrink`).
//!
//! Sleeping costs a wake-up per batch (a kick the guest must send and the
//! backend thread must be scheduled for); polling costs CPU while nothing
//! comes. The window follows the gaps the worker sees: when it wakes less
//! than `max` after it stopped serving (the window plus the sleep), a
//! window that long would have caught the work without a wake-up, so the
//! window doubles (from [`FIRST_WINDOW`], up to `max`); when it slept
//! longer, polling would have been wasted, so the window halves, down to
//! zero. An idle device thus costs one window of polling after its last
//! batch and nothing after that; `max` bounds what any gap costs.
//!
//! Polling pays only with a CPU to spare. On a host with more runnable
//! threads than CPUs the poller takes its CPU from another thread, often
//! the very vCPU whose requests it waits for (measured on a 2-core host
//! under a build: a 1 ms window cut 4K reads from tmpfs at QD1 to a few
//! hundred per second). So a worker does not poll while the host's count
//! of runnable threads (/proc/loadavg, looked at every
//! [`CONTENTION_CHECK`]) exceeds its CPUs; it sleeps and is woken as
//! without polling.

use std::time::{Duration, Instant};

/// The window polling starts from once it proves worthwhile.
pub const FIRST_WINDOW: Duration = Duration::from_micros(4);
/// How often a worker looks whether the host has CPUs to spare.
pub const CONTENTION_CHECK: Duration = Duration::from_millis(10);

/// The polling window of one worker, and what polling achieved.
#[derive(Debug, Clone)]
pub struct AdaptivePoll {
    max: Duration,
    window: Duration,
    /// When the worker last stopped serving (its window started).
    idle_since: Option<Instant>,
    polls: u64,
    hits: u64,
    cpus: HostCpus,
}

/// Whether the host has CPUs to spare, looked at now and then.
#[derive(Debug, Clone)]
struct HostCpus {
    /// Off in unit tests, whose hosts may be busy.
    watch: bool,
    cpus: usize,
    checked: Option<Instant>,
    oversubscribed: bool,
}

impl HostCpus {
    fn new(watch: bool) -> Self {
        HostCpus {
            watch,
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            checked: None,
            oversubscribed: false,
        }
    }

    /// More runnable threads than CPUs, as of the last look (taken again
    /// when older than [`CONTENTION_CHECK`]).
    fn oversubscribed(&mut self) -> bool {
        if !self.watch {
            return false;
        }
        if self
            .checked
            .is_none_or(|at| at.elapsed() >= CONTENTION_CHECK)
        {
            self.checked = Some(Instant::now());
            self.oversubscribed = runnable_threads().is_some_and(|n| n > self.cpus);
        }
        self.oversubscribed
    }
}

/// Runnable threads on the host now: the fourth field of /proc/loadavg,
/// `RUNNABLE/TOTAL`.
fn runnable_threads() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace()
        .nth(3)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// What a worker's polling did, for its stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollReport {
    /// The window now.
    pub window: Duration,
    /// The bound (`--poll-us`).
    pub max: Duration,
    /// Windows polled.
    pub polls: u64,
    /// Windows in which polling found work.
    pub hits: u64,
}

impl PollReport {
    /// Adds another worker's report: counts add up, the window shown is
    /// the largest.
    pub fn merge(self, other: PollReport) -> PollReport {
        PollReport {
            window: self.window.max(other.window),
            max: self.max.max(other.max),
            polls: self.polls + other.polls,
            hits: self.hits + other.hits,
        }
    }
}

impl std::fmt::Display for PollReport {
    /// `poll window W us (max M us), polling found work in H of P windows`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "poll window {} us (max {} us), polling found work in {} of {} windows",
            self.window.as_micros(),
            self.max.as_micros(),
            self.hits,
            self.polls
        )
    }
}

impl AdaptivePoll {
    /// A window bounded by `max`; zero never polls. Starts at zero.
    pub fn new(max: Duration) -> Self {
        AdaptivePoll {
            max,
            window: Duration::ZERO,
            idle_since: None,
            polls: 0,
            hits: 0,
            cpus: HostCpus::new(true),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// The bound; zero: never polls.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Calls `found_work` until it returns true or the window has passed;
    /// returns whether it found work in time. The first call after serving
    /// starts the idle gap [`Self::woke`] measures. Work found only after
    /// the window passed (the thread lost its CPU meanwhile, to another
    /// thread, perhaps the very vCPU that produces the work) counts as a
    /// miss: polling did not pay.
    pub fn poll(&mut self, mut found_work: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        self.idle_since.get_or_insert(start);
        if self.window.is_zero() || self.cpus.oversubscribed() {
            return false;
        }
        self.polls += 1;
        let deadline = start + self.window;
        loop {
            let found = found_work();
            if Instant::now() > deadline {
                return false;
            }
            if found {
                self.hits += 1;
                self.idle_since = None;
                return true;
            }
            std::hint::spin_loop();
        }
    }

    /// The worker woke from sleep (a kick, a completion): adapts the
    /// window to the gap since it stopped serving.
    pub fn woke(&mut self) {
        let Some(since) = self.idle_since.take() else {
            return;
        };
        if since.elapsed() <= self.max {
            self.window = (self.window * 2).max(FIRST_WINDOW).min(self.max);
        } else {
            self.window /= 2;
            if self.window < FIRST_WINDOW {
                self.window = Duration::ZERO;
            }
        }
    }

    pub fn report(&self) -> PollReport {
        PollReport {
            window: self.window,
            max: self.max,
            polls: self.polls,
            hits: self.hits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_millis(50);

    /// A window bounded by `max` that polls whatever the host's load.
    fn unwatched(max: Duration) -> AdaptivePoll {
        AdaptivePoll {
            cpus: HostCpus::new(false),
            ..AdaptivePoll::new(max)
        }
    }

    #[test]
    fn the_hosts_runnable_threads_are_read() {
        let runnable = runnable_threads().expect("/proc/loadavg");
        assert!(runnable >= 1, "this test's own thread runs");
    }

    /// Pretends the worker stopped serving `gap` ago.
    fn gap(poll: &mut AdaptivePoll, gap: Duration) {
        poll.idle_since = Some(Instant::now() - gap);
        poll.woke();
    }

    #[test]
    fn short_gaps_grow_the_window_up_to_the_bound() {
        let mut poll = unwatched(MAX);
        assert!(!poll.poll(|| true), "a zero window never polls");
        assert_eq!(poll.report().polls, 0);
        gap(&mut poll, Duration::from_micros(10));
        assert_eq!(poll.window(), FIRST_WINDOW);
        for _ in 0..20 {
            gap(&mut poll, Duration::from_micros(10));
        }
        assert_eq!(poll.window(), MAX);
    }

    #[test]
    fn long_gaps_shrink_the_window_to_zero() {
        let mut poll = unwatched(MAX);
        for _ in 0..20 {
            gap(&mut poll, Duration::ZERO);
        }
        assert_eq!(poll.window(), MAX);
        gap(&mut poll, MAX * 3);
        assert_eq!(poll.window(), MAX / 2);
        for _ in 0..20 {
            gap(&mut poll, Duration::from_secs(1));
        }
        assert_eq!(poll.window(), Duration::ZERO);
    }

    #[test]
    fn polling_counts_windows_and_hits_and_stops_at_the_deadline() {
        let mut poll = unwatched(MAX);
        gap(&mut poll, Duration::ZERO);
        let mut calls = 0;
        assert!(poll.poll(|| {
            calls += 1;
            calls == 3
        }));
        // Work found only after the window passed is a miss.
        assert!(!poll.poll(|| {
            std::thread::sleep(FIRST_WINDOW * 4);
            true
        }));
        let started = Instant::now();
        assert!(!poll.poll(|| false));
        assert!(started.elapsed() >= poll.window());
        let report = poll.report();
        assert_eq!((report.polls, report.hits), (3, 1));
        assert_eq!(
            report.to_string(),
            "poll window 4 us (max 50000 us), polling found work in 1 of 3 windows"
        );
    }

    #[test]
    fn a_zero_bound_never_polls() {
        let mut poll = unwatched(Duration::ZERO);
        for _ in 0..5 {
            gap(&mut poll, Duration::ZERO);
        }
        assert_eq!(poll.window(), Duration::ZERO);
        assert!(!poll.poll(|| true));
    }
}
