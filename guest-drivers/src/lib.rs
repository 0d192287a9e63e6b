//! pvstack's guest side: everything the guest image (the `pvstack-guest`
//! binary) is built from, as a `no_std` library that also compiles on the
//! host so that host tests reuse its pattern, checksum and compute code.
//!
//! Code that only makes sense inside the VM (hypercalls, device registers)
//! is reachable only through `unsafe` constructors ([`hypercall::Hypercall::new`],
//! [`console::init`], [`virtio::mmio::MmioTransport::new`]); everything
//! else is plain computation with unit tests beside it.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod args;
pub mod block;
pub mod bump;
pub mod checksum;
pub mod clock;
pub mod compute;
pub mod console;
pub mod hypercall;
pub mod legacy_blk;
pub mod netstack;
pub mod pattern;
pub mod rng;
pub mod seqblock;
pub mod stamp;
pub mod sync;
pub mod uart;
pub mod virtio;
