//! Live replacement of the VMM: see the module documentation of
//! [`super`].

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use super::capture::LiveVm;
use crate::api::VmControl;
use crate::error::{Error, Result};

/// The new process that runs the VM now.
pub struct HandedOver {
    pub pid: u32,
    pub paused: Duration,
}

/// Hands the VM over to a new pvstack started from `binary`.
pub fn hand_over(
    _live: &LiveVm,
    _control: &VmControl,
    _listener: &UnixListener,
    _binary: &Path,
) -> Result<HandedOver> {
    Err(Error::Takeover("not yet".into()))
}

/// `pvstack take-over`: the new process's side.
pub fn take_over(_args: &crate::cli::TakeOverArgs) -> Result<crate::lifecycle::VmEnd> {
    Err(Error::Takeover("not yet".into()))
}
