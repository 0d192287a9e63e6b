//! [`Hub`]: where the guest's console meets the host. Guest output goes
//! through the stamp filter into the history, the log file and every
//! attached sink; host input from any source queues for the guest.

use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::history::History;
use crate::input::{InputQueue, INPUT_CAPACITY};
use crate::log_file::LogFile;
use crate::stamp::StampFilter;

/// Bytes of recent output kept for clients that attach later.
pub const HISTORY_CAPACITY: usize = 64 * 1024;

/// Somewhere guest output is shown: stdout, a PTY, a socket client.
pub trait Sink: Send {
    /// Writes `bytes`; returns false if the sink is gone and is to be dropped.
    fn write(&mut self, bytes: &[u8]) -> bool;
    /// Names the sink in log lines.
    fn name(&self) -> String;
}

struct Outputs {
    filter: StampFilter,
    history: History,
    log: Option<LogFile>,
    sinks: Vec<Box<dyn Sink>>,
    /// Filtered output of the current call, reused between calls.
    shown: Vec<u8>,
}

/// The console's host side, shared by the queue worker and the host I/O threads.
pub struct Hub {
    outputs: Mutex<Outputs>,
    input: InputQueue,
}

impl Hub {
    /// A hub with no sinks that also appends output to `log`.
    pub fn new(log: Option<LogFile>) -> io::Result<Self> {
        Ok(Hub {
            outputs: Mutex::new(Outputs {
                filter: StampFilter::new(),
                history: History::new(HISTORY_CAPACITY),
                log,
                sinks: Vec::new(),
                shown: Vec::new(),
            }),
            input: InputQueue::new(INPUT_CAPACITY)?,
        })
    }

    fn outputs(&self) -> MutexGuard<'_, Outputs> {
        self.outputs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Shows guest output everywhere. Returns once every sink has it (or
    /// was dropped), so output the guest sees consumed is out of this process.
    pub fn output(&self, raw: &[u8]) {
        let mut outputs = self.outputs();
        let outputs = &mut *outputs;
        outputs.shown.clear();
        outputs.filter.filter(raw, &mut outputs.shown);
        if outputs.shown.is_empty() {
            return;
        }
        outputs.history.append(&outputs.shown);
        if let Some(log) = outputs.log.as_mut() {
            if let Err(e) = log.write(&outputs.shown) {
                log::warn!("cannot write the console log ({e}); stopping it");
                outputs.log = None;
            }
        }
        let shown = &outputs.shown;
        outputs.sinks.retain_mut(|sink| {
            let keep = sink.write(shown);
            if !keep {
                log::info!("{} detached", sink.name());
            }
            keep
        });
    }

    /// Adds a sink; with `replay`, it first gets the recent output.
    pub fn attach(&self, mut sink: Box<dyn Sink>, replay: bool) {
        let mut outputs = self.outputs();
        if replay && !sink.write(&outputs.history.contents()) {
            return;
        }
        log::info!("{} attached", sink.name());
        outputs.sinks.push(sink);
    }

    /// Input on its way to the guest.
    pub fn input(&self) -> &InputQueue {
        &self.input
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct Collect(Arc<Mutex<Vec<u8>>>, bool);

    impl Sink for Collect {
        fn write(&mut self, bytes: &[u8]) -> bool {
            self.0.lock().unwrap().extend_from_slice(bytes);
            self.1
        }
        fn name(&self) -> String {
            "test sink".into()
        }
    }

    #[test]
    fn late_sinks_see_history_and_gone_sinks_are_dropped() {
        let hub = Hub::new(None).unwrap();
        hub.output(b"\x1b_pvs;1;0\x1b\\early\n");
        let late = Arc::new(Mutex::new(Vec::new()));
        hub.attach(Box::new(Collect(Arc::clone(&late), true)), true);
        let once = Arc::new(Mutex::new(Vec::new()));
        hub.attach(Box::new(Collect(Arc::clone(&once), false)), false);
        hub.output(b"late\n");
        hub.output(b"later\n");
        assert_eq!(&*late.lock().unwrap(), b"early\nlate\nlater\n");
        assert_eq!(&*once.lock().unwrap(), b"late\n");
    }
}
