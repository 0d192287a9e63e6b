//! Devices of the pvstack VMM, kept apart from the VM and vCPU plumbing so
//! that each can be built and tested on its own: the MMIO bus that vCPU
//! exits are dispatched on ([`bus`]).

pub mod bus;
