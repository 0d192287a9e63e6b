//! [`MemoryTableGuard`]: the memory regions a frontend hands over
//! (SET_MEM_TABLE, ADD_MEM_REG), checked before the daemon maps them.
//!
//! vhost-user-backend maps each region as it is described: a region
//! larger than its file maps fine and kills the backend with SIGBUS on
//! the first access past the end, and regions that overlap (in guest
//! addresses or in the frontend's addresses, which ring addresses are
//! given in) make an address mean two places. The guard refuses such a
//! table whole, so the daemon never sees it.

use std::os::fd::AsFd;

use vhost::vhost_user::message::{FrontendReq, MAX_ATTACHED_FD_ENTRIES};

use crate::fds::check_mappable;
use crate::message_filter::Message;

/// Most regions a connection may add one by one: what vhost-user-backend
/// answers GET_MAX_MEM_SLOTS with.
pub const MAX_MEM_SLOTS: usize = 509;
/// Bytes of one region as the messages carry it: guest address, size,
/// frontend address, offset in the file.
const REGION_LEN: usize = 32;

/// One region of guest memory as the frontend described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    guest: u64,
    size: u64,
    user: u64,
    offset: u64,
}

impl Region {
    fn parse(bytes: &[u8]) -> Region {
        let word = |i: usize| {
            let mut field = [0u8; 8];
            field.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(field)
        };
        Region {
            guest: word(0),
            size: word(1),
            user: word(2),
            offset: word(3),
        }
    }

    /// Refuses a region of no size or one whose ranges wrap around.
    fn check_bounds(&self, n: usize) -> Result<(), String> {
        if self.size == 0 {
            return Err(format!("region {n} has no size"));
        }
        for (name, start) in [
            ("guest", self.guest),
            ("frontend", self.user),
            ("file", self.offset),
        ] {
            if start.checked_add(self.size).is_none() {
                return Err(format!(
                    "region {n}: {:#x} bytes from {name} address {start:#x} run past 2^64",
                    self.size
                ));
            }
        }
        Ok(())
    }

    fn overlaps(&self, other: &Region) -> Option<&'static str> {
        let meet = |a: u64, b: u64| a < b + other.size && b < a + self.size;
        if meet(self.guest, other.guest) {
            Some("guest")
        } else if meet(self.user, other.user) {
            Some("frontend")
        } else {
            None
        }
    }
}

/// The regions one connection's daemon holds, as far as the guard let
/// them through.
#[derive(Default)]
pub struct MemoryTableGuard {
    regions: Vec<Region>,
}

impl MemoryTableGuard {
    /// Checks a request before it reaches the daemon: `Err` says why a
    /// memory table or region is refused. Other requests pass.
    pub fn check(&mut self, message: &Message) -> Result<(), String> {
        let code = message.code();
        if code == FrontendReq::SET_MEM_TABLE as u32 {
            self.regions = table(message)?;
        } else if code == FrontendReq::ADD_MEM_REG as u32 {
            let region = single_region(message)?;
            check_file(message, &[region])?;
            if self.regions.len() >= MAX_MEM_SLOTS {
                return Err(format!("more than {MAX_MEM_SLOTS} regions"));
            }
            check_disjoint(&self.regions, &region, self.regions.len())?;
            self.regions.push(region);
        } else if code == FrontendReq::REM_MEM_REG as u32 {
            let region = single_region(message)?;
            self.regions
                .retain(|r| (r.guest, r.size, r.user) != (region.guest, region.size, region.user));
        }
        Ok(())
    }
}

/// SET_MEM_TABLE's regions, each checked and backed by its descriptor.
fn table(message: &Message) -> Result<Vec<Region>, String> {
    let payload = message.payload();
    let count = payload
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| format!("a {}-byte memory table", payload.len()))?;
    if count == 0 || count > MAX_ATTACHED_FD_ENTRIES {
        return Err(format!(
            "a memory table of {count} regions (1 to {MAX_ATTACHED_FD_ENTRIES})"
        ));
    }
    if payload.len() != 8 + count * REGION_LEN {
        return Err(format!(
            "a memory table of {count} regions in {} bytes",
            payload.len()
        ));
    }
    let mut regions = Vec::with_capacity(count);
    for (n, bytes) in payload[8..].chunks_exact(REGION_LEN).enumerate() {
        let region = Region::parse(bytes);
        region.check_bounds(n)?;
        check_disjoint(&regions, &region, n)?;
        regions.push(region);
    }
    check_file(message, &regions)?;
    Ok(regions)
}

/// ADD_MEM_REG's or REM_MEM_REG's region (after 8 bytes of padding).
fn single_region(message: &Message) -> Result<Region, String> {
    let payload = message.payload();
    if payload.len() != 8 + REGION_LEN {
        return Err(format!("a {}-byte memory region", payload.len()));
    }
    let region = Region::parse(&payload[8..]);
    region.check_bounds(0)?;
    Ok(region)
}

/// Refuses `region` (number `n`) if it overlaps any of `regions`.
fn check_disjoint(regions: &[Region], region: &Region, n: usize) -> Result<(), String> {
    for (m, other) in regions.iter().enumerate() {
        if let Some(space) = region.overlaps(other) {
            return Err(format!(
                "region {n} overlaps region {m} in {space} addresses"
            ));
        }
    }
    Ok(())
}

