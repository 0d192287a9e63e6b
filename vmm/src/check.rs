//! `pvstack check`: what this host offers pvstack, one line per item, in
//! the spirit of libvirt's virt-host-validate.

use pvstack_sandbox::probe::HostProtections;
use std::fmt;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

use crate::kvm_flavour::Flavour;
use crate::vm::{open_kvm, KVM_API_VERSION};

/// How one item came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Missing, but pvstack still runs (some feature is unavailable).
    Warn,
    /// Missing, and pvstack cannot run.
    Fail,
}

/// One line of the report.
#[derive(Debug)]
pub struct Item {
    pub verdict: Verdict,
    pub what: String,
    pub detail: String,
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.verdict {
            Verdict::Ok => "ok     ",
            Verdict::Warn => "WARN   ",
            Verdict::Fail => "MISSING",
        };
        write!(f, "{tag} {:<28} {}", self.what, self.detail)
    }
}

fn item(verdict: Verdict, what: impl Into<String>, detail: impl Into<String>) -> Item {
    Item {
        verdict,
        what: what.into(),
        detail: detail.into(),
    }
}

/// Checks the host; pvstack can run if no item is [`Verdict::Fail`].
pub fn check_host(kvm_device: &Path) -> Vec<Item> {
    let mut items = Vec::new();
    let flavour = Flavour::detect();
    items.push(match flavour {
        Flavour::Unknown => item(
            Verdict::Warn,
            "KVM flavour",
            "unknown (no vmx/svm flag, no kvm_intel/kvm_amd/kvm_pvm module); guest runs at CPL3",
        ),
        _ => item(
            Verdict::Ok,
            "KVM flavour",
            format!(
                "{flavour} (guest runs at CPL{} by default)",
                flavour.default_privilege().cpl()
            ),
        ),
    });
    match open_kvm(kvm_device) {
        Ok(kvm) => {
            items.push(item(
                Verdict::Ok,
                format!("KVM device {}", kvm_device.display()),
                format!("opened read-write, API version {KVM_API_VERSION}"),
            ));
            items.extend(kvm_capabilities(&kvm));
        }
        Err(e) => items.push(item(
            Verdict::Fail,
            format!("KVM device {}", kvm_device.display()),
            format!("{e}: pvstack cannot create VMs"),
        )),
    }
    items.push(linux_guests(flavour));
    items.push(memfd());
    items.push(shmem_huge_pages(Path::new(THP_DIR)));
    items.push(io_uring());
    items.push(tun());
    items.extend(protections());
    items
}

/// The confinement pvstack and its backends use (pvstack_sandbox).
fn protections() -> Vec<Item> {
    let host = HostProtections::probe();
    let seccomp = match (&host.seccomp_actions, host.seccomp_usable()) {
        (Ok(actions), true) => item(
            Verdict::Ok,
            "seccomp",
            format!(
                "allow-lists with trap (`--seccomp on`) and log (actions: {actions}); `--seccomp log` {}",
                if host.log_recorded {
                    "records in the kernel log (dmesg | grep type=1326)"
                } else {
                    "records NOTHING (log missing from actions_logged)"
                }
            ),
        ),
        (Ok(actions), false) => item(
            Verdict::Warn,
            "seccomp",
            format!("actions {actions} lack trap or log: run with --seccomp off"),
        ),
        (Err(e), _) => item(
            Verdict::Warn,
            "seccomp",
            format!("{e}: no seccomp filters; run with --seccomp off"),
        ),
    };
    let landlock = match &host.landlock_abi {
        Ok(abi) => item(
            Verdict::Ok,
            "Landlock",
            format!(
                "ABI {abi}: backends' file access is limited to what they use{}",
                if *abi >= 8 {
                    ""
                } else {
                    " (threads started before the restriction escape it below ABI 8)"
                }
            ),
        ),
        Err(e) => item(
            Verdict::Warn,
            "Landlock",
            format!("{e}: backends run without file access restrictions"),
        ),
    };
    let no_new_privs = if host.no_new_privs {
        item(Verdict::Ok, "no_new_privs", "supported")
    } else {
        item(
            Verdict::Warn,
            "no_new_privs",
            "not supported by this kernel",
        )
    };
    // SAFETY: geteuid cannot fail and touches no memory.
    let drop = if unsafe { libc::geteuid() } == 0 {
        item(
            Verdict::Ok,
            "privilege drop",
            "running as root: the backends pvstack starts switch to --backend-user with no capabilities",
        )
    } else {
        item(
            Verdict::Ok,
            "privilege drop",
            "not root: pvstack and its backends run as this user (a TAP needs CAP_NET_ADMIN)",
        )
    };
    vec![seccomp, landlock, no_new_privs, drop]
}

