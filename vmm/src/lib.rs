//! pvstack's VMM core: a KVM VM with memfd-backed guest memory, two boot
//! paths into it (pvstack's own guest, and a stock Linux kernel with its
//! ACPI tables), vCPU threads, the paravirtual hypercalls of
//! `pvstack_protocols`, the MMIO and port buses devices attach to, the
//! control API and the host check. The `pvstack` binary's subcommands `run`, `ctl` and
//! `check` are thin wrappers over them; `bench` is the pvstack-bench crate.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod check;
pub mod cli;
pub mod console;
pub mod counters;
pub mod crash_report;
pub mod error;
pub mod guest_structs;
pub mod hypercall;
pub mod kvm_flavour;
pub mod lifecycle;
pub mod machine;
pub mod memory;
pub mod run;
pub mod sandbox;
pub mod signals;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod x86;

pub use error::{Error, Result};
