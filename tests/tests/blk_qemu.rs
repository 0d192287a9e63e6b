//! Peer frontend and peer guest driver: QEMU (software emulation) boots a
//! stock Debian kernel whose virtio-blk driver talks to pvstack-blk through
//! `-device vhost-user-blk-pci`. The guest must read exactly what the test
//! put in the image, and its writes must land in the image at the right
//! offsets.

use pvstack_tests::blk_process::BlkProcess;
use pvstack_tests::qemu::{linux_guest_assets, run_linux_guest};
use pvstack_tests::ScratchDir;

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
    // QEMU's vhost-user-blk asks for an inflight region when the backend
    // offers INFLIGHT_SHMFD and hands it back before starting the rings.
    assert!(
        log.contains("inflight region created for 1 queues")
            && log.contains("inflight region set for 1 queues"),
        "QEMU did not take pvstack-blk's inflight region:\n{log}"
    );
    assert!(
        backend.is_running(),
        "pvstack-blk must outlive the frontend:\n{log}"
    );
    backend.terminate_cleanly();
    assert!(!socket.exists(), "socket file left behind");
}

const TWO_DISKS_SCRIPT: &str = r#"echo "BEGIN ro"; cat /sys/block/vdb/ro; dd if=/dev/vdb bs=512 count=1 2>/dev/null | hexdump -v -e '32/1 "%02x" "\n"'; echo "END ro"
if printf 'MUST-NOT-LAND' | dd of=/dev/vdb bs=512 conv=sync 2>/dev/null; then echo "BEGIN rowrite"; echo accepted; echo "END rowrite"; else echo "BEGIN rowrite"; echo refused; echo "END rowrite"; fi
printf 'PVSTACK-GUEST-MARK' | dd of=/dev/vda bs=512 seek=7 conv=sync 2>/dev/null
sync
"#;

#[test]
fn linux_guest_sees_two_disks_one_readonly() {
    let assets = linux_guest_assets();
    let dir = ScratchDir::new("blk-qemu-two-disks");
    let rw_path = dir.path("rw.img");
    let ro_path = dir.path("ro.img");
    let rw_image = vec![0u8; 1 << 20];
    let ro_image = pattern(4 << 20);
    std::fs::write(&rw_path, &rw_image).expect("write rw image");
    std::fs::write(&ro_path, &ro_image).expect("write ro image");

    let rw_socket = dir.path("rw.sock");
    let ro_socket = dir.path("ro.sock");
    let mut rw_backend = BlkProcess::start(
        &rw_socket,
        &[
            "--image",
            rw_path.to_str().expect("utf-8"),
            "--num-queues",
            "2",
        ],
    );
    let mut ro_backend = BlkProcess::start(
        &ro_socket,
        &["--image", ro_path.to_str().expect("utf-8"), "--readonly"],
    );

    let run = run_linux_guest(
        &assets,
        &[(&rw_socket, 2), (&ro_socket, 1)],
        TWO_DISKS_SCRIPT,
    );
    assert_eq!(
        run.script_status,
        Some(0),
        "guest script failed; console:\n{}",
        run.console
    );

    let ro_section = run.section("ro");
    assert_eq!(
        ro_section.first().copied(),
        Some("1"),
        "Linux must see vdb read-only"
    );
    assert_eq!(
        ro_section[1..],
        hex_lines(&ro_image[..SECTOR])[..],
        "vdb's first sector"
    );
    assert_eq!(run.section("rowrite"), vec!["refused"]);
    assert!(
        std::fs::read(&ro_path).expect("read ro image") == ro_image,
        "readonly image changed"
    );

    let rw_after = std::fs::read(&rw_path).expect("read rw image");
    let mut expected = rw_image;
    expected[7 * SECTOR..7 * SECTOR + GUEST_MARK.len()].copy_from_slice(GUEST_MARK);
    assert!(
        rw_after == expected,
        "vda's write did not land exactly at sector 7"
    );

    for backend in [&mut rw_backend, &mut ro_backend] {
        backend.terminate_cleanly();
    }
}
