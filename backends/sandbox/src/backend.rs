//! What every vhost-user backend process does once it serves frontends,
//! whatever its device: the allow-list the three backends share, on top
//! of [`crate::runtime::RUNTIME`].

use syscalls::Sysno;

/// Serving vhost-user frontends: accepting them (and, behind a message
/// filter, joining each to the daemon's socket), passing messages with
/// their file descriptors, mapping the guest memory and inflight regions
/// they send, epoll and eventfds in the queue workers, starting a fresh
/// daemon's threads for each connection, reading /proc/loadavg for
/// adaptive polling, removing the socket files (and the filter's daemon directory) at exit, checking what a
/// frontend hands over (readlink of /proc/self/fd/N tells an eventfd) and
/// who it is (getsockopt SO_PEERCRED, compared with geteuid), bounding how long a frontend may
/// take (socket timeouts).
pub const SERVE: &[Sysno] = &[
    Sysno::accept4,
    Sysno::socket,
    Sysno::connect,
    Sysno::shutdown,
    Sysno::getsockopt,
    Sysno::geteuid,
    Sysno::setsockopt,
    Sysno::sendmsg,
    Sysno::recvmsg,
    Sysno::sendto,
    Sysno::recvfrom,
    Sysno::poll,
    Sysno::ppoll,
    Sysno::epoll_create1,
    Sysno::epoll_ctl,
    Sysno::epoll_wait,
    Sysno::epoll_pwait,
    Sysno::eventfd2,
    Sysno::read,
    Sysno::readv,
    Sysno::memfd_create,
    Sysno::ftruncate,
    Sysno::fstat,
    Sysno::newfstatat,
    Sysno::statx,
    Sysno::lseek,
    Sysno::openat,
    Sysno::readlink,
    Sysno::readlinkat,
    Sysno::dup,
    Sysno::clone3,
    Sysno::clone,
    Sysno::rt_sigtimedwait,
    Sysno::unlink,
    Sysno::unlinkat,
    Sysno::rmdir,
];
