//! The Linux boot path: a bzImage ([`bzimage`]), whose kernel pvstack
//! unpacks itself when it knows the compression ([`payload`]), or a PVH
//! vmlinux ([`pvh`]) with its initrd and command line, checked against
//! the VM's memory before any VM exists ([`LinuxGuest::new`]), then written into
//! guest memory with the boot parameters, the e820 map ([`e820`]) and the
//! ACPI tables and a reset vector ([`reset_vector`], what Linux jumps to
//! when it reboots "through the BIOS") ([`LinuxGuest::load`]); [`layout`]
//! says where each goes.

pub mod bzimage;
pub mod e820;
pub mod layout;
pub mod payload;
pub mod pvh;
pub mod reset_vector;

use std::fs::File;
use std::io::Cursor;
use std::path::PathBuf;
use std::time::Instant;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage as BzImageLoader;
use linux_loader::loader::elf::{Elf as ElfLoader, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use self::bzimage::BzImage;
use self::pvh::PvhKernel;
use super::KernelKind;
use crate::acpi::{self, AcpiPlatform};
use crate::error::{Error, Result};
use crate::memory::GuestMemory;
use crate::vcpu::{Launch, Vcpu};
use crate::x86;
use crate::x86::gdt::{self, CodeMode};
use crate::x86::paging::{self, PageZero};

/// How the kernel is loaded and entered.
#[derive(Clone, Copy, Debug)]
enum Format {
    /// A bzImage, loaded whole and entered at its decompressor.
    BzImage(BzImage),
    /// A bzImage whose kernel pvstack unpacked: the vmlinux (the guest's
    /// `image`) is loaded at its segments' addresses and entered at
    /// `entry`, its 64-bit entry, with the bzImage's boot parameters; it
    /// takes memory up to `end`.
    Unpacked {
        bz: BzImage,
        entry: u64,
        end: u64,
    },
    Pvh(PvhKernel),
}

/// Where vCPU 0 starts a loaded Linux kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxEntry {
    /// The bzImage's 64-bit entry: long mode, `boot_params` in RSI.
    Long64 {
        entry: u64,
        boot_params: u64,
        stack_top: u64,
    },
    /// The PVH entry: 32-bit protected mode, the start info in RBX.
    Pvh { entry: u64, start_info: u64 },
}

/// The initrd and where it goes.
#[derive(Clone, Debug)]
struct Initrd {
    path: PathBuf,
    size: u64,
    addr: u64,
}

/// A Linux kernel, its initrd and command line, checked to fit the VM.
pub struct LinuxGuest {
    name: String,
    image: Vec<u8>,
    format: Format,
    initrd: Option<Initrd>,
    cmdline: Cmdline,
    mem_size: u64,
}