fn kvm_capabilities(kvm: &Kvm) -> Vec<Item> {
    let needed = [
        (Cap::UserMemory, "user memory", "guest RAM cannot be mapped"),
        (
            Cap::Irqchip,
            "in-kernel irqchip",
            "no interrupt controller for devices",
        ),
        (
            Cap::Ioeventfd,
            "ioeventfd",
            "device doorbells cannot reach backends without an exit",
        ),
        (Cap::Irqfd, "irqfd", "backends cannot interrupt the guest"),
    ];
    let mut items: Vec<Item> = needed
        .into_iter()
        .map(|(cap, name, consequence)| {
            if kvm.check_extension(cap) {
                item(Verdict::Ok, format!("KVM {name}"), "present")
            } else {
                item(
                    Verdict::Fail,
                    format!("KVM {name}"),
                    format!("absent: {consequence}"),
                )
            }
        })
        .collect();
    items.push(item(
        Verdict::Ok,
        "KVM max vCPUs",
        format!(
            "{} (pvstack uses at most {})",
            kvm.get_max_vcpus(),
            pvstack_protocols::layout::MAX_VCPUS
        ),
    ));
    items
}

/// Whether a stock Linux kernel can run here: it runs at CPL0, which only
/// VMX and SVM run natively.
fn linux_guests(flavour: Flavour) -> Item {
    match flavour {
        Flavour::Vmx | Flavour::Svm => item(
            Verdict::Ok,
            "Linux guests",
            format!("yes: {flavour} runs a stock kernel's CPL0 code natively"),
        ),
        Flavour::Pvm => item(
            Verdict::Warn,
            "Linux guests",
            "no: PVM runs only CPL3 natively and emulates a kernel's CPL0 code instruction by instruction; use a VMX or SVM host",
        ),
        Flavour::Unknown => item(
            Verdict::Warn,
            "Linux guests",
            "unknown: no VMX or SVM found; a stock kernel needs one",
        ),
    }
}

fn memfd() -> Item {
    match crate::memory::create(pvstack_protocols::layout::MIN_MEMORY) {
        Ok(_) => item(
            Verdict::Ok,
            "memfd",
            "guest RAM can be shared with backend processes",
        ),
        Err(e) => item(
            Verdict::Fail,
            "memfd",
            format!("{e}: guest RAM cannot be created"),
        ),
    }
}

/// Where the kernel's transparent-huge-page settings are.
const THP_DIR: &str = "/sys/kernel/mm/transparent_hugepage";

/// Whether guest RAM (a memfd: shmem) can get 2 MiB transparent huge pages,
/// from `shmem_enabled` under `thp_dir`, and, on kernels with per-size
/// settings (6.11 and later), `hugepages-2048kB/shmem_enabled`, which
/// decides for 2 MiB pages unless it says `inherit`.
fn shmem_huge_pages(thp_dir: &Path) -> Item {
    let what = "shmem huge pages";
    let knob = thp_dir.join("shmem_enabled");
    let Ok(text) = std::fs::read_to_string(&knob) else {
        return item(
            Verdict::Warn,
            what,
            format!(
                "{} not found (kernel without transparent huge pages): guest RAM uses 4 KiB pages",
                knob.display()
            ),
        );
    };
    let Some(global) = selected_setting(&text) else {
        return item(
            Verdict::Warn,
            what,
            format!(
                "{} reads {:?}, no [setting] in it",
                knob.display(),
                text.trim()
            ),
        );
    };
    let per_size = thp_dir.join("hugepages-2048kB/shmem_enabled");
    let per_size_text = std::fs::read_to_string(&per_size).unwrap_or_default();
    match selected_setting(&per_size_text) {
        Some("inherit") | None => shmem_verdict(global, &knob),
        Some(own) => shmem_verdict(own, &per_size),
    }
}

/// The item for the setting `setting` read from `source`.
fn shmem_verdict(setting: &str, source: &Path) -> Item {
    let what = "shmem huge pages";
    let advice = format!(
        "set advise (echo advise > {}/shmem_enabled) so that KVM takes far fewer page faults (EPT/NPT) as a guest first touches its RAM",
        THP_DIR
    );
    match setting {
        "advise" | "always" | "within_size" | "force" => item(
            Verdict::Ok,
            what,
            format!(
                "{setting} ({}): guest RAM, advised MADV_HUGEPAGE, gets 2 MiB pages",
                source.display()
            ),
        ),
        _ => item(
            Verdict::Warn,
            what,
            format!(
                "{setting} ({}): guest RAM uses 4 KiB pages; {advice}",
                source.display()
            ),
        ),
    }
}

