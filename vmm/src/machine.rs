//! What the vCPU threads of one running VM share.

use std::sync::Arc;
use std::time::Instant;

use pvstack_devices::bus::Bus;
use pvstack_protocols::boot::BootInfo;

use crate::console::Console;
use crate::counters::ExitCounters;
use crate::lifecycle::Lifecycle;
use crate::memory::GuestMemory;

/// The running VM as its vCPU threads see it.
pub struct Machine {
    pub memory: GuestMemory,
    /// Device register windows; fixed once the VM runs.
    pub bus: Bus,
    /// Device I/O ports (a Linux guest's legacy PC devices); fixed once
    /// the VM runs.
    pub pio: Bus,
    /// Whether the guest is Linux (a triple fault is its reset) rather
    /// than pvstack's own guest (a triple fault is a crash).
    pub linux: bool,
    /// What BOOT_INFO hands the guest.
    pub boot_info: BootInfo,
    pub console: Console,
    pub counters: ExitCounters,
    pub lifecycle: Arc<Lifecycle>,
    /// When VM creation began; TIME_NS counts from here.
    pub created: Instant,
    /// Guest time (TIME_NS) that had passed before `created`: what a
    /// restored or taken-over VM had counted in its earlier life.
    pub time_base_ns: u64,
}

impl Machine {
    /// The guest's TIME_NS clock: nanoseconds of guest life.
    pub fn time_ns(&self) -> u64 {
        let since_created = u64::try_from(self.created.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.time_base_ns.saturating_add(since_created)
    }
}
