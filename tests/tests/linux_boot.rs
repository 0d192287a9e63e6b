//! A Linux kernel given to `pvstack run --kernel`: what pvstack refuses
//! before any VM exists, each with one clear error line and exit status 1
//! (the input is unusable) or 2 (the options do not fit together). On a
//! PVM host (where these tests run) a stock Linux kernel is refused; the
//! kernels here are made by the tests (a bzImage setup header in front of
//! a zero payload, or a broken LZ4 one), so no download is needed.
//!
//! Booting a real kernel needs a VMX/SVM host; on PVM machines that is
//! done under nested SVM (see README, "Linux guests").

use std::path::{Path, PathBuf};

use pvstack_tests::{assert_pvstack_error, guest_image, run_pvstack, Finished, ScratchDir};

const USAGE: i32 = 2;
const RUNTIME: i32 = 1;

/// Setup header offsets (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const SYSSIZE: usize = 0x1f4;
const BOOT_FLAG: usize = 0x1fe;
const HEADER: usize = 0x202;
const VERSION: usize = 0x206;
const LOADFLAGS: usize = 0x211;
const CODE32_START: usize = 0x214;
const INITRD_ADDR_MAX: usize = 0x22c;
const KERNEL_ALIGNMENT: usize = 0x230;
const XLOADFLAGS: usize = 0x236;
const CMDLINE_SIZE: usize = 0x238;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
const PREF_ADDRESS: usize = 0x258;
const INIT_SIZE: usize = 0x260;

/// The kernel's command line limit in the synthetic header.
const CMDLINE_LIMIT: usize = 2047;
/// What the synthetic kernel needs from 16 MiB on: 32 MiB.
const INIT_SIZE_BYTES: u32 = 32 << 20;

/// A bzImage of boot protocol 2.15 with a 64-bit entry point: 4 setup
/// sectors after the boot sector, then `payload` bytes of kernel.
fn synthetic_bzimage(payload: usize) -> Vec<u8> {
    let mut image = vec![0u8; 5 * 512 + payload];
    let mut put = |at: usize, bytes: &[u8]| image[at..at + bytes.len()].copy_from_slice(bytes);
    put(SETUP_SECTS, &[4]);
    put(SYSSIZE, &((payload / 16) as u32).to_le_bytes());
    put(BOOT_FLAG, &0xaa55u16.to_le_bytes());
    put(HEADER, b"HdrS");
    put(VERSION, &0x020fu16.to_le_bytes());
    put(LOADFLAGS, &[1]);
    put(CODE32_START, &0x10_0000u32.to_le_bytes());
    put(INITRD_ADDR_MAX, &0x7fff_ffffu32.to_le_bytes());
    put(KERNEL_ALIGNMENT, &0x20_0000u32.to_le_bytes());
    put(XLOADFLAGS, &1u16.to_le_bytes());
    put(CMDLINE_SIZE, &(CMDLINE_LIMIT as u32).to_le_bytes());
    put(PREF_ADDRESS, &0x100_0000u64.to_le_bytes());
    put(INIT_SIZE, &INIT_SIZE_BYTES.to_le_bytes());
    image
}

