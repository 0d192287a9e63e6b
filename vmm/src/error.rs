//! The crate's one error type. Every variant says what pvstack was doing
//! and on which file or device, so that `main` can print it as one line.

use std::path::PathBuf;

/// Everything that can go wrong in pvstack.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The seccomp filters could not be built or installed.
    #[error("sandbox: {0}")]
    Sandbox(String),
    /// The KVM device could not be opened.
    #[error("cannot open KVM device {path}: {cause}")]
    KvmOpen {
        path: PathBuf,
        cause: kvm_ioctls::Error,
    },
    /// The file opened but does not answer KVM ioctls.
    #[error("{path} is not a KVM device (KVM_GET_API_VERSION failed)")]
    NotKvm { path: PathBuf },
    /// The KVM device speaks another API version.
    #[error("KVM device {path} has API version {found}, pvstack needs {expected}")]
    KvmApiVersion {
        path: PathBuf,
        found: i32,
        expected: i32,
    },
    /// A KVM capability pvstack relies on is missing.
    #[error("KVM lacks the {0} capability")]
    KvmCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM: cannot {what}: {cause}")]
    Kvm {
        what: &'static str,
        cause: kvm_ioctls::Error,
    },
    /// The VM configuration is out of range.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// The guest memory size is unusable on this host.
    #[error("guest memory of {requested} bytes is more than this host has ({available} bytes in /proc/meminfo)")]
    MemoryTooLarge { requested: u64, available: u64 },
    /// More vCPUs than KVM offers.
    #[error("{requested} vCPUs requested, KVM allows at most {max}")]
    TooManyVcpus { requested: u32, max: usize },
    /// Creating or mapping guest memory failed.
    #[error("cannot create guest memory of {size} bytes: {cause}")]
    Memory { size: u64, cause: std::io::Error },
    /// The host has too few free hugetlbfs pages for `--hugepages`.
    #[error("--hugepages: cannot take {needed} huge pages of 2 MiB for guest RAM ({cause}); the host has {free} free (HugePages_Free in /proc/meminfo): reserve more with sysctl vm.nr_hugepages")]
    HugePages {
        needed: u64,
        free: u64,
        cause: std::io::Error,
    },
    /// vm-memory refused the region layout.
    #[error("cannot map guest memory: {0}")]
    MemoryMap(vm_memory::mmap::FromRangesError),
    /// Writing the VMM's structures (page tables, GDT) into guest memory failed.
    #[error("cannot write {what} into guest memory: {cause}")]
    GuestWrite {
        what: &'static str,
        cause: vm_memory::GuestMemoryError,
    },
    /// Reading a file failed.
    #[error("cannot {action} {path}: {cause}")]
    File {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The guest image is not a usable kernel.
    #[error("{image}: {reason}")]
    BadImage { image: String, reason: String },
    /// The options do not fit together or do not fit the kernel (exit
    /// status 2, like a command-line error).
    #[error("{0}")]
    Usage(String),
    /// A Linux kernel on a host where it cannot run.
    #[error("{image} is a Linux kernel: a stock Linux kernel runs at CPL0, which PVM does not run natively (it emulates every instruction and soon fails); run it on a VMX or SVM host (--guest-privilege kernel tries anyway)")]
    LinuxOnPvm { image: String },
    /// The initial ramdisk cannot be used.
    #[error("initrd {path}: {reason}")]
    Initrd { path: PathBuf, reason: String },
    /// KVM refused one of the boot MSRs.
    #[error("KVM: cannot set MSR {index:#x}")]
    Msr { index: u32 },
    /// A `--blk` device could not be created.
    #[error("--blk number {index}: {cause}")]
    Blk {
        index: u32,
        cause: pvstack_devices::Error,
    },
    /// The `--console` or `--serial` device could not be created.
    #[error("--{option}: {cause}")]
    Console {
        option: &'static str,
        cause: pvstack_devices::Error,
    },
    /// A `--net` device could not be created.
    #[error("--net number {index}: {cause}")]
    Net {
        index: u32,
        cause: pvstack_devices::Error,
    },
    /// A device could not be attached.
    #[error("cannot add device at slot {slot}: {reason}")]
    Device { slot: u32, reason: String },
    /// A thread or signal could not be set up.
    #[error("cannot {what}: {cause}")]
    Os {
        what: &'static str,
        cause: std::io::Error,
    },
    /// The control API answered with something unreadable.
    #[error("control API: {0}")]
    Api(String),
    /// A snapshot directory cannot be used (missing, truncated, another
    /// version, another host): the message names the difference.
    #[error("snapshot {dir}: {reason}")]
    Snapshot {
        dir: std::path::PathBuf,
        reason: String,
    },
    /// A snapshot or take-over failed while the VM ran.
    #[error("{0}")]
    Takeover(String),
    /// A device failed while being saved or restored.
    #[error(transparent)]
    Devices(#[from] pvstack_devices::Error),
}

/// Short for results with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A KVM ioctl failure with what pvstack was trying to do.
    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |cause| Error::Kvm { what, cause }
    }

    /// Whether the error is the user's command line (exit status 2)
    /// rather than a runtime failure (exit status 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Usage(_))
    }

    /// A failed write of a VMM structure into guest memory.
    pub fn guest_write(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error {
        move |cause| Error::GuestWrite { what, cause }
    }
}
