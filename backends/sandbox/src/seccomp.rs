//! Allow-list seccomp filters, compiled with seccompiler.
//!
//! A filter allows exactly the union of the lists it is built from; any
//! other system call is not made and ends the whole process with a line
//! naming it (`--seccomp on`, see [`crate::sigsys`]), or is allowed and
//! logged by the kernel (`--seccomp log`). Filters stack: a
//! thread that installs its own filter on top of the process's gets what
//! both allow, so a thread kind's list narrows the process's.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use syscalls::Sysno;

use crate::{Error, SeccompMode};

/// Which threads a filter applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The calling thread, and the threads and processes it starts later.
    Thread,
    /// Every thread of the process (SECCOMP_FILTER_FLAG_TSYNC), and what
    /// they start later.
    Process,
}

/// Installs the filter called `name` allowing the union of `lists` on
/// `scope`, as `mode` says (nothing for `off`). Sets no_new_privs first,
/// which an unprivileged process needs to install a filter.
pub fn install(
    name: &str,
    lists: &[&[Sysno]],
    scope: Scope,
    mode: SeccompMode,
) -> Result<(), Error> {
    let Some(program) = compile(name, lists, mode)? else {
        return Ok(());
    };
    if mode == SeccompMode::On {
        crate::sigsys::install(name).map_err(|e| Error::InstallFilter {
            list: name.to_owned(),
            message: format!("cannot handle SIGSYS: {e}"),
        })?;
    }
    let installed = match scope {
        Scope::Thread => seccompiler::apply_filter(&program),
        Scope::Process => seccompiler::apply_filter_all_threads(&program),
    };
    installed.map_err(|e| Error::InstallFilter {
        list: name.to_owned(),
        message: e.to_string(),
    })?;
    log::info!(
        "seccomp {mode}: the {name} filter allows {} system calls ({})",
        count(lists),
        match scope {
            Scope::Thread => "this thread",
            Scope::Process => "every thread",
        }
    );
    Ok(())
}

/// For a process that may run under a filter inherited through execve
/// (which keeps filters but resets signal handlers): whether there is
/// one, and if so and `mode` is `on`, SIGSYS is handled again as
/// [`install`] would, so a refused call is named.
pub fn adopt_inherited(name: &str, mode: SeccompMode) -> Result<bool, Error> {
    let inherited = filtered()?;
    if inherited && mode == SeccompMode::On {
        crate::sigsys::install(name).map_err(|e| Error::InstallFilter {
            list: name.to_owned(),
            message: format!("cannot handle SIGSYS: {e}"),
        })?;
    }
    Ok(inherited)
}

/// Whether this process already runs under a seccomp filter: the
/// `Seccomp:` line of /proc/self/status is 2 (SECCOMP_MODE_FILTER).
fn filtered() -> Result<bool, Error> {
    const STATUS: &str = "/proc/self/status";
    let status = std::fs::read_to_string(STATUS).map_err(|cause| Error::ReadStatus {
        path: STATUS,
        cause,
    })?;
    Ok(status
        .lines()
        .filter_map(|line| line.strip_prefix("Seccomp:"))
        .any(|mode| mode.trim() == "2"))
}

/// The BPF program for `lists` in `mode`, or None for `off`.
pub fn compile(
    name: &str,
    lists: &[&[Sysno]],
    mode: SeccompMode,
) -> Result<Option<BpfProgram>, Error> {
    let mismatch = match mode {
        SeccompMode::On => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(None),
    };
    let build_error = |message: String| Error::BuildFilter {
        list: name.to_owned(),
        message,
    };
    // An empty rule chain allows the system call whatever its arguments.
    let rules: BTreeMap<i64, Vec<_>> = lists
        .iter()
        .flat_map(|list| list.iter())
        .map(|sysno| (i64::from(sysno.id()), Vec::new()))
        .collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| build_error(format!("architecture: {e}")))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|e| build_error(e.to_string()))?;
    let program = BpfProgram::try_from(filter).map_err(|e| build_error(e.to_string()))?;
    Ok(Some(program))
}

/// How many distinct system calls the union of `lists` holds.
fn count(lists: &[&[Sysno]]) -> usize {
    let mut all: Vec<Sysno> = lists.iter().flat_map(|list| list.iter().copied()).collect();
    all.sort_unstable();
    all.dedup();
    all.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::RUNTIME;

    #[test]
    fn off_builds_nothing_and_on_builds_a_program() {
        assert!(compile("test", &[RUNTIME], SeccompMode::Off)
            .unwrap()
            .is_none());
        let program = compile("test", &[RUNTIME], SeccompMode::On)
            .unwrap()
            .unwrap();
        assert!(program.len() > RUNTIME.len());
    }

    #[test]
    fn duplicates_count_once() {
        assert_eq!(count(&[&[Sysno::read, Sysno::write], &[Sysno::read]]), 2);
    }
}
