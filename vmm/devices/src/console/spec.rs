//! [`ConsoleSpec`]: one `--console` option value.

use std::path::PathBuf;
use std::str::FromStr;

use pvstack_options::{Keys, OptionList};

use crate::error::Error;
use crate::vhost_user::peer::BACKEND_UID_KEY;
use crate::vhost_user::{AllowedBackend, BackendProcess, BackendSpec, VhostUserHandle};

/// Where the guest's console goes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConsoleSpec {
    /// virtio-console served by a pvstack-console (or other vhost-user
    /// console backend) already listening on `path`; a backend run by
    /// `backend_uid` is trusted besides pvstack's own user and root.
    Socket {
        path: PathBuf,
        #[serde(default)]
        backend_uid: Option<u32>,
    },
    /// virtio-console served by a pvstack-console child on pvstack's stdio.
    Stdio,
    /// virtio-console served by a pvstack-console child on a new PTY,
    /// whose path it prints.
    Pty,
    /// virtio-console served by a pvstack-console child that runs a Unix
    /// socket console server at this path.
    Unix(PathBuf),
    /// The emulated 16550 UART in the VMM (every register access traps).
    Uart,
}

impl ConsoleSpec {
    /// Whether this is a virtio-console over vhost-user.
    pub fn is_virtio(&self) -> bool {
        !matches!(self, ConsoleSpec::Uart)
    }
}

impl BackendSpec for ConsoleSpec {
    fn connect(&self) -> crate::error::Result<(VhostUserHandle, Option<BackendProcess>)> {
        super::connect(self)
    }

    /// Whose backends may serve the console: for `socket=`, also
    /// `backend-uid=`; a backend pvstack starts runs as its own user.
    fn allowed_backend(&self) -> AllowedBackend {
        match self {
            ConsoleSpec::Socket { backend_uid, .. } => AllowedBackend {
                also_uid: *backend_uid,
            },
            _ => AllowedBackend::default(),
        }
    }
}

/// The forms `--console` takes: exactly one of these (`backend-uid=`
/// only with `socket=`).
const KEYS: Keys = Keys {
    valued: &["socket", "unix", BACKEND_UID_KEY],
    flags: &["stdio", "pty", "uart"],
};

impl FromStr for ConsoleSpec {
    type Err = Error;

    fn from_str(value: &str) -> Result<Self, Error> {
        parse(value).map_err(|reason| Error::InvalidOption {
            option: "console",
            value: value.to_string(),
            reason,
        })
    }
}

fn parse(value: &str) -> Result<ConsoleSpec, String> {
    let list = OptionList::parse(value, KEYS)?;
    let backend_uid = AllowedBackend::from_option(list.get(BACKEND_UID_KEY))?.also_uid;
    if backend_uid.is_some() && list.get("socket").is_none() {
        return Err(format!(
            "{BACKEND_UID_KEY}= goes with socket=PATH: pvstack runs the backends it starts itself"
        ));
    }
    let mut given = [
        list.get("socket").map(|path| ConsoleSpec::Socket {
            path: path.into(),
            backend_uid,
        }),
        list.get("unix").map(|path| ConsoleSpec::Unix(path.into())),
        list.flag("stdio").then_some(ConsoleSpec::Stdio),
        list.flag("pty").then_some(ConsoleSpec::Pty),
        list.flag("uart").then_some(ConsoleSpec::Uart),
    ]
    .into_iter()
    .flatten();
    match (given.next(), given.next()) {
        (Some(spec), None) => Ok(spec),
        _ => Err("expected one of socket=PATH, stdio, pty, unix=PATH or uart".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            "socket=/tmp/c.sock".parse::<ConsoleSpec>().unwrap(),
            ConsoleSpec::Socket {
                path: "/tmp/c.sock".into(),
                backend_uid: None
            }
        );
        let trusting = "socket=/tmp/c.sock,backend-uid=65534"
            .parse::<ConsoleSpec>()
            .unwrap();
        assert_eq!(trusting.allowed_backend().also_uid, Some(65534));
        assert_eq!(
            "unix=/tmp/l".parse::<ConsoleSpec>().unwrap(),
            ConsoleSpec::Unix("/tmp/l".into())
        );
        assert_eq!("stdio".parse::<ConsoleSpec>().unwrap(), ConsoleSpec::Stdio);
        assert_eq!("pty".parse::<ConsoleSpec>().unwrap(), ConsoleSpec::Pty);
        assert_eq!("uart".parse::<ConsoleSpec>().unwrap(), ConsoleSpec::Uart);
        for bad in [
            "",
            "socket=",
            "tty",
            "unix",
            "file=x",
            "stdio,pty",
            "socket=a,unix=b",
            "stdio,backend-uid=65534",
            "socket=a,backend-uid=nobody",
        ] {
            let err = bad.parse::<ConsoleSpec>().unwrap_err().to_string();
            assert!(err.starts_with("invalid --console value"), "{bad}: {err}");
        }
    }
}
