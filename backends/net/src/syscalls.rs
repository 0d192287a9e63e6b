//! pvstack-net's seccomp allow-list, on top of the runtime's and every
//! backend's (pvstack_sandbox::runtime, pvstack_sandbox::backend).

use pvstack_sandbox::Sysno;

/// Frames to and from the TAP device (with its virtio-net header) or the
/// peer's datagram socket, and the TAP's offload settings, which follow
/// the features the guest's driver accepts.
pub const NET: &[Sysno] = &[Sysno::readv, Sysno::ioctl];
