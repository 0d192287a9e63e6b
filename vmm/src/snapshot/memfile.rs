//! Guest RAM in a snapshot directory: the memfd's bytes at their own
//! offsets, with holes where the guest never wrote (found with
//! SEEK_DATA/SEEK_HOLE, so a 4 GiB guest that touched 20 MiB writes and
//! stores 20 MiB), and the two ways a restore brings it back:
//!
//! - [`MemoryMode::Copy`] (the default): a new memfd filled with only the
//!   data extents, copied in the kernel (sendfile); the snapshot stays as
//!   it was and can be restored again. Costs time in the RAM the guest
//!   had written.
//! - [`MemoryMode::Map`]: the snapshot's file itself becomes guest RAM,
//!   mapped shared (vhost-user backends map the same file): nothing is
//!   copied, so a restore costs the same at any size, but the guest writes
//!   into the snapshot, which is consumed. Meant for a snapshot on tmpfs
//!   (on a disk file system guest RAM would be written back to disk).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a restore brings guest RAM back from a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum MemoryMode {
    /// A new memfd with the snapshot's data copied in; the snapshot is kept.
    Copy,
    /// The snapshot's memory file mapped shared as guest RAM: no copy, and
    /// the snapshot is consumed (the guest writes into it).
    Map,
}

/// The data extents of `file` (offset, length), in order, below `size`.
pub fn data_extents(file: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on an fd this function borrows; no memory involved.
        let start = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if start < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(Error::Os {
                what: "find the data in guest memory (SEEK_DATA)",
                cause: err,
            });
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(Error::Os {
                what: "find the holes in guest memory (SEEK_HOLE)",
                cause: std::io::Error::last_os_error(),
            });
        }
        let end = (end as u64).min(size);
        if end > start as u64 {
            extents.push((start as u64, end - start as u64));
        }
        pos = end as i64;
    }
    Ok(extents)
}

fn copy_error(target: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |cause| Error::File {
        action: "copy guest memory to",
        path: target.to_path_buf(),
        cause,
    }
}

/// Copies `len` bytes at `offset` of `from` to the same offset of `to`,
/// in the kernel; returns the bytes written.
fn copy_extent(from: &File, to: &File, offset: u64, len: u64, target: &Path) -> Result<u64> {
    let io_error = copy_error(target);
    let mut done = 0u64;
    while done < len {
        let at = (offset + done) as i64;
        // SAFETY: lseek on a borrowed fd.
        if unsafe { libc::lseek(to.as_raw_fd(), at, libc::SEEK_SET) } < 0 {
            return Err(io_error(std::io::Error::last_os_error()));
        }
        let mut in_offset: libc::off_t = at;
        let chunk = (len - done).min(1 << 30) as usize;
        // SAFETY: sendfile between two borrowed fds; `in_offset` is a
        // valid off_t the call updates.
        let sent =
            unsafe { libc::sendfile(to.as_raw_fd(), from.as_raw_fd(), &mut in_offset, chunk) };
        if sent < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if done == 0 && err.raw_os_error() == Some(libc::EINVAL) {
                return copy_through_buffer(from, to, offset, len, target);
            }
            return Err(io_error(err));
        }
        if sent == 0 {
            return Err(io_error(std::io::ErrorKind::UnexpectedEof.into()));
        }
        done += sent as u64;
    }
    Ok(len)
}

/// Copies as [`copy_extent`] does, through a buffer, for a file the kernel
/// cannot sendfile from (hugetlbfs, the guest RAM of `run --hugepages`,
/// whose every byte SEEK_DATA calls data): chunks of zeros stay holes in
/// `to`. Returns the bytes written.
fn copy_through_buffer(
    from: &File,
    to: &File,
    offset: u64,
    len: u64,
    target: &Path,
) -> Result<u64> {
    let io_error = copy_error(target);
    let mut buf = vec![0u8; 2 << 20];
    let mut written = 0u64;
    let mut done = 0u64;
    while done < len {
        let chunk = &mut buf[..(len - done).min(2 << 20) as usize];
        from.read_exact_at(chunk, offset + done)
            .map_err(&io_error)?;
        if chunk.iter().any(|&byte| byte != 0) {
            to.write_all_at(chunk, offset + done).map_err(&io_error)?;
            written += chunk.len() as u64;
        }
        done += chunk.len() as u64;
    }
    Ok(written)
}

/// What [`save`] wrote.
#[derive(Clone, Copy, Debug)]
pub struct SavedMemory {
    /// Bytes of data (the rest are holes).
    pub data_bytes: u64,
}

/// Writes the `size` bytes of `memfd` to a new sparse file at `path`.
pub fn save(memfd: &File, size: u64, path: &Path) -> Result<SavedMemory> {
    let file_error = |action, source| Error::File {
        action,
        path: path.to_path_buf(),
        cause: source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| file_error("create the memory file", e))?;
    file.set_len(size)
        .map_err(|e| file_error("size the memory file", e))?;
    let mut data_bytes = 0;
    for (offset, len) in data_extents(memfd, size)? {
        data_bytes += copy_extent(memfd, &file, offset, len, path)?;
    }
    file.sync_data()
        .map_err(|e| file_error("write the memory file to disk", e))?;
    Ok(SavedMemory { data_bytes })
}

