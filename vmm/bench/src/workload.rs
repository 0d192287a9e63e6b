//! The guest workloads `pvstack bench` runs: disk workloads as `blk-bench`
//! command lines, network workloads as `net-bench` ones.

use std::fmt;
use std::str::FromStr;

/// The guest's address on the benchmark's network (the host side of the
/// TAP is [`NET_HOST`] in the same /24).
pub const NET_GUEST_CIDR: &str = "10.0.0.2/24";
/// The host side of the benchmark's TAP, where the sinks listen.
pub const NET_HOST: &str = "10.0.0.1";
/// Port of the host's TCP sink.
pub const NET_TCP_PORT: u16 = 5001;
/// Port of the host's UDP counter.
pub const NET_UDP_PORT: u16 = 5002;
/// Payload bytes of each datagram of `net-udp-64`.
pub const NET_UDP_SIZE: u64 = 64;

/// One benchmark workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// 4 KiB random reads, one in flight: latency bound.
    RandRead4kQd1,
    /// 4 KiB random reads, 32 in flight: request-rate bound.
    RandRead4kQd32,
    /// 64 KiB sequential writes, one in flight.
    SeqWrite64k,
    /// 1 MiB sequential reads, one in flight: bandwidth bound.
    SeqRead1m,
    /// One TCP connection from the guest to a host sink: bandwidth bound.
    NetTcpTx,
    /// 64-byte UDP datagrams from the guest to a host counter: frame-rate
    /// bound.
    NetUdp64,
}

impl Workload {
    /// Every workload, in the order reports show them.
    pub const ALL: [Workload; 6] = [
        Workload::RandRead4kQd1,
        Workload::RandRead4kQd32,
        Workload::SeqWrite64k,
        Workload::SeqRead1m,
        Workload::NetTcpTx,
        Workload::NetUdp64,
    ];

    /// The name `--workloads` takes and reports show.
    pub fn name(self) -> &'static str {
        match self {
            Workload::RandRead4kQd1 => "4k-randread-qd1",
            Workload::RandRead4kQd32 => "4k-randread-qd32",
            Workload::SeqWrite64k => "64k-seqwrite",
            Workload::SeqRead1m => "1m-seqread",
            Workload::NetTcpTx => "net-tcp-tx",
            Workload::NetUdp64 => "net-udp-64",
        }
    }

    /// Whether it runs on a NIC (and `--net-modes`) rather than a disk.
    pub fn is_net(self) -> bool {
        matches!(self, Workload::NetTcpTx | Workload::NetUdp64)
    }

    /// The guest command line that runs it: disk and UDP workloads for
    /// `secs` seconds, TCP until `tcp_bytes` are sent.
    pub fn guest_args(self, secs: u64, tcp_bytes: u64) -> String {
        let (rw, bs, qd) = match self {
            Workload::RandRead4kQd1 => ("randread", "4K", 1),
            Workload::RandRead4kQd32 => ("randread", "4K", 32),
            Workload::SeqWrite64k => ("write", "64K", 1),
            Workload::SeqRead1m => ("read", "1M", 1),
            Workload::NetTcpTx => {
                return format!(
                    "net-bench ip={NET_GUEST_CIDR} target={NET_HOST} proto=tcp \
                     port={NET_TCP_PORT} bytes={tcp_bytes}"
                )
            }
            Workload::NetUdp64 => {
                return format!(
                    "net-bench ip={NET_GUEST_CIDR} target={NET_HOST} proto=udp \
                     port={NET_UDP_PORT} size={NET_UDP_SIZE} secs={secs}"
                )
            }
        };
        format!("blk-bench rw={rw} bs={bs} qd={qd} secs={secs}")
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = Workload::ALL.iter().map(|w| w.name()).collect();
                format!("unknown workload {name:?} (expected {})", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_guest_args() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>(), Ok(w));
        }
        assert!("8k".parse::<Workload>().unwrap_err().contains("1m-seqread"));
        assert!("8k".parse::<Workload>().unwrap_err().contains("net-udp-64"));
        assert_eq!(
            Workload::RandRead4kQd32.guest_args(3, 0),
            "blk-bench rw=randread bs=4K qd=32 secs=3"
        );
        assert_eq!(
            Workload::NetTcpTx.guest_args(3, 1 << 20),
            "net-bench ip=10.0.0.2/24 target=10.0.0.1 proto=tcp port=5001 bytes=1048576"
        );
        assert_eq!(
            Workload::NetUdp64.guest_args(3, 1 << 20),
            "net-bench ip=10.0.0.2/24 target=10.0.0.1 proto=udp port=5002 size=64 secs=3"
        );
        assert!(Workload::NetUdp64.is_net() && !Workload::SeqRead1m.is_net());
    }
}
