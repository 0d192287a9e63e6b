//! Snapshot, restore and live replacement of the VMM (issue 14).
//!
//! Guest RAM lives in a memfd and every device's data path in a backend
//! process, so what a VM needs beyond its RAM is small: the vCPUs', the
//! in-kernel irqchip's, PIT's and clock's state, and each virtio device's
//! transport registers ([`state`]). From that:
//!
//! - `pvstack ctl snapshot --to DIR` ([`save`]) pauses the VM, stops every
//!   backend's rings (as a swap does) and writes the state and guest RAM
//!   as a sparse file ([`memfile`]); `pvstack restore --from DIR`
//!   ([`restore`]) builds a new VM from them and starts the rings again on
//!   the same or replacement backends.
//! - `pvstack ctl upgrade --binary PATH` ([`takeover`]) starts another
//!   pvstack and hands it the memfd, the devices' eventfds and backend
//!   connections and the state over a Unix socket; the backends keep
//!   serving throughout, and the old process exits once the new one runs
//!   the guest.
//!
//! A KVM VM belongs to the process that created it, so the new process
//! always creates a new VM and sets the saved state on it ([`vcpu`],
//! [`platform`]).

pub mod capture;
pub mod memfile;
pub mod phases;
pub mod platform;
pub mod relay;
pub mod restore;
pub mod save;
pub mod state;
pub mod takeover;
pub mod vcpu;

pub use capture::{LiveDevice, LiveVm};
