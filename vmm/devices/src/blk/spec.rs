//! [`BlkSpec`]: one `--blk` option value,
//! `socket=PATH[,id=ID][,num-queues=N][,queue-size=N][,readonly][,backend-uid=UID]` or
//! `image=PATH[,mode=MODE][,...the same options]`.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use pvstack_options::{check_id, parse_queue_size, Keys, OptionList};

use crate::error::Error;
use crate::vhost_user::peer::BACKEND_UID_KEY;
use crate::vhost_user::{AllowedBackend, BackendProcess, BackendSpec, VhostUserHandle};

/// Most queues a block device may have.
pub const MAX_QUEUES: u16 = 64;
/// Queue size when `queue-size` is not given.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// Where a disk's requests are served (`mode=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BlkMode {
    /// The register-level controller of `pvstack_protocols::legacy_blk`
    /// in the VMM: every register access, data words included, traps.
    EmulatedLegacy,
    /// virtio-blk whose queue the VMM processes when a QueueNotify write
    /// exits to it (no ioeventfd: every kick exits).
    EmulatedVirtio,
    /// virtio-blk served by a vhost-user backend, kicked by ioeventfd
    /// (pvstack-blk polls adaptively, within its default bound).
    #[default]
    VhostUser,
    /// As `VhostUser`, with pvstack-blk's adaptive polling allowed a far
    /// longer window (`--poll-us`), so a guest that pauses between
    /// requests still finds the backend polling and skips its kicks.
    VhostUserPoll,
}

impl BlkMode {
    /// Every mode, in the order benchmarks show them.
    pub const ALL: [BlkMode; 4] = [
        BlkMode::EmulatedLegacy,
        BlkMode::EmulatedVirtio,
        BlkMode::VhostUser,
        BlkMode::VhostUserPoll,
    ];

    /// The name `mode=` takes.
    pub fn name(self) -> &'static str {
        match self {
            BlkMode::EmulatedLegacy => "emulated-legacy",
            BlkMode::EmulatedVirtio => "emulated-virtio",
            BlkMode::VhostUser => "vhost-user",
            BlkMode::VhostUserPoll => "vhost-user-poll",
        }
    }

    /// Whether the VMM itself serves the disk from its image (so the disk
    /// cannot come from someone else's `socket=`).
    pub fn is_emulated(self) -> bool {
        matches!(self, BlkMode::EmulatedLegacy | BlkMode::EmulatedVirtio)
    }
}

impl std::fmt::Display for BlkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BlkMode {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        BlkMode::ALL
            .into_iter()
            .find(|mode| mode.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown mode {name:?} (expected emulated-legacy, emulated-virtio, \
                     vhost-user or vhost-user-poll)"
                )
            })
    }
}

/// Where the disk comes from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BlkSource {
    /// A backend already listening on this vhost-user socket.
    Socket(PathBuf),
    /// This raw image, served by a pvstack-blk that pvstack starts.
    Image(PathBuf),
}

/// One block device as the command line describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlkSpec {
    /// Where the disk comes from.
    pub source: BlkSource,
    /// Name in logs and the control API; `blk<index>` if not given.
    pub id: Option<String>,
    /// Queues; if not given, as many as the backend serves.
    pub num_queues: Option<u16>,
    /// Largest size of each queue the driver may choose.
    pub queue_size: u16,
    /// The guest may only read the disk.
    pub readonly: bool,
    /// Where requests are served.
    pub mode: BlkMode,
    /// How long to keep reconnecting after the backend hangs up; `None`
    /// (the default): for ever.
    pub reconnect_timeout: Option<Duration>,
    /// A user besides pvstack's own and root whose backend may serve the
    /// disk (`backend-uid=`).
    pub backend_uid: Option<u32>,
}

impl BackendSpec for BlkSpec {
    fn connect(&self) -> crate::error::Result<(VhostUserHandle, Option<BackendProcess>)> {
        super::connect(self)
    }

    /// Whose backends may serve the disk.
    fn allowed_backend(&self) -> AllowedBackend {
        AllowedBackend {
            also_uid: self.backend_uid,
        }
    }
}

impl FromStr for BlkSpec {
    type Err = Error;

    fn from_str(value: &str) -> Result<Self, Error> {
        parse(value).map_err(|reason| Error::InvalidOption {
            option: "blk",
            value: value.to_string(),
            reason,
        })
    }
}

/// The keys `--blk` takes.
const KEYS: Keys = Keys {
    valued: &[
        "socket",
        "image",
        "mode",
        "id",
        "num-queues",
        "queue-size",
        "reconnect-timeout",
        BACKEND_UID_KEY,
    ],
    flags: &["readonly"],
};

