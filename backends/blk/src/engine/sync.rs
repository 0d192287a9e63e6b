//! The synchronous engine: each request runs to its end inside
//! [`Engine::submit`], with the very code pvstack's in-VMM emulated disk
//! runs (`pvstack_block::execute`). For hosts without io_uring, and as the
//! baseline the io_uring engine is measured against.

use std::os::fd::RawFd;

use pvstack_block::chain::finish;
use pvstack_block::execute::execute;

use super::{Engine, EngineDisk, Finished, Job};

pub struct SyncEngine {
    disk: EngineDisk,
    /// Finished in `submit`, waiting for `reap`.
    finished: Vec<Finished>,
}

impl SyncEngine {
    pub fn new(disk: EngineDisk) -> Self {
        SyncEngine {
            disk,
            finished: Vec::new(),
        }
    }
}

impl Engine for SyncEngine {
    fn submit(&mut self, job: Job) {
        let result = execute(
            &job.operation,
            &self.disk.image,
            &job.memory,
            &self.disk.serial,
        );
        let answer = finish(&job.memory, job.status, job.operation, result);
        self.finished.push(Finished {
            head: job.head,
            answer,
        });
    }

    fn reap(&mut self, finished: &mut Vec<Finished>, _wait: bool) {
        finished.append(&mut self.finished);
    }

    fn in_flight(&self) -> usize {
        self.finished.len()
    }

    fn room(&self) -> usize {
        usize::MAX
    }

    fn has_finished(&mut self) -> bool {
        !self.finished.is_empty()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn notify_completions(&mut self, _on: bool) {}

    fn consume_completion_signal(&mut self) {}
}
