//! Confining `pvstack run` once the VM is set up: a process-wide seccomp
//! filter, a narrower one on each vCPU thread, and what the backends it
//! starts are told (`--seccomp`, `--user`).

mod syscalls;

use std::sync::OnceLock;

use clap::Args;
use pvstack_sandbox::backend::SERVE;
use pvstack_sandbox::runtime::RUNTIME;
use pvstack_sandbox::seccomp::{self, Scope};
use pvstack_sandbox::{SeccompMode, User};

use crate::error::{Error, Result};

/// `pvstack run`'s sandbox options.
#[derive(Debug, Clone, Args)]
pub struct SandboxOptions {
    /// The seccomp allow-lists, installed once the VM is set up (one for
    /// the whole process, a narrower one on each vCPU thread) and passed
    /// on to the backends pvstack starts: `on` ends the process on any
    /// other system call, after a line on stderr naming the thread and the
    /// call; `log` allows it and the kernel logs it (`dmesg | grep
    /// type=1326`, the `syscall=N` field); `off` installs none. Also taken
    /// from PVSTACK_SECCOMP.
    #[arg(long, value_name = "MODE", value_enum, env = "PVSTACK_SECCOMP", default_value_t = SeccompMode::On)]
    pub seccomp: SeccompMode,

    /// The user the backends pvstack starts (`image=`, `tap=`, `stdio`,
    /// `pty`, `unix=`) switch to once they have opened what they need: a
    /// name or UID[:GID], or `keep` to leave them pvstack's user. Only
    /// root can switch, so a pvstack that is not root keeps its user.
    /// The default is nobody:nogroup by number.
    #[arg(long, value_name = "NAME|UID[:GID]|keep", default_value = pvstack_sandbox::user::DEFAULT_USER, value_parser = parse_backend_user)]
    pub backend_user: BackendUser,
}

/// `--backend-user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendUser {
    Keep,
    Switch(User),
}

fn parse_backend_user(text: &str) -> std::result::Result<BackendUser, String> {
    if text == "keep" {
        return Ok(BackendUser::Keep);
    }
    User::parse(text).map(BackendUser::Switch)
}

/// The options this pvstack was given, set by [`configure`].
static OPTIONS: OnceLock<SandboxOptions> = OnceLock::new();

/// Records `options` for what comes later (the vCPU threads' filters, a
/// take-over's command line) and tells pvstack's backend children what
/// they get; call before any backend starts.
pub fn configure(options: &SandboxOptions) {
    let _ = OPTIONS.set(options.clone());
    // SAFETY: geteuid cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let user = match &options.backend_user {
        BackendUser::Switch(user) if root => Some(user.clone()),
        _ => None,
    };
    pvstack_devices::set_child_sandbox(options.seccomp, user);
}

fn mode() -> SeccompMode {
    OPTIONS.get().map_or(SeccompMode::Off, |o| o.seccomp)
}

/// What a new pvstack taking the VM over is told (`pvstack take-over`),
/// so that it confines itself and its backends as this one does.
pub fn take_over_args() -> Vec<String> {
    let Some(options) = OPTIONS.get() else {
        return Vec::new();
    };
    let user = match &options.backend_user {
        BackendUser::Keep => "keep".to_owned(),
        BackendUser::Switch(user) => user.spec.clone(),
    };
    vec![
        "--seccomp".into(),
        options.seccomp.to_string(),
        "--backend-user".into(),
        user,
    ]
}

/// The lists pvstack's process-wide filter allows.
const VMM_LISTS: &[&[pvstack_sandbox::Sysno]] = &[
    RUNTIME,
    syscalls::VMM,
    syscalls::BACKEND_START,
    SERVE,
    pvstack_blk::syscalls::BLK,
    pvstack_net::syscalls::NET,
    pvstack_console::syscalls::CONSOLE,
];

/// Installs the process-wide filter on every thread; vCPU threads started
/// afterwards add theirs ([`confine_vcpu_thread`]).
pub fn confine_vmm() -> Result<()> {
    seccomp::install("pvstack", VMM_LISTS, Scope::Process, mode()).map_err(sandbox_error)
}

/// [`configure`] for `pvstack take-over`, which the pvstack handing over
/// started under its own filter: SIGSYS is handled again from here on
/// (execve reset its handler), so that a call the inherited filter
/// refuses while this process sets up is named too.
pub fn configure_take_over(options: &SandboxOptions) -> Result<()> {
    configure(options);
    let inherited = seccomp::adopt_inherited("pvstack", mode()).map_err(sandbox_error)?;
    let _ = INHERITED.set(inherited);
    Ok(())
}

/// Whether this pvstack runs under a filter inherited through execve, as
/// [`configure_take_over`] found.
static INHERITED: OnceLock<bool> = OnceLock::new();

/// As [`confine_vmm`] for a pvstack that took a VM over: the filter of
/// the pvstack that started it is still there (a filter outlives execve
/// and cannot be removed), and it is this list when the binary is the
/// same, so a second copy would only make every system call dearer and,
/// upgrade after upgrade, fill the kernel's limit on stacked filters.
/// Installs it if there is none.
pub fn confine_vmm_after_take_over() -> Result<()> {
    if mode() != SeccompMode::Off && INHERITED.get() == Some(&true) {
        log::info!(
            "seccomp {}: keeping the filter inherited from the pvstack that handed over",
            mode()
        );
        return Ok(());
    }
    confine_vmm()
}

/// Narrows the calling vCPU thread to [`syscalls::VCPU`].
pub fn confine_vcpu_thread() -> Result<()> {
    seccomp::install("vCPU", &[RUNTIME, syscalls::VCPU], Scope::Thread, mode())
        .map_err(sandbox_error)
}

fn sandbox_error(e: pvstack_sandbox::Error) -> Error {
    Error::Sandbox(e.to_string())
}
