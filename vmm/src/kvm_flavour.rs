//! Which kind of KVM this host runs: Intel VMX, AMD SVM or PVM (software
//! KVM where guest code runs natively only at CPL3; see vmm/README.md),
//! and the guest privilege level that suits it.

use std::fmt;
use std::path::Path;

use pvstack_protocols::boot::flavour as abi;

/// The KVM flavour of the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Flavour {
    Vmx,
    Svm,
    Pvm,
    Unknown,
}

/// The privilege level the guest's code runs at.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum Privilege {
    /// CPL0.
    Kernel,
    /// CPL3.
    User,
}

impl Privilege {
    /// The CPL (and descriptor privilege level) as a number.
    pub fn cpl(self) -> u8 {
        match self {
            Privilege::Kernel => 0,
            Privilege::User => 3,
        }
    }
}

impl Flavour {
    /// Detects the flavour from /proc/cpuinfo and /sys/module.
    pub fn detect() -> Flavour {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let module = |name: &str| Path::new("/sys/module").join(name).exists();
        Self::from_host(
            &cpuinfo,
            module("kvm_pvm"),
            module("kvm_intel"),
            module("kvm_amd"),
        )
    }

    /// The decision behind [`Flavour::detect`]. A loaded `kvm_pvm` wins: a
    /// PVM host may itself be a VMX guest that shows the `vmx` flag.
    fn from_host(cpuinfo: &str, kvm_pvm: bool, kvm_intel: bool, kvm_amd: bool) -> Flavour {
        let has_flag = |flag: &str| {
            cpuinfo
                .lines()
                .filter(|line| line.starts_with("flags"))
                .any(|line| line.split_whitespace().any(|word| word == flag))
        };
        if kvm_pvm {
            Flavour::Pvm
        } else if kvm_intel || has_flag("vmx") {
            Flavour::Vmx
        } else if kvm_amd || has_flag("svm") {
            Flavour::Svm
        } else {
            Flavour::Unknown
        }
    }

    /// The privilege level the guest runs at unless the user says otherwise:
    /// CPL0 where it is native (VMX/SVM), CPL3 elsewhere (native on PVM,
    /// and it works on every flavour).
    pub fn default_privilege(self) -> Privilege {
        match self {
            Flavour::Vmx | Flavour::Svm => Privilege::Kernel,
            Flavour::Pvm | Flavour::Unknown => Privilege::User,
        }
    }

    /// The value for `BootInfo::flavour`.
    pub fn abi_value(self) -> u32 {
        match self {
            Flavour::Vmx => abi::VMX,
            Flavour::Svm => abi::SVM,
            Flavour::Pvm => abi::PVM,
            Flavour::Unknown => abi::UNKNOWN,
        }
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavour::Vmx => "VMX",
            Flavour::Svm => "SVM",
            Flavour::Pvm => "PVM",
            Flavour::Unknown => "unknown",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMX_CPU: &str = "processor\t: 0\nflags\t\t: fpu vme vmx sse2\n";
    const PLAIN_CPU: &str = "processor\t: 0\nflags\t\t: fpu vme sse2 svm_lock\n";

    #[test]
    fn modules_and_flags_decide() {
        assert_eq!(
            Flavour::from_host(PLAIN_CPU, true, false, false),
            Flavour::Pvm
        );
        assert_eq!(Flavour::from_host(VMX_CPU, true, true, false), Flavour::Pvm);
        assert_eq!(
            Flavour::from_host(VMX_CPU, false, false, false),
            Flavour::Vmx
        );
        assert_eq!(
            Flavour::from_host(PLAIN_CPU, false, false, true),
            Flavour::Svm
        );
        // `svm_lock` is not `svm`.
        assert_eq!(
            Flavour::from_host(PLAIN_CPU, false, false, false),
            Flavour::Unknown
        );
    }

    #[test]
    fn privilege_follows_the_flavour() {
        assert_eq!(Flavour::Pvm.default_privilege().cpl(), 3);
        assert_eq!(Flavour::Vmx.default_privilege().cpl(), 0);
        assert_eq!(Flavour::Svm.default_privilege().cpl(), 0);
    }
}
