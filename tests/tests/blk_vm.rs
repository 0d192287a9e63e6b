//! The guest's virtio-blk driver on real KVM, through pvstack's vhost-user
//! frontend, against real backend processes (pvstack-blk, started by
//! pvstack or already running, and qemu-storage-daemon) serving real image
//! files: the bytes the guest writes are found in the file at the right
//! offsets, and the bytes the test puts in the file are what the guest reads.

use pvstack_guest::checksum::fnv1a64;
use pvstack_tests::blk_process::BlkProcess;
use std::process::Command;

use pvstack_tests::blk_vm::{
    assert_no_process_mentions, assert_pattern, assert_zeros, image_spec, pattern_image,
    read_image, run_with_disks, socket_spec, utf8, zeroed_image, SECTOR,
};
use pvstack_tests::qsd::QsdProcess;
use pvstack_tests::{pvstack, run_to_end, Finished, ScratchDir};

const MIB: usize = 1 << 20;

/// Asserts a passed blk-verify run that moved `bytes` each way.
fn assert_verified(run: &Finished, bytes: usize) {
    assert_eq!(run.code(), 0, "{run:#?}");
    let result = run.result("blk-verify");
    assert_eq!(result["bytes"], bytes.to_string(), "{run:#?}");
    assert_eq!(result["mismatches"], "0", "{run:#?}");
    assert_eq!(result["errors"], "0", "{run:#?}");
}

/// The guest's FNV-1a of `[offset, offset + len)` of disk 0.
fn guest_checksum(specs: &[String], offset: usize, len: usize) -> u64 {
    let run = run_with_disks(specs, &format!("blk-checksum {offset} {len}"));
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(run.result("blk-checksum")["bytes"], len.to_string());
    run.result_u64("blk-checksum", "fnv")
}

#[test]
fn guest_pattern_lands_in_the_image_at_its_offsets() {
    let dir = ScratchDir::new("blk-vm-pattern");
    let image = dir.path("disk.img");
    let size = 80 * MIB;
    zeroed_image(&image, size);
    // Sector aligned but on no larger boundary.
    let (seed, offset, len) = (7, 5 * MIB + 3 * SECTOR, 64 * MIB);

    let run = run_with_disks(
        &[image_spec(&image, &[])],
        &format!("blk-verify seed={seed} offset={offset} len={len}"),
    );
    assert_verified(&run, len);

    let bytes = read_image(&image);
    assert_eq!(bytes.len(), size, "the image changed size");
    assert_pattern(&bytes, seed, offset..offset + len);
    assert_zeros(&bytes, 0..offset);
    assert_zeros(&bytes, offset + len..size);
}

#[test]
fn guest_checksums_what_the_host_wrote() {
    let dir = ScratchDir::new("blk-vm-checksum");
    let image = dir.path("disk.img");
    let bytes = pattern_image(&image, 0x5eed, 72 * MIB);
    let specs = [image_spec(&image, &["num-queues=2"])];

    // 64 MiB from the host into the guest.
    assert_eq!(
        guest_checksum(&specs, 0, 64 * MIB),
        fnv1a64(&bytes[..64 * MIB])
    );
    // Any alignment: the range starts and ends inside sectors.
    let (offset, len) = (64 * MIB + 4097, 1_000_003);
    assert_eq!(
        guest_checksum(&specs, offset, len),
        fnv1a64(&bytes[offset..offset + len])
    );
    // A one-byte change in the file is seen by the guest.
    let mut changed = bytes;
    changed[offset + 1234] ^= 0x40;
    std::fs::write(&image, &changed).expect("rewrite image");
    assert_eq!(
        guest_checksum(&specs, offset, len),
        fnv1a64(&changed[offset..offset + len])
    );
}

#[test]
fn two_queues_and_queue_depth_32_verify() {
    let dir = ScratchDir::new("blk-vm-queues");
    let image = dir.path("disk.img");
    let size = 64 * MIB;
    zeroed_image(&image, size);
    let specs = [image_spec(&image, &["num-queues=2"])];
    // A fresh seed per run, so the file shows that this run wrote it.
    for (seed, queues, depth) in [(11, 1, 32), (12, 2, 1), (13, 2, 32)] {
        let run = run_with_disks(
            &specs,
            &format!("blk-verify seed={seed} queues={queues} depth={depth}"),
        );
        assert_verified(&run, size);
        assert!(
            run.stdout.contains(&format!("queues {queues} of 2")),
            "{run:#?}"
        );
        assert_pattern(&read_image(&image), seed, 0..size);
    }
}

