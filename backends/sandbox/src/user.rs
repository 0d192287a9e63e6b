//! `--user NAME|UID[:GID]`, and dropping to that user for good.

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;

use crate::Error;

/// The user pvstack's backends switch to unless told otherwise: nobody
/// and nogroup on Debian, given by number so that a host without a
/// password database (an initramfs, a container) has it too.
pub const DEFAULT_USER: &str = "65534:65534";

/// The unprivileged user a process switches to once it is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// As given on the command line, for messages and for passing on.
    pub spec: String,
    pub uid: u32,
    pub gid: u32,
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (uid {}, gid {})", self.spec, self.uid, self.gid)
    }
}

impl User {
    /// A user name from the password database, or `UID[:GID]` (the group
    /// defaults to the uid's primary group, or to UID when the uid has no
    /// entry). Root is refused: it would drop nothing.
    pub fn parse(text: &str) -> Result<User, String> {
        let (who, group) = match text.split_once(':') {
            Some((who, group)) => (who, Some(group)),
            None => (text, None),
        };
        let group = group
            .map(|g| {
                g.parse::<u32>()
                    .map_err(|_| format!("`{g}` is not a numeric group id"))
            })
            .transpose()?;
        let (uid, primary_gid) = match who.parse::<u32>() {
            Ok(uid) => (uid, lookup_uid(uid).map_err(|e| e.to_string())?),
            Err(_) => {
                if group.is_some() {
                    return Err(format!("`{text}`: a group goes with a numeric uid only"));
                }
                let (uid, gid) = lookup_name(who)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| Error::UnknownUser(who.to_owned()).to_string())?;
                (uid, Some(gid))
            }
        };
        let gid = group.or(primary_gid).unwrap_or(uid);
        if uid == 0 || gid == 0 {
            return Err(format!(
                "`{text}` is root (uid {uid}, gid {gid}); give an unprivileged user"
            ));
        }
        Ok(User {
            spec: text.to_owned(),
            uid,
            gid,
        })
    }
}

/// uid and primary gid of the user called `name`, None if there is none.
fn lookup_name(name: &str) -> Result<Option<(u32, u32)>, Error> {
    let c_name = CString::new(name).map_err(|_| Error::UnknownUser(name.to_owned()))?;
    lookup(name, |pwd, buf, result| {
        // SAFETY: every pointer is valid for the call: the name is a NUL
        // terminated string, pwd and result point to locals, buf is a
        // live buffer of the length given.
        unsafe { libc::getpwnam_r(c_name.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), result) }
    })
    .map(|found| found.map(|(uid, gid, _)| (uid, gid)))
}

/// The primary gid of `uid`, None if it has no entry.
fn lookup_uid(uid: u32) -> Result<Option<u32>, Error> {
    lookup(&uid.to_string(), |pwd, buf, result| {
        // SAFETY: as in lookup_name: pwd and result point to locals, buf
        // is a live buffer of the length given.
        unsafe { libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), result) }
    })
    .map(|found| found.map(|(_, gid, _)| gid))
}

/// Runs a getpw*_r call with a buffer that grows until the entry fits.
fn lookup<F>(what: &str, mut call: F) -> Result<Option<(u32, u32, String)>, Error>
where
    F: FnMut(*mut libc::passwd, &mut [libc::c_char], *mut *mut libc::passwd) -> i32,
{
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: passwd is plain data; all zero is a valid value.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pwd, &mut buf, &mut result);
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        // getpwnam_r(3): these mean "no such entry" too, as where there
        // is no password database at all (an initramfs: ENOENT).
        if [libc::ENOENT, libc::ESRCH, libc::EBADF, libc::EPERM].contains(&rc) {
            return Ok(None);
        }
        if rc != 0 {
            return Err(Error::LookUpUser {
                name: what.to_owned(),
                cause: io::Error::from_raw_os_error(rc),
            });
        }
        if result.is_null() {
            return Ok(None);
        }
        // SAFETY: on success pw_name points to a NUL-terminated string in
        // `buf`, alive here.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) }
            .to_string_lossy()
            .into_owned();
        return Ok(Some((pwd.pw_uid, pwd.pw_gid, name)));
    }
}

