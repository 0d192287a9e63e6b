//! [`ConsoleSpec`]: one `--console` option value.

use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

/// Where the guest's console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleSpec {
    /// virtio-console served by a pvstack-console (or other vhost-user
    /// console backend) already listening on this socket.
    Socket(PathBuf),
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

impl FromStr for ConsoleSpec {
    type Err = Error;

    fn from_str(value: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidOption {
            option: "console",
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let path = |path: &str| {
            if path.is_empty() {
                Err(invalid("the path is empty"))
            } else {
                Ok(PathBuf::from(path))
            }
        };
        match value.split_once('=') {
            Some(("socket", p)) => Ok(ConsoleSpec::Socket(path(p)?)),
            Some(("unix", p)) => Ok(ConsoleSpec::Unix(path(p)?)),
            None if value == "stdio" => Ok(ConsoleSpec::Stdio),
            None if value == "pty" => Ok(ConsoleSpec::Pty),
            None if value == "uart" => Ok(ConsoleSpec::Uart),
            _ => Err(invalid(
                "expected socket=PATH, stdio, pty, unix=PATH or uart",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            "socket=/tmp/c.sock".parse::<ConsoleSpec>().unwrap(),
            ConsoleSpec::Socket("/tmp/c.sock".into())
        );
        assert_eq!(
            "unix=/tmp/l".parse::<ConsoleSpec>().unwrap(),
            ConsoleSpec::Unix("/tmp/l".into())
        );
        assert_eq!("stdio".parse::<ConsoleSpec>().unwrap(), ConsoleSpec::Stdio);
        assert_eq!("pty".parse::<ConsoleSpec>().unwrap(), ConsoleSpec::Pty);
        assert_eq!("uart".parse::<ConsoleSpec>().unwrap(), ConsoleSpec::Uart);
        for bad in ["", "socket=", "tty", "unix", "file=x"] {
            let err = bad.parse::<ConsoleSpec>().unwrap_err().to_string();
            assert!(err.starts_with("invalid --console value"), "{bad}: {err}");
        }
    }
}