/// Asserts that blk-verify on a read-only disk failed with write errors
/// and left the image as it was.
fn assert_writes_refused(run: &Finished, image: &std::path::Path, before: u64) {
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(run.stdout.contains("ro=1"), "{run:#?}");
    assert!(run.result_u64("blk-verify", "errors") > 0, "{run:#?}");
    assert_eq!(
        fnv1a64(&read_image(image)),
        before,
        "read-only image changed"
    );
}

#[test]
fn readonly_disk_refuses_writes_and_keeps_the_file() {
    let dir = ScratchDir::new("blk-vm-readonly");
    let image = dir.path("disk.img");
    let before = fnv1a64(&pattern_image(&image, 3, 8 * MIB));

    // Read-only asked of pvstack (which starts the backend).
    let specs = [image_spec(&image, &["readonly"])];
    assert_writes_refused(&run_with_disks(&specs, "blk-verify seed=9"), &image, before);
    let zero = run_with_disks(&specs, &format!("blk-zero 0 {}", MIB));
    assert_eq!(zero.code(), 1, "{zero:#?}");
    assert_ne!(zero.result("blk-zero")["status"], "0", "{zero:#?}");
    let discard = run_with_disks(&specs, &format!("blk-zero 0 {} discard=1", MIB));
    assert_ne!(discard.result("blk-zero")["status"], "0", "{discard:#?}");
    assert_eq!(
        fnv1a64(&read_image(&image)),
        before,
        "read-only image changed"
    );
    // Reads still work.
    let run = run_with_disks(&specs, &format!("blk-checksum 0 {}", 8 * MIB));
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(run.result_u64("blk-checksum", "fnv"), before);

    // Read-only enforced by a running backend, not asked by pvstack.
    let socket = dir.path("ro.sock");
    let mut backend = BlkProcess::start(&socket, &["--image", utf8(&image), "--readonly"]);
    let run = run_with_disks(&[socket_spec(&socket, &[])], "blk-verify seed=9");
    assert_writes_refused(&run, &image, before);
    backend.terminate_cleanly();
}

#[test]
fn three_disks_each_hold_their_own_pattern() {
    let dir = ScratchDir::new("blk-vm-three-disks");
    let sizes = [8 * MIB, 12 * MIB, 16 * MIB];
    let images: Vec<_> = (0..sizes.len())
        .map(|n| dir.path(&format!("disk{n}.img")))
        .collect();
    for (image, &size) in images.iter().zip(&sizes) {
        zeroed_image(image, size);
    }
    let specs: Vec<String> = images.iter().map(|i| image_spec(i, &[])).collect();
    let seed = |n: usize| 100 + n as u64;
    for (n, &size) in sizes.iter().enumerate() {
        let run = run_with_disks(&specs, &format!("blk-verify disk={n} seed={}", seed(n)));
        assert_verified(&run, size);
        let sectors = size / SECTOR;
        assert!(
            run.stdout.contains(&format!("disk {n}: {sectors} sectors")),
            "disk={n} is not the {n}-th --blk: {run:#?}"
        );
        // The disks after this one are still untouched.
        for later in &images[n + 1..] {
            let bytes = read_image(later);
            assert_zeros(&bytes, 0..bytes.len());
        }
    }
    for (n, (image, &size)) in images.iter().zip(&sizes).enumerate() {
        let bytes = read_image(image);
        assert_eq!(bytes.len(), size);
        assert_pattern(&bytes, seed(n), 0..size);
    }
}