impl LinuxGuest {
    /// Checks everything that can be checked before the VM exists: the
    /// image (`name` names it in errors) is a bzImage or PVH vmlinux of
    /// `kind` that fits `mem_size` bytes of RAM, the command line fits
    /// the kernel's limit and the initrd fits above the kernel.
    pub fn new(
        name: String,
        image: Vec<u8>,
        kind: KernelKind,
        initrd: Option<PathBuf>,
        cmdline: String,
        mem_size: u64,
    ) -> Result<LinuxGuest> {
        let bad = |reason: String| Error::BadImage {
            image: name.clone(),
            reason,
        };
        let mut image = image;
        let format = match kind {
            KernelKind::BzImage => {
                let bz = BzImage::parse(&image).map_err(bad)?;
                match unpack(&name, &bz, &image).map_err(bad)? {
                    Some(unpacked) => {
                        image = unpacked.elf;
                        Format::Unpacked {
                            bz,
                            entry: unpacked.entry,
                            end: unpacked.end,
                        }
                    }
                    None => Format::BzImage(bz),
                }
            }
            KernelKind::Pvh => Format::Pvh(PvhKernel::parse(&image).map_err(bad)?),
            KernelKind::OwnGuest => {
                return Err(bad(
                    "not a Linux kernel (no bzImage header, no PVH note)".into()
                ))
            }
        };
        let (kernel_end, cmdline_max, initrd_max) = match format {
            Format::BzImage(bz) => (bz.footprint_end(), bz.cmdline_max(), bz.initrd_addr_max()),
            Format::Unpacked { bz, end, .. } => (end, bz.cmdline_max(), bz.initrd_addr_max()),
            Format::Pvh(kernel) => (kernel.end, pvh::CMDLINE_MAX, u64::from(u32::MAX)),
        };
        let low_end = e820::low_ram_end(mem_size);
        if kernel_end > low_end {
            return Err(bad(format!(
                "the kernel needs guest memory up to {} MiB, the VM has {} MiB below the MMIO hole; give more --memory",
                kernel_end.div_ceil(1 << 20),
                low_end >> 20
            )));
        }
        let cmdline_max = cmdline_max.min(layout::CMDLINE_ROOM - 1);
        if cmdline.len() > cmdline_max {
            return Err(Error::Usage(format!(
                "--cmdline is {} bytes; {name} takes at most {cmdline_max}",
                cmdline.len()
            )));
        }
        let cmdline = Cmdline::try_from(&cmdline, layout::CMDLINE_ROOM)
            .map_err(|e| Error::Usage(format!("--cmdline: {e}")))?;
        let initrd = match initrd {
            Some(path) => Some(place_initrd(path, kernel_end, low_end.min(initrd_max + 1))?),
            None => None,
        };
        Ok(LinuxGuest {
            name,
            image,
            format,
            initrd,
            cmdline,
            mem_size,
        })
    }

    /// Loads the kernel (see [`Self::load`]), gives every vCPU the boot
    /// MSRs and LAPIC wiring and vCPU 0 the kernel's entry state; returns
    /// how each vCPU thread begins: all at once, vCPU 0 at the entry and
    /// the others waiting in KVM for the INIT/SIPI Linux sends them.
    pub fn start(
        &self,
        mem: &GuestMemory,
        platform: &AcpiPlatform,
        vcpus: &[Vcpu],
    ) -> Result<Vec<Launch>> {
        let entry = self.load(mem, platform)?;
        for vcpu in vcpus {
            x86::msrs::set_boot_msrs(&vcpu.fd)?;
            x86::lapic::set_lints(&vcpu.fd)?;
        }
        if let Some(boot_cpu) = vcpus.first() {
            match entry {
                LinuxEntry::Long64 {
                    entry,
                    boot_params,
                    stack_top,
                } => x86::cpu::set_linux64_entry(&boot_cpu.fd, entry, boot_params, stack_top)?,
                LinuxEntry::Pvh { entry, start_info } => {
                    x86::cpu::set_pvh_entry(&boot_cpu.fd, entry, start_info)?
                }
            }
        }
        log::info!(
            "Linux guest: {} vCPUs, entry {entry:x?}; vCPUs 1.. wait for INIT/SIPI",
            vcpus.len()
        );
        Ok(vec![Launch::Configured; vcpus.len()])
    }

