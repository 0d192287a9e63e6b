//! pvstack-blk on an image in memory (a file in /dev/shm), which it serves
//! through a shared mapping of the file: the guest's pattern lands in the
//! file, a frontend's reads and writes go through the mapping, an image
//! with holes is served with system calls instead, and a file truncated
//! under the mapping fails the requests past its new end while the
//! backend lives on and serves the rest through the file.

use std::path::PathBuf;

use pvstack_tests::blk_process::BlkProcess;
use pvstack_tests::blk_vm::{
    assert_pattern, assert_zeros, read_image, run_with_disks, socket_spec,
};
use pvstack_tests::process::LoggedProcess;
use pvstack_tests::vhost_frontend::{
    shared, start_backend, start_ring, Ram, Ring, Started, DESC_F_NEXT, DESC_F_WRITE,
};
use pvstack_tests::ScratchDir;

const MIB: usize = 1 << 20;
const SECTOR: usize = 512;
/// virtio-blk request types and statuses.
const IN: u32 = 0;
const OUT: u32 = 1;
const OK: u8 = 0;
const IOERR: u8 = 1;

/// A file in /dev/shm (tmpfs), removed when dropped.
struct ShmImage(PathBuf);

impl ShmImage {
    fn new(test: &str, bytes: &[u8]) -> ShmImage {
        let path = PathBuf::from(format!(
            "/dev/shm/pvstack-test-{}-{test}.img",
            std::process::id()
        ));
        std::fs::write(&path, bytes).expect("write an image in /dev/shm");
        ShmImage(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("UTF-8 path")
    }
}

impl Drop for ShmImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn a_guests_pattern_lands_in_an_image_in_memory() {
    let dir = ScratchDir::new("blk-in-memory-guest");
    let size = 48 * MIB;
    let image = ShmImage::new("guest", &vec![0u8; size]);
    let socket = dir.path("blk.sock");
    let backend = BlkProcess::start(&socket, &["--image", image.path(), "--exit-on-disconnect"]);
    let (seed, offset, len) = (5, 3 * MIB, 40 * MIB);
    let run = run_with_disks(
        &[socket_spec(&socket, &[])],
        &format!("blk-verify seed={seed} offset={offset} len={len} depth=32"),
    );
    assert_eq!(run.code(), 0, "{run:#?}\n{}", backend.log());
    let result = run.result("blk-verify");
    assert_eq!(result["mismatches"], "0", "{run:#?}");
    assert_eq!(result["errors"], "0", "{run:#?}");
    assert!(
        backend.log().contains("in memory, mapped"),
        "{}",
        backend.log()
    );
    let bytes = read_image(&image.0);
    assert_pattern(&bytes, seed, offset..offset + len);
    assert_zeros(&bytes, 0..offset);
    assert_zeros(&bytes, offset + len..size);
}

/// A frontend of this test on one queue of a real pvstack-blk, sending
/// one-sector requests.
struct TestFrontend {
    backend: LoggedProcess,
    ram: Ram,
    queue: Ring,
    started: Started,
    answered: u16,
    _frontend: vhost::vhost_user::Frontend,
    _dir: ScratchDir,
}

/// Where the request's parts sit in the test's guest memory.
const HEADER: u64 = 0x8000;
const DATA: u64 = 0x9000;
const STATUS: u64 = 0xa000;

impl TestFrontend {
    fn start(test: &str, image: &ShmImage) -> TestFrontend {
        let dir = ScratchDir::new(test);
        let socket = dir.path("blk.sock");
        let backend = start_backend("pvstack-blk", &socket, &["--image", image.path()]);
        let (mut frontend, ram) = shared(&socket, MIB);
        let queue = Ring::new(0, 16, 0x1000);
        queue.put(&ram, 0, (HEADER, 16, DESC_F_NEXT, 1));
        queue.put(&ram, 2, (STATUS, 1, DESC_F_WRITE, 0));
        let started = start_ring(&mut frontend, &ram, &queue);
        TestFrontend {
            backend,
            ram,
            queue,
            started,
            answered: 0,
            _frontend: frontend,
            _dir: dir,
        }
    }

    /// Sends a request of `kind` for `sector` (data at [`DATA`]) and
    /// returns its status.
    fn request(&mut self, kind: u32, sector: u64) -> u8 {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.ram.write(HEADER, &header);
        self.ram.write(STATUS, &[0xff]);
        let data_flags = if kind == IN { DESC_F_WRITE } else { 0 };
        self.queue.put(
            &self.ram,
            1,
            (DATA, SECTOR as u32, data_flags | DESC_F_NEXT, 2),
        );
        self.queue.offer(&self.ram, 0);
        self.started.kick();
        self.answered += 1;
        self.queue
            .wait_used(&self.ram, self.answered, &mut self.backend);
        self.ram.read(STATUS, 1)[0]
    }

    fn log(&self) -> String {
        self.backend.log()
    }
}

#[test]
fn an_image_file_truncated_under_the_mapping_fails_what_is_past_its_end_and_no_more() {
    let bytes = pattern(64 << 10);
    let image = ShmImage::new("truncated", &bytes);
    let mut frontend = TestFrontend::start("blk-in-memory-truncated", &image);
    assert!(
        frontend.log().contains("in memory, mapped"),
        "{}",
        frontend.log()
    );

    assert_eq!(frontend.request(IN, 9), OK, "a read before");
    assert!(frontend.ram.read(DATA, SECTOR) == bytes[9 * SECTOR..10 * SECTOR]);
    frontend.ram.write(DATA, &[0x5a; SECTOR]);
    assert_eq!(frontend.request(OUT, 3), OK, "a write before");
    let on_file = std::fs::read(&image.0).expect("read the image");
    assert!(
        on_file[3 * SECTOR..4 * SECTOR].iter().all(|&b| b == 0x5a),
        "written through"
    );

    // Down to one page: sector 16 on is past the end.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image.0)
        .and_then(|file| file.set_len(4096))
        .expect("truncate the image");
    assert_eq!(frontend.request(IN, 40), IOERR, "a read past the new end");
    assert!(frontend.backend.is_running(), "{}", frontend.log());
    assert!(
        frontend.log().contains("shrank under its mapping"),
        "{}",
        frontend.log()
    );
    // From now on through the file: inside it reads are served, past its
    // end they fail, and nothing grows it back.
    assert_eq!(frontend.request(IN, 1), OK, "a read inside");
    assert!(frontend.ram.read(DATA, SECTOR) == bytes[SECTOR..2 * SECTOR]);
    assert_eq!(
        frontend.request(IN, 100),
        IOERR,
        "a read past the end, through the file"
    );
    assert_eq!(std::fs::metadata(&image.0).unwrap().len(), 4096);
    assert!(frontend.backend.is_running(), "{}", frontend.log());
}

#[test]
fn an_image_in_memory_with_holes_is_served_through_the_file() {
    let image = ShmImage::new("sparse", &pattern(8192));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image.0)
        .and_then(|file| file.set_len(4 * MIB as u64))
        .expect("make the image sparse");
    let mut frontend = TestFrontend::start("blk-in-memory-sparse", &image);
    let log = frontend.log();
    assert!(
        log.contains("not mapped") && log.contains("holes") && log.contains(", in memory)"),
        "{log}"
    );
    assert_eq!(frontend.request(IN, 2000), OK, "a read of a hole");
    assert!(frontend.ram.read(DATA, SECTOR).iter().all(|&b| b == 0));
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image.0).unwrap());
    assert!(
        allocated * 512 <= 8192,
        "the hole stayed a hole: {allocated} blocks"
    );
}
