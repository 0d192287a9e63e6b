//! pvstack-console's seccomp allow-list, on top of the runtime's and every
//! backend's (pvstack_sandbox::runtime, pvstack_sandbox::backend).

use pvstack_sandbox::Sysno;

/// The host side: the terminal's settings (stdio and PTY: tcgetattr,
/// tcsetattr, the window size) and the output log (written, synced,
/// renamed to FILE.1 when it reaches its size). Console clients on the
/// Unix socket server need nothing beyond every backend's list.
pub const CONSOLE: &[Sysno] = &[Sysno::ioctl, Sysno::pwrite64, Sysno::fsync, Sysno::rename];