/// Opens the memory file at `path`, which must hold `size` bytes, as the
/// backing of guest RAM the way `mode` says.
pub fn load(path: &Path, size: u64, mode: MemoryMode) -> Result<File> {
    let file_error = |action, source| Error::File {
        action,
        path: path.to_path_buf(),
        cause: source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(mode == MemoryMode::Map)
        .open(path)
        .map_err(|e| file_error("open the memory file", e))?;
    let len = file
        .metadata()
        .map_err(|e| file_error("read the size of the memory file", e))?
        .len();
    if len != size {
        return Err(Error::Snapshot {
            dir: path.parent().unwrap_or(path).to_path_buf(),
            reason: format!(
                "the memory file {} holds {len} bytes, the VM's RAM is {size} bytes",
                path.display()
            ),
        });
    }
    match mode {
        MemoryMode::Map => Ok(file),
        MemoryMode::Copy => {
            let memfd = crate::memory::create_memfd(size)?;
            for (offset, len) in data_extents(&file, size)? {
                copy_extent(
                    &file,
                    &memfd,
                    offset,
                    len,
                    Path::new("memfd:pvstack-guest-ram"),
                )?;
            }
            Ok(memfd)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn only_written_pages_are_saved_and_both_modes_load_them() {
        let dir = std::env::temp_dir().join(format!("pvstack-memfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.bin");
        let _ = std::fs::remove_file(&path);
        let size = 64 << 20;
        let memfd = crate::memory::create_memfd(size).unwrap();
        memfd.write_all_at(b"first page", 0).unwrap();
        memfd.write_all_at(b"far away", 40 << 20).unwrap();
        let saved = save(&memfd, size, &path).unwrap();
        assert_eq!(saved.data_bytes, 2 * 4096, "only the two written pages");
        let file = File::open(&path).unwrap();
        assert_eq!(file.metadata().unwrap().len(), size);
        for mode in [MemoryMode::Copy, MemoryMode::Map] {
            let loaded = load(&path, size, mode).unwrap();
            let mut buf = [0u8; 8];
            loaded.read_exact_at(&mut buf, 40 << 20).unwrap();
            assert_eq!(&buf, b"far away");
            assert_eq!(data_extents(&loaded, size).unwrap().len(), 2, "{mode:?}");
        }
        let err = load(&path, size * 2, MemoryMode::Copy)
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds 67108864 bytes"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn guest_ram_in_huge_pages_saves_and_restores() {
        // Where shmem THP is on, guest RAM's data comes in 2 MiB folios:
        // SEEK_DATA finds whole huge pages, and both restores bring back
        // the bytes (a map restore from a huge tmpfs gets huge pages again).
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
        let tmpfs = crate::memory::huge_tmpfs::HugeTmpfs::mount("memfile");
        let size = 64 << 20;
        let memory = crate::memory::from_file(tmpfs.file("ram", size), size).unwrap();
        memory.write_slice(b"first page", GuestAddress(0)).unwrap();
        memory
            .write_slice(b"far away", GuestAddress(40 << 20))
            .unwrap();
        let pmd = crate::memory::huge_tmpfs::pmd_mapped_kib(memory.iter().next().unwrap().as_ptr());
        assert_eq!(pmd, 2 * 2048, "both writes in huge pages");
        let dir = std::env::temp_dir().join(format!("pvstack-memfile-huge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.bin");
        let _ = std::fs::remove_file(&path);
        let memfd = crate::memory::backing_file(&memory).unwrap();
        let saved = save(memfd, size, &path).unwrap();
        assert_eq!(saved.data_bytes, 2 * (2 << 20), "the two huge pages, whole");
        for mode in [MemoryMode::Copy, MemoryMode::Map] {
            let restored =
                crate::memory::from_file(load(&path, size, mode).unwrap(), size).unwrap();
            let mut buf = [0u8; 10];
            restored.read_slice(&mut buf, GuestAddress(0)).unwrap();
            assert_eq!(&buf, b"first page", "{mode:?}");
            restored
                .read_slice(&mut buf[..8], GuestAddress(40 << 20))
                .unwrap();
            assert_eq!(&buf[..8], b"far away", "{mode:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hugetlbfs_guest_ram_is_saved_through_a_buffer_and_stays_sparse() {
        // A hugetlbfs memfd (run --hugepages) cannot be sendfile'd from and
        // calls all of itself data; unallocated huge pages read as zeros
        // (this needs no reserved huge pages), so the copy writes nothing.
        let size = 8 << 20;
        let memfd = memfd::MemfdOptions::default()
            .hugetlb(Some(memfd::HugetlbSize::Huge2MB))
            .create("pvstack-test-hugetlb")
            .unwrap()
            .into_file();
        memfd.set_len(size).unwrap();
        assert_eq!(data_extents(&memfd, size).unwrap(), vec![(0, size)]);
        let dir =
            std::env::temp_dir().join(format!("pvstack-memfile-hugetlb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.bin");
        let _ = std::fs::remove_file(&path);
        let saved = save(&memfd, size, &path).unwrap();
        assert_eq!(saved.data_bytes, 0);
        let file = File::open(&path).unwrap();
        assert_eq!(file.metadata().unwrap().len(), size);
        assert!(data_extents(&file, size).unwrap().is_empty(), "all holes");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
