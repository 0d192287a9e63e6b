use std::io;
use std::path::PathBuf;

/// Why pvstack-net cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sandbox(#[from] pvstack_sandbox::Error),
    #[error("invalid TAP name: {reason}")]
    TapName { reason: String },
    #[error("cannot open /dev/net/tun: {cause}")]
    TunDevice { cause: io::Error },
    #[error("no permission to open /dev/net/tun for TAP {name} (needs read-write access to /dev/net/tun, e.g. as root)")]
    TunPermission { name: String },
    #[error("no permission to create or attach TAP {name} (needs CAP_NET_ADMIN or a TAP owned by this user)")]
    TapPermission { name: String },
    #[error("TAP {name} is busy: another process has it open")]
    TapBusy { name: String },
    #[error("TAP {name}: {what}: {cause}")]
    Tap {
        name: String,
        what: &'static str,
        cause: io::Error,
    },
    #[error("peer socket {path}: {what}: {cause}")]
    Peer {
        path: PathBuf,
        what: &'static str,
        cause: io::Error,
    },
    #[error(transparent)]
    Serve(#[from] pvstack_backend_common::Error),
}
