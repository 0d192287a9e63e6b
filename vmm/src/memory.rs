//! Guest RAM: one memfd, mapped shared, split around the MMIO hole as
//! [`layout::ram_ranges`] says. Every region carries the memfd as its
//! `FileOffset`, so vhost-user frontends can hand the fd to backend
//! processes, which then map the very same pages.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use pvstack_protocols::layout;
use vm_memory::{FileOffset, GuestAddress};

use crate::error::{Error, Result};

/// The guest's memory as the VMM and its devices see it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Creates `size` bytes of guest RAM backed by a fresh memfd.
pub fn create(size: u64) -> Result<GuestMemory> {
    from_file(create_memfd(size)?, size)
}

/// Guest RAM of `size` bytes backed by `file` (a memfd, or a snapshot's
/// memory file), mapped shared.
pub fn from_file(file: File, size: u64) -> Result<GuestMemory> {
    let memfd = Arc::new(file);
    let regions: Vec<(GuestAddress, usize, Option<FileOffset>)> = ram_regions(size)
        .into_iter()
        .map(|(start, len, file_offset)| {
            (
                GuestAddress(start),
                len as usize,
                Some(FileOffset::from_arc(memfd.clone(), file_offset)),
            )
        })
        .collect();
    GuestMemory::from_ranges_with_files(regions).map_err(Error::MemoryMap)
}

/// The file that backs all of `memory` (every region's `FileOffset`).
pub fn backing_file(memory: &GuestMemory) -> Option<&Arc<File>> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    memory
        .iter()
        .next()
        .and_then(|region| region.file_offset())
        .map(|fo| fo.arc())
}

/// The non-empty RAM ranges as `(guest address, length, offset in the memfd)`.
fn ram_regions(size: u64) -> Vec<(u64, u64, u64)> {
    let mut file_offset = 0;
    layout::ram_ranges(size)
        .into_iter()
        .filter(|&(_, len)| len > 0)
        .map(|(start, len)| {
            let region = (start, len, file_offset);
            file_offset += len;
            region
        })
        .collect()
}

/// A new memfd for guest RAM, `size` bytes long (all holes) and sealed
/// at that size before anyone else sees it: backends get the descriptor, and one that
/// shrank it would make every later access to the lost pages a SIGBUS in
/// the VMM. F_SEAL_SEAL keeps a backend from adding seals of its own
/// (F_SEAL_FUTURE_WRITE would keep the next backend from mapping it).
pub fn create_memfd(size: u64) -> Result<File> {
    use memfd::FileSeal;
    let memory_error = |source| Error::Memory {
        size,
        cause: source,
    };
    let memfd_error = |e| match e {
        memfd::Error::Create(e) | memfd::Error::AddSeals(e) | memfd::Error::GetSeals(e) => {
            memory_error(e)
        }
    };
    let memfd = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create("pvstack-guest-ram")
        .map_err(memfd_error)?;
    memfd.as_file().set_len(size).map_err(memory_error)?;
    memfd
        .add_seals(&[FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealSeal])
        .map_err(memfd_error)?;
    Ok(memfd.into_file())
}

/// Total RAM of the host in bytes, from the `MemTotal` line of `meminfo`
/// (normally /proc/meminfo).
pub fn host_mem_total(meminfo: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(meminfo).map_err(|source| Error::File {
        action: "read",
        path: meminfo.to_path_buf(),
        cause: source,
    })?;
    parse_mem_total(&text).ok_or_else(|| Error::File {
        action: "find MemTotal in",
        path: meminfo.to_path_buf(),
        cause: std::io::ErrorKind::InvalidData.into(),
    })
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_memory_is_one_region_backed_by_a_memfd() {
        let mem = create(8 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let region = mem.iter().next().unwrap();
        let fo = region.file_offset().expect("region has a file offset");
        assert_eq!(fo.start(), 0);
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fo.file().as_raw_fd())).unwrap();
        assert!(link.to_string_lossy().contains("memfd:pvstack-guest-ram"));
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn a_backend_cannot_resize_guest_ram() {
        // A backend gets the memfd with SET_MEM_TABLE. Shrinking it would
        // turn every later access to the lost pages into SIGBUS in the VMM;
        // growing it or adding seals of its own is no business of a backend.
        let mem = create(8 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        let file = region.file_offset().unwrap().file();
        for size in [0, 4096, 16 << 20] {
            let err = file.set_len(size).expect_err("resizing must be refused");
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "set_len({size})");
        }
        assert_eq!(file.metadata().unwrap().len(), 8 << 20);
        // SAFETY: fcntl on a valid descriptor; F_ADD_SEALS takes an int.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_FUTURE_WRITE,
            )
        };
        assert_eq!(rc, -1, "a backend must not add seals");
        mem.write_obj(7u64, GuestAddress(0x7f_f000)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x7f_f000)).unwrap(), 7);
    }

    #[test]
    fn large_memory_is_split_around_the_hole() {
        let size = layout::LOW_RAM_END + (256 << 20);
        assert_eq!(
            ram_regions(size),
            vec![
                (0, layout::LOW_RAM_END, 0),
                (layout::HIGH_RAM_START, 256 << 20, layout::LOW_RAM_END)
            ]
        );
        // Mapping 3.25 GiB of memfd costs nothing until it is touched.
        let mem = create(size).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.address_in_range(GuestAddress(layout::HIGH_RAM_START)));
        assert!(!mem.address_in_range(GuestAddress(layout::MMIO_HOLE_START)));
    }

    #[test]
    fn mem_total_is_parsed_in_bytes() {
        let text = "MemFree: 10 kB\nMemTotal:       24588472 kB\n";
        assert_eq!(parse_mem_total(text), Some(24588472 * 1024));
        assert_eq!(parse_mem_total("MemTotal: x kB"), None);
        assert!(host_mem_total(Path::new("/proc/meminfo")).unwrap() > 0);
    }
}
