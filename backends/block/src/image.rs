//! The raw image file behind the disk: positioned reads and writes straight
//! between the file and guest memory (or copies through a mapping of an
//! image in memory, [`crate::mapped`]), flush, discard and write-zeroes.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::bounce::AlignedBuffer;
use crate::config::SECTOR_SIZE;
use crate::mapped::MappedImage;
use crate::Error;

/// O_DIRECT alignment assumed where the kernel does not report it
/// (statx STATX_DIOALIGN, Linux 6.1 on): enough for any logical block size.
const DEFAULT_DIRECT_ALIGN: usize = 4096;
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
    alignment: DirectAlignment,
    /// On tmpfs or ramfs: its bytes live in memory.
    in_memory: bool,
    /// The file mapped, once [`DiskImage::map`] has mapped it.
    mapping: Option<MappedImage>,
}

/// What O_DIRECT asks of a transfer: buffer addresses aligned to
/// `memory`, buffer lengths and file offsets to `length` (the logical
/// block size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAlignment {
    pub memory: usize,
    pub length: usize,
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
                    cause: source,
                }
            }
        })?;
        let file_type = file
            .metadata()
            .map_err(|source| Error::ImageSize {
                path: path.to_owned(),
                cause: source,
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
                cause: source,
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
        let alignment = direct_alignment(&file).unwrap_or(DirectAlignment {
            memory: DEFAULT_DIRECT_ALIGN,
            length: DEFAULT_DIRECT_ALIGN,
        });
        // A block device's node lives on devtmpfs, which reports tmpfs's
        // magic: only a regular file's bytes can be in memory.
        let in_memory = file_type.is_file() && in_memory(&file);
        Ok(DiskImage {
            file,
            path: path.to_owned(),
            size,
            readonly,
            direct,
            alignment,
            in_memory,
            mapping: None,
        })
    }

    /// Maps an image in memory opened without O_DIRECT, so reads and
    /// writes become copies ([`crate::mapped`]); returns why it does not
    /// map it, if it does not.
    pub fn map(&mut self) -> Result<(), String> {
        if !self.in_memory {
            return Err("it is not a file in memory (tmpfs, ramfs)".into());
        }
        if self.direct {
            return Err("it is opened with O_DIRECT".into());
        }
        MappedImage::worth_mapping(&self.file, self.size)?;
        let mapping = MappedImage::new(&self.file, self.size, !self.readonly)
            .map_err(|e| format!("cannot map it: {e}"))?;
        self.mapping = Some(mapping);
        Ok(())
    }

    /// The mapping reads and writes go through, while it can be used (not
    /// after the file was found to have shrunk under it).
    pub fn mapping(&self) -> Option<&MappedImage> {
        self.mapping.as_ref().filter(|mapping| !mapping.shrunk())
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

    /// Whether the image lives in memory (tmpfs, ramfs): a read or write
    /// is a copy that never waits for a device.
    pub fn is_in_memory(&self) -> bool {
        self.in_memory
    }

    /// The open file, for engines that submit I/O on it themselves.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// What O_DIRECT asks of a transfer on this image, if it is opened
    /// with O_DIRECT.
    pub fn direct_alignment(&self) -> Option<DirectAlignment> {
        self.direct.then_some(self.alignment)
    }

    /// Whether the kernel takes `iovecs` as they are: always without
    /// O_DIRECT; with it, only when every buffer address and every length
    /// is aligned as O_DIRECT asks (else they go through a bounce buffer).
    pub fn takes_directly(&self, iovecs: &[libc::iovec]) -> bool {
        match self.direct_alignment() {
            None => true,
            Some(alignment) => iovecs.iter().all(|iov| {
                iov.iov_base as usize % alignment.memory == 0 && iov.iov_len % alignment.length == 0
            }),
        }
    }

    /// Fills `buffers` (host memory, e.g. mapped guest memory) with the image
    /// bytes starting at `offset`, with as few preadv calls as it takes.
    /// With O_DIRECT the buffers must be aligned ([`Self::takes_directly`]).
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes for the whole
    /// call.
    pub unsafe fn read_vectored_at(
        &self,
        offset: u64,
        buffers: &mut [libc::iovec],
    ) -> io::Result<()> {
        self.transfer_all(Direction::Read, offset, buffers)
    }

    /// Writes `buffers` to the image starting at `offset`. With O_DIRECT
    /// the buffers must be aligned ([`Self::takes_directly`]).
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads for the whole
    /// call.
    pub unsafe fn write_vectored_at(
        &self,
        offset: u64,
        buffers: &mut [libc::iovec],
    ) -> io::Result<()> {
        self.transfer_all(Direction::Write, offset, buffers)
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
            self.transfer_all(Direction::Write, offset, &mut [zeroes.iovec(chunk)])?;
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

/// Which way bytes move between the image and memory.
#[derive(Clone, Copy)]
pub(crate) enum Direction {
    /// Image to memory.
    Read,
    /// Memory to image.
    Write,
}

/// The O_DIRECT alignment the kernel reports for `file` (statx
/// STATX_DIOALIGN), if it does.
fn direct_alignment(file: &File) -> Option<DirectAlignment> {
    // SAFETY: statx is plain old data; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on our own open descriptor with an empty path
    // (AT_EMPTY_PATH) writes only into `stx`, which outlives the call.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let (memory, length) = (
        stx.stx_dio_mem_align as usize,
        stx.stx_dio_offset_align as usize,
    );
    (memory.is_power_of_two() && length.is_power_of_two())
        .then_some(DirectAlignment { memory, length })
}

/// Whether `file` is on a memory file system (tmpfs, ramfs).
fn in_memory(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: statfs is plain old data; all zeroes is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs on our own open descriptor writes only into `fs`.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) };
    rc == 0 && matches!(fs.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}