/// Switches every thread of the process to `user` for good: no
/// supplementary groups, real, effective and saved ids all the user's (so
/// the kernel clears the permitted, effective and ambient capabilities),
/// the capability bounding set emptied, and no_new_privs, so nothing this
/// process executes can gain privileges either. Fails unless it ends
/// with no capability and no way back to root.
pub fn drop_to(user: &User) -> Result<(), Error> {
    // SAFETY: geteuid cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(Error::CannotSwitch(user.spec.clone(), euid));
    }
    empty_bounding_set()?;
    // glibc applies setgroups, setresgid and setresuid to every thread.
    // SAFETY: a null list of length 0 clears the supplementary groups.
    check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: plain system calls on integers.
    check("setresgid", unsafe {
        libc::setresgid(user.gid, user.gid, user.gid)
    })?;
    // SAFETY: as above.
    check("setresuid", unsafe {
        libc::setresuid(user.uid, user.uid, user.uid)
    })?;
    set_no_new_privs()?;
    verify_dropped(user)
}

/// Sets no_new_privs on the calling thread (and the threads it starts).
pub fn set_no_new_privs() -> Result<(), Error> {
    // SAFETY: prctl with integer arguments only.
    check("no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })
}

/// Drops every capability from the calling thread's bounding set (needs
/// CAP_SETPCAP, so before the user switch); stops at the first number the
/// kernel does not know.
fn empty_bounding_set() -> Result<(), Error> {
    for cap in 0.. {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) && cap > 0 {
                return Ok(());
            }
            return Err(Error::Drop {
                step: "capability bounding set",
                cause: err,
            });
        }
    }
    Ok(())
}

/// The switch took: the ids are the user's, no capability is left, and
/// root cannot be had back.
fn verify_dropped(user: &User) -> Result<(), Error> {
    let wrong = |what: String| Error::Drop {
        step: "checking the result",
        cause: io::Error::other(what),
    };
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if (uid, gid) != (user.uid, user.gid) {
        return Err(wrong(format!("still uid {uid} gid {gid}")));
    }
    let status =
        std::fs::read_to_string("/proc/thread-self/status").map_err(|source| Error::Drop {
            step: "reading /proc/thread-self/status",
            cause: source,
        })?;
    for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let value = status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{field}:")))
            .map(str::trim);
        if value.is_some_and(|v| v.chars().any(|c| c != '0')) {
            return Err(wrong(format!("{field} is {}", value.unwrap_or_default())));
        }
    }
    // SAFETY: setuid on an integer; it must fail now.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(wrong("setuid(0) still succeeds".into()));
    }
    Ok(())
}

fn check(step: &'static str, rc: libc::c_int) -> Result<(), Error> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Drop {
            step,
            cause: io::Error::last_os_error(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        let nobody = User::parse("nobody").unwrap();
        assert_eq!(nobody.uid, 65534);
        let numeric = User::parse("65534").unwrap();
        assert_eq!((numeric.uid, numeric.gid), (nobody.uid, nobody.gid));
        let with_group = User::parse("4242:4343").unwrap();
        assert_eq!((with_group.uid, with_group.gid), (4242, 4343));
        // A uid without a name: its group defaults to the uid.
        assert_eq!(User::parse("4242").unwrap().gid, 4242);
    }

    #[test]
    fn bad_users_are_refused() {
        assert!(User::parse("no-such-user-here")
            .unwrap_err()
            .contains("no user `no-such-user-here`"));
        assert!(User::parse("root").unwrap_err().contains("is root"));
        assert!(User::parse("0").unwrap_err().contains("is root"));
        assert!(User::parse("4242:x").unwrap_err().contains("not a numeric"));
        assert!(User::parse("nobody:5")
            .unwrap_err()
            .contains("numeric uid only"));
    }
}
