//! The network rows of `pvstack bench`: `net-bench` in a guest whose NIC
//! (pvstack-net over vhost-user, or the VMM's emulated virtio-net) sits on
//! the TAP of the benchmark's own namespace, sending to the host's sinks.

use std::path::Path;
use std::time::Duration;

use pvstack_devices::net::NetMode;

use super::child::{cpu_s_per_gib, field, interrupts_per_request, Sample, VmRun};
use super::netns::{BenchNetns, TAP};
use super::sink::{Sinks, TcpConnection};
use super::workload::{Workload, NET_UDP_SIZE};
use crate::error::Result;

/// How long the TCP sink may take to see the end of a connection after
/// the guest reported it done (the guest waits for the host's FIN-ACK, so
/// normally it already has).
const TCP_SINK_GRACE: Duration = Duration::from_secs(10);

/// The NIC modes `--net-modes` takes, by their `--net mode=` names.
pub fn parse_net_mode(name: &str) -> std::result::Result<NetMode, String> {
    [NetMode::VhostUser, NetMode::Emulated]
        .into_iter()
        .find(|m| m.name() == name)
        .ok_or_else(|| format!("unknown net mode {name:?} (expected vhost-user, emulated)"))
}

/// What to run.
pub struct NetRunSpec<'a> {
    pub pvstack: &'a Path,
    pub kernel: Option<&'a Path>,
    pub mode: NetMode,
    pub workload: Workload,
    pub secs: u64,
    pub tcp_bytes: u64,
}

/// The namespace and the sinks the network runs share. Field order is drop
/// order: the sinks stop before the namespace goes.
pub struct NetBench {
    sinks: Sinks,
    netns: BenchNetns,
}

/// What the host saw of one run.
enum HostSide {
    Tcp(Option<TcpConnection>),
    Udp { datagrams: u64 },
}

impl NetBench {
    /// Creates the namespace with its TAP and starts the sinks in it.
    pub fn start() -> Result<NetBench> {
        let netns = BenchNetns::create()?;
        let sinks = Sinks::start(&netns)?;
        Ok(NetBench { sinks, netns })
    }

    /// Runs `spec` once and checks what the guest reported against what
    /// the host received.
    pub fn run_once(&self, spec: &NetRunSpec<'_>) -> Result<Sample> {
        let run = VmRun {
            pvstack: spec.pvstack,
            kernel: spec.kernel,
            netns: Some(self.netns.name()),
            devices: vec![
                "--net".into(),
                format!("tap={TAP},mode={}", spec.mode).into(),
            ],
            guest_args: spec.workload.guest_args(spec.secs, spec.tcp_bytes),
            started: "nic 0:",
            result: "RESULT net-bench",
            what: format!("{} {}", spec.mode, spec.workload),
            backend_pid: None,
        };
        self.sinks.clear_tcp();
        let udp_before = self.sinks.udp_datagrams();
        let out = run.run()?;
        let host = match spec.workload {
            Workload::NetTcpTx => HostSide::Tcp(self.sinks.take_tcp(TCP_SINK_GRACE)),
            _ => HostSide::Udp {
                datagrams: self.sinks.udp_datagrams() - udp_before,
            },
        };
        net_sample(
            &out.result,
            &host,
            out.cpu_seconds,
            interrupts_per_request(&out.log),
        )
        .map_err(|reason| run.failed(reason))
    }
}

/// A sample from the guest's RESULT line and the host's count: a request
/// is one frame from the guest (TCP: segments the host received; UDP:
/// datagrams the guest sent).
fn net_sample(
    line: &str,
    host: &HostSide,
    cpu_seconds: f64,
    interrupts_per_req: Option<f64>,
) -> std::result::Result<Sample, String> {
    let usecs = field(line, "usecs")?.max(1.0);
    let kicks = field(line, "kicks")?;
    let (frames, bytes) = match host {
        HostSide::Tcp(connection) => {
            let sent = field(line, "bytes")? as u64;
            let connection = connection.ok_or("the host's TCP sink saw no finished connection")?;
            if connection.bytes != sent {
                return Err(format!(
                    "the guest sent {sent} bytes but the host's sink received {}",
                    connection.bytes
                ));
            }
            (connection.segments, sent)
        }
        HostSide::Udp { datagrams } => {
            if *datagrams == 0 {
                return Err(format!(
                    "the host's UDP counter received no datagram: {line}"
                ));
            }
            let frames = field(line, "packets")? as u64;
            (frames, frames * NET_UDP_SIZE)
        }
    };
    if frames == 0 {
        return Err(format!("no frames went out: {line}"));
    }
    Ok(Sample {
        ios: frames,
        bytes,
        iops: frames as f64 * 1e6 / usecs,
        mbps: bytes as f64 / usecs,
        exits_per_req: None,
        kicks_per_req: Some(kicks / frames as f64),
        interrupts_per_req,
        cpu_s_per_gib: cpu_s_per_gib(cpu_seconds, bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "RESULT net-bench proto=tcp bytes=1000000 usecs=500000 mbps=16.000 kicks=400";
    const UDP: &str =
        "RESULT net-bench proto=udp size=64 packets=5000 usecs=1000000 pps=5000.000 kicks=50";

    #[test]
    fn tcp_frames_are_the_segments_the_host_received() {
        let connection = TcpConnection {
            bytes: 1_000_000,
            segments: 800,
        };
        let s = net_sample(TCP, &HostSide::Tcp(Some(connection)), 1.0, None).unwrap();
        assert_eq!((s.ios, s.bytes), (800, 1_000_000));
        assert_eq!(s.iops, 1600.0);
        assert_eq!(s.mbps, 2.0);
        assert_eq!(s.kicks_per_req, Some(0.5));
        assert_eq!(s.exits_per_req, None);
        let short = TcpConnection {
            bytes: 999_999,
            segments: 800,
        };
        let err = net_sample(TCP, &HostSide::Tcp(Some(short)), 1.0, None).unwrap_err();
        assert!(err.contains("received 999999"), "{err}");
        let err = net_sample(TCP, &HostSide::Tcp(None), 1.0, None).unwrap_err();
        assert!(err.contains("no finished connection"), "{err}");
    }

    #[test]
    fn udp_frames_are_the_datagrams_the_guest_sent() {
        let s = net_sample(UDP, &HostSide::Udp { datagrams: 4990 }, 1.0, Some(0.1)).unwrap();
        assert_eq!((s.ios, s.bytes), (5000, 320_000));
        assert_eq!(s.iops, 5000.0);
        assert_eq!(s.kicks_per_req, Some(0.01));
        assert_eq!(s.interrupts_per_req, Some(0.1));
        let err = net_sample(UDP, &HostSide::Udp { datagrams: 0 }, 1.0, None).unwrap_err();
        assert!(err.contains("no datagram"), "{err}");
    }

    #[test]
    fn net_modes_parse_by_their_mode_names() {
        assert_eq!(parse_net_mode("emulated"), Ok(NetMode::Emulated));
        assert_eq!(parse_net_mode("vhost-user"), Ok(NetMode::VhostUser));
        assert!(parse_net_mode("tap").unwrap_err().contains("expected"));
    }
}
