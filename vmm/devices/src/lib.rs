//! Devices of the pvstack VMM, kept apart from the VM and vCPU plumbing so
//! that each can be built and tested on its own: the MMIO bus that vCPU
//! exits are dispatched on ([`bus`]), the virtio-mmio transport
//! ([`virtio`]), the vhost-user frontend ([`vhost_user`]) and the block
//! device served by a backend process ([`blk`]), the console devices
//! ([`console`]: virtio-console over vhost-user, the emulated UART), and
//! the few legacy PC devices a Linux guest needs on the port-I/O bus
//! ([`legacy`]: the i8042's reset line, the ACPI sleep and reset
//! registers).
//!
//! The VMM creates a device with what it lends it in a [`DeviceContext`]
//! (e.g. [`blk::create_blk`]), maps the device's register window on its
//! [`bus::Bus`] and lists it in the boot info.

pub mod blk;
pub mod bus;
pub mod console;
mod context;
pub mod error;
pub mod legacy;
pub mod net;
pub mod vhost_user;
pub mod virtio;

pub use blk::{create_blk, BlkDevice, BlkSpec};
pub use console::{
    create_console, create_serial_port, create_uart, ConsoleDevice, ConsoleSpec, SerialPort,
    SharedUart, UartDevice, UartState,
};
pub use context::{DeviceContext, InheritedDevice};
pub use error::{Error, Result};
pub use net::{create_net, NetDevice, NetSpec};
pub use vhost_user::process::set_child_sandbox;
