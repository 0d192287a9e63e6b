//! How long each step of a take-over took: the old process times its
//! own steps while the guest is paused, the new process times its own and
//! reports them in its `Ready`, and `pvstack ctl upgrade` returns the
//! whole breakdown (the benchmark, scripts/bench-upgrade, prints its
//! medians).

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One step and how long it took.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub phase: String,
    pub us: u64,
}

/// Times consecutive steps: each [`PhaseClock::mark`] closes the step
/// that began at the previous mark (or at the start).
pub struct PhaseClock {
    last: Instant,
    phases: Vec<Phase>,
}

impl PhaseClock {
    pub fn start() -> PhaseClock {
        PhaseClock {
            last: Instant::now(),
            phases: Vec::new(),
        }
    }

    /// Records the step `phase` as ending now.
    pub fn mark(&mut self, phase: &str) {
        let now = Instant::now();
        self.phases.push(Phase {
            phase: phase.to_string(),
            us: micros(now.duration_since(self.last)),
        });
        self.last = now;
    }

    /// Adds steps timed elsewhere (the new process's), each named
    /// `prefix` + its name; they do not move this clock.
    pub fn add(&mut self, prefix: &str, phases: Vec<Phase>) {
        self.phases
            .extend(phases.into_iter().map(|Phase { phase, us }| Phase {
                phase: format!("{prefix}{phase}"),
                us,
            }));
    }

    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    pub fn into_phases(self) -> Vec<Phase> {
        self.phases
    }
}

/// `name 12 us, other 3 us` for a log line.
pub fn describe(phases: &[Phase]) -> String {
    phases
        .iter()
        .map(|p| format!("{} {} us", p.phase, p.us))
        .collect::<Vec<_>>()
        .join(", ")
}

fn micros(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_close_consecutive_steps_and_added_ones_are_prefixed() {
        let mut clock = PhaseClock::start();
        std::thread::sleep(std::time::Duration::from_millis(2));
        clock.mark("first");
        clock.mark("second");
        clock.add(
            "new:",
            vec![Phase {
                phase: "adopt".into(),
                us: 7,
            }],
        );
        let phases = clock.into_phases();
        let names: Vec<&str> = phases.iter().map(|p| p.phase.as_str()).collect();
        assert_eq!(names, ["first", "second", "new:adopt"]);
        assert!(phases[0].us >= 2000, "{phases:?}");
        assert_eq!(phases[2].us, 7);
        assert_eq!(describe(&phases[2..]), "new:adopt 7 us");
    }
}