/// One descriptor per region, each a regular file holding all of it.
fn check_file(message: &Message, regions: &[Region]) -> Result<(), String> {
    let fds = message.fds();
    if fds.len() != regions.len() {
        return Err(format!(
            "{} regions came with {} descriptors",
            regions.len(),
            fds.len()
        ));
    }
    for (n, (region, fd)) in regions.iter().zip(fds).enumerate() {
        check_mappable(
            fd.as_fd(),
            region.offset,
            region.size,
            &format!("region {n}"),
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn memfd(len: u64) -> OwnedFd {
        let file = memfd::MemfdOptions::default()
            .create("mem-table-test")
            .unwrap()
            .into_file();
        file.set_len(len).unwrap();
        file.into()
    }

    /// (guest address, size, frontend address, file offset).
    type Described = (u64, u64, u64, u64);

    fn region_bytes(r: Described) -> Vec<u8> {
        [r.0, r.1, r.2, r.3]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// A SET_MEM_TABLE of `regions`, each with a memfd of the given size.
    fn set_table(regions: &[(Described, u64)]) -> Message {
        let mut payload = (regions.len() as u32).to_le_bytes().to_vec();
        payload.extend_from_slice(&[0; 4]);
        for (region, _) in regions {
            payload.extend(region_bytes(*region));
        }
        let fds = regions.iter().map(|(_, len)| memfd(*len)).collect();
        Message::with_fds(FrontendReq::SET_MEM_TABLE as u32, &payload, fds)
    }

    fn add_region(region: Described, file_len: u64) -> Message {
        let mut payload = vec![0; 8];
        payload.extend(region_bytes(region));
        Message::with_fds(
            FrontendReq::ADD_MEM_REG as u32,
            &payload,
            vec![memfd(file_len)],
        )
    }

    fn refused(guard: &mut MemoryTableGuard, message: Message) -> String {
        guard.check(&message).expect_err("refused")
    }

    #[test]
    fn an_honest_table_passes() {
        let mut guard = MemoryTableGuard::default();
        let table = set_table(&[
            ((0, 0x10000, 0x7f00_0000_0000, 0), 0x10000),
            ((0x10_0000, 0x1000, 0x7f00_1000_0000, 0x1000), 0x2000),
        ]);
        guard.check(&table).unwrap();
        guard
            .check(&add_region(
                (0x20_0000, 0x1000, 0x7f00_2000_0000, 0),
                0x1000,
            ))
            .unwrap();
        assert_eq!(guard.regions.len(), 3);
    }

    #[test]
    fn a_region_larger_than_its_file_is_refused() {
        let mut guard = MemoryTableGuard::default();
        let why = refused(&mut guard, set_table(&[((0, 0x10000, 0x1000, 0), 0)]));
        assert!(
            why.contains("need a file of 65536 bytes, it has 0"),
            "{why}"
        );
        let why = refused(
            &mut guard,
            set_table(&[((0, 0x1000, 0x1000, 0x1000), 0x1000)]),
        );
        assert!(why.contains("it has 4096"), "{why}");
        let why = refused(&mut guard, add_region((0, 0x2000, 0x1000, 0), 0x1000));
        assert!(why.contains("it has 4096"), "{why}");
        assert!(guard.regions.is_empty());
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let mut guard = MemoryTableGuard::default();
        let why = refused(
            &mut guard,
            set_table(&[
                ((0, 0x2000, 0x10000, 0), 0x2000),
                ((0x1000, 0x2000, 0x20000, 0), 0x2000),
            ]),
        );
        assert!(
            why.contains("overlaps region 0 in guest addresses"),
            "{why}"
        );
        let why = refused(
            &mut guard,
            set_table(&[
                ((0, 0x2000, 0x10000, 0), 0x2000),
                ((0x10000, 0x2000, 0x11000, 0), 0x2000),
            ]),
        );
        assert!(why.contains("in frontend addresses"), "{why}");
        guard
            .check(&set_table(&[((0, 0x2000, 0x10000, 0), 0x2000)]))
            .unwrap();
        let why = refused(&mut guard, add_region((0x1000, 0x1000, 0x90000, 0), 0x1000));
        assert!(why.contains("in guest addresses"), "{why}");
    }

    #[test]
    fn absurd_tables_are_refused() {
        let mut guard = MemoryTableGuard::default();
        for (region, expected) in [
            ((0, 0, 0x1000, 0), "has no size"),
            ((u64::MAX - 0xfff, 0x2000, 0x1000, 0), "guest address"),
            ((0, 0x2000, u64::MAX, 0), "frontend address"),
            ((0, 0x2000, 0x1000, u64::MAX), "file address"),
        ] {
            let why = refused(&mut guard, set_table(&[(region, 0x2000)]));
            assert!(why.contains(expected), "{region:x?}: {why}");
        }
        let why = refused(&mut guard, set_table(&[]));
        assert!(why.contains("0 regions"), "{why}");
        let mut short = set_table(&[((0, 0x1000, 0x1000, 0), 0x1000)]);
        short.take_fds();
        let why = refused(&mut guard, short);
        assert!(why.contains("1 regions came with 0 descriptors"), "{why}");
        let truncated = Message::with_fds(
            FrontendReq::SET_MEM_TABLE as u32,
            &[2, 0, 0, 0, 0, 0, 0, 0],
            Vec::new(),
        );
        let why = refused(&mut guard, truncated);
        assert!(why.contains("2 regions in 8 bytes"), "{why}");
    }

    #[test]
    fn regions_added_one_by_one_are_bounded() {
        let mut guard = MemoryTableGuard::default();
        for n in 0..MAX_MEM_SLOTS as u64 {
            guard
                .check(&add_region((n << 12, 0x1000, n << 12, 0), 0x1000))
                .unwrap();
        }
        let n = MAX_MEM_SLOTS as u64;
        let why = refused(
            &mut guard,
            add_region((n << 12, 0x1000, n << 12, 0), 0x1000),
        );
        assert!(why.contains("more than 509 regions"), "{why}");
    }
}
