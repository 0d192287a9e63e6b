//! The guest workloads `pvstack bench` runs: disk workloads as `blk-bench`
//! command lines (and, for the host row, the same pattern for fio),
//! network workloads as `net-bench` ones.

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
    /// 4 KiB random reads, 16 in flight on each of two queues (32 in
    /// all): how a mode scales from one queue to two.
    RandRead4kQd32Queues2,
    /// 4 KiB random writes, 32 in flight.
    RandWrite4kQd32,
    /// 64 KiB sequential writes, one in flight.
    SeqWrite64k,
    /// 1 MiB sequential reads, one in flight: bandwidth bound.
    SeqRead1m,
    /// 1 MiB sequential writes, one in flight: bandwidth bound.
    SeqWrite1m,
    /// One TCP connection from the guest to a host sink: bandwidth bound.
    NetTcpTx,
    /// 64-byte UDP datagrams from the guest to a host counter: frame-rate
    /// bound.
    NetUdp64,
}

/// What a disk workload does: the same for the guest's `blk-bench` and
/// for fio on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskPattern {
    /// `randread`, `randwrite`, `read` or `write` (blk-bench's and fio's
    /// names agree).
    pub rw: &'static str,
    /// Bytes per request.
    pub bs: u32,
    /// Requests in flight on each queue.
    pub qd: u32,
    /// Queues the guest drives (fio: jobs, one per queue).
    pub queues: u16,
}

impl Workload {
    /// Every workload, in the order reports show them.
    pub const ALL: [Workload; 9] = [
        Workload::RandRead4kQd1,
        Workload::RandRead4kQd32,
        Workload::RandRead4kQd32Queues2,
        Workload::RandWrite4kQd32,
        Workload::SeqWrite64k,
        Workload::SeqRead1m,
        Workload::SeqWrite1m,
        Workload::NetTcpTx,
        Workload::NetUdp64,
    ];

    /// The name `--workloads` takes and reports show.
    pub fn name(self) -> &'static str {
        match self {
            Workload::RandRead4kQd1 => "4k-randread-qd1",
            Workload::RandRead4kQd32 => "4k-randread-qd32",
            Workload::RandRead4kQd32Queues2 => "4k-randread-qd32-2q",
            Workload::RandWrite4kQd32 => "4k-randwrite-qd32",
            Workload::SeqWrite64k => "64k-seqwrite",
            Workload::SeqRead1m => "1m-seqread",
            Workload::SeqWrite1m => "1m-seqwrite",
            Workload::NetTcpTx => "net-tcp-tx",
            Workload::NetUdp64 => "net-udp-64",
        }
    }

    /// Whether it runs on a NIC (and `--net-modes`) rather than a disk.
    pub fn is_net(self) -> bool {
        self.disk_pattern().is_none()
    }

    /// What a disk workload does; `None` for a network one.
    pub fn disk_pattern(self) -> Option<DiskPattern> {
        let (rw, bs, qd, queues) = match self {
            Workload::RandRead4kQd1 => ("randread", 4096, 1, 1),
            Workload::RandRead4kQd32 => ("randread", 4096, 32, 1),
            Workload::RandRead4kQd32Queues2 => ("randread", 4096, 16, 2),
            Workload::RandWrite4kQd32 => ("randwrite", 4096, 32, 1),
            Workload::SeqWrite64k => ("write", 64 << 10, 1, 1),
            Workload::SeqRead1m => ("read", 1 << 20, 1, 1),
            Workload::SeqWrite1m => ("write", 1 << 20, 1, 1),
            Workload::NetTcpTx | Workload::NetUdp64 => return None,
        };
        Some(DiskPattern { rw, bs, qd, queues })
    }

    /// The guest command line that runs it: disk and UDP workloads for
    /// `secs` seconds, TCP until `tcp_bytes` are sent.
    pub fn guest_args(self, secs: u64, tcp_bytes: u64) -> String {
        if let Some(DiskPattern { rw, bs, qd, queues }) = self.disk_pattern() {
            return format!("blk-bench rw={rw} bs={bs} qd={qd} queues={queues} secs={secs}");
        }
        if self == Workload::NetTcpTx {
            format!(
                "net-bench ip={NET_GUEST_CIDR} target={NET_HOST} proto=tcp \
                 port={NET_TCP_PORT} bytes={tcp_bytes}"
            )
        } else {
            format!(
                "net-bench ip={NET_GUEST_CIDR} target={NET_HOST} proto=udp \
                 port={NET_UDP_PORT} size={NET_UDP_SIZE} secs={secs}"
            )
        }
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
            "blk-bench rw=randread bs=4096 qd=32 queues=1 secs=3"
        );
        assert_eq!(
            Workload::RandRead4kQd32Queues2.guest_args(3, 0),
            "blk-bench rw=randread bs=4096 qd=16 queues=2 secs=3"
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

    #[test]
    fn the_two_queue_workload_keeps_the_total_depth() {
        let one = Workload::RandRead4kQd32.disk_pattern().unwrap();
        let two = Workload::RandRead4kQd32Queues2.disk_pattern().unwrap();
        assert_eq!(one.qd * u32::from(one.queues), 32);
        assert_eq!(two.qd * u32::from(two.queues), 32);
        assert_eq!((one.rw, one.bs), (two.rw, two.bs));
    }
}
