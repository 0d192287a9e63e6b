//! Restricting a process's file access to the paths it still needs, with
//! Landlock (the landlock crate), best effort: on a kernel without
//! Landlock, or with an older ABI, as much as the kernel supports is
//! enforced and the outcome says how much.

use std::fmt;
use std::path::PathBuf;

use landlock::{
    Access as _, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd,
    RestrictSelfAttr, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use crate::Error;

/// The newest ABI whose rights are asked for; older kernels enforce what
/// they know of it.
const ABI_WANTED: ABI = ABI::V7;

/// What a process may still do with one path after the restriction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read a file (e.g. /proc/loadavg).
    ReadFile,
    /// Read and write a file (an image).
    ReadWriteFile,
    /// Create, replace and remove sockets and files in a directory (its
    /// own sockets, a log it rotates).
    OwnDirectory,
}

/// One path and what may be done with it.
#[derive(Debug, Clone)]
pub struct Rule {
    pub path: PathBuf,
    pub access: Access,
}

/// How much of the restriction the kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Full,
    Partial,
    /// The kernel has no Landlock (or it is disabled): nothing enforced.
    None,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Full => "fully enforced",
            Outcome::Partial => "partly enforced (the kernel's Landlock is older)",
            Outcome::None => "not enforced (the kernel has no Landlock)",
        })
    }
}

/// A ruleset made and waiting to be enforced: its paths are opened when
/// it is made, so make it while the process can still reach them.
pub struct Prepared(landlock::RulesetCreated);

/// Makes the ruleset allowing only `rules`: no other file may be opened,
/// created, removed or renamed, no TCP socket bound or connected, no
/// abstract Unix socket or signal reach outside the process's domain.
pub fn prepare(rules: &[Rule]) -> Result<Prepared, Error> {
    let fail = |what: &str| {
        let what = what.to_owned();
        move |e: landlock::RulesetError| Error::Landlock {
            what,
            message: e.to_string(),
        }
    };
    let mut ruleset = landlock::Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(ABI_WANTED))
        .map_err(fail("file rights"))?
        .handle_access(AccessNet::from_all(ABI_WANTED))
        .map_err(fail("network rights"))?
        .scope(Scope::from_all(ABI_WANTED))
        .map_err(fail("scopes"))?
        .create()
        .map_err(fail("creating the ruleset"))?;
    for rule in rules {
        let fd = PathFd::new(&rule.path).map_err(|e| Error::Landlock {
            what: format!("opening {}", rule.path.display()),
            message: e.to_string(),
        })?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, rights(rule.access)))
            .map_err(fail(&format!("a rule for {}", rule.path.display())))?;
    }
    Ok(Prepared(ruleset))
}

impl Prepared {
    /// Restricts the calling thread, and the threads it starts later
    /// (every thread where the kernel has Landlock ABI 8). Sets
    /// no_new_privs.
    pub fn enforce(self) -> Result<Outcome, Error> {
        let fail = |what: &'static str| {
            move |e: landlock::RulesetError| Error::Landlock {
                what: what.to_owned(),
                message: e.to_string(),
            }
        };
        let status = self
            .0
            .all_threads(true)
            .map_err(fail("all threads"))?
            .restrict_self()
            .map_err(fail("restricting this process"))?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => Outcome::Full,
            RulesetStatus::PartiallyEnforced => Outcome::Partial,
            RulesetStatus::NotEnforced => Outcome::None,
        })
    }
}

fn rights(access: Access) -> BitFlags<AccessFs> {
    let read = AccessFs::ReadFile;
    match access {
        Access::ReadFile => read.into(),
        Access::ReadWriteFile => read | AccessFs::WriteFile | AccessFs::Truncate,
        Access::OwnDirectory => AccessFs::from_all(ABI_WANTED) & !AccessFs::Execute,
    }
}
