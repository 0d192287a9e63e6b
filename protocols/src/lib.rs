//! The contract between pvstack's host side (the VMM and the backends) and
//! the guest: where things live in guest physical memory ([`layout`]) and
//! how the guest asks the VMM for services ([`hypercall`], [`boot`]), and
//! the register set of the emulated baseline disk ([`legacy_blk`]).
//!
//! The crate is `no_std` and has no dependencies so that the guest image
//! and the host share the very same definitions.
#![no_std]

pub mod boot;
pub mod hypercall;
pub mod layout;
pub mod legacy_blk;
