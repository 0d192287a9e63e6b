//! pvstack-net's seccomp allow-list, on top of the runtime's and every
//! backend's (pvstack_sandbox::runtime, pvstack_sandbox::backend).

use pvstack_sandbox::Sysno;

/// The TAP's offload settings, which follow the features the guest's
/// driver accepts (ioctl), and learning the address of the socket bound
/// at the peer's path, to take frames only from it (getpeername of a
/// probe connected there). Frames to and from the TAP (readv, writev) or
/// the peer's datagram socket (sendto, recvfrom) need nothing beyond
/// every backend's list.
pub const NET: &[Sysno] = &[Sysno::ioctl, Sysno::getpeername];
