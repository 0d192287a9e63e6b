//! [`NetSpec`]: one `--net` option value,
//! `socket=PATH[,id=ID][,mac=MAC][,mtu=N][,queue-size=N][,backend-uid=UID]` or
//! `tap=NAME[,mode=vhost-user|emulated][,...the same options]`.

use std::path::PathBuf;
use std::str::FromStr;

use pvstack_options::{check_id, parse_queue_size, Keys, OptionList};

use crate::error::Error;
use crate::vhost_user::peer::BACKEND_UID_KEY;
use crate::vhost_user::{AllowedBackend, BackendProcess, BackendSpec, VhostUserHandle};

/// Queue size when `queue-size` is not given.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// MTU when `mtu` is not given.
pub const DEFAULT_MTU: u16 = 1500;
/// Smallest MTU IPv4 allows.
const MIN_MTU: u16 = 68;
/// Linux's limit on interface names, with the terminating NUL.
const IFNAMSIZ: usize = 16;

/// Where the device's frames are handled (`mode=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NetMode {
    /// A pvstack-net (or other vhost-user) backend serves the queues.
    #[default]
    VhostUser,
    /// The VMM serves the queues itself on each QueueNotify exit, with a
    /// TAP it opens: the baseline the vhost-user path is measured against.
    Emulated,
}

impl NetMode {
    /// The name `mode=` takes.
    pub fn name(self) -> &'static str {
        match self {
            NetMode::VhostUser => "vhost-user",
            NetMode::Emulated => "emulated",
        }
    }
}

impl std::fmt::Display for NetMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the device's backend comes from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NetSource {
    /// A backend already listening on this vhost-user socket.
    Socket(PathBuf),
    /// This TAP device, served by a pvstack-net that pvstack starts (or,
    /// with `mode=emulated`, by the VMM).
    Tap(String),
}

/// One network device as the command line describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetSpec {
    pub source: NetSource,
    /// Name in logs and the control API; `net<index>` if not given.
    pub id: Option<String>,
    /// The MAC address in the configuration space; derived from the
    /// process id and device index if not given.
    pub mac: Option<[u8; 6]>,
    /// The MTU in the configuration space.
    pub mtu: u16,
    /// Largest size of each queue.
    pub queue_size: u16,
    pub mode: NetMode,
    /// A user besides pvstack's own and root whose backend may serve the
    /// NIC (`backend-uid=`).
    pub backend_uid: Option<u32>,
}

impl BackendSpec for NetSpec {
    fn connect(&self) -> crate::error::Result<(VhostUserHandle, Option<BackendProcess>)> {
        super::connect(self)
    }

    /// Whose backends may serve the NIC.
    fn allowed_backend(&self) -> AllowedBackend {
        AllowedBackend {
            also_uid: self.backend_uid,
        }
    }
}

impl FromStr for NetSpec {
    type Err = Error;

    fn from_str(value: &str) -> Result<Self, Error> {
        parse(value).map_err(|reason| Error::InvalidOption {
            option: "net",
            value: value.to_string(),
            reason,
        })
    }
}

/// Parses `52:54:00:12:34:56`; refuses multicast addresses, which a NIC
/// cannot have.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().unwrap_or("");
        *byte = match (part.len(), u8::from_str_radix(part, 16)) {
            (2, Ok(b)) => b,
            _ => {
                return Err(format!(
                    "mac {text:?} is not six hex bytes like 52:54:00:12:34:56"
                ))
            }
        };
    }
    if parts.next().is_some() {
        return Err(format!("mac {text:?} has more than six bytes"));
    }
    if mac[0] & 1 != 0 {
        return Err(format!("mac {text:?} is a multicast address"));
    }
    Ok(mac)
}

/// The keys `--net` takes.
const KEYS: Keys = Keys {
    valued: &[
        "socket",
        "tap",
        "id",
        "mac",
        "mtu",
        "queue-size",
        "mode",
        BACKEND_UID_KEY,
    ],
    flags: &[],
};

