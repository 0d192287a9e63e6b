//! The registers a hardware-reduced ACPI platform powers off and resets
//! through (ACPI 6.x, 4.8.3.7 sleep control and status registers, 4.8.3.6
//! reset register). The FADT points at them and the DSDT's `\_S5` names
//! the sleep type; three ports, one byte each:
//!
//! | port | register | |
//! | --- | --- | --- |
//! | [`SLEEP_CONTROL_PORT`] | sleep control | `SLP_EN` (bit 5) with `SLP_TYP` (bits 2..4) = [`S5_SLEEP_TYPE`]: power off |
//! | [`SLEEP_STATUS_PORT`] | sleep status | reads 0; writes (clearing `WAK_STS`) are accepted |
//! | [`RESET_PORT`] | reset | [`RESET_VALUE`]: reset |

use log::{debug, info};
use pvstack_logging::warn_limited;

use super::{PowerEvent, PowerHandler};
use crate::bus::BusDevice;

/// First port of the window; the registers follow one byte apart.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// The sleep status register.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// The reset register.
pub const RESET_PORT: u16 = 0x602;
/// Ports in the window.
pub const PORTS: u64 = 3;
/// What the guest writes to the reset register to reset.
pub const RESET_VALUE: u8 = 0x01;
/// The sleep type of S5 (soft off), as `\_S5` says.
pub const S5_SLEEP_TYPE: u8 = 5;

/// SLP_EN in the sleep control register.
const SLEEP_ENABLE: u8 = 1 << 5;
/// SLP_TYP's position and width in the sleep control register.
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0b111;

/// The sleep and reset registers at [`SLEEP_CONTROL_PORT`].
pub struct AcpiPowerRegisters {
    handler: PowerHandler,
}

impl AcpiPowerRegisters {
    /// Registers that report power-off and reset to `handler`.
    pub fn new(handler: PowerHandler) -> Self {
        AcpiPowerRegisters { handler }
    }

    fn sleep_control(&self, value: u8) {
        if value & SLEEP_ENABLE == 0 {
            return;
        }
        match (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK {
            S5_SLEEP_TYPE => {
                info!("acpi: the guest entered S5 (power off)");
                (self.handler)(PowerEvent::PowerOff);
            }
            other => warn_limited!("acpi: the guest asked for sleep type {other}, which pvstack does not offer; ignored"),
        }
    }
}

impl BusDevice for AcpiPowerRegisters {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS never sets (the machine never wakes).
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            warn_limited!(
                "acpi: {}-byte write to power register {offset}; ignored",
                data.len()
            );
            return;
        };
        match offset {
            0 => self.sleep_control(*value),
            1 => debug!("acpi: sleep status written {value:#x}"),
            2 if *value == RESET_VALUE => {
                info!("acpi: the guest wrote the reset register");
                (self.handler)(PowerEvent::Reset("ACPI reset register"));
            }
            _ => warn_limited!("acpi: write of {value:#x} to power register {offset}; ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn registers() -> (AcpiPowerRegisters, Arc<Mutex<Vec<PowerEvent>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let handler: PowerHandler = Arc::new(move |e| seen.lock().unwrap().push(e));
        (AcpiPowerRegisters::new(handler), events)
    }

    #[test]
    fn s5_powers_off_and_the_reset_value_resets() {
        let (mut regs, events) = registers();
        // What Linux writes for S5: SLP_TYP 5 in bits 2..4, SLP_EN.
        regs.write(0, &[(5 << 2) | (1 << 5)]);
        regs.write(2, &[RESET_VALUE]);
        assert_eq!(
            *events.lock().unwrap(),
            vec![
                PowerEvent::PowerOff,
                PowerEvent::Reset("ACPI reset register")
            ]
        );
    }

    #[test]
    fn other_values_do_nothing() {
        let (mut regs, events) = registers();
        regs.write(0, &[5 << 2]); // no SLP_EN
        regs.write(0, &[(3 << 2) | (1 << 5)]); // S3
        regs.write(1, &[0x80]);
        regs.write(2, &[0x02]);
        regs.write(2, &[RESET_VALUE, 0]);
        let mut status = [0xff];
        regs.read(1, &mut status);
        assert_eq!(status, [0]);
        assert!(events.lock().unwrap().is_empty());
    }
}
