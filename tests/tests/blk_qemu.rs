//! Peer frontend and peer guest driver: QEMU (software emulation) boots a
//! stock Debian kernel whose virtio-blk driver talks to pvstack-blk through
//! `-device vhost-user-blk-pci`. The guest must read exactly what the test
//! put in the image, and its writes must land in the image at the right
//! offsets.

// These helper modules belong in pvstack-tests' lib; until tests/src/lib.rs
// declares them they are included by path, reaching the lib's own helpers
// through `crate::` via the imports below.
#[path = "../src/blk_process.rs"]
mod blk_process;
#[path = "../src/qemu.rs"]
mod qemu;
use pvstack_tests::{binary, run_to_end, wait_or_kill, HANG_TIMEOUT};

use blk_process::BlkProcess;
use pvstack_tests::ScratchDir;
use qemu::{linux_guest_assets, run_linux_guest};

const SECTOR: usize = 512;
const IMAGE_SIZE: usize = 16 << 20;
const HOST_MARK: &[u8] = b"PVSTACK-HOST-MARK";
const GUEST_MARK: &[u8] = b"PVSTACK-GUEST-MARK";
const MARK_SECTOR: usize = 1000;
const TAIL_SECTOR: usize = 30000;
/// The guest copies the first COPY_LEN bytes of the disk to COPY_TO.
const COPY_LEN: usize = 64 << 10;
const COPY_TO: usize = 2 << 20;
const SERIAL: &str = "pvstack-qemu-test";

/// Deterministic, position-dependent bytes (so a read from a wrong offset
/// cannot match).
fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn hex_lines(bytes: &[u8]) -> Vec<String> {
    bytes
        .chunks(32)
        .map(|chunk| chunk.iter().map(|b| format!("{b:02x}")).collect())
        .collect()
}

const GUEST_SCRIPT: &str = r#"set -e
echo "BEGIN info"; cat /sys/block/vda/size; cat /sys/block/vda/serial; echo; echo "END info"
dump() { dd if=/dev/vda bs=512 skip=$1 count=$2 2>/dev/null | hexdump -v -e '32/1 "%02x" "\n"'; }
echo "BEGIN head"; dump 0 2; echo "END head"
echo "BEGIN tail"; dump 30000 1; echo "END tail"
printf 'PVSTACK-GUEST-MARK' | dd of=/dev/vda bs=512 seek=1000 conv=sync 2>/dev/null
dd if=/dev/vda of=/dev/vda bs=4096 count=16 seek=512 2>/dev/null
sync
echo "BEGIN done"; echo "END done"
"#;

#[test]
fn linux_guest_under_qemu_reads_and_writes_through_pvstack_blk() {
    let assets = linux_guest_assets();
    let dir = ScratchDir::new("blk-qemu");
    let image_path = dir.path("disk.img");
    let mut image = pattern(IMAGE_SIZE);
    image[..HOST_MARK.len()].copy_from_slice(HOST_MARK);
    std::fs::write(&image_path, &image).expect("write image");

    let socket = dir.path("blk.sock");
    let image_arg = image_path.to_str().expect("utf-8 path");
    let mut backend = BlkProcess::start(&socket, &["--image", image_arg, "--serial", SERIAL]);

    let run = run_linux_guest(&assets, &[(&socket, 1)], GUEST_SCRIPT);
    assert_eq!(
        run.script_status,
        Some(0),
        "guest script failed; console:\n{}",
        run.console
    );

    // What the guest saw.
    let info = run.section("info");
    assert_eq!(
        info.first().copied(),
        Some((IMAGE_SIZE / SECTOR).to_string().as_str()),
        "capacity"
    );
    assert_eq!(info.get(1).copied(), Some(SERIAL), "serial from GET_ID");
    assert_eq!(
        run.section("head"),
        hex_lines(&image[..2 * SECTOR]),
        "first two sectors"
    );
    assert_eq!(
        run.section("tail"),
        hex_lines(&image[TAIL_SECTOR * SECTOR..(TAIL_SECTOR + 1) * SECTOR]),
        "sector {TAIL_SECTOR}"
    );

    // What the guest wrote.
    let after = std::fs::read(&image_path).expect("read image back");
    let mut expected_mark = vec![0u8; SECTOR];
    expected_mark[..GUEST_MARK.len()].copy_from_slice(GUEST_MARK);
    assert_eq!(
        &after[MARK_SECTOR * SECTOR..(MARK_SECTOR + 1) * SECTOR],
        &expected_mark[..]
    );
    assert!(
        after[COPY_TO..COPY_TO + COPY_LEN] == image[..COPY_LEN],
        "the guest's 64 KiB copy did not land at offset {COPY_TO}"
    );
    // Nothing else changed.
    let mut expected = image.clone();
    expected[MARK_SECTOR * SECTOR..(MARK_SECTOR + 1) * SECTOR].copy_from_slice(&expected_mark);
    expected.copy_within(..COPY_LEN, COPY_TO);
    assert!(
        after == expected,
        "bytes outside the guest's writes changed"
    );

    let log = backend.log();
    assert!(
        !log.contains("rejected") && !log.contains("unanswered"),
        "Linux's requests were refused:\n{log}"
    );
    assert!(
        backend.is_running(),
        "pvstack-blk must outlive the frontend:\n{log}"
    );
    let status = backend.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exit status; log:\n{}",
        backend.log()
    );
    assert!(!socket.exists(), "socket file left behind");
}
