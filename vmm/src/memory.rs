//! Guest RAM: one memfd, mapped shared, split around the MMIO hole as
//! [`layout::ram_ranges`] says. Every region carries the memfd as its
//! `FileOffset`, so vhost-user frontends can hand the fd to backend
//! processes, which then map the very same pages.
//!
//! Huge pages: every mapping is advised MADV_HUGEPAGE, so that where the
//! host lets shmem use transparent huge pages (`shmem_enabled` = `advise`,
//! `always` or `within_size`, see [`crate::check`]) the guest's RAM is
//! backed by 2 MiB pages and KVM maps it with 2 MiB nested page-table
//! entries: far fewer nested page faults while the guest first touches its
//! memory. Where shmem THP is off, the advice changes nothing. KVM uses a
//! 2 MiB entry only where the host address and the guest address agree
//! modulo 2 MiB; every region starts at a 2 MiB-aligned guest address and
//! file offset, and the kernel places a shmem mapping at an address that
//! agrees with its file offset modulo 2 MiB whenever shmem THP is on
//! (`shmem_get_unmapped_area`), which [`huge_page_misaligned`] verifies.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use pvstack_protocols::layout;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Result};

/// The guest's memory as the VMM and its devices see it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Creates `size` bytes of guest RAM backed by a fresh memfd.
pub fn create(size: u64) -> Result<GuestMemory> {
    from_file(create_memfd(size)?, size)
}

/// Creates `size` bytes of guest RAM in the host's reserved 2 MiB huge
/// pages (a hugetlbfs memfd), every page taken now: a hugetlbfs page the
/// host cannot supply later would be a SIGBUS in whoever touches it (the
/// VMM, KVM on the guest's behalf, a backend). `size` must be whole huge
/// pages (a usage error otherwise).
pub fn create_huge(size: u64) -> Result<GuestMemory> {
    if size % HUGE_PAGE_SIZE != 0 {
        return Err(Error::Usage(format!(
            "--hugepages: --memory must be a multiple of 2M, got {size} bytes"
        )));
    }
    let memfd = new_memfd(size, Some(memfd::HugetlbSize::Huge2MB))?;
    // Counted before: a fallocate that fails keeps the pages it got until
    // the memfd is dropped.
    let free = free_huge_pages(Path::new("/proc/meminfo")).unwrap_or(0);
    // SAFETY: fallocate on the descriptor this function owns; no memory
    // is passed.
    if unsafe { libc::fallocate(memfd.as_raw_fd(), 0, 0, size as libc::off_t) } != 0 {
        return Err(Error::HugePages {
            needed: size / HUGE_PAGE_SIZE,
            free,
            cause: std::io::Error::last_os_error(),
        });
    }
    log::info!(
        "guest RAM: {} reserved huge pages of 2 MiB (hugetlbfs), all taken",
        size / HUGE_PAGE_SIZE
    );
    from_file(seal_size(memfd, size)?, size)
}

/// The free huge pages of the default size, from `HugePages_Free` in
/// `meminfo` (normally /proc/meminfo).
fn free_huge_pages(meminfo: &Path) -> Option<u64> {
    std::fs::read_to_string(meminfo)
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("HugePages_Free:"))?
        .trim()
        .parse()
        .ok()
}

/// Guest RAM of `size` bytes backed by `file` (a memfd, or a snapshot's
/// memory file), mapped shared and advised to use huge pages.
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
    let memory = GuestMemory::from_ranges_with_files(regions).map_err(Error::MemoryMap)?;
    advise_huge_pages(&memory);
    if let Some(guest_address) = huge_page_misaligned(&memory) {
        log::debug!(
            "guest RAM at {guest_address:#x} is not mapped 2 MiB-aligned (shmem THP off?): KVM maps it with 4 KiB pages"
        );
    }
    Ok(memory)
}

