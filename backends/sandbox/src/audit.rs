//! The kernel's record of a seccomp decision. A process killed by its
//! filter cannot say which system call it made; the kernel logs it
//! (actions_logged has kill_process by default) as an audit line in the
//! kernel log:
//!
//! ```text
//! audit: type=1326 audit(...): ... pid=1234 comm="pvstack-blk" exe="..." sig=31 arch=c000003e syscall=135 compat=0 ip=0x... code=0x80000000
//! ```
//!
//! `sig=31` (SIGSYS) and `code=0x80000000` mean killed; `sig=0` and
//! `code=0x7ffc0000` mean allowed and logged (`--seccomp log`). Find them
//! with `dmesg | grep type=1326`; [`records`] reads them from /dev/kmsg.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;

use syscalls::Sysno;

/// SECCOMP_RET_KILL_PROCESS and SECCOMP_RET_LOG as the audit line prints them.
const CODE_KILL_PROCESS: &str = "0x80000000";
const CODE_LOG: &str = "0x7ffc0000";

/// What the filter did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Killed,
    Logged,
}

/// One seccomp audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub pid: u32,
    /// The thread's name (`comm`), e.g. `vcpu0`.
    pub comm: String,
    pub syscall: u64,
    pub action: Action,
}

impl Record {
    /// The system call's name, or its number when this build has no name
    /// for it.
    pub fn syscall_name(&self) -> String {
        i32::try_from(self.syscall)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .and_then(Sysno::new)
            .map_or_else(|| format!("#{}", self.syscall), |s| s.name().to_owned())
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} (thread {}) {} by its seccomp filter for system call {} ({})",
            self.pid,
            self.comm,
            match self.action {
                Action::Killed => "was killed",
                Action::Logged => "was allowed and logged",
            },
            self.syscall_name(),
            self.syscall
        )
    }
}

/// The seccomp record in one kernel log line, if it is one.
pub fn parse(line: &str) -> Option<Record> {
    if !line.contains("type=1326") {
        return None;
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
    };
    let action = match field("code")? {
        CODE_KILL_PROCESS => Action::Killed,
        CODE_LOG => Action::Logged,
        _ => return None,
    };
    Some(Record {
        pid: field("pid")?.parse().ok()?,
        comm: field("comm")?.trim_matches('"').to_owned(),
        syscall: field("syscall")?.parse().ok()?,
        action,
    })
}

/// Every seccomp record the kernel log still holds (its ring buffer keeps
/// the recent past). Needs read access to /dev/kmsg (root, or
/// dmesg_restrict=0).
pub fn records() -> io::Result<Vec<Record>> {
    let mut kmsg = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")?;
    let mut found = Vec::new();
    // Each read returns one record; EAGAIN once all were read.
    let mut buf = vec![0u8; 8192];
    loop {
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => found.extend(parse(&String::from_utf8_lossy(&buf[..n]))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            // A record overwritten while being read: go on with the next.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

/// Why process `pid`, which died of SIGSYS, was killed: the kernel's
/// record naming the system call, or how to find it.
pub fn explain_kill(pid: u32) -> String {
    match records() {
        Ok(found) => match found
            .into_iter()
            .rev()
            .find(|r| r.pid == pid && r.action == Action::Killed)
        {
            Some(record) => record.to_string(),
            None => format!(
                "pid {pid} died of SIGSYS (a system call outside its seccomp allow-list) and the kernel log has no record of it; see `dmesg | grep type=1326`, or run with --seccomp log"
            ),
        },
        Err(e) => format!(
            "pid {pid} died of SIGSYS (a system call outside its seccomp allow-list); /dev/kmsg: {e}; see `dmesg | grep type=1326` as root"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_and_log_lines() {
        let kill = "6,1234,5678,-;audit: type=1326 audit(1795938658.899:2): auid=4294967295 uid=0 gid=0 ses=4294967295 pid=6319 comm=\"vcpu0\" exe=\"/tmp/sk\" sig=31 arch=c000003e syscall=110 compat=0 ip=0x7f38e2eb94f7 code=0x80000000";
        let record = parse(kill).unwrap();
        assert_eq!(
            record,
            Record {
                pid: 6319,
                comm: "vcpu0".into(),
                syscall: 110,
                action: Action::Killed
            }
        );
        assert_eq!(record.syscall_name(), "getppid");
        assert!(record.to_string().contains("getppid (110)"), "{record}");
        let logged = kill.replace("code=0x80000000", "code=0x7ffc0000");
        assert_eq!(parse(&logged).unwrap().action, Action::Logged);
        assert!(parse("kvm-pvm: triple fault").is_none());
        assert!(parse(&kill.replace("syscall=110", "syscall=x")).is_none());
    }
}
