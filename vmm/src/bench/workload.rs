//! The guest workloads `pvstack bench` runs, as `blk-bench` command lines.

use std::fmt;
use std::str::FromStr;

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
}

impl Workload {
    /// Every workload, in the order reports show them.
    pub const ALL: [Workload; 4] = [
        Workload::RandRead4kQd1,
        Workload::RandRead4kQd32,
        Workload::SeqWrite64k,
        Workload::SeqRead1m,
    ];

    /// The name `--workloads` takes and reports show.
    pub fn name(self) -> &'static str {
        match self {
            Workload::RandRead4kQd1 => "4k-randread-qd1",
            Workload::RandRead4kQd32 => "4k-randread-qd32",
            Workload::SeqWrite64k => "64k-seqwrite",
            Workload::SeqRead1m => "1m-seqread",
        }
    }

    /// The guest command line that runs it for `secs` seconds.
    pub fn guest_args(self, secs: u64) -> String {
        let (rw, bs, qd) = match self {
            Workload::RandRead4kQd1 => ("randread", "4K", 1),
            Workload::RandRead4kQd32 => ("randread", "4K", 32),
            Workload::SeqWrite64k => ("write", "64K", 1),
            Workload::SeqRead1m => ("read", "1M", 1),
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
        assert_eq!(
            Workload::RandRead4kQd32.guest_args(3),
            "blk-bench rw=randread bs=4K qd=32 secs=3"
        );
    }
}
