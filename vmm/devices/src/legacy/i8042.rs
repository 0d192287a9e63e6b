//! The i8042 keyboard controller, reduced to its CPU reset line: writing
//! 0xFE to the command port (0x64) pulses it, which is one of the ways
//! Linux reboots a PC. vm-superio's `I8042Device` decodes the command;
//! every other access reads as 0 (status: nothing to read, room to write),
//! so a guest waiting for the input buffer to drain never waits.

use log::info;
use vm_superio::{I8042Device, Trigger};

use super::{PowerEvent, PowerHandler};
use crate::bus::BusDevice;

/// The controller's data port; the window spans it to the command port.
pub const I8042_PORT: u16 = 0x60;
/// Ports from the data port (0x60) to the command/status port (0x64).
pub const I8042_PORTS: u64 = 5;

/// Reports the reset pulse to the VMM.
pub struct ResetLine(PowerHandler);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        info!("i8042: the guest pulsed the CPU reset line");
        (self.0)(PowerEvent::Reset("i8042 CPU reset, 0xFE to port 0x64"));
        Ok(())
    }
}

/// The i8042 as the port-I/O bus sees it, at [`I8042_PORT`].
pub struct I8042 {
    device: I8042Device<ResetLine>,
}

impl I8042 {
    /// A controller whose reset pulse goes to `handler`.
    pub fn new(handler: PowerHandler) -> Self {
        I8042 {
            device: I8042Device::new(ResetLine(handler)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            *byte = self.device.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([value], Ok(offset)) = (data, u8::try_from(offset)) {
            // ResetLine's trigger cannot fail.
            let _ = self.device.write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn only_0xfe_to_the_command_port_resets() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let mut i8042 = I8042::new(Arc::new(move |e| seen.lock().unwrap().push(e)));
        let mut status = [0xffu8];
        i8042.read(4, &mut status);
        assert_eq!(status, [0], "input buffer empty");
        i8042.write(4, &[0xfd]);
        i8042.write(0, &[0xfe]);
        i8042.write(4, &[0xfe, 0]);
        assert!(events.lock().unwrap().is_empty());
        i8042.write(4, &[0xfe]);
        assert!(matches!(
            events.lock().unwrap().as_slice(),
            [PowerEvent::Reset(_)]
        ));
    }
}
