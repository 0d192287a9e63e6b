//! A Linux bzImage (Documentation/arch/x86/boot.rst): the setup header at
//! 0x1f1 says what the kernel needs; the protected-mode kernel after the
//! setup sectors is loaded at 1 MiB (linux-loader) and entered through its
//! 64-bit entry point, 0x200 bytes in, with `boot_params` (the "zero
//! page") in RSI.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header, XLF_KERNEL_64};
use vm_memory::ByteValued;

use super::e820;

/// Where the setup header sits in the image (and in boot_params).
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// The boot sector's signature at 0x1fe, and the header's "HdrS" at 0x202.
const BOOT_FLAG: u16 = 0xaa55;
const HEADER_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG_OFFSET: usize = 0x1fe;
const HEADER_MAGIC_OFFSET: usize = 0x202;
/// loadflags: the protected-mode kernel loads at 1 MiB (a bzImage).
const LOADED_HIGH: u8 = 1 << 0;
/// The 64-bit entry point exists from boot protocol 2.12 on (xloadflags).
const MIN_PROTOCOL: u16 = 0x020c;
/// Offset of the 64-bit entry point from the load address.
const ENTRY_64_OFFSET: u64 = 0x200;
/// type_of_loader: a boot loader without an assigned id.
const LOADER_UNDEFINED: u8 = 0xff;

