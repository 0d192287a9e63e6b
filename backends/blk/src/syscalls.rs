//! pvstack-blk's seccomp allow-list, on top of the runtime's and every
//! backend's (pvstack_sandbox::runtime, pvstack_sandbox::backend).

use pvstack_sandbox::Sysno;

/// The I/O engines: io_uring (rings made per connection, entered by the
/// workers), the sync engine's positioned reads and writes, flushes,
/// discard and write-zeroes (fallocate), the image size (ioctl on a block
/// device).
pub const BLK: &[Sysno] = &[
    Sysno::io_uring_setup,
    Sysno::io_uring_enter,
    Sysno::io_uring_register,
    Sysno::pread64,
    Sysno::pwrite64,
    Sysno::preadv,
    Sysno::pwritev,
    Sysno::preadv2,
    Sysno::pwritev2,
    Sysno::fsync,
    Sysno::fdatasync,
    Sysno::fallocate,
    Sysno::ioctl,
];
