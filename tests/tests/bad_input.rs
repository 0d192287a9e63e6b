//! Bad input gets one clear error line and exit status 2 (usage) or 1
//! (runtime), never a hang, a panic or a crash report.

use elf::abi::PT_LOAD;
use elf::endian::AnyEndian;
use elf::ElfBytes;
use pvstack_protocols::layout;
use pvstack_tests::{assert_pvstack_error, guest_image, run_pvstack, Finished, ScratchDir};

const USAGE: i32 = 2;
const RUNTIME: i32 = 1;

/// Asserts exit status `code` and a single `pvstack: error:` line on stderr
/// containing `needle`.
fn assert_one_line_error(run: &Finished, code: i32, needle: &str) {
    assert_pvstack_error(run, code, &[needle]);
    run.assert_stderr_one_line();
}

fn run_kernel(image: &std::path::Path, extra: &[&str]) -> Finished {
    let mut args = vec!["run", "--kernel", image.to_str().expect("UTF-8 path")];
    args.extend_from_slice(extra);
    run_pvstack(&args)
}

/// A copy of the guest image with `patch` applied, in `dir`.
fn patched_guest(
    dir: &ScratchDir,
    name: &str,
    patch: impl FnOnce(&mut Vec<u8>),
) -> std::path::PathBuf {
    let mut image = std::fs::read(guest_image()).expect("guest image is readable");
    patch(&mut image);
    let path = dir.path(name);
    std::fs::write(&path, image).expect("scratch dir is writable");
    path
}

/// Byte offset of the `p_paddr` field of the first PT_LOAD program header.
fn first_load_paddr_offset(image: &[u8]) -> usize {
    let elf = ElfBytes::<AnyEndian>::minimal_parse(image).expect("the guest is an ELF");
    let index = elf
        .segments()
        .expect("the guest has program headers")
        .iter()
        .position(|p| p.p_type == PT_LOAD)
        .expect("the guest has a loadable segment");
    const P_PADDR: usize = 24;
    elf.ehdr.e_phoff as usize + index * usize::from(elf.ehdr.e_phentsize) + P_PADDR
}

fn set_first_load_paddr(image: &mut [u8], paddr: u64) {
    let at = first_load_paddr_offset(image);
    image[at..at + 8].copy_from_slice(&paddr.to_le_bytes());
}

#[test]
fn missing_kernel_file() {
    let run = run_pvstack(&["run", "--kernel", "/nonexistent/guest.elf"]);
    assert_one_line_error(
        &run,
        RUNTIME,
        "cannot open kernel /nonexistent/guest.elf: No such file",
    );
}

#[test]
fn kernel_that_is_not_elf() {
    let dir = ScratchDir::new("not-elf");
    let path = dir.path("script.sh");
    std::fs::write(&path, "#!/bin/sh\necho not a guest\n").unwrap();
    assert_one_line_error(&run_kernel(&path, &[]), RUNTIME, "not an ELF file");
}

#[test]
fn kernel_for_another_machine() {
    let dir = ScratchDir::new("aarch64");
    let path = patched_guest(&dir, "aarch64.elf", |image| {
        const E_MACHINE: usize = 18;
        const EM_AARCH64: u16 = 183;
        image[E_MACHINE..E_MACHINE + 2].copy_from_slice(&EM_AARCH64.to_le_bytes());
    });
    assert_one_line_error(
        &run_kernel(&path, &[]),
        RUNTIME,
        "another machine (ARM 64-bit architecture (AARCH64), e_machine 183)",
    );
}

#[test]
fn segment_beyond_guest_ram() {
    let dir = ScratchDir::new("beyond-ram");
    let path = patched_guest(&dir, "high.elf", |image| {
        set_first_load_paddr(image, 256 << 20)
    });
    let run = run_kernel(&path, &["--memory", "64M"]);
    assert_one_line_error(&run, RUNTIME, "lies outside guest RAM");
}

#[test]
fn segment_in_the_mmio_hole() {
    let dir = ScratchDir::new("in-hole");
    let path = patched_guest(&dir, "hole.elf", |image| {
        set_first_load_paddr(image, layout::HYPERCALL_ADDR)
    });
    assert_one_line_error(
        &run_kernel(&path, &["--memory", "4G"]),
        RUNTIME,
        "lies outside guest RAM",
    );
}

