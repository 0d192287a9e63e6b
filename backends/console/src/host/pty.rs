//! `--pty`: a pseudo-terminal whose other end a person opens with a
//! terminal program (`screen /dev/pts/N`). The slave is kept open here so
//! the PTY outlives its users, and in raw mode so bytes pass unchanged.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::hub::{Hub, Sink};

/// The master side's output: never blocks the guest. While nobody reads
/// the slave, output beyond what the PTY buffers is dropped (and counted).
struct Master {
    file: File,
    dropped: u64,
}

impl Sink for Master {
    fn write(&mut self, bytes: &[u8]) -> bool {
        let mut rest = bytes;
        while !rest.is_empty() {
            match self.file.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.dropped += rest.len() as u64;
                    log::warn!(
                        "PTY full (nobody reading it): {} bytes not shown there so far",
                        self.dropped
                    );
                    break;
                }
                Err(e) => {
                    log::warn!("cannot write to the PTY: {e}");
                    return false;
                }
            }
        }
        true
    }

    fn name(&self) -> String {
        "PTY".into()
    }
}

/// A PTY master opened non-blocking, the slave's path and its open fd.
struct Pty {
    master: File,
    slave_path: PathBuf,
    _slave: OwnedFd,
}

fn open_pty() -> io::Result<Pty> {
    // SAFETY: posix_openpt has no memory arguments; the result is checked.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let master = unsafe { File::from_raw_fd(fd) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt/unlockpt take the master fd; ptsname_r writes at most
    // name.len() bytes into `name`, NUL-terminated on success.
    let slave_path = unsafe {
        if libc::grantpt(fd) != 0
            || libc::unlockpt(fd) != 0
            || libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) != 0
        {
            return Err(io::Error::last_os_error());
        }
        PathBuf::from(CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned())
    };
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave_path)?;
    // SAFETY: termios is plain data filled by tcgetattr before use.
    unsafe {
        let mut termios: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(slave.as_raw_fd(), &mut termios) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut termios);
        if libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &termios) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(Pty {
        master,
        slave_path,
        _slave: slave.into(),
    })
}

/// Reads the non-blocking master, waiting with poll(2) in between.
struct PollingReader(File);

impl Read for PollingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let mut pollfd = libc::pollfd {
                        fd: self.0.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { libc::poll(&mut pollfd, 1, -1) };
                }
                other => return other,
            }
        }
    }
}

/// Opens the PTY, prints its path on stdout, attaches it and starts
/// reading it. Returns the slave's path.
pub fn start(hub: &Arc<Hub>) -> io::Result<PathBuf> {
    let pty = open_pty()?;
    let reader = PollingReader(pty.master.try_clone()?);
    println!("pvstack-console: pty {}", pty.slave_path.display());
    io::stdout().flush()?;
    hub.attach(
        Box::new(Master {
            file: pty.master,
            dropped: 0,
        }),
        false,
    );
    // The slave fd lives in the reader thread, as long as the process.
    let slave = pty._slave;
    super::spawn_input(hub, reader, "pty".into(), move || drop(slave))?;
    Ok(pty.slave_path)
}
