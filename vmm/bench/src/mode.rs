//! The disk modes `pvstack bench` compares: pvstack's own (the VMM's
//! emulated devices and pvstack-blk over vhost-user), QEMU's
//! qemu-storage-daemon as the peer vhost-user backend, and the host
//! itself (fio on the image, no VM): the ceiling.

use std::fmt;
use std::str::FromStr;

use pvstack_devices::blk::BlkMode;

/// Where one row's requests are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskMode {
    /// A `--blk mode=` of pvstack's.
    Pvstack(BlkMode),
    /// qemu-storage-daemon, configured at its best for the image's
    /// storage, over vhost-user.
    Qsd,
    /// fio on the host with the same pattern on the same file.
    Host,
}

impl DiskMode {
    /// Every mode, in the order reports show them.
    pub const ALL: [DiskMode; 6] = [
        DiskMode::Pvstack(BlkMode::EmulatedLegacy),
        DiskMode::Pvstack(BlkMode::EmulatedVirtio),
        DiskMode::Pvstack(BlkMode::VhostUser),
        DiskMode::Pvstack(BlkMode::VhostUserPoll),
        DiskMode::Qsd,
        DiskMode::Host,
    ];

    /// The name `--modes` takes and reports show.
    pub fn name(self) -> &'static str {
        match self {
            DiskMode::Pvstack(mode) => mode.name(),
            DiskMode::Qsd => "qsd",
            DiskMode::Host => "host",
        }
    }

    /// How many queues it can serve; `None` for no limit worth naming.
    pub fn max_queues(self) -> Option<u16> {
        (self == DiskMode::Pvstack(BlkMode::EmulatedLegacy)).then_some(1)
    }
}

impl fmt::Display for DiskMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DiskMode {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        DiskMode::ALL
            .into_iter()
            .find(|mode| mode.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = DiskMode::ALL.iter().map(|m| m.name()).collect();
                format!("unknown disk mode {name:?} (expected {})", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for mode in DiskMode::ALL {
            assert_eq!(mode.name().parse::<DiskMode>(), Ok(mode));
        }
        assert_eq!(
            "vhost-user-poll".parse(),
            Ok(DiskMode::Pvstack(BlkMode::VhostUserPoll))
        );
        let err = "turbo".parse::<DiskMode>().unwrap_err();
        assert!(err.contains("qsd") && err.contains("host"), "{err}");
        assert_eq!(
            DiskMode::Pvstack(BlkMode::EmulatedLegacy).max_queues(),
            Some(1)
        );
        assert_eq!(DiskMode::Qsd.max_queues(), None);
    }
}
