//! What a file descriptor a peer handed over really is, checked before
//! this process maps or polls it: a region mapped past the end of its
//! file faults (SIGBUS) on first touch, and a kick that is a pipe at end
//! of file keeps a level-triggered epoll loop awake for ever.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// A duplicate of `fd` to ask the kernel about it with std's calls.
fn inspect(fd: BorrowedFd<'_>) -> io::Result<File> {
    Ok(File::from(fd.try_clone_to_owned()?))
}

/// Checks that `fd` is a regular file (a memfd, a file on tmpfs or
/// hugetlbfs) holding at least `offset + len` bytes, so that `len` bytes
/// mapped from `offset` are all backed. `what` names the region in errors.
pub fn check_mappable(fd: BorrowedFd<'_>, offset: u64, len: u64, what: &str) -> io::Result<()> {
    let metadata = inspect(fd)?.metadata()?;
    if !metadata.file_type().is_file() {
        return Err(invalid(format!(
            "{what}: the descriptor is not a regular file"
        )));
    }
    let Some(end) = offset.checked_add(len) else {
        return Err(invalid(format!(
            "{what}: {len} bytes from offset {offset:#x} run past 2^64"
        )));
    };
    if metadata.len() < end {
        return Err(invalid(format!(
            "{what}: {len} bytes from offset {offset:#x} need a file of {end} bytes, it has {}",
            metadata.len()
        )));
    }
    Ok(())
}

/// Checks that `fd` is an eventfd (what vhost-user kick, call and error
/// descriptors are).
pub fn check_eventfd(fd: BorrowedFd<'_>, what: &str) -> io::Result<()> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let is_eventfd = match std::fs::read_link(&link) {
        Ok(target) => target.as_os_str() == "anon_inode:[eventfd]",
        // Without /proc, settle for an anonymous inode: not a pipe, a
        // socket or a file.
        Err(_) => {
            let file_type = inspect(fd)?.metadata()?.file_type();
            !(file_type.is_file()
                || file_type.is_dir()
                || file_type.is_symlink()
                || file_type.is_fifo()
                || file_type.is_socket()
                || file_type.is_char_device()
                || file_type.is_block_device())
        }
    };
    if !is_eventfd {
        return Err(invalid(format!("{what}: the descriptor is not an eventfd")));
    }
    Ok(())
}

/// Checks that `file` is a memfd sealed against shrinking, so that its
/// holder cannot cut it short under a mapping.
pub fn check_sealed(file: &File, what: &str) -> io::Result<()> {
    let memfd = memfd::Memfd::try_from_fd(inspect(file.as_fd())?)
        .map_err(|_| invalid(format!("{what}: not a memfd, so it cannot be sealed")))?;
    let seals = memfd.seals().map_err(|e| io::Error::other(e.to_string()))?;
    if !seals.contains(&memfd::FileSeal::SealShrink) {
        return Err(invalid(format!(
            "{what}: the memfd is not sealed against shrinking (F_SEAL_SHRINK)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use vmm_sys_util::eventfd::EventFd;

    fn memfd(len: u64) -> memfd::Memfd {
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .create("fds-test")
            .unwrap();
        memfd.as_file().set_len(len).unwrap();
        memfd
    }

    #[test]
    fn a_region_must_lie_inside_a_regular_file() {
        let file = memfd(8192).into_file();
        check_mappable(file.as_fd(), 0, 8192, "r").unwrap();
        check_mappable(file.as_fd(), 4096, 4096, "r").unwrap();
        let short = check_mappable(file.as_fd(), 4096, 8192, "region 0").unwrap_err();
        assert!(
            short
                .to_string()
                .contains("need a file of 12288 bytes, it has 8192"),
            "{short}"
        );
        assert!(check_mappable(file.as_fd(), u64::MAX, 2, "r").is_err());
        let (socket, _) = UnixStream::pair().unwrap();
        let err = check_mappable(socket.as_fd(), 0, 1, "r").unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn kicks_must_be_eventfds() {
        let event = EventFd::new(0).unwrap();
        // SAFETY: `event` owns the descriptor and outlives the borrow.
        let event_fd = unsafe { BorrowedFd::borrow_raw(event.as_raw_fd()) };
        check_eventfd(event_fd, "kick").unwrap();
        let (socket, _) = UnixStream::pair().unwrap();
        assert!(check_eventfd(socket.as_fd(), "kick").is_err());
        let file = memfd(1).into_file();
        assert!(check_eventfd(file.as_fd(), "kick").is_err());
    }

    #[test]
    fn only_a_memfd_sealed_against_shrinking_passes() {
        let memfd = memfd(4096);
        let err = check_sealed(memfd.as_file(), "inflight").unwrap_err();
        assert!(err.to_string().contains("F_SEAL_SHRINK"), "{err}");
        memfd.add_seal(memfd::FileSeal::SealShrink).unwrap();
        check_sealed(memfd.as_file(), "inflight").unwrap();
        let (socket, _) = UnixStream::pair().unwrap();
        let socket = File::from(std::os::fd::OwnedFd::from(socket));
        assert!(check_sealed(&socket, "inflight").is_err());
    }
}
