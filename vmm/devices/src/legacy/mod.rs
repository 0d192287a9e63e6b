//! Legacy PC devices on the port-I/O bus, only as much of them as a Linux
//! guest needs to power off and reboot: the i8042 keyboard controller's
//! CPU reset line ([`i8042`]) and the sleep and reset registers that the
//! ACPI tables point Linux at ([`power`]). Both report to the VMM through
//! a [`PowerHandler`]. (The serial port is in `crate::console::uart`.)

pub mod i8042;
pub mod power;

use std::sync::Arc;

pub use i8042::I8042;
pub use power::AcpiPowerRegisters;

/// What the guest asked of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEvent {
    /// Turn the machine off (ACPI S5).
    PowerOff,
    /// Reset the machine; the text says through which register.
    Reset(&'static str),
}

/// Called by a device when the guest powers off or resets the machine.
pub type PowerHandler = Arc<dyn Fn(PowerEvent) + Send + Sync>;