    /// Writes the kernel, initrd, command line, boot parameters, ACPI
    /// tables (describing `platform`) and the GDT (and, for the 64-bit
    /// entry, identity page tables) into `mem`.
    pub fn load(&self, mem: &GuestMemory, platform: &AcpiPlatform) -> Result<LinuxEntry> {
        let rsdp = self.write_acpi(mem, platform)?;
        reset_vector::write(mem)?;
        self.write_cmdline(mem)?;
        let initrd = self.write_initrd(mem)?;
        let map = e820::memory_map(self.mem_size);
        let boot_error = |e: linux_loader::configurator::Error| Error::BadImage {
            image: self.name.clone(),
            reason: format!("cannot write its boot parameters: {e}"),
        };
        let load_error = |e: linux_loader::loader::Error| Error::BadImage {
            image: self.name.clone(),
            reason: format!("cannot load it: {e}"),
        };
        let high_memory = Some(GuestAddress(layout::HIGH_MEMORY_START));
        match self.format {
            Format::BzImage(bz) | Format::Unpacked { bz, .. } => {
                gdt::write(mem, 0, CodeMode::Long)?;
                paging::write(mem, false, PageZero::Mapped)?;
                let image = &mut Cursor::new(&self.image);
                let entry = match self.format {
                    Format::Unpacked { entry, .. } => {
                        ElfLoader::load(mem, None, image, high_memory).map_err(load_error)?;
                        entry
                    }
                    _ => {
                        let loaded = BzImageLoader::load(mem, None, image, high_memory)
                            .map_err(load_error)?;
                        BzImage::entry(loaded.kernel_load.0)
                    }
                };
                let params = bz.boot_params(layout::CMDLINE, initrd, &map, rsdp);
                LinuxBootConfigurator::write_bootparams::<GuestMemory>(
                    &BootParams::new(&params, GuestAddress(layout::BOOT_PARAMS)),
                    mem,
                )
                .map_err(boot_error)?;
                Ok(LinuxEntry::Long64 {
                    entry,
                    boot_params: layout::BOOT_PARAMS,
                    stack_top: layout::BOOT_STACK_TOP,
                })
            }
            Format::Pvh(kernel) => {
                gdt::write(mem, 0, CodeMode::Protected32)?;
                let loaded = ElfLoader::load(mem, None, &mut Cursor::new(&self.image), high_memory)
                    .map_err(load_error)?;
                if loaded.pvh_boot_cap
                    != PvhBootCapability::PvhEntryPresent(GuestAddress(kernel.entry))
                {
                    return Err(load_error(
                        linux_loader::loader::Error::InvalidKernelStartAddress,
                    ));
                }
                if map.len() > layout::PVH_MEMMAP_MAX {
                    return Err(Error::Config(format!("{} memory map entries", map.len())));
                }
                let start = pvh::start_info(
                    layout::CMDLINE,
                    initrd,
                    &map,
                    layout::PVH_MODLIST,
                    layout::PVH_MEMMAP,
                    rsdp,
                );
                let mut params = BootParams::new(&start.info, GuestAddress(layout::BOOT_PARAMS));
                params.set_sections(&start.memmap, GuestAddress(layout::PVH_MEMMAP));
                if let Some(module) = &start.module {
                    params.set_modules(
                        std::slice::from_ref(module),
                        GuestAddress(layout::PVH_MODLIST),
                    );
                }
                PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
                    .map_err(boot_error)?;
                Ok(LinuxEntry::Pvh {
                    entry: kernel.entry,
                    start_info: layout::BOOT_PARAMS,
                })
            }
        }
    }

    fn write_acpi(&self, mem: &GuestMemory, platform: &AcpiPlatform) -> Result<u64> {
        let tables = acpi::build(platform, layout::ACPI_TABLES);
        let room = layout::ACPI_TABLES_END - layout::ACPI_TABLES;
        if tables.bytes.len() as u64 > room {
            return Err(Error::Config(format!(
                "the ACPI tables take {} bytes, more than the {room} reserved for them",
                tables.bytes.len()
            )));
        }
        mem.write_slice(&tables.bytes, GuestAddress(layout::ACPI_TABLES))
            .map_err(Error::guest_write("the ACPI tables"))?;
        Ok(tables.rsdp)
    }

    fn write_cmdline(&self, mem: &GuestMemory) -> Result<()> {
        load_cmdline(mem, GuestAddress(layout::CMDLINE), &self.cmdline)
            .map_err(|e| Error::Config(format!("cannot place the command line: {e}")))
    }

