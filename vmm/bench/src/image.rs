//! The benchmark's disk image: a file filled with data (so reads touch
//! real pages or blocks, not holes) in a private directory that the
//! benchmark makes inside `--image-dir` and removes at the end, and what
//! kind of storage holds it.
//!
//! The directory is made like mkdtemp(3) (a fresh random name, mode 0700,
//! failing rather than reusing anything that exists) and the image is
//! created in it with O_EXCL|O_NOFOLLOW, so nothing planted in a shared
//! directory such as /dev/shm or /var/tmp is followed or truncated. The
//! backends' sockets and logs live in the same directory.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

/// Bytes written at a time while filling the image.
const CHUNK: usize = 1 << 20;

/// statfs(2)'s f_type of tmpfs and ramfs (linux/magic.h; the libc crate
/// lacks the second).
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// The image's name inside the private directory.
const IMAGE_NAME: &str = "disk.img";

/// What holds the image, and so how its I/O must be done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Storage {
    /// The `--image-dir` the private directory was made in.
    pub dir: PathBuf,
    /// `tmpfs`/`ramfs` (memory: the stack is measured, not a disk) or
    /// `disk` (any other file system).
    pub kind: StorageKind,
    /// Whether the backends open the image with O_DIRECT (pvstack-blk
    /// `--direct`, qemu-storage-daemon `cache.direct=on`, fio
    /// `--direct=1`): on a disk that accepts it, never on memory, where
    /// it would bypass nothing.
    pub direct: bool,
}

/// Memory or a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    Tmpfs,
    Ramfs,
    Disk,
}

impl StorageKind {
    /// The name reports show (as in the JSON).
    pub fn name(self) -> &'static str {
        match self {
            StorageKind::Tmpfs => "tmpfs",
            StorageKind::Ramfs => "ramfs",
            StorageKind::Disk => "disk",
        }
    }

    /// Whether the file lives in memory (its page cache is the file).
    pub fn is_memory(self) -> bool {
        matches!(self, StorageKind::Tmpfs | StorageKind::Ramfs)
    }
}

/// The image and its private directory, both removed when dropped (so
/// also after an error, or after SIGTERM ended the benchmark).
pub struct BenchImage {
    dir: PathBuf,
    path: PathBuf,
    storage: Storage,
}

impl BenchImage {
    /// Creates `size` bytes of data in a new private directory in `parent`.
    pub fn create(parent: &Path, size: u64) -> Result<Self> {
        let kind = storage_kind(parent)?;
        let dir = private_dir(parent)?;
        let path = dir.join(IMAGE_NAME);
        let mut image = BenchImage {
            dir,
            path: path.clone(),
            storage: Storage {
                dir: parent.to_path_buf(),
                kind,
                direct: false,
            },
        };
        let file_error = |action, source| Error::File {
            action,
            path: path.clone(),
            cause: source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| file_error("create the image", e))?;
        let chunk: Vec<u8> = (0..CHUNK).map(|i| (i * 31 + i / 4096) as u8).collect();
        let mut left = size;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            file.write_all(&chunk[..n])
                .map_err(|e| file_error("fill the image", e))?;
            left -= n as u64;
        }
        if !kind.is_memory() {
            // On the disk before any run, and out of the page cache, so
            // that neither write-back nor cached pages colour the first
            // runs.
            file.sync_all()
                .map_err(|e| file_error("flush the image to disk", e))?;
            drop_cached_pages(&file);
            image.storage.direct = accepts_o_direct(&path);
            if !image.storage.direct {
                log::warn!(
                    "{} does not accept O_DIRECT: every mode goes through the page cache",
                    parent.display()
                );
            }
        }
        Ok(image)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The private directory, for the backends' sockets and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }
}

impl Drop for BenchImage {
    fn drop(&mut self) {
        // remove_dir_all does not follow symbolic links; the directory is
        // ours (mode 0700), so nothing in it is anyone else's.
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            log::warn!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// What kind of file system `dir` is on.
fn storage_kind(dir: &Path) -> Result<StorageKind> {
    let dir_error = |source| Error::File {
        action: "use the image directory",
        path: dir.to_path_buf(),
        cause: source,
    };
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| dir_error(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: statfs is plain data; all zeroes is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_dir` is NUL-terminated and `stat` is a valid statfs that
    // outlives the call.
    if unsafe { libc::statfs(c_dir.as_ptr(), &mut stat) } != 0 {
        return Err(dir_error(std::io::Error::last_os_error()));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs.
    let magic = stat.f_type as i64;
    Ok(if magic == TMPFS_MAGIC {
        StorageKind::Tmpfs
    } else if magic == RAMFS_MAGIC {
        StorageKind::Ramfs
    } else {
        StorageKind::Disk
    })
}

/// Makes `parent/pvstack-bench.XXXXXX` with mkdtemp(3): a new name, mode
/// 0700, never an existing directory.
fn private_dir(parent: &Path) -> Result<PathBuf> {
    let template = parent.join("pvstack-bench.XXXXXX");
    let failed = |source| Error::File {
        action: "create a private directory like",
        path: template.clone(),
        cause: source,
    };
    let mut bytes = template.as_os_str().as_bytes().to_vec();
    if bytes.contains(&0) {
        return Err(failed(std::io::Error::from(
            std::io::ErrorKind::InvalidInput,
        )));
    }
    bytes.push(0);
    // SAFETY: `bytes` is a writable NUL-terminated string ending in
    // XXXXXX, which mkdtemp overwrites in place; it outlives the call.
    let made = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if made.is_null() {
        return Err(failed(std::io::Error::last_os_error()));
    }
    bytes.pop();
    Ok(PathBuf::from(OsString::from_vec(bytes)))
}

/// Whether `path` can be opened with O_DIRECT (ext4, xfs, ...: yes; some
/// FUSE and network file systems: no).
fn accepts_o_direct(path: &Path) -> bool {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW)
        .open(path)
        .is_ok()
}

/// Asks the kernel to drop `file`'s cached pages (a hint: failure only
/// means they stay).
fn drop_cached_pages(file: &File) {
    // SAFETY: posix_fadvise on an fd we own; it only affects the cache.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        log::debug!(
            "posix_fadvise(DONTNEED): {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn image_lives_in_a_private_directory_that_goes_away() {
        let image = BenchImage::create(Path::new("/dev/shm"), 3 << 20).unwrap();
        let dir = image.dir().to_path_buf();
        assert!(dir.starts_with("/dev/shm"));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let data = std::fs::read(image.path()).unwrap();
        assert_eq!(data.len(), 3 << 20);
        assert!(data.iter().any(|&b| b != 0));
        assert_eq!(image.storage().kind, StorageKind::Tmpfs);
        assert!(!image.storage().direct);
        drop(image);
        assert!(!dir.exists());
    }

    #[test]
    fn a_missing_image_directory_is_one_clear_error() {
        let err = BenchImage::create(Path::new("/nonexistent-pvstack-dir"), 4 << 20)
            .err()
            .expect("no image in a missing directory")
            .to_string();
        assert!(err.contains("/nonexistent-pvstack-dir"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
