//! An image in memory (a regular file on tmpfs or ramfs) served through a
//! shared mapping of the file: a read or a write is a copy between the
//! mapping and guest memory, with no system call. Through preadv, a 4 KiB
//! read from tmpfs spends more time finding the file's pages and entering
//! the kernel (past the seccomp filter) than copying (perf on pvstack-blk
//! at QD32: the page-cache lookup alone took a fifth of its time).
//!
//! Both sides are shared memory: the image with every process that has
//! the file open, guest memory with the guest's vCPUs. So bytes move only
//! through vm-memory's volatile slices (`copy_to_volatile_slice`, a
//! memcpy), and no Rust reference to either side is ever made.
//!
//! The file may shrink under the mapping (whoever may write the image may
//! truncate it), and a full tmpfs cannot supply a page for a write into a
//! hole a DISCARD punched: a copy that touches such a page survives
//! ([`crate::sigbus`]), the request it served fails with an I/O error, and
//! the mapping is no longer used: later requests go through the file,
//! where they fail or succeed on their own.
//!
//! A read of a hole in a tmpfs file through a mapping allocates the page
//! (preadv reads zeroes without one), so [`MappedImage::worth_mapping`]
//! refuses an image with holes; a hole a DISCARD punches later is
//! allocated again when the guest reads it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::image::Direction;
use crate::request::Segment;
use crate::sigbus;

/// A shared mapping of a whole image file.
#[derive(Debug)]
pub struct MappedImage {
    base: *mut u8,
    len: usize,
    writable: bool,
    /// Taken (released) before the mapping goes, so the SIGBUS handler
    /// never holds an address range that is no longer this mapping.
    guard: Option<sigbus::Guard>,
}

// SAFETY: `base` is a mapping this value owns until it is dropped; it is
// only ever accessed through volatile slices, from any thread.
unsafe impl Send for MappedImage {}
// SAFETY: as for Send: shared access is volatile copies only.
unsafe impl Sync for MappedImage {}

impl MappedImage {
    /// Why `file` (`len` bytes) should not be mapped, if it should not:
    /// it has holes.
    pub fn worth_mapping(file: &File, len: u64) -> Result<(), String> {
        let metadata = file
            .metadata()
            .map_err(|e| format!("cannot stat it: {e}"))?;
        if metadata.blocks() * 512 < len {
            return Err(format!(
                "it has holes ({} of {len} bytes allocated), which reads through a mapping would fill",
                metadata.blocks() * 512
            ));
        }
        Ok(())
    }

    /// Maps the first `len` bytes of `file` shared, writable if `writable`.
    pub fn new(file: &File, len: u64, writable: bool) -> io::Result<Self> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "image too large to map"))?;
        let protection = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping of our own open file, at an address
        // the kernel chooses; nothing else is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                protection,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base.cast::<u8>();
        match sigbus::guard(base, len) {
            Ok(guard) => Ok(MappedImage {
                base,
                len,
                writable,
                guard: Some(guard),
            }),
            Err(e) => {
                // SAFETY: unmaps the mapping made above, which nothing uses.
                unsafe { libc::munmap(base.cast(), len) };
                Err(e)
            }
        }
    }

    /// Whether the file was found shorter than the mapping: the mapping
    /// must no longer be used.
    pub fn shrunk(&self) -> bool {
        self.guard.as_ref().is_none_or(sigbus::Guard::shrunk)
    }

    /// Copies the image bytes from `offset` into the guest's `buffers`.
    pub fn read(&self, offset: u64, mem: &GuestMemoryMmap, buffers: &[Segment]) -> io::Result<()> {
        self.copy(Direction::Read, offset, mem, buffers)
    }

    /// Copies the guest's `buffers` into the image from `offset`.
    pub fn write(&self, offset: u64, mem: &GuestMemoryMmap, buffers: &[Segment]) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        self.copy(Direction::Write, offset, mem, buffers)
    }

    fn copy(
        &self,
        direction: Direction,
        offset: u64,
        mem: &GuestMemoryMmap,
        buffers: &[Segment],
    ) -> io::Result<()> {
        let total: u64 = buffers.iter().map(|b| u64::from(b.len)).sum();
        if offset
            .checked_add(total)
            .is_none_or(|end| end > self.len as u64)
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{total} bytes at offset {offset} go past the image's end"),
            ));
        }
        let mut at = offset as usize;
        for segment in buffers {
            for guest in mem.get_slices(segment.addr, segment.len as usize) {
                let guest = guest.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                // SAFETY: `at + guest.len()` <= `self.len` (checked above),
                // so the slice lies in the mapping, which lives as long as
                // `self`; every access to it is volatile.
                let image = unsafe { VolatileSlice::new(self.base.add(at), guest.len()) };
                match direction {
                    Direction::Read => image.copy_to_volatile_slice(guest),
                    Direction::Write => guest.copy_to_volatile_slice(image),
                }
                at += guest.len();
            }
        }
        if self.shrunk() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image file shrank under its mapping, or its file system could not supply a page of it",
            ));
        }
        Ok(())
    }
}

