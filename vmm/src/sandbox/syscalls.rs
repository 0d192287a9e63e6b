//! pvstack's seccomp allow-lists, on top of the runtime's
//! (pvstack_sandbox::runtime).

use pvstack_sandbox::Sysno;

/// What every thread of `pvstack run` may do once the VM is set up (the
/// process-wide filter): KVM's ioctls, vhost-user connections (connect,
/// messages with descriptors, replies awaited with poll), reconnecting
/// and swapping backends, the control API's socket, the in-VMM emulated
/// devices' image and TAP I/O, the signal thread, and starting a
/// replacement backend child and stopping it (see [`BACKEND_START`]).
pub const VMM: &[Sysno] = &[
    Sysno::ioctl,
    Sysno::read,
    Sysno::readv,
    Sysno::pread64,
    Sysno::pwrite64,
    Sysno::preadv,
    Sysno::pwritev,
    Sysno::fsync,
    Sysno::fdatasync,
    Sysno::fallocate,
    Sysno::lseek,
    Sysno::socket,
    Sysno::socketpair,
    Sysno::connect,
    Sysno::accept4,
    Sysno::shutdown,
    Sysno::sendmsg,
    Sysno::recvmsg,
    Sysno::sendto,
    Sysno::recvfrom,
    Sysno::getsockopt,
    Sysno::setsockopt,
    Sysno::poll,
    Sysno::ppoll,
    Sysno::epoll_create1,
    Sysno::epoll_ctl,
    Sysno::epoll_wait,
    Sysno::eventfd2,
    Sysno::memfd_create,
    Sysno::ftruncate,
    Sysno::fstat,
    Sysno::newfstatat,
    Sysno::statx,
    Sysno::openat,
    Sysno::getdents64,
    Sysno::mkdir,
    Sysno::unlink,
    Sysno::unlinkat,
    Sysno::rmdir,
    Sysno::readlink,
    Sysno::rt_sigtimedwait,
    Sysno::rt_sigaction,
    // Starting and stopping backend children.
    Sysno::clone,
    Sysno::clone3,
    Sysno::execve,
    Sysno::wait4,
    Sysno::waitid,
    Sysno::kill,
    Sysno::pipe2,
    Sysno::dup2,
    Sysno::dup3,
    Sysno::getppid,
    Sysno::chown,
    Sysno::fchownat,
];

/// A backend child started after pvstack is confined (a supervisor
/// replacing one that died) inherits pvstack's filter through execve and
/// must be able to start and confine itself under it: the dynamic loader,
/// binding its sockets, dropping to `--user`, Landlock and its own filter
/// (which then narrows it to the backend's list).
pub const BACKEND_START: &[Sysno] = &[
    Sysno::arch_prctl,
    Sysno::set_tid_address,
    Sysno::prlimit64,
    Sysno::access,
    Sysno::fstatfs,
    Sysno::bind,
    Sysno::listen,
    Sysno::getuid,
    Sysno::getgid,
    Sysno::geteuid,
    Sysno::getegid,
    Sysno::setgroups,
    Sysno::setresuid,
    Sysno::setresgid,
    Sysno::setuid,
    Sysno::capget,
    Sysno::landlock_create_ruleset,
    Sysno::landlock_add_rule,
    Sysno::landlock_restrict_self,
    Sysno::seccomp,
    Sysno::io_uring_setup,
    Sysno::io_uring_enter,
    Sysno::io_uring_register,
    Sysno::preadv2,
    Sysno::pwritev2,
    Sysno::epoll_pwait,
    Sysno::dup,
    Sysno::uname,
];

/// A vCPU thread (its own filter, stacked on [`VMM`]): running the vCPU
/// and the exits it handles: MMIO and port I/O on the buses, hypercalls,
/// a device's activation, reset and the vhost-user messages they send
/// (memory table, rings, eventfds, the inflight region's descriptor), and
/// the emulated devices' image and TAP I/O. No new sockets, files,
/// processes or threads.
pub const VCPU: &[Sysno] = &[
    Sysno::ioctl,
    Sysno::read,
    Sysno::readv,
    Sysno::pread64,
    Sysno::pwrite64,
    Sysno::preadv,
    Sysno::pwritev,
    Sysno::fsync,
    Sysno::fdatasync,
    Sysno::fallocate,
    Sysno::lseek,
    Sysno::sendmsg,
    Sysno::recvmsg,
    Sysno::sendto,
    Sysno::recvfrom,
    Sysno::shutdown,
    Sysno::poll,
    Sysno::ppoll,
    Sysno::eventfd2,
    Sysno::fstat,
    Sysno::newfstatat,
    Sysno::statx,
];