/// The size of a transparent huge page (PMD) on x86_64.
const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Advises every region of `memory` MADV_HUGEPAGE. Only advice: where the
/// host has no THP for this memory (shmem THP off, a file on a disk file
/// system, a kernel without THP) the kernel ignores or refuses it and
/// guest RAM stays in 4 KiB pages, so a refusal is logged and nothing more.
fn advise_huge_pages(memory: &GuestMemory) {
    for region in memory.iter() {
        // SAFETY: madvise on a mapping `memory` owns, of its own length;
        // MADV_HUGEPAGE changes no contents and no protection.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if rc != 0 {
            log::debug!(
                "guest RAM at {:#x}: madvise(MADV_HUGEPAGE) refused ({}); it stays in 4 KiB pages",
                region.start_addr().0,
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The guest address of the first region whose host mapping does not
/// agree with its guest address modulo [`HUGE_PAGE_SIZE`] (KVM then maps
/// it with 4 KiB pages only), or None when every region can be mapped huge.
fn huge_page_misaligned(memory: &GuestMemory) -> Option<u64> {
    memory
        .iter()
        .find(|region| (region.as_ptr() as u64 ^ region.start_addr().0) % HUGE_PAGE_SIZE != 0)
        .map(|region| region.start_addr().0)
}

/// The file that backs all of `memory` (every region's `FileOffset`).
pub fn backing_file(memory: &GuestMemory) -> Option<&Arc<File>> {
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
    seal_size(new_memfd(size, None)?, size)
}

fn memory_error(size: u64) -> impl Fn(std::io::Error) -> Error {
    move |cause| Error::Memory { size, cause }
}

fn memfd_error(size: u64) -> impl Fn(memfd::Error) -> Error {
    move |e| match e {
        memfd::Error::Create(e) | memfd::Error::AddSeals(e) | memfd::Error::GetSeals(e) => {
            memory_error(size)(e)
        }
    }
}

/// A new memfd of `size` bytes (all holes), in huge pages of `huge` if given.
fn new_memfd(size: u64, huge: Option<memfd::HugetlbSize>) -> Result<memfd::Memfd> {
    let memfd = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .hugetlb(huge)
        .create("pvstack-guest-ram")
        .map_err(memfd_error(size))?;
    memfd.as_file().set_len(size).map_err(memory_error(size))?;
    Ok(memfd)
}

/// Seals `memfd` at its size (see [`create_memfd`]).
fn seal_size(memfd: memfd::Memfd, size: u64) -> Result<File> {
    use memfd::FileSeal;
    memfd
        .add_seals(&[FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealSeal])
        .map_err(memfd_error(size))?;
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
    fn guest_ram_on_shmem_with_huge_pages_is_mapped_huge() {
        let tmpfs = huge_tmpfs::HugeTmpfs::mount("memory");
        let size = 16 << 20;
        let mem = from_file(tmpfs.file("ram", size), size).unwrap();
        assert_eq!(huge_page_misaligned(&mem), None);
        let region = mem.iter().next().unwrap();
        for offset in (0..size).step_by(4096) {
            mem.write_obj(offset, GuestAddress(offset)).unwrap();
        }
        let pmd_mapped_kib = huge_tmpfs::pmd_mapped_kib(region.as_ptr());
        assert!(
            pmd_mapped_kib >= 2048,
            "no huge page mapped ({pmd_mapped_kib} KiB)"
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(size - 4096)).unwrap(),
            size - 4096
        );
    }

    #[test]
    fn huge_pages_are_counted_from_meminfo_and_must_be_whole() {
        let dir = std::env::temp_dir().join(format!("pvstack-meminfo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let meminfo = dir.join("meminfo");
        std::fs::write(
            &meminfo,
            "HugePages_Total:     128\nHugePages_Free:       96\n",
        )
        .unwrap();
        assert_eq!(free_huge_pages(&meminfo), Some(96));
        std::fs::write(&meminfo, "MemTotal: 1 kB\n").unwrap();
        assert_eq!(free_huge_pages(&meminfo), None);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(free_huge_pages(Path::new("/proc/meminfo")).is_some());
        let err = create_huge((4 << 20) + 4096).unwrap_err();
        assert!(err.is_usage(), "{err}");
    }

    #[test]
    fn mem_total_is_parsed_in_bytes() {
        let text = "MemFree: 10 kB\nMemTotal:       24588472 kB\n";
        assert_eq!(parse_mem_total(text), Some(24588472 * 1024));
        assert_eq!(parse_mem_total("MemTotal: x kB"), None);
        assert!(host_mem_total(Path::new("/proc/meminfo")).unwrap() > 0);
    }
}

/// Shmem with transparent huge pages for tests, without touching the
/// host's `shmem_enabled`: a tmpfs mounted huge=advise offers 2 MiB pages
/// to mappings advised MADV_HUGEPAGE, as `shmem_enabled` = advise does for
/// memfds.
#[cfg(test)]
pub(crate) mod huge_tmpfs {
    use std::ffi::CString;
    use std::fs::File;
    use std::path::{Path, PathBuf};

    /// A tmpfs mounted huge=advise in a mount namespace of the calling
    /// thread alone (a test's own thread), unmounted on drop.
    pub struct HugeTmpfs {
        dir: PathBuf,
    }

    fn c_path(path: &Path) -> CString {
        CString::new(path.as_os_str().as_encoded_bytes()).unwrap()
    }

    impl HugeTmpfs {
        pub fn mount(name: &str) -> HugeTmpfs {
            let dir =
                std::env::temp_dir().join(format!("pvstack-huge-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let fstype = CString::new("tmpfs").unwrap();
            let options = CString::new("huge=advise,size=256m").unwrap();
            // SAFETY: unshare and mount with valid C strings; they change
            // only this thread's mount namespace, made private first so
            // that nothing propagates to the host's.
            unsafe {
                assert_eq!(
                    libc::unshare(libc::CLONE_NEWNS),
                    0,
                    "unshare(CLONE_NEWNS): {}",
                    std::io::Error::last_os_error()
                );
                let root = c_path(Path::new("/"));
                let private = libc::MS_REC | libc::MS_PRIVATE;
                let rc = libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    private,
                    std::ptr::null(),
                );
                assert_eq!(rc, 0, "make / private: {}", std::io::Error::last_os_error());
                let rc = libc::mount(
                    fstype.as_ptr(),
                    c_path(&dir).as_ptr(),
                    fstype.as_ptr(),
                    0,
                    options.as_ptr().cast(),
                );
                assert_eq!(
                    rc,
                    0,
                    "mount tmpfs huge=advise: {}",
                    std::io::Error::last_os_error()
                );
            }
            HugeTmpfs { dir }
        }

        /// A new file `name` of `size` bytes (all holes) on this tmpfs.
        pub fn file(&self, name: &str, size: u64) -> File {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(self.dir.join(name))
                .unwrap();
            file.set_len(size).unwrap();
            file
        }
    }

    impl Drop for HugeTmpfs {
        fn drop(&mut self) {
            // SAFETY: unmounts what `mount` mounted, in this thread's namespace.
            unsafe { libc::umount2(c_path(&self.dir).as_ptr(), libc::MNT_DETACH) };
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    /// The KiB of the mapping that starts at `start` mapped with 2 MiB
    /// page-table entries (ShmemPmdMapped in /proc/self/smaps).
    pub fn pmd_mapped_kib(start: *const u8) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let header = format!("{:x}-", start as u64);
        let mapping = smaps
            .split_inclusive('\n')
            .skip_while(|line| !line.starts_with(&header))
            .take_while(|line| !line.starts_with("VmFlags"))
            .collect::<String>();
        mapping
            .lines()
            .find_map(|line| line.strip_prefix("ShmemPmdMapped:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_else(|| {
                panic!("no ShmemPmdMapped for the mapping at {start:?} in smaps:\n{mapping}")
            })
    }
}