impl Drop for MappedImage {
    fn drop(&mut self) {
        drop(self.guard.take());
        // SAFETY: the mapping is ours and no copy can be running: they all
        // borrow `self`.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress};

    /// A file in /dev/shm holding `bytes`, removed when dropped.
    struct ShmFile {
        path: std::path::PathBuf,
        file: File,
    }

    impl ShmFile {
        fn new(name: &str, bytes: &[u8]) -> ShmFile {
            let path = std::path::PathBuf::from(format!(
                "/dev/shm/pvstack-mapped-{}-{name}",
                std::process::id()
            ));
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .expect("create a file in /dev/shm");
            file.write_all(bytes).expect("fill it");
            ShmFile { path, file }
        }
    }

    impl Drop for ShmFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 13 % 251) as u8).collect()
    }

    /// Guest memory of two regions with a gap, so a segment can cross
    /// from one region into the next only where they touch.
    fn guest() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x4000), 0x4000)])
            .expect("guest memory")
    }

    fn segment(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn reads_and_writes_move_the_bytes_across_guest_regions() {
        let bytes = pattern(0x6000);
        let shm = ShmFile::new("copy", &bytes);
        let image = MappedImage::new(&shm.file, bytes.len() as u64, true).expect("map");
        let mem = guest();
        // 0x3800..0x4800 crosses from the first region into the second.
        let buffers = [segment(0x3800, 0x1000), segment(0x100, 0x200)];
        image.read(0x1000, &mem, &buffers).expect("read");
        let mut got = vec![0u8; 0x1000];
        mem.read_slice(&mut got, GuestAddress(0x3800)).unwrap();
        assert!(got == bytes[0x1000..0x2000], "first segment");
        let mut got = vec![0u8; 0x200];
        mem.read_slice(&mut got, GuestAddress(0x100)).unwrap();
        assert!(got == bytes[0x2000..0x2200], "second segment");

        mem.write_slice(&[0xab; 0x1000], GuestAddress(0x3800))
            .unwrap();
        image
            .write(0x200, &mem, &[segment(0x3800, 0x1000)])
            .expect("write");
        let on_file = std::fs::read(&shm.path).unwrap();
        assert!(
            on_file[0x200..0x1200].iter().all(|&b| b == 0xab),
            "written through"
        );
        assert!(on_file[..0x200] == bytes[..0x200] && on_file[0x1200..] == bytes[0x1200..]);
    }

    #[test]
    fn copies_past_the_end_and_writes_to_a_read_only_mapping_are_refused() {
        let shm = ShmFile::new("bounds", &pattern(0x2000));
        let mem = guest();
        let image = MappedImage::new(&shm.file, 0x2000, false).expect("map");
        let past = image.read(0x1800, &mem, &[segment(0, 0x1000)]).unwrap_err();
        assert_eq!(past.kind(), io::ErrorKind::UnexpectedEof, "{past}");
        assert!(image.read(u64::MAX, &mem, &[segment(0, 1)]).is_err());
        let readonly = image.write(0, &mem, &[segment(0, 0x200)]).unwrap_err();
        assert_eq!(readonly.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn a_file_that_shrinks_under_the_mapping_fails_the_copy_and_the_process_lives() {
        let bytes = pattern(0x4000);
        let shm = ShmFile::new("shrink", &bytes);
        let image = MappedImage::new(&shm.file, 0x4000, true).expect("map");
        let mem = guest();
        image
            .read(0x3000, &mem, &[segment(0, 0x1000)])
            .expect("before");
        assert!(!image.shrunk());
        shm.file.set_len(0x1000).expect("truncate");
        // Within the file's new length: still fine.
        image.read(0, &mem, &[segment(0, 0x1000)]).expect("inside");
        let err = image
            .read(0x2000, &mem, &[segment(0, 0x1000)])
            .expect_err("a read past the new end");
        assert!(err.to_string().contains("shrank"), "{err}");
        assert!(image.shrunk());
        let mut got = vec![0xffu8; 0x1000];
        mem.read_slice(&mut got, GuestAddress(0)).unwrap();
        assert!(
            got.iter().all(|&b| b == 0),
            "the page put in place reads zeroes"
        );
        assert!(image.write(0x3000, &mem, &[segment(0, 0x1000)]).is_err());
        assert_eq!(
            std::fs::metadata(&shm.path).unwrap().len(),
            0x1000,
            "not grown back"
        );
    }

    /// Mounts a tmpfs of `size` in a new directory, in this thread's own
    /// mount namespace (private, so nothing reaches the host's).
    fn small_tmpfs(name: &str, size: &str) -> std::path::PathBuf {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let dir =
            std::env::temp_dir().join(format!("pvstack-mapped-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = |text: &[u8]| CString::new(text).unwrap();
        let (root, target, tmpfs) = (c(b"/"), c(dir.as_os_str().as_bytes()), c(b"tmpfs"));
        let options = c(format!("size={size}").as_bytes());
        // SAFETY: unshare and mount with valid C strings; they change only
        // this thread's mount namespace, made private first.
        unsafe {
            assert_eq!(
                libc::unshare(libc::CLONE_NEWNS),
                0,
                "unshare: {}",
                io::Error::last_os_error()
            );
            let private = libc::MS_REC | libc::MS_PRIVATE;
            let null = std::ptr::null();
            assert_eq!(
                libc::mount(null, root.as_ptr(), null, private, null.cast()),
                0
            );
            let rc = libc::mount(
                tmpfs.as_ptr(),
                target.as_ptr(),
                tmpfs.as_ptr(),
                0,
                options.as_ptr().cast(),
            );
            assert_eq!(rc, 0, "mount a tmpfs: {}", io::Error::last_os_error());
        }
        dir
    }

    #[test]
    fn a_page_a_full_file_system_cannot_supply_fails_the_copy_and_the_process_lives() {
        let dir = small_tmpfs("full", "64k");
        let path = dir.join("disk.img");
        std::fs::write(&path, pattern(0x4000)).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let image = MappedImage::new(&file, 0x4000, true).expect("map");
        // A DISCARD's hole, then the file system filled by another file.
        // SAFETY: fallocate on our own descriptor; no memory is passed.
        let punched = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                0x1000,
            )
        };
        assert_eq!(punched, 0, "punch a hole: {}", io::Error::last_os_error());
        let mut filler = std::fs::File::create(dir.join("filler")).unwrap();
        while filler.write_all(&[1u8; 4096]).is_ok() {}
        let mem = guest();
        let err = image
            .write(0, &mem, &[segment(0, 0x1000)])
            .expect_err("a write into the hole of a full tmpfs");
        assert!(err.to_string().contains("could not supply"), "{err}");
        assert!(image.shrunk());
        drop((image, file, filler));
        let target = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        // SAFETY: unmounts the tmpfs this test mounted, in its namespace.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn images_with_holes_are_not_worth_mapping() {
        let shm = ShmFile::new("holes", &pattern(0x2000));
        assert_eq!(MappedImage::worth_mapping(&shm.file, 0x2000), Ok(()));
        shm.file.set_len(1 << 20).expect("grow sparse");
        let why = MappedImage::worth_mapping(&shm.file, 1 << 20).unwrap_err();
        assert!(why.contains("holes"), "{why}");
    }
}
