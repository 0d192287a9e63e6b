//! The TAP device: opened (and created if it does not exist) on
//! /dev/net/tun as `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, so every frame
//! read or written carries the same 12-byte virtio-net header the guest
//! uses, and offloads are handed through to the kernel untouched.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::error::Error;
use crate::frame::VNET_HDR_LEN;

/// Linux's limit on interface names, including the terminating NUL.
const IFNAMSIZ: usize = 16;
const TUN_DEVICE: &str = "/dev/net/tun";

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags; the rest
/// of the 40-byte union is padding.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks `name` the way the kernel will (dev_valid_name): 1 to 15 bytes,
/// not `.` or `..`, no `/`, `:` or whitespace. Refusing it here gives a
/// clear message instead of a bare EINVAL.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the TAP name is empty".to_string());
    }
    if name.len() >= IFNAMSIZ {
        return Err(format!(
            "the TAP name {name:?} is {} bytes; at most {} fit",
            name.len(),
            IFNAMSIZ - 1
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "the TAP name {name:?} contains {bad:?}, which interface names cannot"
        ));
    }
    Ok(())
}

/// An open TAP queue.
pub struct Tap {
    name: String,
    file: File,
    /// Whether TUNSETOFFLOAD accepted checksum and TSO offloads when the
    /// device was opened (so they can be offered to the guest).
    offloads_supported: bool,
}

impl Tap {
    /// Opens TAP `name`, creating it if needed, non-blocking, with virtio-net
    /// headers of [`VNET_HDR_LEN`] bytes.
    pub fn open(name: &str) -> Result<Self, Error> {
        validate_name(name).map_err(|reason| Error::TapName { reason })?;
        let tap_error = |what: &'static str, source: io::Error| Error::Tap {
            name: name.to_string(),
            what,
            cause: source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(|source| match source.kind() {
                io::ErrorKind::PermissionDenied => Error::TunPermission {
                    name: name.to_string(),
                },
                _ => Error::TunDevice { cause: source },
            })?;
        let mut request = IfReq {
            name: [0; IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; `request` is
        // one (40 bytes, laid out as the kernel expects) and outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        if rc < 0 {
            let source = io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => Error::TapPermission {
                    name: name.to_string(),
                },
                Some(libc::EBUSY) => Error::TapBusy {
                    name: name.to_string(),
                },
                _ => tap_error("cannot attach to it (TUNSETIFF)", source),
            });
        }
        let header_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &header_len) };
        if rc < 0 {
            return Err(tap_error(
                "cannot set the virtio-net header size (TUNSETVNETHDRSZ)",
                io::Error::last_os_error(),
            ));
        }
        let mut tap = Tap {
            name: name.to_string(),
            file,
            offloads_supported: false,
        };
        let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
        tap.offloads_supported = tap.set_offload(all).is_ok();
        tap.set_offload(0)
            .map_err(|source| tap_error("cannot clear its offloads (TUNSETOFFLOAD)", source))?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the kernel takes checksum and TSO offloads on this TAP.
    pub fn offloads_supported(&self) -> bool {
        self.offloads_supported
    }

    /// Tells the kernel which offloads the receiver (the guest) handles:
    /// `TUN_F_*` bits. With 0 every frame read is complete and checksummed.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (header included); `Ok(None)` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match (&self.file).read(buf) {
            Ok(len) => Ok(Some(len)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one frame (header included).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        (&self.file).write(frame).map(|_| ())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_like_the_kernel_does() {
        assert!(validate_name("tap0").is_ok());
        assert!(validate_name("a23456789012345").is_ok());
        let long = validate_name("a234567890123456").unwrap_err();
        assert!(long.contains("at most 15"), "{long}");
        assert!(validate_name("").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name("a/b").unwrap_err().contains("'/'"));
        assert!(validate_name("a b").is_err());
        assert!(validate_name("a:b").is_err());
    }
}
