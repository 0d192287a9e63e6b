//! `--background-load N`: N host threads that spin for the whole
//! measurement, so every mode is measured on a loaded host.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};

/// Name prefix of the spinning threads (in /proc/PID/task/*/comm).
pub const THREAD_PREFIX: &str = "bench-load-";

/// The spinning threads; stopped when dropped (also after an error).
pub struct BackgroundLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<f64>>,
    started: Instant,
}

/// What the load did, for the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoadReport {
    /// Spinning threads the benchmark ran.
    pub threads: usize,
    /// CPU seconds they used in all, each read from its own thread clock
    /// when it stopped.
    pub cpu_seconds: f64,
    /// Seconds from their start to their stop.
    pub wall_seconds: f64,
    /// Threads of the benchmark named `bench-load-*` after the stop (from
    /// /proc/self/task): 0 once every one has ended.
    pub threads_left_after_stop: usize,
}

impl BackgroundLoad {
    /// Starts `n` spinning threads (none for 0), returning once all of
    /// them run (under their names).
    pub fn start(n: usize) -> Result<BackgroundLoad> {
        let mut load = BackgroundLoad {
            stop: Arc::default(),
            threads: Vec::new(),
            started: Instant::now(),
        };
        let (running_tx, running_rx) = std::sync::mpsc::channel();
        for i in 0..n {
            let stop = load.stop.clone();
            let running = running_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("{THREAD_PREFIX}{i}"))
                .spawn(move || {
                    // The thread has its name by the time its closure runs.
                    let _ = running.send(());
                    spin(&stop)
                })
                .map_err(|source| Error::Os {
                    what: "spawn a background load thread",
                    cause: source,
                })?;
            load.threads.push(thread);
        }
        drop(running_tx);
        for _ in 0..n {
            // An error means a thread ended at once: the count shows it.
            let _ = running_rx.recv();
        }
        if n > 0 {
            log::info!("background load: {n} spinning thread(s)");
        }
        Ok(load)
    }

    /// Stops and joins every thread; what they did.
    pub fn stop(mut self) -> LoadReport {
        let threads = self.threads.len();
        let cpu_seconds = self.join();
        LoadReport {
            threads,
            cpu_seconds,
            wall_seconds: self.started.elapsed().as_secs_f64(),
            threads_left_after_stop: threads_left_after_join(),
        }
    }

    /// Stops the threads and sums their CPU seconds.
    fn join(&mut self) -> f64 {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .drain(..)
            .map(|t| t.join().unwrap_or(0.0))
            .fold(0.0, |total, t| total + t)
    }
}

impl Drop for BackgroundLoad {
    fn drop(&mut self) {
        self.join();
    }
}

/// Spins until `stop`; the CPU seconds this thread used.
fn spin(stop: &AtomicBool) -> f64 {
    let mut x = 1u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..1000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    thread_cpu_seconds()
}

/// CPU time of the calling thread.
fn thread_cpu_seconds() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `now`, which outlives the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } != 0 {
        return 0.0;
    }
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// The load's threads still listed after they were joined, given up to a
/// second to go: a joined thread's task stays in /proc/self/task for a
/// moment while the kernel finishes its exit (join returns once the
/// thread has released its memory, before that).
fn threads_left_after_join() -> usize {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let left = own_threads_named(THREAD_PREFIX);
        if left == 0 || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Threads of this process whose name starts with `prefix`.
fn own_threads_named(prefix: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .filter(|comm| comm.starts_with(prefix))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_spin_while_running_and_are_gone_after_stop() {
        let load = BackgroundLoad::start(2).unwrap();
        assert_eq!(own_threads_named(THREAD_PREFIX), 2);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let report = load.stop();
        assert_eq!(report.threads, 2);
        assert!(report.cpu_seconds > 0.0, "{report:?}");
        assert_eq!(report.threads_left_after_stop, 0);
        let none = BackgroundLoad::start(0).unwrap().stop();
        assert_eq!((none.threads, none.cpu_seconds), (0, 0.0));
        assert!(none.cpu_seconds.is_sign_positive());
    }
}
