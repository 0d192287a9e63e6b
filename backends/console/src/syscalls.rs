//! pvstack-console's seccomp allow-list, on top of the runtime's and every
//! backend's (pvstack_sandbox::runtime, pvstack_sandbox::backend).

use pvstack_sandbox::Sysno;

/// The host side: the terminal's settings (stdio and PTY: tcgetattr,
/// tcsetattr, the window size), waiting for input, console clients on
/// the Unix socket server, and the output log.
pub const CONSOLE: &[Sysno] = &[Sysno::ioctl, Sysno::pwrite64, Sysno::fsync];
