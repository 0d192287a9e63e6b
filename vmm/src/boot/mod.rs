//! The two ways into a pvstack VM, side by side:
//!
//! - [`own_guest`]: pvstack's own `no_std` guest (or any static x86-64 ELF
//!   written for its ABI). pvstack writes a GDT and identity page tables,
//!   loads the ELF and starts vCPU 0 at its entry in long mode, at CPL3 on
//!   PVM or CPL0 on VMX/SVM; the guest learns its devices from the
//!   BOOT_INFO hypercall and starts the other vCPUs with CPU_START.
//! - [`linux`]: a stock Linux kernel, a bzImage (Linux's 64-bit boot
//!   protocol) or an ELF vmlinux with a PVH entry note, with an optional
//!   initrd and command line. The kernel learns the machine the way it
//!   does on a PC: from the e820 map in its boot parameters and from ACPI
//!   tables (CPUs, interrupt controllers, virtio-mmio devices, the serial
//!   port, power off); every vCPU runs from the start and the secondary
//!   ones wait in KVM for the INIT/SIPI that Linux sends them.
//!
//! Both run on the same VM: the same memory map, devices, irqchip and
//! vCPU threads (`crate::vm`).

pub mod linux;
pub mod own_guest;

use std::borrow::Cow;

/// What a kernel image is, told from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// An ELF without a PVH note: pvstack's own guest, or another ELF for
    /// its ABI.
    OwnGuest,
    /// A Linux bzImage.
    BzImage,
    /// An ELF vmlinux with a PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY).
    Pvh,
}

impl KernelKind {
    /// The kind of `image`; `None` if it is neither an ELF file nor a bzImage.
    pub fn detect(image: &[u8]) -> Option<KernelKind> {
        if linux::bzimage::is_bzimage(image) {
            Some(KernelKind::BzImage)
        } else if image.starts_with(b"\x7fELF") {
            Some(match linux::pvh::entry_point(image) {
                Some(_) => KernelKind::Pvh,
                None => KernelKind::OwnGuest,
            })
        } else {
            None
        }
    }

    /// Whether this is a Linux kernel.
    pub fn is_linux(self) -> bool {
        self != KernelKind::OwnGuest
    }
}

/// The guest a VM boots.
pub enum Guest {
    /// pvstack's own guest: its ELF image and a name for errors.
    Own {
        image: Cow<'static, [u8]>,
        name: String,
    },
    /// A Linux kernel, checked against the VM's memory.
    Linux(Box<linux::LinuxGuest>),
}

impl Guest {
    /// Whether the VM must look like a PC to this guest (ACPI, legacy
    /// devices, vCPUs in INIT/SIPI wait).
    pub fn is_linux(&self) -> bool {
        matches!(self, Guest::Linux(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_told_apart() {
        assert_eq!(
            KernelKind::detect(own_guest::BUILTIN_GUEST),
            Some(KernelKind::OwnGuest)
        );
        assert_eq!(KernelKind::detect(b"#!/bin/sh\n"), None);
        assert_eq!(KernelKind::detect(&[]), None);
        let bzimage = linux::bzimage::tests::synthetic(1 << 16);
        assert_eq!(KernelKind::detect(&bzimage), Some(KernelKind::BzImage));
        assert!(KernelKind::BzImage.is_linux() && KernelKind::Pvh.is_linux());
        assert!(!KernelKind::OwnGuest.is_linux());
    }
}
