//! Peer frontend and peer guest driver: QEMU (software emulation) boots a
//! stock Debian kernel whose virtio-blk driver talks to pvstack-blk through
//! `-device vhost-user-blk-pci` with QEMU's default queue size (128). The
//! guest must read exactly what the test put in the image, its writes must
//! land in the image at the right offsets, and its kernel log must stay
//! free of warnings and I/O errors.

use std::io::Write;
use std::process::{Command, Stdio};

use pvstack_tests::blk_process::BlkProcess;
use pvstack_tests::qemu::{linux_guest_assets, run_linux_guest, KERNEL_LOG_SECTION};
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

/// The kernel log line that says the disk was found.
const DISK_FOUND: &str = "virtio_blk virtio0: [vda]";

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

    let script = format!("{GUEST_SCRIPT}{KERNEL_LOG_SECTION}\n");
    let run = run_linux_guest(&assets, &[(&socket, 1)], &script);
    assert_eq!(
        run.script_status,
        Some(0),
        "guest script failed; console:\n{}",
        run.console
    );
    run.assert_clean_kernel_log(DISK_FOUND);

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
        &format!("{TWO_DISKS_SCRIPT}{KERNEL_LOG_SECTION}\n"),
    );
    assert_eq!(
        run.script_status,
        Some(0),
        "guest script failed; console:\n{}",
        run.console
    );

    run.assert_clean_kernel_log("virtio_blk virtio1: [vdb]");
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

const MIB: usize = 1 << 20;
/// Boots of the large-I/O test: the request sizes Linux builds depend on
/// how fragmented the guest's memory is, so one boot may get lucky.
const LARGE_IO_BOOTS: usize = 3;
const LARGE_IO_IMAGE: usize = 48 * MIB;
/// Boot `b` reads [8b, 8b+8) MiB and copies its first COPY_MIB MiB to
/// COPY_BASE_MIB + 8b.
const READ_MIB: usize = 8;
const COPY_MIB: usize = 4;
const COPY_BASE_MIB: usize = 24;

/// SHA-256 of `bytes` in hex, from the host's sha256sum (as the guest's
/// busybox prints it).
fn sha256_hex(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the host's sha256sum (coreutils)");
    child
        .stdin
        .take()
        .expect("sha256sum's stdin")
        .write_all(bytes)
        .expect("feed sha256sum");
    let output = child.wait_with_output().expect("sha256sum output");
    assert!(output.status.success(), "sha256sum failed");
    let text = String::from_utf8(output.stdout).expect("sha256sum prints ASCII");
    text.split_whitespace()
        .next()
        .expect("a checksum")
        .to_string()
}

/// The guest script of boot `boot`: what Linux makes of the disk, 1 MiB
/// O_DIRECT reads (each request as long as seg_max allows, and longer than
/// QEMU's default queue of 128 if seg_max were not sized for it), the same
/// range through the page cache, an O_DIRECT copy and its read-back, then
/// the kernel log.
fn large_io_script(boot: usize) -> String {
    let read = boot * READ_MIB;
    let copy_to = COPY_BASE_MIB + boot * READ_MIB;
    format!(
        r#"set -e
echo BEGIN limits; cat /sys/block/vda/queue/max_segments /sys/block/vda/device/features; echo END limits
echo BEGIN direct; dd if=/dev/vda bs=1M skip={read} count={READ_MIB} iflag=direct 2>/dev/null | sha256sum; echo END direct
echo BEGIN buffered; dd if=/dev/vda bs=1M skip={read} count={READ_MIB} 2>/dev/null | sha256sum; echo END buffered
dd if=/dev/vda of=/dev/vda bs=1M skip={read} seek={copy_to} count={COPY_MIB} iflag=direct oflag=direct 2>/dev/null
echo BEGIN copy; dd if=/dev/vda bs=1M skip={copy_to} count={COPY_MIB} iflag=direct 2>/dev/null | sha256sum; echo END copy
{KERNEL_LOG_SECTION}
"#
    )
}

/// The checksum line busybox's sha256sum prints for stdin.
fn checksum_line(bytes: &[u8]) -> Vec<String> {
    vec![format!("{}  -", sha256_hex(bytes))]
}

#[test]
fn large_direct_io_at_qemus_default_queue_size_boot_after_boot() {
    let assets = linux_guest_assets();
    let dir = ScratchDir::new("blk-qemu-large-io");
    let image_path = dir.path("disk.img");
    let image = pattern(LARGE_IO_IMAGE);
    std::fs::write(&image_path, &image).expect("write image");
    let socket = dir.path("blk.sock");
    let image_arg = image_path.to_str().expect("utf-8 path");
    // One backend for every boot: it serves each new QEMU in turn.
    let mut backend = BlkProcess::start(&socket, &["--image", image_arg]);

    for boot in 0..LARGE_IO_BOOTS {
        let run = run_linux_guest(&assets, &[(&socket, 1)], &large_io_script(boot));
        assert_eq!(
            run.script_status,
            Some(0),
            "boot {boot}: guest script failed; console:\n{}",
            run.console
        );
        run.assert_clean_kernel_log(DISK_FOUND);
        let limits = run.section("limits");
        assert_eq!(
            limits.first().copied(),
            Some("126"),
            "boot {boot}: Linux's max_segments is pvstack-blk's seg_max"
        );
        let features = limits.get(1).copied().unwrap_or_default();
        assert_eq!(
            features.as_bytes().get(28),
            Some(&b'1'),
            "boot {boot}: Linux did not take VIRTIO_RING_F_INDIRECT_DESC ({features})"
        );
        let read = &image[boot * READ_MIB * MIB..(boot + 1) * READ_MIB * MIB];
        assert_eq!(run.section("direct"), checksum_line(read), "boot {boot}");
        assert_eq!(run.section("buffered"), checksum_line(read), "boot {boot}");
        assert_eq!(
            run.section("copy"),
            checksum_line(&read[..COPY_MIB * MIB]),
            "boot {boot}"
        );
    }

    let mut expected = image.clone();
    for boot in 0..LARGE_IO_BOOTS {
        let from = boot * READ_MIB * MIB;
        let to = (COPY_BASE_MIB + boot * READ_MIB) * MIB;
        expected.copy_within(from..from + COPY_MIB * MIB, to);
    }
    let after = std::fs::read(&image_path).expect("read image back");
    assert!(
        after == expected,
        "the image is not the original with the guests' three O_DIRECT copies"
    );
    let log = backend.log();
    assert!(
        !log.contains("rejected") && !log.contains("unanswered"),
        "Linux's requests were refused:\n{log}"
    );
    backend.terminate_cleanly();
}