fn write(dir: &ScratchDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path(name);
    std::fs::write(&path, bytes).expect("scratch dir is writable");
    path
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn run_kernel(kernel: &Path, extra: &[&str]) -> Finished {
    let mut args = vec!["run", "--kernel", arg(kernel)];
    args.extend_from_slice(extra);
    run_pvstack(&args)
}

/// One `pvstack: error:` line containing every needle, nothing else on
/// stderr, nothing on stdout.
fn assert_one_line_error(run: &Finished, code: i32, needles: &[&str]) {
    assert_pvstack_error(run, code, needles);
    run.assert_stderr_one_line();
}

fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

#[test]
fn bzimage_is_refused_on_pvm() {
    let dir = ScratchDir::new("linux-on-pvm");
    let kernel = write(&dir, "vmlinuz", &synthetic_bzimage(1 << 16));
    let run = run_kernel(&kernel, &["--serial", "--cmdline", "console=ttyS0"]);
    if is_pvm_host() {
        assert_one_line_error(
            &run,
            RUNTIME,
            &[
                "is a Linux kernel",
                "PVM does not run natively",
                "VMX or SVM host",
            ],
        );
    } else {
        assert!(
            !run.stderr.contains("PVM does not run natively"),
            "{run:#?}"
        );
    }
}

#[test]
fn file_that_is_neither_elf_nor_bzimage() {
    let dir = ScratchDir::new("linux-neither");
    let mut bytes = synthetic_bzimage(4096);
    bytes[HEADER..HEADER + 4].copy_from_slice(b"HdrX");
    let kernel = write(&dir, "not-a-kernel", &bytes);
    assert_one_line_error(
        &run_kernel(&kernel, &[]),
        RUNTIME,
        &["not-a-kernel: not an ELF file or a Linux bzImage"],
    );
}

#[test]
fn truncated_bzimage() {
    let dir = ScratchDir::new("linux-truncated");
    let whole = synthetic_bzimage(1 << 16);
    let kernel = write(&dir, "vmlinuz", &whole[..whole.len() / 2]);
    let expected = format!(
        "truncated bzImage: its header says {} bytes, the file has {}",
        whole.len(),
        whole.len() / 2
    );
    assert_one_line_error(&run_kernel(&kernel, &[]), RUNTIME, &[&expected]);
    // Cut inside the setup header itself.
    let kernel = write(&dir, "vmlinuz-header", &whole[..0x210]);
    assert_one_line_error(
        &run_kernel(&kernel, &[]),
        RUNTIME,
        &["truncated bzImage: 528 bytes"],
    );
}

#[test]
fn bzimage_with_a_broken_lz4_kernel() {
    // The kernel build's LZ4 format: magic, blocks of (length, LZ4 block),
    // then the decompressed length. pvstack decompresses it itself.
    let mut payload = 0x184c_2102u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&100u32.to_le_bytes()); // a 100-byte block...
    payload.extend_from_slice(&[0x10; 20]); // ...of which only 20 are there
    payload.extend_from_slice(&(1u32 << 20).to_le_bytes());
    let dir = ScratchDir::new("linux-lz4");
    let mut image = synthetic_bzimage(4096);
    image[5 * 512..5 * 512 + payload.len()].copy_from_slice(&payload);
    image[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
        .copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let kernel = write(&dir, "vmlinuz", &image);
    assert_one_line_error(
        &run_kernel(&kernel, &[]),
        RUNTIME,
        &[
            "vmlinuz",
            "its LZ4 payload is corrupt: a block of 100 bytes, with 20 left",
        ],
    );
    // A header that puts the compressed kernel beyond the file's end.
    image[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&8192u32.to_le_bytes());
    let kernel = write(&dir, "vmlinuz-outside", &image);
    assert_one_line_error(
        &run_kernel(&kernel, &[]),
        RUNTIME,
        &["places the compressed kernel outside the file"],
    );
}

#[test]
fn initrd_too_large_for_guest_memory() {
    let dir = ScratchDir::new("linux-initrd");
    let kernel = write(&dir, "vmlinuz", &synthetic_bzimage(1 << 16));
    // The kernel takes memory up to 48 MiB; 64 MiB of RAM leave 16 MiB.
    let initrd = dir.path("initrd.img");
    std::fs::File::create(&initrd)
        .and_then(|f| f.set_len(24 << 20))
        .expect("sparse initrd");
    let run = run_kernel(&kernel, &["--memory", "64M", "--initrd", arg(&initrd)]);
    assert_one_line_error(
        &run,
        RUNTIME,
        &[
            &format!("initrd {}", initrd.display()),
            "25165824 bytes do not fit in guest memory",
            "give more --memory",
        ],
    );
    let missing = dir.path("missing.img");
    let run = run_kernel(&kernel, &["--initrd", arg(&missing)]);
    assert_one_line_error(&run, RUNTIME, &["cannot open initrd", "No such file"]);
}

#[test]
fn cmdline_the_kernel_cannot_take() {
    let dir = ScratchDir::new("linux-cmdline");
    let kernel = write(&dir, "vmlinuz", &synthetic_bzimage(1 << 16));
    let long = "a".repeat(CMDLINE_LIMIT + 1);
    let run = run_kernel(&kernel, &["--cmdline", &long]);
    assert_one_line_error(
        &run,
        USAGE,
        &[&format!(
            "--cmdline is 2048 bytes; {} takes at most 2047",
            kernel.display()
        )],
    );
}

#[test]
fn emulated_legacy_disk_with_a_linux_kernel() {
    let dir = ScratchDir::new("linux-legacy-disk");
    let kernel = write(&dir, "vmlinuz", &synthetic_bzimage(1 << 16));
    let image = dir.path("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk image");
    let spec = format!("image={},mode=emulated-legacy", image.display());
    let run = run_kernel(&kernel, &["--blk", &spec]);
    assert_one_line_error(
        &run,
        USAGE,
        &[
            "--blk number 0: mode=emulated-legacy",
            "Linux has no driver",
        ],
    );
}

#[test]
fn options_of_the_other_boot_path() {
    let dir = ScratchDir::new("linux-options");
    let kernel = write(&dir, "vmlinuz", &synthetic_bzimage(1 << 16));
    assert_one_line_error(
        &run_kernel(&kernel, &["--guest-args", "selftest"]),
        USAGE,
        &["--guest-args is for pvstack's own guest"],
    );
    assert_one_line_error(
        &run_kernel(&kernel, &["--console-log", arg(&dir.path("console.log"))]),
        USAGE,
        &["--console-log is pvstack's own guest's hypercall console"],
    );
    assert_one_line_error(
        &run_kernel(&kernel, &["--guest-privilege", "user"]),
        USAGE,
        &["a Linux kernel runs at CPL0"],
    );
    // --initrd and --cmdline with pvstack's own guest, built in or given.
    assert_one_line_error(
        &run_pvstack(&["run", "--cmdline", "quiet"]),
        USAGE,
        &["--cmdline is for a Linux kernel"],
    );
    let own = guest_image();
    assert_one_line_error(
        &run_kernel(&own, &["--initrd", arg(&kernel)]),
        USAGE,
        &["--initrd is for a Linux kernel", "takes --guest-args"],
    );
}
