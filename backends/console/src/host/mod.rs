//! The host side of the console: where output is shown and input comes
//! from. One of stdio ([`stdio`]), a PTY ([`pty`]) or a Unix socket
//! console server ([`server`]); each feeds the [`crate::hub::Hub`].

pub mod pty;
pub mod server;
pub mod stdio;

use std::io::{ErrorKind, Read};
use std::sync::Arc;

use crate::hub::Hub;

/// Reads from `source` into the hub's input until end of file or an
/// error; blocks while the guest is not taking input.
pub fn pump_input(hub: &Hub, mut source: impl Read, name: &str) {
    let mut buf = [0u8; 4096];
    loop {
        match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hub.input().push(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                log::info!("{name}: input ended: {e}");
                break;
            }
        }
    }
}

/// Runs `pump_input` on a thread of its own.
pub fn spawn_input(
    hub: &Arc<Hub>,
    source: impl Read + Send + 'static,
    name: String,
    after: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    let hub = Arc::clone(hub);
    std::thread::Builder::new()
        .name(format!("input {name}"))
        .spawn(move || {
            pump_input(&hub, source, &name);
            after();
        })?;
    Ok(())
}
