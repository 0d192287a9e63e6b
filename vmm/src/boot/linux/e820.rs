//! The e820 memory map a Linux guest gets (in boot_params, or as the PVH
//! memory map): RAM below the EBDA, the EBDA and BIOS area reserved (the
//! ACPI tables live there), RAM from 1 MiB to the MMIO hole and beyond it.
//! The hole itself is not listed: the ACPI tables describe the devices in
//! it.

use pvstack_protocols::layout;

use super::layout::{EBDA_START, HIGH_MEMORY_START};

/// e820 types (Linux's E820_TYPE_*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ram = 1,
    Reserved = 2,
}

/// One range of the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: Kind,
}

/// The map of a VM with `mem_size` bytes of RAM (at least
/// `layout::MIN_MEMORY`).
pub fn memory_map(mem_size: u64) -> Vec<Entry> {
    let entry = |addr, end: u64, kind| Entry {
        addr,
        size: end - addr,
        kind,
    };
    let [(low_start, low_len), (high_start, high_len)] = layout::ram_ranges(mem_size);
    let mut map = vec![
        entry(low_start, EBDA_START, Kind::Ram),
        entry(EBDA_START, HIGH_MEMORY_START, Kind::Reserved),
        entry(HIGH_MEMORY_START, low_start + low_len, Kind::Ram),
    ];
    if high_len > 0 {
        map.push(entry(high_start, high_start + high_len, Kind::Ram));
    }
    map
}

/// The end of the RAM below the MMIO hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    let [(start, len), _] = layout::ram_ranges(mem_size);
    start + len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_has_no_high_ram() {
        let map = memory_map(256 << 20);
        assert_eq!(
            map,
            vec![
                Entry {
                    addr: 0,
                    size: 0x9_fc00,
                    kind: Kind::Ram
                },
                Entry {
                    addr: 0x9_fc00,
                    size: 0x6_0400,
                    kind: Kind::Reserved
                },
                Entry {
                    addr: 0x10_0000,
                    size: (256 << 20) - 0x10_0000,
                    kind: Kind::Ram
                },
            ]
        );
        assert_eq!(low_ram_end(256 << 20), 256 << 20);
    }

    #[test]
    fn large_memory_continues_above_4g_and_adds_up() {
        let size = 5u64 << 30;
        let map = memory_map(size);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, layout::LOW_RAM_END);
        assert_eq!(map[3].addr, layout::HIGH_RAM_START);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == Kind::Ram)
            .map(|e| e.size)
            .sum();
        // Everything but the reserved BIOS area is RAM.
        assert_eq!(ram, size - (HIGH_MEMORY_START - EBDA_START));
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{map:?}");
        }
    }
}