    /// Copies the initrd file into guest memory; its `(address, size)`.
    fn write_initrd(&self, mem: &GuestMemory) -> Result<Option<(u64, u64)>> {
        let Some(initrd) = &self.initrd else {
            return Ok(None);
        };
        let file_error = |source| Error::File {
            action: "read initrd",
            path: initrd.path.clone(),
            cause: source,
        };
        let mut file = File::open(&initrd.path).map_err(file_error)?;
        mem.read_exact_volatile_from(GuestAddress(initrd.addr), &mut file, initrd.size as usize)
            .map_err(|e| Error::Initrd {
                path: initrd.path.clone(),
                reason: format!("cannot copy it into guest memory: {e}"),
            })?;
        Ok(Some((initrd.addr, initrd.size)))
    }
}

/// The kernel of bzImage `name` (`bz`, parsed from `image`) unpacked by
/// pvstack, or `None` if its compression is one pvstack leaves to the
/// kernel's own decompressor.
fn unpack(
    name: &str,
    bz: &BzImage,
    image: &[u8],
) -> std::result::Result<Option<payload::Unpacked>, String> {
    let Some(compressed) = bz.payload(image) else {
        return Err("its header places the compressed kernel outside the file".into());
    };
    let started = Instant::now();
    let unpacked = payload::unpack(compressed)?;
    match &unpacked {
        Some(kernel) => log::info!(
            "{name}: pvstack decompressed its kernel ({} MiB) in {:.1} ms; entering it at {:#x}",
            kernel.elf.len() >> 20,
            started.elapsed().as_secs_f64() * 1000.0,
            kernel.entry
        ),
        None => log::info!(
            "{name}: its kernel's compression is left to its own decompressor (pvstack unpacks LZ4)"
        ),
    }
    Ok(unpacked)
}

