//! Unix sockets whose file has the permissions asked for from the moment
//! it exists: 0600 by default (only this user, and root, may connect or
//! send), or the `--socket-mode` a user gives to share one. The mode is
//! set on the socket before `bind` creates its file (Linux creates the
//! file with the socket's own mode, less the umask), so the file is never
//! open to more users than asked, whatever the umask; where the umask
//! took away bits a shared mode asked for, they are added back on the
//! file `bind` made (opened without following links) before anyone can
//! connect.

use std::ffi::OsStr;
use std::fs::{OpenOptions, Permissions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;

/// The permissions of a socket file unless told otherwise.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// The connections a listening socket queues before they are accepted.
const BACKLOG: libc::c_int = 128;

/// Parses an octal mode for `--socket-mode` (e.g. `600`, `0660`): only
/// permission bits, and the owner must be able to connect (`rw` for the
/// owner).
pub fn parse_socket_mode(text: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("`{text}` is not an octal mode from 0 to 777"))?;
    if mode & 0o600 != 0o600 {
        return Err(format!(
            "mode {mode:04o} leaves the owner unable to connect (it needs 0600)"
        ));
    }
    Ok(mode)
}

/// A stream socket listening at `path` (which must be free: see
/// [`crate::prepare_socket_path`]) whose file has permissions `mode`.
pub fn listen_with_mode(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let socket = bound(path, libc::SOCK_STREAM, mode)?;
    // SAFETY: listen on a socket this function owns.
    if unsafe { libc::listen(socket.as_raw_fd(), BACKLOG) } != 0 {
        let error = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(error);
    }
    Ok(UnixListener::from(socket))
}

/// A datagram socket bound at `path` (which must be free) whose file has
/// permissions `mode`.
pub fn bind_datagram_with_mode(path: &Path, mode: u32) -> io::Result<UnixDatagram> {
    Ok(UnixDatagram::from(bound(path, libc::SOCK_DGRAM, mode)?))
}

/// A new Unix socket of `kind`, given `mode`, then bound at `path`.
fn bound(path: &Path, kind: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    let address = socket_address(path.as_os_str())?;
    // SAFETY: socket(2) with constant arguments; a non-negative result is
    // a new descriptor that nothing else owns.
    let fd = unsafe { libc::socket(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created above and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fchmod on a descriptor this function owns.
    if unsafe { libc::fchmod(socket.as_raw_fd(), mode as libc::mode_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let length = std::mem::size_of::<libc::sa_family_t>() + path.as_os_str().len() + 1;
    // SAFETY: `address` is a sockaddr_un that lives for the call, and
    // `length` covers its family and the NUL-terminated path in it.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const address).cast(),
            length as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if let Err(error) = widen_to(path, mode) {
        let _ = std::fs::remove_file(path);
        return Err(error);
    }
    Ok(socket)
}

/// Gives the socket file at `path` exactly `mode` where the umask left it
/// narrower. The file is opened with O_PATH|O_NOFOLLOW and changed through
/// that descriptor, so a link planted at `path` meanwhile changes nothing.
fn widen_to(path: &Path, mode: u32) -> io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the socket's file was replaced as it was made",
        ));
    }
    if metadata.permissions().mode() & 0o777 == mode {
        return Ok(());
    }
    // chmod(2) does not take an O_PATH descriptor; its /proc link does.
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    std::fs::set_permissions(link, Permissions::from_mode(mode))
}

/// `path` as a socket address, NUL-terminated; a path that does not fit
/// (about 107 bytes) or holds a NUL is refused.
fn socket_address(path: &OsStr) -> io::Result<libc::sockaddr_un> {
    // SAFETY: sockaddr_un is plain data for which all zeroes is valid.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    if bytes.is_empty() || bytes.contains(&0) || bytes.len() >= address.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a socket path must be 1 to {} bytes without NUL",
                address.sun_path.len() - 1
            ),
        ));
    }
    for (slot, &byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = byte as libc::c_char;
    }
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

    fn scratch_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pvstack-socket-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn sockets_get_the_mode_asked_for_and_work() {
        let dir = scratch_dir("modes");
        let stream = dir.join("stream");
        let listener = listen_with_mode(&stream, DEFAULT_SOCKET_MODE).unwrap();
        assert_eq!(mode_of(&stream), 0o600);
        let _client = UnixStream::connect(&stream).unwrap();
        listener.accept().unwrap();
        let shared = dir.join("shared");
        let _shared = listen_with_mode(&shared, 0o660).unwrap();
        assert_eq!(mode_of(&shared), 0o660);
        let datagram = dir.join("datagram");
        let bound = bind_datagram_with_mode(&datagram, 0o600).unwrap();
        assert_eq!(mode_of(&datagram), 0o600);
        UnixDatagram::unbound()
            .unwrap()
            .send_to(b"x", &datagram)
            .unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(bound.recv(&mut buf).unwrap(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_shared_mode_survives_the_umask() {
        let dir = scratch_dir("umask");
        let path = dir.join("sock");
        // SAFETY: umask(2) cannot fail; other tests' sockets get at most
        // the mode they ask for whatever the umask (that is the point).
        let old = unsafe { libc::umask(0o077) };
        let bound = listen_with_mode(&path, 0o660);
        // SAFETY: as above, restoring the mask.
        unsafe { libc::umask(old) };
        bound.unwrap();
        assert_eq!(mode_of(&path), 0o660);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_taken_or_overlong_path_is_refused() {
        let dir = scratch_dir("refused");
        let path = dir.join("sock");
        let _first = listen_with_mode(&path, 0o600).unwrap();
        let err = listen_with_mode(&path, 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        let long = dir.join("x".repeat(120));
        let err = listen_with_mode(&long, 0o600).unwrap_err();
        assert!(err.to_string().contains("socket path"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modes_are_octal_and_let_the_owner_in() {
        assert_eq!(parse_socket_mode("600"), Ok(0o600));
        assert_eq!(parse_socket_mode("0660"), Ok(0o660));
        assert_eq!(parse_socket_mode("777"), Ok(0o777));
        for bad in ["", "rw", "1000", "800", "0400", "066"] {
            assert!(parse_socket_mode(bad).is_err(), "{bad}");
        }
    }
}
