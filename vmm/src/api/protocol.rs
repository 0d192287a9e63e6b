//! The control API's messages (see vmm/API.md): one JSON request object
//! per line, one JSON response object per line. They live in the VMM
//! crate rather than in protocols/ because protocols must stay free of
//! dependencies and features: a serde feature there would be unified into
//! the no_std guest's build by a workspace build and drag std into it.

use serde::{Deserialize, Serialize};

/// Version of the API; every response carries it. Bumped when a request
/// or a response changes incompatibly; additions keep it.
pub const API_VERSION: u32 = 1;

/// Longest request line the server reads; a longer one is refused.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// One request. Variants without arguments are empty structs so that
/// an unexpected field is refused for them too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The VM's state, vCPUs, memory and devices.
    Info {},
    /// Stop running the vCPUs (devices keep serving what is queued).
    Pause {},
    /// Run the vCPUs again.
    Resume {},
    /// End the VM; `pvstack run` exits with status 0.
    Shutdown {},
    /// Move device `id` to the backend listening on `socket`; with
    /// `pause_vcpus`, the vCPUs stop from when the new backend is
    /// connected until it has served.
    DeviceSwap {
        id: String,
        socket: String,
        #[serde(default)]
        pause_vcpus: bool,
    },
    /// Disconnect device `id` from its backend and connect again.
    DeviceReconnect { id: String },
    /// Write the VM's state and RAM to the directory `to`, then resume
    /// (`resume`) or stay paused.
    Snapshot {
        to: String,
        #[serde(default)]
        resume: bool,
    },
    /// Hand the running VM over to a new pvstack process started from
    /// `binary`; this one exits once the new one runs the guest.
    Upgrade { binary: String },
}

/// One response: `ok` with a `result`, or not with an `error` message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub api_version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Reply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// A successful response.
    pub fn ok(result: Reply) -> Self {
        Response {
            api_version: API_VERSION,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A failed response with its message.
    pub fn error(message: impl Into<String>) -> Self {
        Response {
            api_version: API_VERSION,
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }
}

/// What a successful request returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// `info`.
    Info(VmInfo),
    /// `device-swap` and `device-reconnect`: how long the rings were held.
    Stall { device: String, stall_us: u64 },
    /// `snapshot`: what was written and how long the VM was paused.
    Snapshot {
        dir: String,
        memory_bytes: u64,
        data_bytes: u64,
        paused_us: u64,
        state: VmState,
    },
    /// `upgrade`: the process that now runs the VM, and how long the
    /// guest was paused (from pause to the new process's resume) and
    /// how long each step of that pause took (`new:` steps in the new
    /// process).
    Upgrade {
        pid: u32,
        paused_us: u64,
        #[serde(default)]
        phases: Vec<crate::snapshot::phases::Phase>,
    },
    /// `pause`, `resume`, `shutdown`: the VM's state afterwards. Last:
    /// the untagged replies above also carry a state.
    State { state: VmState },
}

/// The VM's run state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Running,
    Paused,
    ShuttingDown,
}

/// `info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub devices: Vec<DeviceInfo>,
}

/// One device in `info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: String,
    /// `vhost-user-blk`.
    pub kind: String,
    /// The backend's socket.
    pub socket: String,
    /// The backend process, if pvstack started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_pid: Option<u32>,
    /// `connected`, `reconnecting` or `failed`.
    pub backend_state: String,
    /// Whether the driver runs the device.
    pub active: bool,
    /// Whether the backend keeps an inflight log (INFLIGHT_SHMFD).
    pub inflight_log: bool,
    pub swaps: StallCounters,
    pub refused_swaps: u64,
    pub reconnects: StallCounters,
}

/// A count with the stalls its events caused, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StallCounters {
    pub count: u64,
    pub last_stall_us: u64,
    pub max_stall_us: u64,
    pub p99_stall_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_by_command_name() {
        let parse = |text: &str| serde_json::from_str::<Request>(text);
        assert_eq!(parse(r#"{"command":"info"}"#).unwrap(), Request::Info {});
        assert_eq!(
            parse(r#"{"command":"device-swap","id":"blk0","socket":"/s"}"#).unwrap(),
            Request::DeviceSwap {
                id: "blk0".into(),
                socket: "/s".into(),
                pause_vcpus: false,
            }
        );
        assert_eq!(
            parse(r#"{"command":"device-swap","id":"blk0","socket":"/s","pause_vcpus":true}"#)
                .unwrap(),
            Request::DeviceSwap {
                id: "blk0".into(),
                socket: "/s".into(),
                pause_vcpus: true,
            }
        );
        assert!(
            parse(r#"{"command":"device-swap","id":"b","socket":"/s","pause_vcpus":1}"#).is_err()
        );
        assert!(parse(r#"{"command":"reboot"}"#).is_err());
        assert!(parse(r#"{"command":"device-swap","id":"blk0"}"#).is_err());
        assert!(parse(r#"{"command":"info","extra":1}"#).is_err());
        assert!(parse("not json").is_err());
    }

    #[test]
    fn responses_carry_the_version() {
        let text = serde_json::to_string(&Response::error("no such device")).unwrap();
        assert_eq!(
            text,
            r#"{"api_version":1,"ok":false,"error":"no such device"}"#
        );
        let ok = Response::ok(Reply::State {
            state: VmState::Paused,
        });
        let text = serde_json::to_string(&ok).unwrap();
        assert_eq!(
            text,
            r#"{"api_version":1,"ok":true,"result":{"state":"paused"}}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), ok);
    }
}
