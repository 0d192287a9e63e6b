//! pvstack's seccomp allow-lists, on top of the runtime's
//! (pvstack_sandbox::runtime); `super` says which filter holds which.

use pvstack_sandbox::Sysno;

/// What `pvstack run` needs beyond what its backends do. Its
/// process-wide filter (every thread) allows this, [`BACKEND_START`] and
/// each backend's lists, because pvstack does what they do: it speaks
/// vhost-user and connects to backends (`pvstack_sandbox::backend`),
/// serves emulated disks and NICs with the same calls as pvstack-blk and
/// pvstack-net, and the backends it (re)starts inherit its filter.
/// Beyond that: snapshots (a directory,
/// guest memory copied in the kernel, files renamed into place, which the
/// console log's rotation does too), a take-over's socket pair, the
/// lowest priority a taking-over pvstack gives the thread that creates
/// its VM (it runs under this filter, inherited), and starting, watching
/// and stopping backend children.
pub const VMM: &[Sysno] = &[
    Sysno::socketpair,
    Sysno::getdents64,
    Sysno::mkdir,
    Sysno::rename,
    Sysno::sendfile,
    Sysno::setpriority,
    // Starting and stopping backend children, and a take-over.
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
/// binding its sockets with their mode (fchmod on the socket before bind;
/// chmod through /proc/self/fd where the umask narrowed a shared
/// `--socket-mode`, which glibc makes chmod or fchmodat), dropping to
/// `--user`, Landlock and its own filter (which then narrows it to the
/// backend's list).
pub const BACKEND_START: &[Sysno] = &[
    Sysno::arch_prctl,
    Sysno::set_tid_address,
    Sysno::prlimit64,
    Sysno::access,
    Sysno::fstatfs,
    Sysno::bind,
    Sysno::listen,
    Sysno::fchmod,
    Sysno::chmod,
    Sysno::fchmodat,
    Sysno::getuid,
    Sysno::getgid,
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
    Sysno::uname,
];

/// A vCPU thread (its own filter, stacked on the process-wide one, so
/// only what both allow is allowed): running the vCPU
/// and the exits it handles: MMIO and port I/O on the buses, hypercalls,
/// a device's activation, reset and the vhost-user messages they send
/// (memory table, rings, eventfds, the inflight region's descriptor), and
/// the emulated devices' image and TAP I/O, and pvstack's own guest's
/// console lines (hypercalls) into `--console-log`, which the vCPU that
/// writes the line past the size limit rotates (rename, then open the
/// file afresh). One thread: a driver's reset of a vhost-user device
/// stops the backend's rings on a thread the vCPU starts
/// (pvstack_devices' vhost_user::reset), which inherits this filter and
/// needs nothing beyond it. No new sockets or processes (clone is allowed
/// for that thread, but execve is not).
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
    Sysno::rename,
    Sysno::openat,
    Sysno::clone3,
    Sysno::clone,
];