fn parse(value: &str) -> Result<NetSpec, String> {
    let list = OptionList::parse(value, KEYS)?;
    let (socket, tap) = (list.get("socket"), list.get("tap"));
    let source = match (socket, tap) {
        (Some(socket), None) => NetSource::Socket(socket.into()),
        (None, Some(tap)) => {
            if tap.len() >= IFNAMSIZ
                || tap.contains(['/', ':'])
                || tap.contains(char::is_whitespace)
            {
                return Err(format!(
                    "tap {tap:?} is not a valid interface name (1-15 bytes, no '/', ':' or spaces)"
                ));
            }
            NetSource::Tap(tap.to_string())
        }
        (Some(_), Some(_)) => return Err("give socket= or tap=, not both".to_string()),
        (None, None) => return Err("missing socket=PATH or tap=NAME".to_string()),
    };
    let mode = match list.get("mode") {
        None | Some("vhost-user") => NetMode::VhostUser,
        Some("emulated") => NetMode::Emulated,
        Some(other) => {
            return Err(format!(
                "unknown mode {other:?} (expected vhost-user or emulated)"
            ))
        }
    };
    if mode == NetMode::Emulated && !matches!(source, NetSource::Tap(_)) {
        return Err("mode=emulated needs tap=NAME: the VMM opens the TAP itself".to_string());
    }
    let id = list.get("id");
    id.map(check_id).transpose()?;
    let mac = list.get("mac").map(parse_mac).transpose()?;
    let mtu = match list.get("mtu") {
        None => DEFAULT_MTU,
        Some(n) => match n.parse::<u16>() {
            Ok(n) if n >= MIN_MTU => n,
            _ => return Err(format!("mtu must be {MIN_MTU}..=65535, not {n:?}")),
        },
    };
    let queue_size = list
        .get("queue-size")
        .map_or(Ok(DEFAULT_QUEUE_SIZE), parse_queue_size)?;
    let backend_uid = AllowedBackend::from_option(list.get(BACKEND_UID_KEY))?.also_uid;
    Ok(NetSpec {
        source,
        id: id.map(str::to_string),
        mac,
        mtu,
        queue_size,
        mode,
        backend_uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(value: &str) -> String {
        match value.parse::<NetSpec>() {
            Ok(spec) => panic!("{value:?} parsed as {spec:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn full_spec() {
        let spec: NetSpec = "tap=tap0,mac=52:54:00:aa:bb:cc,mtu=9000,id=n0,queue-size=512"
            .parse()
            .unwrap();
        assert_eq!(spec.source, NetSource::Tap("tap0".into()));
        assert_eq!(spec.mac, Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(spec.mtu, 9000);
        assert_eq!(spec.queue_size, 512);
        assert_eq!(spec.id.as_deref(), Some("n0"));
        assert_eq!(spec.mode, NetMode::VhostUser);
        let spec: NetSpec = "socket=/run/n.sock".parse().unwrap();
        assert_eq!(spec.source, NetSource::Socket("/run/n.sock".into()));
        assert_eq!((spec.mtu, spec.mac), (DEFAULT_MTU, None));
        assert_eq!(spec.allowed_backend(), AllowedBackend::default());
        let spec: NetSpec = "socket=/run/n.sock,backend-uid=65534".parse().unwrap();
        assert_eq!(spec.backend_uid, Some(65534));
    }

    #[test]
    fn bad_specs_are_explained() {
        assert!(reason("tap=a234567890123456").contains("not a valid interface name"));
        assert!(reason("mac=52:54:00:aa:bb:cc").contains("missing socket"));
        assert!(reason("tap=t,mac=53:54:00:aa:bb:cc").contains("multicast"));
        assert!(reason("tap=t,mac=52:54:00:aa:bb").contains("six hex bytes"));
        assert!(reason("tap=t,mtu=10").contains("mtu"));
        assert!(reason("socket=s,mode=emulated").contains("needs tap="));
        assert!(reason("tap=t,tap=u").contains("twice"));
        assert!(reason("tap=t,speed=1").contains("unknown key"));
        assert!(reason("socket=s,backend-uid=nobody").contains("numeric uid"));
    }
}
