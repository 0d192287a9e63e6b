//! The raw image file behind the disk: positioned reads and writes straight
//! between the file and guest memory, flush, discard and write-zeroes.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::config::SECTOR_SIZE;
use crate::Error;

/// Alignment of bounce buffers for O_DIRECT, enough for any logical block size.
const DIRECT_ALIGN: usize = 4096;
/// Most iovecs one preadv/pwritev takes (IOV_MAX on Linux).
const MAX_IOVECS: usize = 1024;
/// Chunk written at a time when write-zeroes falls back to writing.
const ZERO_CHUNK: usize = 1 << 20;

/// An open raw image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
    direct: bool,
}

impl DiskImage {
    /// Opens `path` read-write (read-only with `readonly`), with O_DIRECT when
    /// `direct`. The image must be a regular file or a block device of at
    /// least one sector; a trailing partial sector is not exposed.
    pub fn open(path: &Path, readonly: bool, direct: bool) -> Result<Self, Error> {
        let mut options = OpenOptions::new();
        options.read(true).write(!readonly);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let mut file = options.open(path).map_err(|source| {
            if direct && source.raw_os_error() == Some(libc::EINVAL) {
                Error::DirectUnsupported {
                    path: path.to_owned(),
                }
            } else {
                Error::OpenImage {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        let file_type = file
            .metadata()
            .map_err(|source| Error::ImageSize {
                path: path.to_owned(),
                source,
            })?
            .file_type();
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(Error::NotAnImage {
                path: path.to_owned(),
            });
        }
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| Error::ImageSize {
                path: path.to_owned(),
                source,
            })?;
        if size < SECTOR_SIZE {
            return Err(Error::ImageTooSmall {
                path: path.to_owned(),
                size,
            });
        }
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "image {} is {size} bytes, not a whole number of sectors; the last {} bytes are not exposed",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(DiskImage {
            file,
            path: path.to_owned(),
            size,
            readonly,
            direct,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Fills `buffers` (host memory, e.g. mapped guest memory) with the image
    /// bytes starting at `offset`.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes for the whole
    /// call and that nothing else reads or writes meanwhile.
    pub unsafe fn read_vectored_at(
        &self,
        offset: u64,
        buffers: &mut [libc::iovec],
    ) -> io::Result<()> {
        // SAFETY: passed on from our caller.
        unsafe { self.transfer(Direction::Read, offset, buffers) }
    }

    /// Writes `buffers` to the image starting at `offset`.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads for the whole
    /// call.
    pub unsafe fn write_vectored_at(
        &self,
        offset: u64,
        buffers: &mut [libc::iovec],
    ) -> io::Result<()> {
        // SAFETY: passed on from our caller.
        unsafe { self.transfer(Direction::Write, offset, buffers) }
    }

    /// Moves the bytes of `buffers` in `direction`, through an aligned
    /// bounce buffer when the image is opened with O_DIRECT (the iovecs
    /// need not be aligned).
    ///
    /// # Safety
    /// Every iovec must describe memory valid for `direction` (writes for a
    /// read, reads for a write) for the whole call that nothing else writes
    /// meanwhile.
    unsafe fn transfer(
        &self,
        direction: Direction,
        offset: u64,
        buffers: &mut [libc::iovec],
    ) -> io::Result<()> {
        if !self.direct {
            return self.transfer_all(direction, offset, buffers);
        }
        let mut bounce = AlignedBuffer::new(iovecs_len(buffers))?;
        if let Direction::Write = direction {
            // SAFETY: passed on from our caller; `bounce` holds the sum of
            // all iovec lengths.
            unsafe { bounce.exchange(Direction::Write, buffers) };
        }
        self.transfer_all(direction, offset, &mut [bounce.as_iovec()])?;
        if let Direction::Read = direction {
            // SAFETY: as above.
            unsafe { bounce.exchange(Direction::Read, buffers) };
        }
        Ok(())
    }

    /// Makes written data durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Tells the filesystem the range is unused (punches a hole). Discard is
    /// advisory, so a filesystem without hole punching is not an error.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                log::debug!(
                    "discard not supported by the filesystem of {}",
                    self.path.display()
                );
                Ok(())
            }
            other => other,
        }
    }

    /// Makes the range read as zeroes: a punched hole when `unmap` allows it,
    /// else FALLOC_FL_ZERO_RANGE, else writing zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let unsupported = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
            )
        };
        if unmap {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if unsupported(&e) => {}
                other => return other,
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => self.write_zero_bytes(offset, len),
            other => other,
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let mut zeroes = AlignedBuffer::new(ZERO_CHUNK)?;
        while offset < end {
            let chunk = (end - offset).min(ZERO_CHUNK as u64) as usize;
            let mut iov = zeroes.as_iovec();
            iov.iov_len = chunk;
            self.transfer_all(Direction::Write, offset, &mut [iov])?;
            offset += chunk as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let len =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: fallocate only acts on our own open file descriptor.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// preadv/pwritev until every byte is transferred, resuming after short
    /// transfers and splitting at IOV_MAX. Consumes the iovecs as it goes.
    fn transfer_all(
        &self,
        direction: Direction,
        mut offset: u64,
        iovecs: &mut [libc::iovec],
    ) -> io::Result<()> {
        let mut first = 0;
        while first < iovecs.len() {
            if iovecs[first].iov_len == 0 {
                first += 1;
                continue;
            }
            let batch = &iovecs[first..iovecs.len().min(first + MAX_IOVECS)];
            let pos = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: every iovec points at memory valid for this direction
            // (guaranteed by the public callers' contracts or owned buffers);
            // the count is at most IOV_MAX.
            let done = unsafe {
                match direction {
                    Direction::Read => libc::preadv(
                        self.file.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as libc::c_int,
                        pos,
                    ),
                    Direction::Write => libc::pwritev(
                        self.file.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as libc::c_int,
                        pos,
                    ),
                }
            };
            if done < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if done == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("image {} ended at offset {offset}", self.path.display()),
                ));
            }
            let mut left = done as usize;
            offset += left as u64;
            while left > 0 {
                let iov = &mut iovecs[first];
                let step = left.min(iov.iov_len);
                // SAFETY: `step` <= iov_len, so the new base stays inside (or
                // one past the end of) the same buffer.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(step) }.cast();
                iov.iov_len -= step;
                left -= step;
                if iov.iov_len == 0 {
                    first += 1;
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

fn iovecs_len(iovecs: &[libc::iovec]) -> usize {
    iovecs.iter().map(|iov| iov.iov_len).sum()
}

/// A zeroed heap buffer aligned for O_DIRECT.
struct AlignedBuffer {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuffer {
    fn new(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), DIRECT_ALIGN)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(AlignedBuffer { ptr, layout })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points at `layout.size()` initialised (zeroed) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }

    /// Copies between the buffer and `buffers` laid end to end at its
    /// start: out of the buffer into them for a read, into it for a write.
    ///
    /// # Safety
    /// The buffer must hold at least the sum of the iovec lengths; every
    /// iovec must be memory valid for the copy (writes for a read, reads
    /// for a write) that nothing else writes meanwhile.
    unsafe fn exchange(&mut self, direction: Direction, buffers: &[libc::iovec]) {
        let mut copied = 0;
        for iov in buffers {
            let iov_base = iov.iov_base.cast::<u8>();
            // SAFETY: the caller's contract; `copied + iov_len` stays within
            // the sum of the iovec lengths, which the buffer holds.
            unsafe {
                match direction {
                    Direction::Read => std::ptr::copy_nonoverlapping(
                        self.as_slice().as_ptr().add(copied),
                        iov_base,
                        iov.iov_len,
                    ),
                    Direction::Write => std::ptr::copy_nonoverlapping(
                        iov_base,
                        self.as_mut_slice().as_mut_ptr().add(copied),
                        iov.iov_len,
                    ),
                }
            }
            copied += iov.iov_len;
        }
    }

    fn as_iovec(&mut self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: self.layout.size(),
        }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this very layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}