fn parse(value: &str) -> Result<BlkSpec, String> {
    let list = OptionList::parse(value, KEYS)?;
    let (socket, image) = (list.get("socket"), list.get("image"));
    let num_queues = list.get("num-queues");
    let source = match (socket, image) {
        (Some(socket), None) => BlkSource::Socket(socket.into()),
        (None, Some(image)) => BlkSource::Image(image.into()),
        (Some(_), Some(_)) => return Err("give socket= or image=, not both".to_string()),
        (None, None) => return Err("missing socket=PATH or image=PATH".to_string()),
    };
    let mode = list
        .get("mode")
        .map_or(Ok(BlkMode::default()), str::parse)?;
    if mode != BlkMode::VhostUser && matches!(source, BlkSource::Socket(_)) {
        return Err(format!(
            "mode={mode} needs image=PATH: pvstack serves or starts that disk itself"
        ));
    }
    if mode == BlkMode::EmulatedLegacy && num_queues.is_some() {
        return Err("mode=emulated-legacy has no queues (num-queues)".to_string());
    }
    let id = list.get("id");
    id.map(check_id).transpose()?;
    let num_queues = num_queues
        .map(|n| match n.parse::<u16>() {
            Ok(n) if (1..=MAX_QUEUES).contains(&n) => Ok(n),
            _ => Err(format!("num-queues must be 1..={MAX_QUEUES}, not {n:?}")),
        })
        .transpose()?;
    let queue_size = list
        .get("queue-size")
        .map_or(Ok(DEFAULT_QUEUE_SIZE), parse_queue_size)?;
    let reconnect_timeout = list
        .get("reconnect-timeout")
        .map(|secs| match secs.parse::<u64>() {
            Ok(secs) => Ok(Duration::from_secs(secs)),
            _ => Err(format!(
                "reconnect-timeout must be whole seconds, not {secs:?}"
            )),
        })
        .transpose()?;
    let backend_uid = AllowedBackend::from_option(list.get(BACKEND_UID_KEY))?.also_uid;
    Ok(BlkSpec {
        source,
        id: id.map(str::to_string),
        num_queues,
        queue_size,
        readonly: list.flag("readonly"),
        mode,
        reconnect_timeout,
        backend_uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(value: &str) -> String {
        match value.parse::<BlkSpec>() {
            Ok(spec) => panic!("{value:?} parsed as {spec:?}"),
            Err(err) => {
                assert!(err.is_usage());
                let message = err.to_string();
                assert!(!message.contains('\n'), "{message}");
                message
            }
        }
    }

    #[test]
    fn minimal_socket_and_image() {
        assert_eq!(
            "socket=/run/blk.sock".parse::<BlkSpec>().unwrap(),
            BlkSpec {
                source: BlkSource::Socket("/run/blk.sock".into()),
                id: None,
                num_queues: None,
                queue_size: DEFAULT_QUEUE_SIZE,
                readonly: false,
                mode: BlkMode::VhostUser,
                reconnect_timeout: None,
                backend_uid: None,
            }
        );
        let spec: BlkSpec = "image=disk.img".parse().unwrap();
        assert_eq!(spec.source, BlkSource::Image("disk.img".into()));
    }

    #[test]
    fn every_option() {
        let spec: BlkSpec =
            "readonly,queue-size=32768,image=/a=b.img,num-queues=64,id=root-disk_1.0,reconnect-timeout=30,backend-uid=65534"
                .parse()
                .unwrap();
        assert_eq!(
            spec,
            BlkSpec {
                source: BlkSource::Image("/a=b.img".into()),
                id: Some("root-disk_1.0".into()),
                num_queues: Some(64),
                queue_size: 32768,
                readonly: true,
                mode: BlkMode::VhostUser,
                reconnect_timeout: Some(Duration::from_secs(30)),
                backend_uid: Some(65534),
            }
        );
        let spec: BlkSpec = "socket=s,queue-size=2,num-queues=1".parse().unwrap();
        assert_eq!((spec.queue_size, spec.num_queues), (2, Some(1)));
    }

    #[test]
    fn every_mode_by_name() {
        for mode in BlkMode::ALL {
            let spec: BlkSpec = format!("image=d.img,mode={mode}").parse().unwrap();
            assert_eq!(spec.mode, mode);
        }
        let spec: BlkSpec = "socket=s,mode=vhost-user".parse().unwrap();
        assert_eq!(spec.mode, BlkMode::VhostUser);
    }

    #[test]
    fn malformed_values_are_usage_errors() {
        let cases = [
            ("socket=s,colour=red", "unknown key \"colour\""),
            ("socket=s,", "unknown key \"\""),
            ("", "unknown key \"\""),
            ("id=x", "missing socket=PATH or image=PATH"),
            ("readonly", "missing socket=PATH or image=PATH"),
            ("socket=s,image=i", "not both"),
            ("socket=s,reconnect-timeout=1.5", "whole seconds"),
            ("socket=s,reconnect-timeout=-1", "whole seconds"),
            ("socket=s,backend-uid=nobody", "numeric uid"),
            ("socket=s,backend-uid=-1", "numeric uid"),
            ("socket=", "socket needs a value"),
            ("socket", "socket needs a value"),
            ("socket=a,socket=b", "socket given twice"),
            ("socket=s,readonly,readonly", "readonly given twice"),
            ("socket=s,readonly=yes", "readonly takes no value"),
            ("socket=s,num-queues=0", "num-queues must be 1..=64"),
            ("socket=s,num-queues=65", "num-queues must be 1..=64"),
            ("socket=s,num-queues=two", "num-queues must be"),
            ("socket=s,queue-size=0", "queue-size must be a power of two"),
            ("socket=s,queue-size=1", "power of two in 2..=32768"),
            (
                "socket=s,queue-size=100",
                "queue-size must be a power of two",
            ),
            (
                "socket=s,queue-size=65536",
                "queue-size must be a power of two",
            ),
            (
                "socket=s,queue-size=-8",
                "queue-size must be a power of two",
            ),
            ("socket=s,id=a b", "id \"a b\" may only hold"),
            ("image=i,mode=fast", "unknown mode \"fast\""),
            ("image=i,mode=", "mode needs a value"),
            (
                "image=i,mode=vhost-user,mode=vhost-user",
                "mode given twice",
            ),
            ("socket=s,mode=emulated-legacy", "needs image=PATH"),
            ("socket=s,mode=emulated-virtio", "needs image=PATH"),
            ("socket=s,mode=vhost-user-poll", "needs image=PATH"),
            ("image=i,mode=emulated-legacy,num-queues=2", "has no queues"),
        ];
        for (value, expected) in cases {
            let message = reason(value);
            assert!(message.contains(expected), "{value:?}: {message}");
            assert!(message.starts_with("invalid --blk value"), "{message}");
        }
    }
}