#[test]
fn segment_on_the_vmm_area() {
    let dir = ScratchDir::new("low");
    let path = patched_guest(&dir, "low.elf", |image| set_first_load_paddr(image, 0x1000));
    assert_one_line_error(&run_kernel(&path, &[]), RUNTIME, "starts below 0x200000");
}

#[test]
fn zero_memory() {
    let run = run_pvstack(&["run", "--memory", "0"]);
    assert_one_line_error(&run, USAGE, "guest memory cannot be 0");
}

#[test]
fn malformed_memory() {
    let run = run_pvstack(&["run", "--memory", "12X"]);
    assert_one_line_error(&run, USAGE, "not a size");
}

#[test]
fn memory_above_the_layout_limit() {
    let run = run_pvstack(&["run", "--memory", "64G"]);
    assert_one_line_error(&run, USAGE, "above the maximum");
}

#[test]
fn memory_larger_than_the_host() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("MemTotal in /proc/meminfo");
    let gib = (kib >> 20) + 1;
    assert!(
        gib << 30 <= layout::MAX_MEMORY,
        "host too large for this test"
    );
    let size = format!("{gib}G");
    let run = run_pvstack(&["run", "--memory", &size]);
    assert_one_line_error(&run, RUNTIME, "more than this host has");
}

#[test]
fn hugepages_need_whole_huge_pages_of_memory() {
    let run = run_pvstack(&["run", "--hugepages", "--memory", "5M"]);
    assert_one_line_error(
        &run,
        USAGE,
        "--hugepages: --memory must be a multiple of 2M",
    );
}

#[test]
fn hugepages_beyond_the_hosts_free_ones_stop_before_the_guest_runs() {
    // One page more than the host has free: taken when the VM is created,
    // so the shortfall is one line, not a SIGBUS when the guest gets there.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let free: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("HugePages_Free in /proc/meminfo");
    let pages = (free + 1).max(2);
    assert!(
        pages << 21 <= layout::MAX_MEMORY,
        "host has too many huge pages for this test"
    );
    let size = format!("{}M", pages * 2);
    let run = run_pvstack(&["run", "--hugepages", "--memory", &size]);
    assert_one_line_error(
        &run,
        RUNTIME,
        &format!("--hugepages: cannot take {pages} huge pages of 2 MiB for guest RAM"),
    );
    assert!(
        run.stderr.contains(&format!("the host has {free} free"))
            && run.stderr.contains("vm.nr_hugepages"),
        "{run:#?}"
    );
    assert!(!run.stdout.contains("Hello"), "the guest ran: {run:#?}");
}

#[test]
fn zero_or_too_many_cpus() {
    assert_one_line_error(&run_pvstack(&["run", "--cpus", "0"]), USAGE, "--cpus");
    let too_many = (layout::MAX_VCPUS + 1).to_string();
    assert_one_line_error(&run_pvstack(&["run", "--cpus", &too_many]), USAGE, "--cpus");
}

#[test]
fn guest_args_too_long() {
    let args = "a".repeat(pvstack_protocols::boot::CMDLINE_MAX + 1);
    let run = run_pvstack(&["run", "--guest-args", &args]);
    assert_one_line_error(&run, USAGE, "longer than the guest command line limit");
}

#[test]
fn kvm_device_that_cannot_be_used() {
    let run = run_pvstack(&["run", "--kvm-device", "/nonexistent/kvm"]);
    assert_one_line_error(&run, RUNTIME, "cannot open KVM device /nonexistent/kvm");
    // A directory cannot be opened read-write, even by root.
    let dir = ScratchDir::new("kvm-dir");
    let path = dir.path("");
    let run = run_pvstack(&["run", "--kvm-device", path.to_str().unwrap()]);
    assert_one_line_error(&run, RUNTIME, "cannot open KVM device");
    // A regular file opens but answers no KVM ioctl.
    let file = dir.path("not-kvm");
    std::fs::write(&file, b"").unwrap();
    let run = run_pvstack(&["run", "--kvm-device", file.to_str().unwrap()]);
    assert_one_line_error(&run, RUNTIME, "is not a KVM device");
}
