//! `--stdio`: guest output to this process's stdout, stdin to the guest.

use std::io::{self, Write};
use std::sync::Arc;

use crate::hub::{Hub, Sink};

struct Stdout;

impl Sink for Stdout {
    fn write(&mut self, bytes: &[u8]) -> bool {
        let mut out = io::stdout().lock();
        match out.write_all(bytes).and_then(|()| out.flush()) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("cannot write to stdout: {e}");
                false
            }
        }
    }

    fn name(&self) -> String {
        "stdout".into()
    }
}

/// Attaches stdout and starts reading stdin.
pub fn start(hub: &Arc<Hub>) -> io::Result<()> {
    hub.attach(Box::new(Stdout), false);
    super::spawn_input(hub, io::stdin(), "stdin".into(), || {
        log::info!("stdin closed; no more input");
    })
}
