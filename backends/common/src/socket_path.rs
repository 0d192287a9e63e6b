use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;

use crate::Error;

/// Whether a socket at `path` is still held by a process: a stream socket
/// someone listens on, or a bound datagram socket. Only a refused
/// connection means a socket left behind; any other failure (of
/// permissions, say) counts as in use, so nothing live is ever removed.
fn in_use(path: &Path) -> bool {
    match UnixStream::connect(path) {
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => false,
        // A datagram socket is bound there (EPROTOTYPE): is it alive?
        Err(_) => match UnixDatagram::unbound().and_then(|probe| probe.connect(path)) {
            Ok(()) => true,
            Err(e) => e.kind() != ErrorKind::ConnectionRefused,
        },
    }
}

/// Makes `path` free for a new socket (stream or datagram): nothing there
/// is fine; a socket nobody holds any more (left by a crashed run) is
/// removed; a socket a process still listens on or is bound to, or any
/// other kind of file, is refused.
pub fn prepare_socket_path(path: &Path) -> Result<(), Error> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::InspectSocket {
                path: path.to_owned(),
                cause: source,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(Error::NotASocket {
            path: path.to_owned(),
        });
    }
    if in_use(path) {
        return Err(Error::SocketInUse {
            path: path.to_owned(),
        });
    }
    log::info!("removing stale socket file");
    std::fs::remove_file(path).map_err(|source| Error::RemoveStaleSocket {
        path: path.to_owned(),
        cause: source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn scratch_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pvstack-common-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    }

    #[test]
    fn absent_path_is_free() {
        let dir = scratch_dir("absent");
        prepare_socket_path(&dir.join("sock")).expect("absent path accepted");
        std::fs::remove_dir_all(&dir).expect("remove scratch dir");
    }

    #[test]
    fn stale_socket_is_removed() {
        let dir = scratch_dir("stale");
        let path = dir.join("sock");
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists(), "UnixListener leaves its file behind");
        prepare_socket_path(&path).expect("stale socket replaced");
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).expect("remove scratch dir");
    }

    #[test]
    fn live_socket_is_refused() {
        let dir = scratch_dir("live");
        let path = dir.join("sock");
        let _listener = UnixListener::bind(&path).expect("bind");
        let err = prepare_socket_path(&path).expect_err("live socket refused");
        assert!(matches!(err, Error::SocketInUse { .. }), "{err}");
        assert!(path.exists());
        std::fs::remove_dir_all(&dir).expect("remove scratch dir");
    }

    #[test]
    fn bound_datagram_socket_is_refused_and_a_stale_one_removed() {
        let dir = scratch_dir("datagram");
        let path = dir.join("sock");
        let bound = UnixDatagram::bind(&path).expect("bind");
        let err = prepare_socket_path(&path).expect_err("live datagram socket refused");
        assert!(matches!(err, Error::SocketInUse { .. }), "{err}");
        drop(bound);
        prepare_socket_path(&path).expect("stale datagram socket replaced");
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).expect("remove scratch dir");
    }

    #[test]
    fn regular_file_is_refused_and_kept() {
        let dir = scratch_dir("regular");
        let path = dir.join("sock");
        std::fs::write(&path, b"precious").expect("write file");
        let err = prepare_socket_path(&path).expect_err("regular file refused");
        assert!(matches!(err, Error::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&path).expect("read back"), b"precious");
        std::fs::remove_dir_all(&dir).expect("remove scratch dir");
    }
}
