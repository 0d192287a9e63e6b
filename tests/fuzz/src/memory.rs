//! Guest memory for the targets: a memfd mapped shared, as a backend maps
//! the memory a frontend hands it (the VMM targets use the VMM's own
//! `pvstack::memory::create`), wiped between runs so that every input
//! starts from the same memory and a crash reproduces.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// `size` bytes of guest memory at guest address 0, backed by a memfd.
pub fn memfd_memory(size: usize) -> GuestMemoryMmap {
    let file = memfd::MemfdOptions::default()
        .create("pvstack-fuzz-guest-ram")
        .expect("memfd_create")
        .into_file();
    file.set_len(size as u64)
        .expect("size the guest memory memfd");
    let offset = FileOffset::from_arc(Arc::new(file), 0);
    GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), size, Some(offset))])
        .expect("map the guest memory")
}

/// Zeroes every region of `mem` by punching its pages out of the backing
/// file: cheap when a run dirtied only a few pages of a large memory.
pub fn wipe(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        let file_offset = region.file_offset().expect("guest memory backed by a file");
        let (Ok(start), Ok(len)) = (
            libc::off_t::try_from(file_offset.start()),
            libc::off_t::try_from(region.len()),
        ) else {
            panic!("a guest memory region beyond off_t");
        };
        // SAFETY: fallocate on a file descriptor we own; it changes the
        // file's contents, never our address space's layout.
        let rc = unsafe {
            libc::fallocate(
                file_offset.file().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                len,
            )
        };
        assert_eq!(
            rc,
            0,
            "punching out guest memory: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Wipes `mem` and copies `image` into it from guest address 0 (as much
/// of it as the memory there holds).
pub fn load(mem: &GuestMemoryMmap, image: &[u8]) {
    wipe(mem);
    let room = mem
        .find_region(GuestAddress(0))
        .map_or(0, |region| region.len() as usize);
    let image = &image[..image.len().min(room)];
    mem.write_slice(image, GuestAddress(0))
        .expect("the image fits the first region");
}
