//! The order in which a backend gives up what it no longer needs, once it
//! has opened everything as the caller (image, TAP, PTY, its sockets):
//!
//! 1. its sockets are handed to `--user`, so it can still accept, connect
//!    to its own filter's daemon socket and remove them at exit;
//! 2. the Landlock ruleset is made (its paths opened while they still
//!    can be);
//! 3. the switch to `--user`: no groups, no capabilities, no_new_privs;
//! 4. Landlock restricts file access to the plan's paths;
//! 5. the seccomp allow-list goes on every thread.
//!
//! Seccomp comes last so its list need not hold what confining takes.

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};

use syscalls::Sysno;

use crate::landlock::{self, Access, Rule};
use crate::seccomp::{self, Scope};
use crate::user::{self, User};
use crate::{Error, SandboxArgs};

/// What one backend keeps.
pub struct Confinement<'a> {
    /// The program, naming its filter in logs.
    pub program: &'a str,
    /// Its seccomp allow-lists (their union is allowed).
    pub syscalls: &'a [&'a [Sysno]],
    /// Socket files it created, handed to `--user`.
    pub sockets: Vec<PathBuf>,
    /// The paths it may still open or change.
    pub files: Vec<Rule>,
}

/// Confines the calling process as `args` and `plan` say (see the module
/// doc for the order). Threads started before this get the user switch
/// and the seccomp filter; the Landlock restriction reaches them only
/// where the kernel has Landlock ABI 8, so call this before starting the
/// threads that serve frontends.
pub fn confine_backend(args: &SandboxArgs, plan: &Confinement<'_>) -> Result<(), Error> {
    if let Some(user) = &args.user {
        hand_over(user, &plan.sockets)?;
    }
    let ruleset = landlock::prepare(&plan.files)?;
    if let Some(user) = &args.user {
        user::drop_to(user)?;
        log::info!("running as {user}, with no capabilities");
    } else {
        user::set_no_new_privs()?;
    }
    let outcome = ruleset.enforce()?;
    log::info!(
        "Landlock: file access limited to {} ({outcome})",
        plan.files
            .iter()
            .map(|rule| rule.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    seccomp::install(plan.program, plan.syscalls, Scope::Process, args.seccomp)
}

fn hand_over(user: &User, sockets: &[PathBuf]) -> Result<(), Error> {
    for path in sockets {
        chown(path, Some(user.uid), Some(user.gid)).map_err(|source| Error::Chown {
            path: path.clone(),
            uid: user.uid,
            cause: source,
        })?;
    }
    Ok(())
}

/// The paths every backend listening on `socket` keeps: the socket's
/// directory (its socket files, removed at exit) and /proc/loadavg
/// (adaptive polling stops while the host has no CPU to spare).
pub fn serving_files(socket: &Path) -> Vec<Rule> {
    vec![
        directory_of(socket),
        Rule {
            path: PathBuf::from("/proc/loadavg"),
            access: Access::ReadFile,
        },
    ]
}

/// The directory holding `file` (a socket, a log), as a backend's own.
pub fn directory_of(file: &Path) -> Rule {
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Rule {
        path: dir,
        access: Access::OwnDirectory,
    }
}