/// Puts the initrd at `path` as high as it may go below `top`, page
/// aligned, refusing it if it would reach down into the kernel (below
/// `kernel_end`).
fn place_initrd(path: PathBuf, kernel_end: u64, top: u64) -> Result<Initrd> {
    let size = std::fs::metadata(&path)
        .map_err(|source| Error::File {
            action: "open initrd",
            path: path.clone(),
            cause: source,
        })?
        .len();
    let room = top.saturating_sub(kernel_end);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end);
    match addr {
        Some(addr) if size > 0 => Ok(Initrd { path, size, addr }),
        _ if size == 0 => Err(Error::Initrd {
            path,
            reason: "the file is empty".into(),
        }),
        _ => Err(Error::Initrd {
            path,
            reason: format!(
                "{size} bytes do not fit in guest memory: {room} bytes are free between the kernel and {top:#x}; give more --memory"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::linux::bzimage::tests::synthetic;

    fn guest(cmdline: &str, initrd: Option<PathBuf>, mem: u64) -> Result<LinuxGuest> {
        LinuxGuest::new(
            "vmlinuz".into(),
            synthetic(1 << 16),
            KernelKind::BzImage,
            initrd,
            cmdline.into(),
            mem,
        )
    }

    fn scratch_file(name: &str, len: u64) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("pvstack-linux-{}-{name}", std::process::id()));
        let file = File::create(&path).unwrap();
        file.set_len(len).unwrap();
        path
    }

    #[test]
    fn cmdline_limit_is_the_kernels() {
        assert!(guest(&"a".repeat(2047), None, 256 << 20).is_ok());
        let err = guest(&"a".repeat(2048), None, 256 << 20).err().unwrap();
        assert!(err.is_usage());
        assert!(
            err.to_string()
                .contains("--cmdline is 2048 bytes; vmlinuz takes at most 2047"),
            "{err}"
        );
    }

    #[test]
    fn initrd_goes_high_or_is_refused() {
        let small = scratch_file("small", 10_000);
        let g = guest("", Some(small.clone()), 256 << 20).unwrap();
        let initrd = g.initrd.as_ref().unwrap();
        assert_eq!(initrd.addr, ((256u64 << 20) - 10_000) & !0xfff);
        assert_eq!(initrd.size, 10_000);
        // The synthetic kernel takes memory up to 48 MiB.
        let big = scratch_file("big", 20 << 20);
        let err = guest("", Some(big.clone()), 64 << 20).err().unwrap();
        assert!(
            err.to_string().contains("do not fit in guest memory"),
            "{err}"
        );
        assert!(guest("", Some(big.clone()), 128 << 20).is_ok());
        let err = guest("", None, 32 << 20).err().unwrap();
        assert!(err.to_string().contains("give more --memory"), "{err}");
        for path in [small, big] {
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn loads_a_bzimage_with_its_boot_data() {
        let initrd = scratch_file("load", 8192);
        let g = guest("console=ttyS0", Some(initrd.clone()), 256 << 20).unwrap();
        let mem = crate::memory::create(256 << 20).unwrap();
        let platform = AcpiPlatform {
            cpus: 2,
            virtio_mmio: vec![],
            serial: true,
        };
        let entry = g.load(&mem, &platform).unwrap();
        assert_eq!(
            entry,
            LinuxEntry::Long64 {
                entry: 0x10_0200,
                boot_params: layout::BOOT_PARAMS,
                stack_top: layout::BOOT_STACK_TOP
            }
        );
        let mut cmdline = [0u8; 14];
        mem.read_slice(&mut cmdline, GuestAddress(layout::CMDLINE))
            .unwrap();
        assert_eq!(&cmdline, b"console=ttyS0\0");
        let rsdp: [u8; 8] = mem.read_obj(GuestAddress(layout::ACPI_TABLES)).unwrap();
        assert_eq!(&rsdp, b"RSD PTR ");
        let ramdisk_image: u32 = mem
            .read_obj(GuestAddress(layout::BOOT_PARAMS + 0x218))
            .unwrap();
        assert_eq!(u64::from(ramdisk_image), g.initrd.as_ref().unwrap().addr);
        std::fs::remove_file(initrd).unwrap();
    }

    #[test]
    fn an_lz4_kernel_is_unpacked_and_entered_directly() {
        use crate::boot::linux::bzimage::tests::with_payload;
        use crate::boot::linux::payload::tests::{lz4_legacy, tiny_vmlinux};
        let code: Vec<u8> = (0..20_000u32).map(|i| (i % 7) as u8).collect();
        let image = with_payload(&lz4_legacy(&tiny_vmlinux(&code), 8192));
        let g = LinuxGuest::new(
            "vmlinuz".into(),
            image,
            KernelKind::BzImage,
            None,
            "quiet".into(),
            64 << 20,
        )
        .unwrap();
        let mem = crate::memory::create(64 << 20).unwrap();
        let platform = AcpiPlatform {
            cpus: 1,
            virtio_mmio: vec![],
            serial: false,
        };
        assert_eq!(
            g.load(&mem, &platform).unwrap(),
            LinuxEntry::Long64 {
                entry: 0x100_0000,
                boot_params: layout::BOOT_PARAMS,
                stack_top: layout::BOOT_STACK_TOP
            }
        );
        let mut loaded = vec![0u8; code.len()];
        mem.read_slice(&mut loaded, GuestAddress(0x100_0000))
            .unwrap();
        assert_eq!(loaded, code, "the segment at its physical address");
        let magic: u32 = mem
            .read_obj(GuestAddress(layout::BOOT_PARAMS + 0x202))
            .unwrap();
        assert_eq!(
            magic, 0x5372_6448,
            "the bzImage's setup header in boot_params"
        );
    }

    #[test]
    fn a_corrupt_lz4_kernel_is_refused() {
        use crate::boot::linux::bzimage::tests::with_payload;
        use crate::boot::linux::payload::tests::{lz4_legacy, tiny_vmlinux};
        let mut payload = lz4_legacy(&tiny_vmlinux(&[0x90; 4000]), 8192);
        let len = payload.len();
        payload[len - 4..].copy_from_slice(&1u32.to_le_bytes());
        let err = LinuxGuest::new(
            "vmlinuz".into(),
            with_payload(&payload),
            KernelKind::BzImage,
            None,
            String::new(),
            64 << 20,
        )
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("its LZ4 payload is corrupt"),
            "{err}"
        );
    }
}