/// The setting in brackets in a sysfs choice file, e.g. `advise` in
/// "always within_size [advise] never deny force".
fn selected_setting(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|word| word.strip_prefix('[')?.strip_suffix(']'))
}

fn io_uring() -> Item {
    let knob = "/proc/sys/kernel/io_uring_disabled";
    match std::fs::read_to_string(knob).map(|s| s.trim().to_string()) {
        Ok(value) if value == "0" => item(Verdict::Ok, "io_uring", format!("enabled ({knob} = 0)")),
        Ok(value) => item(
            Verdict::Warn,
            "io_uring",
            format!("{knob} = {value}: backends fall back to plain reads and writes"),
        ),
        Err(_) => item(
            Verdict::Warn,
            "io_uring",
            format!("{knob} not found (kernel before 6.6?): backends fall back if io_uring fails"),
        ),
    }
}

fn tun() -> Item {
    let path = "/dev/net/tun";
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => item(Verdict::Ok, path, "net backend can create tap devices"),
        Err(e) => item(
            Verdict::Warn,
            path,
            format!("{e}: the net backend cannot run"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_guests_need_vmx_or_svm() {
        assert_eq!(linux_guests(Flavour::Svm).verdict, Verdict::Ok);
        assert_eq!(linux_guests(Flavour::Vmx).verdict, Verdict::Ok);
        let pvm = linux_guests(Flavour::Pvm);
        assert_eq!(pvm.verdict, Verdict::Warn);
        assert!(pvm.detail.starts_with("no: "));
    }

    #[test]
    fn the_bracketed_shmem_setting_is_the_one_in_force() {
        let host = "always within_size advise [never] deny force\n";
        assert_eq!(selected_setting(host), Some("never"));
        assert_eq!(
            selected_setting("always within_size [advise] never deny force"),
            Some("advise")
        );
        assert_eq!(
            selected_setting("always inherit within_size advise [inherit] never"),
            Some("inherit")
        );
        assert_eq!(selected_setting("always advise never"), None);
        assert_eq!(selected_setting(""), None);
        assert_eq!(selected_setting("[] x"), Some(""));
    }

    #[test]
    fn shmem_huge_pages_need_advise_always_or_within_size() {
        let source = Path::new("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
        for setting in ["advise", "always", "within_size"] {
            let got = shmem_verdict(setting, source);
            assert_eq!(got.verdict, Verdict::Ok, "{got}");
            assert!(got.detail.contains("2 MiB pages"), "{got}");
        }
        for setting in ["never", "deny"] {
            let got = shmem_verdict(setting, source);
            assert_eq!(got.verdict, Verdict::Warn, "{got}");
            assert!(
                got.detail.contains("4 KiB pages; set advise (echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled)"),
                "{got}"
            );
        }
    }

    #[test]
    fn shmem_huge_pages_reads_the_2mib_setting_and_its_inheritance() {
        let dir = std::env::temp_dir().join(format!("pvstack-thp-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("hugepages-2048kB")).unwrap();
        let write = |file: &str, text: &str| std::fs::write(dir.join(file), text).unwrap();
        write(
            "shmem_enabled",
            "always within_size [advise] never deny force\n",
        );
        let got = shmem_huge_pages(&dir);
        assert_eq!(got.verdict, Verdict::Ok, "{got}");
        assert!(got.detail.starts_with("advise ("), "{got}");
        write(
            "hugepages-2048kB/shmem_enabled",
            "always inherit within_size advise [never]\n",
        );
        let got = shmem_huge_pages(&dir);
        assert_eq!(got.verdict, Verdict::Warn, "{got}");
        assert!(
            got.detail.contains("hugepages-2048kB/shmem_enabled"),
            "{got}"
        );
        write(
            "hugepages-2048kB/shmem_enabled",
            "always [inherit] within_size advise never\n",
        );
        assert_eq!(shmem_huge_pages(&dir).verdict, Verdict::Ok);
        write("shmem_enabled", "garbage\n");
        let got = shmem_huge_pages(&dir);
        assert_eq!(got.verdict, Verdict::Warn, "{got}");
        assert!(got.detail.contains("no [setting]"), "{got}");
        std::fs::remove_dir_all(&dir).unwrap();
        let got = shmem_huge_pages(&dir);
        assert!(got.detail.contains("not found"), "{got}");
    }

    #[test]
    fn unopenable_device_fails_the_check() {
        let items = check_host(Path::new("/nonexistent/kvm"));
        let kvm = items
            .iter()
            .find(|i| i.what.starts_with("KVM device"))
            .unwrap();
        assert_eq!(kvm.verdict, Verdict::Fail);
        assert!(kvm
            .to_string()
            .starts_with("MISSING KVM device /nonexistent/kvm"));
    }
}