#[test]
fn write_zeroes_and_discard_leave_zeros_in_the_file() {
    let dir = ScratchDir::new("blk-vm-zero");
    let image = dir.path("disk.img");
    let size = 16 * MIB;
    let seed = 4;
    pattern_image(&image, seed, size);
    let specs = [image_spec(&image, &[])];

    let zeroed = (MIB + SECTOR)..(4 * MIB + SECTOR);
    let run = run_with_disks(
        &specs,
        &format!("blk-zero {} {}", zeroed.start, zeroed.len()),
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    let result = run.result("blk-zero");
    assert_eq!(result["op"], "write_zeroes");
    assert_eq!(result["status"], "0", "{run:#?}");
    assert_eq!(result["nonzero"], "0", "{run:#?}");

    // Discard on a file that can punch holes (tmpfs, ext4) reads back as zeros.
    let discarded = (8 * MIB)..(10 * MIB);
    let run = run_with_disks(
        &specs,
        &format!("blk-zero {} {} discard=1", discarded.start, discarded.len()),
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(run.result("blk-zero")["op"], "discard");
    assert_eq!(run.result("blk-zero")["status"], "0", "{run:#?}");

    let bytes = read_image(&image);
    assert_eq!(bytes.len(), size, "the image changed size");
    assert_pattern(&bytes, seed, 0..zeroed.start);
    assert_zeros(&bytes, zeroed.clone());
    assert_pattern(&bytes, seed, zeroed.end..discarded.start);
    assert_zeros(&bytes, discarded.clone());
    assert_pattern(&bytes, seed, discarded.end..size);
}

/// Counts the backend log lines containing `needle`.
fn log_count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn evil_requests_get_errors_and_the_backend_serves_the_next_vm() {
    let dir = ScratchDir::new("blk-vm-evil");
    let image = dir.path("disk.img");
    let size = 16 * MIB;
    zeroed_image(&image, size);
    let socket = dir.path("blk.sock");
    let mut backend = BlkProcess::start(&socket, &["--image", utf8(&image)]);
    let specs = [socket_spec(&socket, &[])];

    let run = run_with_disks(&specs, "blk-evil");
    assert_eq!(run.code(), 0, "{run:#?}");
    let cases = run.result_u64("blk-evil", "cases") as usize;
    let errors = run.result_u64("blk-evil", "errors_returned") as usize;
    let unanswered = run.result_u64("blk-evil", "unanswered") as usize;
    assert!(cases >= 10, "{run:#?}");
    assert_eq!(run.result("blk-evil")["ok_returned"], "0", "{run:#?}");
    assert_eq!(run.result("blk-evil")["after_ok"], "1", "{run:#?}");
    assert_eq!(errors + unanswered, cases, "{run:#?}");
    // Nothing timed out: a chain without a status byte was returned at
    // once, which the backend documents in its log, one line per chain.
    assert!(!run.stdout.contains("no answer within"), "{run:#?}");
    let log = backend.log();
    assert_eq!(
        log_count(&log, "returned a chain unanswered"),
        unanswered,
        "{log}"
    );
    assert_eq!(
        log_count(&log, "rejected a request"),
        errors,
        "every error status is logged:\n{log}"
    );
    // Only a looping chain has no status byte the backend may write.
    for line in run
        .stdout
        .lines()
        .filter(|l| l.contains("without a status"))
    {
        assert!(
            line.starts_with("blk-evil: looping descriptor chain:"),
            "{line}: {run:#?}"
        );
    }
    // The zeroed image was never written to.
    assert_zeros(&read_image(&image), 0..size);

    assert!(backend.is_running(), "blk-evil killed pvstack-blk:\n{log}");
    let run = run_with_disks(&specs, "blk-verify seed=31 depth=16");
    assert_verified(&run, size);
    assert_pattern(&read_image(&image), 31, 0..size);
    backend.terminate_cleanly();
}

#[test]
fn qemu_storage_daemon_serves_the_guest() {
    let dir = ScratchDir::new("blk-vm-qsd");
    let image = dir.path("disk.img");
    let size = 64 * MIB;
    let host_seed = 20;
    let host_bytes = pattern_image(&image, host_seed, size);
    let socket = dir.path("qsd.sock");
    let mut qsd = QsdProcess::start(&image, &socket, 2);
    let specs = [socket_spec(&socket, &[])];

    // The guest reads what the host wrote...
    let (offset, len) = (48 * MIB, 16 * MIB);
    assert_eq!(
        guest_checksum(&specs, offset, len),
        fnv1a64(&host_bytes[offset..offset + len])
    );
    // ...and its writes over both queues land in the image.
    let (seed, written) = (21, 32 * MIB);
    let run = run_with_disks(
        &specs,
        &format!("blk-verify seed={seed} len={written} queues=2 depth=32"),
    );
    assert_verified(&run, written);
    assert!(run.stdout.contains("queues 2 of 2"), "{run:#?}");

    qsd.terminate_cleanly();
    let bytes = read_image(&image);
    assert_pattern(&bytes, seed, 0..written);
    assert_pattern(&bytes, host_seed, written..size);
}

/// pvstack's own pvstack-blk (`image=`) ends with the VM, and the private
/// directory of its socket goes with it: pvstack drops its devices after
/// the VM ends, even though a signal thread could still stop the VM.
#[test]
fn started_backend_and_its_socket_directory_go_with_the_vm() {
    let dir = ScratchDir::new("blk-vm-cleanup");
    let image = dir.path("disk.img");
    zeroed_image(&image, MIB);
    let tmp = dir.path("tmp");
    std::fs::create_dir(&tmp).expect("create the TMPDIR for pvstack");
    let run = run_to_end(
        Command::new(pvstack())
            .env("TMPDIR", &tmp)
            .args(["run", "--blk", &image_spec(&image, &[])])
            .args(["--guest-args", "blk-verify len=64K"]),
    );
    assert_verified(&run, 64 << 10);
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .expect("read pvstack's TMPDIR")
        .map(|entry| entry.map(|e| e.path()))
        .collect();
    assert!(left.is_empty(), "left behind in TMPDIR: {left:?}");
    assert_no_process_mentions(utf8(&image));
}