/// Whether `image` starts like a bzImage (boot sector signature and
/// setup header magic).
pub fn is_bzimage(image: &[u8]) -> bool {
    let word = |at: usize| {
        image
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let dword = |at: usize| {
        image
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    word(BOOT_FLAG_OFFSET) == Some(BOOT_FLAG) && dword(HEADER_MAGIC_OFFSET) == Some(HEADER_MAGIC)
}

/// A checked bzImage.
#[derive(Clone, Copy, Debug)]
pub struct BzImage {
    header: setup_header,
}

impl BzImage {
    /// Reads and checks the setup header: a 64-bit entry point, and a
    /// file as long as the header says.
    pub fn parse(image: &[u8]) -> Result<BzImage, String> {
        let header_end = SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>();
        let Some(bytes) = image.get(SETUP_HEADER_OFFSET..header_end) else {
            return Err(format!(
                "truncated bzImage: {} bytes, its setup header alone ends at {header_end}",
                image.len()
            ));
        };
        let mut header = setup_header::default();
        header.as_mut_slice().copy_from_slice(bytes);
        let version = header.version;
        if version < MIN_PROTOCOL || header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(format!(
                "bzImage of boot protocol {}.{:02} has no 64-bit entry point (pvstack needs protocol 2.12 or later with XLF_KERNEL_64)",
                version >> 8,
                version & 0xff
            ));
        }
        if header.loadflags & LOADED_HIGH == 0 {
            return Err("a zImage (loaded below 1 MiB); pvstack boots bzImages".into());
        }
        let kernel_start = Self::kernel_start(&header);
        let kernel_len = header.syssize as usize * 16;
        let needed = kernel_start + kernel_len;
        if image.len() < needed {
            return Err(format!(
                "truncated bzImage: its header says {needed} bytes, the file has {}",
                image.len()
            ));
        }
        Ok(BzImage { header })
    }

    /// Where the protected-mode kernel begins in the file: after the boot
    /// sector and the setup sectors.
    fn kernel_start(header: &setup_header) -> usize {
        let setup_sects = match header.setup_sects {
            0 => 4,
            n => usize::from(n),
        };
        (setup_sects + 1) * 512
    }

    /// The compressed kernel in `image` (the file this header was parsed
    /// from), as the header's payload_offset and payload_length place it
    /// in the protected-mode kernel; `None` if they point outside it.
    pub fn payload<'a>(&self, image: &'a [u8]) -> Option<&'a [u8]> {
        let start = Self::kernel_start(&self.header) + self.header.payload_offset as usize;
        image.get(start..start.checked_add(self.header.payload_length as usize)?)
    }

    /// Where linux-loader puts the protected-mode kernel (code32_start,
    /// 1 MiB for every bzImage).
    pub fn load_addr(&self) -> u64 {
        u64::from(self.header.code32_start)
    }

    /// The 64-bit entry point once loaded at `load_addr`.
    pub fn entry(load_addr: u64) -> u64 {
        load_addr + ENTRY_64_OFFSET
    }

    /// End of the memory the kernel takes: it decompresses at its
    /// preferred address (or its aligned load address, if higher) and
    /// needs `init_size` bytes there.
    pub fn footprint_end(&self) -> u64 {
        let align = u64::from(self.header.kernel_alignment).max(1);
        let aligned_load = self.load_addr().div_ceil(align) * align;
        aligned_load.max(self.header.pref_address) + u64::from(self.header.init_size)
    }

    /// Longest command line the kernel takes, without its NUL.
    pub fn cmdline_max(&self) -> usize {
        self.header.cmdline_size as usize
    }

    /// Highest address the initrd may reach.
    pub fn initrd_addr_max(&self) -> u64 {
        u64::from(self.header.initrd_addr_max)
    }

    /// The zero page: the image's setup header with what the boot loader
    /// fills in, the e820 map and the ACPI RSDP's address.
    pub fn boot_params(
        &self,
        cmdline: u64,
        initrd: Option<(u64, u64)>,
        map: &[e820::Entry],
        rsdp: u64,
    ) -> boot_params {
        let mut params = boot_params {
            hdr: self.header,
            ..Default::default()
        };
        params.hdr.type_of_loader = LOADER_UNDEFINED;
        params.hdr.cmd_line_ptr = cmdline as u32;
        params.ext_cmd_line_ptr = (cmdline >> 32) as u32;
        if let Some((addr, size)) = initrd {
            params.hdr.ramdisk_image = addr as u32;
            params.ext_ramdisk_image = (addr >> 32) as u32;
            params.hdr.ramdisk_size = size as u32;
            params.ext_ramdisk_size = (size >> 32) as u32;
        }
        let mut table = params.e820_table;
        for (slot, entry) in table.iter_mut().zip(map) {
            *slot = boot_e820_entry {
                addr: entry.addr,
                size: entry.size,
                r#type: entry.kind as u32,
            };
        }
        params.e820_table = table;
        params.e820_entries = map.len().min(table.len()) as u8;
        params.acpi_rsdp_addr = rsdp;
        params
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A bzImage header with a 64-bit entry and `payload` bytes of kernel
    /// (zeros) after 4 setup sectors, as the tests need one.
    pub(crate) fn synthetic(payload: usize) -> Vec<u8> {
        let setup = 5 * 512;
        let mut image = vec![0u8; setup + payload];
        let mut header = setup_header {
            setup_sects: 4,
            syssize: (payload / 16) as u32,
            boot_flag: BOOT_FLAG,
            header: HEADER_MAGIC,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags: XLF_KERNEL_64,
            cmdline_size: 2047,
            pref_address: 0x100_0000,
            init_size: 0x200_0000,
            ..Default::default()
        };
        header.jump = 0x66eb;
        image[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>()]
            .copy_from_slice(header.as_slice());
        image
    }

    /// A synthetic bzImage whose protected-mode kernel is `payload` (as
    /// its compressed kernel, at offset 0).
    pub(crate) fn with_payload(payload: &[u8]) -> Vec<u8> {
        let padded = payload.len().next_multiple_of(16);
        let mut image = synthetic(padded);
        let payload_length = SETUP_HEADER_OFFSET + 0x5b; // 0x24c in the file
        image[payload_length..payload_length + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image[5 * 512..5 * 512 + payload.len()].copy_from_slice(payload);
        image
    }

    #[test]
    fn payload_is_where_the_header_says() {
        let image = with_payload(b"compressed kernel");
        let bz = BzImage::parse(&image).unwrap();
        assert_eq!(bz.payload(&image), Some(&b"compressed kernel"[..]));
        let mut beyond = image.clone();
        beyond[0x248] = 0xff; // payload_offset past the file's end
        assert_eq!(BzImage::parse(&beyond).unwrap().payload(&beyond), None);
    }

    #[test]
    fn header_fields_and_footprint() {
        let image = synthetic(4096);
        assert!(is_bzimage(&image));
        let bz = BzImage::parse(&image).unwrap();
        assert_eq!(bz.load_addr(), 0x10_0000);
        assert_eq!(BzImage::entry(bz.load_addr()), 0x10_0200);
        assert_eq!(bz.footprint_end(), 0x100_0000 + 0x200_0000);
        assert_eq!(bz.cmdline_max(), 2047);
    }

    #[test]
    fn truncated_or_old_images_are_refused() {
        let image = synthetic(4096);
        let err = BzImage::parse(&image[..image.len() - 1]).unwrap_err();
        assert!(err.contains("truncated bzImage"), "{err}");
        assert!(BzImage::parse(&image[..0x210])
            .unwrap_err()
            .contains("truncated"));
        let mut old = image.clone();
        old[0x206] = 0x0a; // version 2.10
        assert!(BzImage::parse(&old)
            .unwrap_err()
            .contains("no 64-bit entry"));
        let mut not_bz = image;
        not_bz[0x202] = b'X';
        assert!(!is_bzimage(&not_bz));
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_e820_and_rsdp() {
        let bz = BzImage::parse(&synthetic(4096)).unwrap();
        let map = e820::memory_map(256 << 20);
        let params = bz.boot_params(0x4_6000, Some((0x0f00_0000, 0x12_3456)), &map, 0xe_0000);
        let bytes = params.as_slice();
        assert_eq!(bytes.len(), 4096);
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        // Offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
        assert_eq!(u16::from_le_bytes([bytes[0x1fe], bytes[0x1ff]]), BOOT_FLAG);
        assert_eq!(u32_at(0x202), HEADER_MAGIC);
        assert_eq!(bytes[0x210], LOADER_UNDEFINED);
        assert_eq!(u32_at(0x228), 0x4_6000, "cmd_line_ptr");
        assert_eq!(u32_at(0x218), 0x0f00_0000, "ramdisk_image");
        assert_eq!(u32_at(0x21c), 0x12_3456, "ramdisk_size");
        assert_eq!(u64_at(0x070), 0xe_0000, "acpi_rsdp_addr");
        assert_eq!(bytes[0x1e8] as usize, map.len(), "e820_entries");
        for (i, entry) in map.iter().enumerate() {
            let at = 0x2d0 + i * 20;
            assert_eq!(u64_at(at), entry.addr);
            assert_eq!(u64_at(at + 8), entry.size);
            assert_eq!(u32_at(at + 16), entry.kind as u32);
        }
    }
}
