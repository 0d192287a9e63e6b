//! Which confinement the host supports, for `pvstack check`.

use std::io;

/// What the kernel offers the sandbox.
#[derive(Debug, Clone)]
pub struct HostProtections {
    /// The seccomp filter actions the kernel has (actions_avail), or why
    /// they are unknown.
    pub seccomp_actions: Result<String, String>,
    /// Whether the kernel logs what `--seccomp log` lets through
    /// (actions_logged has log), which is how the lists are made.
    pub log_recorded: bool,
    /// The Landlock ABI version, or why there is none.
    pub landlock_abi: Result<i64, String>,
    /// Whether prctl(PR_GET_NO_NEW_PRIVS) works.
    pub no_new_privs: bool,
}

const ACTIONS_AVAIL: &str = "/proc/sys/kernel/seccomp/actions_avail";
const ACTIONS_LOGGED: &str = "/proc/sys/kernel/seccomp/actions_logged";

impl HostProtections {
    pub fn probe() -> HostProtections {
        let seccomp_actions = std::fs::read_to_string(ACTIONS_AVAIL)
            .map(|text| text.trim().to_owned())
            .map_err(|e| format!("{ACTIONS_AVAIL}: {e}"));
        let log_recorded = std::fs::read_to_string(ACTIONS_LOGGED)
            .is_ok_and(|text| text.split_whitespace().any(|a| a == "log"));
        HostProtections {
            seccomp_actions,
            log_recorded,
            landlock_abi: landlock_abi(),
            // SAFETY: prctl with integer arguments only.
            no_new_privs: unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } >= 0,
        }
    }

    /// Whether `--seccomp on` and `log` can work: their actions (trap,
    /// log) exist.
    pub fn seccomp_usable(&self) -> bool {
        self.seccomp_actions.as_ref().is_ok_and(|actions| {
            let has = |a: &str| actions.split_whitespace().any(|x| x == a);
            has("trap") && has("log") && has("allow")
        })
    }
}

/// The kernel's Landlock ABI version (landlock_create_ruleset with
/// LANDLOCK_CREATE_RULESET_VERSION).
fn landlock_abi() -> Result<i64, String> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_long = 1;
    // SAFETY: with a null attribute pointer and size 0 and the VERSION
    // flag, the call only returns a number.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if version >= 0 {
        return Ok(version);
    }
    let err = io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) => "built into the kernel but not enabled at boot (lsm=)".into(),
        Some(libc::ENOSYS) => "not built into the kernel".into(),
        _ => err.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_host_has_what_the_sandbox_uses() {
        // The project's machines (see README): seccomp with trap and log,
        // Landlock, no_new_privs.
        let host = HostProtections::probe();
        assert!(host.seccomp_usable(), "{:?}", host.seccomp_actions);
        assert!(
            host.landlock_abi.as_ref().is_ok_and(|v| *v >= 1),
            "{host:?}"
        );
        assert!(host.no_new_privs);
    }
}
