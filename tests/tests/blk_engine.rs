//! pvstack-blk's engines under the guest's own driver on real KVM: a disk
//! on a block device (a loop device over a scratch file) served with
//! O_DIRECT by the io_uring engine and by the sync engine, the guest's
//! pattern checked in the file behind the device.

use std::path::{Path, PathBuf};
use std::process::Command;

use pvstack_tests::blk_process::BlkProcess;
use pvstack_tests::blk_vm::{
    assert_pattern, assert_zeros, read_image, run_with_disks, socket_spec, utf8, zeroed_image,
};
use pvstack_tests::{run_to_end, ScratchDir};

const MIB: usize = 1 << 20;

/// A loop device over a file, detached when dropped.
struct LoopDevice {
    device: PathBuf,
}

impl LoopDevice {
    /// `losetup --find --show FILE` (util-linux; needs root).
    fn attach(file: &Path) -> LoopDevice {
        let out = run_to_end(Command::new("losetup").args(["--find", "--show", utf8(file)]));
        assert_eq!(
            out.code(),
            0,
            "losetup could not attach {} (root and util-linux needed): {out:#?}",
            file.display()
        );
        // Detached even if the check below fails.
        let attached = LoopDevice {
            device: PathBuf::from(out.stdout.trim()),
        };
        assert!(
            attached.device.to_string_lossy().starts_with("/dev/loop"),
            "losetup printed {:?}",
            attached.device
        );
        attached
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("--detach")
            .arg(&self.device)
            .status();
    }
}

/// blk-verify over a loop device served by pvstack-blk with `engine`;
/// the pattern must be in the backing file, and nothing around it.
fn guest_pattern_lands_on_a_block_device(engine: &str) {
    let dir = ScratchDir::new(&format!("blk-engine-loop-{engine}"));
    let file = dir.path("backing.img");
    let size = 48 * MIB;
    zeroed_image(&file, size);
    let device = LoopDevice::attach(&file);
    let socket = dir.path("blk.sock");
    let backend = BlkProcess::start(
        &socket,
        &[
            "--image",
            utf8(&device.device),
            "--direct",
            "--engine",
            engine,
            "--exit-on-disconnect",
        ],
    );
    let (seed, offset, len) = (11, 3 * MIB, 40 * MIB);
    let run = run_with_disks(
        &[socket_spec(&socket, &[])],
        &format!("blk-verify seed={seed} offset={offset} len={len} depth=32"),
    );
    assert_eq!(run.code(), 0, "{run:#?}\n{}", backend.log());
    let result = run.result("blk-verify");
    assert_eq!(result["bytes"], len.to_string(), "{run:#?}");
    assert_eq!(result["mismatches"], "0", "{run:#?}");
    assert_eq!(result["errors"], "0", "{run:#?}");
    let log = backend.log();
    assert!(
        log.contains(&format!("serving {}", device.device.display()))
            && log.contains(&format!("engine {engine}")),
        "{log}"
    );
    // A device node lives on devtmpfs, which reports tmpfs's magic: the
    // device must not be taken for an image in memory (the io_uring
    // engine would then carry out its requests one by one, synchronously).
    assert!(!log.contains("in memory"), "{log}");
    drop(device);
    let bytes = read_image(&file);
    assert_eq!(bytes.len(), size);
    assert_pattern(&bytes, seed, offset..offset + len);
    assert_zeros(&bytes, 0..offset);
    assert_zeros(&bytes, offset + len..size);
}

#[test]
fn a_loop_device_served_by_the_io_uring_engine_holds_the_guests_pattern() {
    guest_pattern_lands_on_a_block_device("io-uring");
}

#[test]
fn a_loop_device_served_by_the_sync_engine_holds_the_guests_pattern() {
    guest_pattern_lands_on_a_block_device("sync");
}
