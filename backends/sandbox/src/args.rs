//! The sandbox flags every backend takes (`#[command(flatten)]` them).

use std::fmt;

use crate::user::User;

/// What a seccomp filter does with a system call outside its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Refuse the call and end the process with a line naming it
    /// (SECCOMP_RET_TRAP and a SIGSYS handler: `pvstack_sandbox::sigsys`).
    On,
    /// Allow it and log it (SECCOMP_RET_LOG): for making the lists.
    Log,
    /// No filter.
    Off,
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::On => "on",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

/// `--seccomp` and `--user`.
#[derive(Debug, Clone, clap::Args)]
pub struct SandboxArgs {
    /// The seccomp allow-list, installed once the backend is set up: `on`
    /// ends the process on any other system call, after a line on stderr
    /// naming the thread and the call; `log` allows it and the kernel logs
    /// it (`dmesg | grep type=1326`, the `syscall=N` field: for making the
    /// lists); `off` installs none. Also taken from PVSTACK_SECCOMP.
    #[arg(long, value_name = "MODE", value_enum, env = "PVSTACK_SECCOMP", default_value_t = SeccompMode::On)]
    pub seccomp: SeccompMode,

    /// Once set up (image, TAP, PTY and sockets opened as the caller),
    /// switch to this user: a name, or UID[:GID] (GID defaults to the
    /// user's group, or to UID when the uid has no name), with no
    /// supplementary groups and no capabilities. Needs root. The sockets
    /// this backend created are handed to the user so it can still use
    /// and remove them; their directory must let the user in.
    #[arg(long, value_name = "NAME|UID[:GID]", value_parser = User::parse)]
    pub user: Option<User>,
}
