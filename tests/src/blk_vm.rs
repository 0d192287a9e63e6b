//! Running the guest with `--blk` disks and checking what it left behind:
//! image files made from the guest's data pattern, assertions on the bytes
//! of an image (also against `blk-swap-verify`'s report), and a check that
//! no backend process outlived its VM.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use pvstack_guest::pattern;
use pvstack_guest::seqblock::{self, BLOCK_SIZE};

use crate::api_vm::ApiVm;
use crate::{parse_result, run_pvstack, Finished, HANG_TIMEOUT};

/// The disk sector size every image is a multiple of.
pub const SECTOR: usize = 512;

/// `pvstack run --blk SPEC... --guest-args GUEST_ARGS`, run to completion.
pub fn run_with_disks(specs: &[String], guest_args: &str) -> Finished {
    let mut args = vec!["run"];
    for spec in specs {
        args.extend(["--blk", spec.as_str()]);
    }
    args.extend(["--guest-args", guest_args]);
    run_pvstack(&args)
}

/// `image=PATH` plus `,OPTION` for each option: a disk served by a
/// pvstack-blk that pvstack starts itself.
pub fn image_spec(image: &Path, options: &[&str]) -> String {
    spec("image", image, options)
}

/// `socket=PATH` plus `,OPTION` for each option: a disk served by a
/// backend that is already running.
pub fn socket_spec(socket: &Path, options: &[&str]) -> String {
    spec("socket", socket, options)
}

fn spec(key: &str, path: &Path, options: &[&str]) -> String {
    let mut spec = format!("{key}={}", utf8(path));
    for option in options {
        spec.push(',');
        spec.push_str(option);
    }
    spec
}

/// The path as `&str`; test paths are always UTF-8.
pub fn utf8(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// Writes an image of `len` zero bytes.
pub fn zeroed_image(path: &Path, len: usize) {
    std::fs::write(path, vec![0u8; len])
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Writes an image of `len` bytes holding the pattern of `seed` from disk
/// offset 0, and returns its contents.
pub fn pattern_image(path: &Path, seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    pattern::fill(seed, 0, &mut bytes);
    std::fs::write(path, &bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    bytes
}

/// The whole image file.
pub fn read_image(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Asserts that `image[range]` holds exactly the pattern of `seed` for
/// those disk offsets.
pub fn assert_pattern(image: &[u8], seed: u64, range: Range<usize>) {
    let bytes = &image[range.clone()];
    let wrong = pattern::mismatches(seed, range.start as u64, bytes);
    if wrong == 0 {
        return;
    }
    let first = bytes
        .iter()
        .enumerate()
        .position(|(i, &b)| b != pattern::byte_at(seed, (range.start + i) as u64))
        .map(|i| range.start + i);
    panic!("{wrong} bytes of {range:?} differ from the pattern of seed {seed}; the first at offset {first:?}");
}

/// The newest write (highest sequence number) among the intact blocks of
/// a `blk-swap-verify` image; a block being rewritten may read torn and is
/// skipped.
pub fn newest_write(image: &Path, blocks: usize) -> u64 {
    read_image(image)
        .chunks_exact(BLOCK_SIZE)
        .take(blocks)
        .enumerate()
        .filter_map(|(block, data)| seqblock::check(block as u64, data))
        .max()
        .unwrap_or(0)
}

/// Waits until the guest's writes to `image` have gone past sequence
/// number `seq`: whatever serves the disk is still serving it.
pub fn wait_for_write_after(image: &Path, blocks: usize, seq: u64) {
    let started = Instant::now();
    while newest_write(image, blocks) <= seq {
        assert!(
            started.elapsed() < HANG_TIMEOUT,
            "no write after sequence number {seq} reached {} in {HANG_TIMEOUT:?}",
            image.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops the guest's `blk-swap-verify blocks=BLOCKS stop=1` on `image`
/// and waits for pvstack (`vm`) to end; returns the RESULT values.
pub fn finish_swap_verify(mut vm: ApiVm, image: &Path, blocks: usize) -> BTreeMap<String, String> {
    stop_swap_verify(image, blocks);
    let status = vm.wait();
    let console = vm.console();
    assert!(
        status.success(),
        "pvstack: {status}\nconsole:\n{console}\nlog:\n{}",
        vm.log()
    );
    parse_result(&console, "blk-swap-verify")
        .unwrap_or_else(|| panic!("no RESULT line:\n{console}"))
}

/// Ends a `blk-swap-verify stop=1` run over `blocks` blocks of `image`
/// once the guest has rewritten at least one of them (so the run did more
/// than fill the disk once): writes the stop marker into the block after
/// them, which the guest polls (through whatever backend serves the disk).
pub fn stop_swap_verify(image: &Path, blocks: usize) {
    wait_for_write_after(image, blocks, blocks as u64);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", image.display()));
    std::os::unix::fs::FileExt::write_all_at(
        &file,
        seqblock::STOP_MARKER,
        (blocks * BLOCK_SIZE) as u64,
    )
    .unwrap_or_else(|e| panic!("cannot write the stop marker into {}: {e}", image.display()));
}

/// Asserts that `blk-swap-verify` over `blocks` blocks passed (`result`
/// is its RESULT line) and that `image` holds exactly the writes the guest
/// saw complete: every block intact (`seqblock::check`) and the table of
/// their sequence numbers equal to the guest's `table_fnv`.
pub fn assert_swap_verify_image(image: &[u8], blocks: usize, result: &BTreeMap<String, String>) {
    assert_eq!(result["mismatches"], "0", "{result:?}");
    assert_eq!(result["errors"], "0", "{result:?}");
    let writes: u64 = result["writes"].parse().expect("writes");
    assert!(
        writes > blocks as u64,
        "the workload barely ran: {result:?}"
    );
    assert!(
        image.len() >= blocks * BLOCK_SIZE,
        "the image has {} bytes, fewer than {blocks} blocks",
        image.len()
    );
    let seqs: Vec<u64> = image
        .chunks_exact(BLOCK_SIZE)
        .take(blocks)
        .enumerate()
        .map(|(block, data)| {
            seqblock::check(block as u64, data)
                .unwrap_or_else(|| panic!("block {block} of the image is torn or foreign"))
        })
        .collect();
    let fnv = format!("{:#018x}", seqblock::table_fnv(seqs));
    assert_eq!(
        fnv, result["table_fnv"],
        "the image's last writes differ from the guest's completed writes"
    );
}

/// Asserts that every byte of `image[range]` is zero.
pub fn assert_zeros(image: &[u8], range: Range<usize>) {
    if let Some(i) = image[range.clone()].iter().position(|&b| b != 0) {
        let nonzero = image[range.clone()].iter().filter(|&&b| b != 0).count();
        panic!(
            "{nonzero} bytes of {range:?} are not zero; the first at offset {}",
            range.start + i
        );
    }
}

/// Pids of the processes (other than this one) whose command line
/// contains `needle`, e.g. a test's scratch directory: a backend that
/// still runs after its VM ended shows up here.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let entries = std::fs::read_dir("/proc").expect("/proc is readable");
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            // A process may end between read_dir and this read.
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Asserts that no process mentions `needle` in its command line.
pub fn assert_no_process_mentions(needle: &str) {
    let pids = processes_mentioning(needle);
    assert!(
        pids.is_empty(),
        "processes left behind mentioning {needle}: {pids:?}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_join_options_with_commas() {
        let path = Path::new("/tmp/d.img");
        assert_eq!(image_spec(path, &[]), "image=/tmp/d.img");
        assert_eq!(
            socket_spec(path, &["num-queues=2", "readonly"]),
            "socket=/tmp/d.img,num-queues=2,readonly"
        );
    }

    #[test]
    fn pattern_and_zero_checks_catch_one_wrong_byte() {
        let mut image = vec![0u8; 4096];
        pattern::fill(5, 1024, &mut image[1024..2048]);
        assert_pattern(&image, 5, 1024..2048);
        assert_zeros(&image, 0..1024);
        assert_zeros(&image, 2048..4096);
        image[1500] ^= 1;
        image[3000] = 1;
        let bad_pattern = std::panic::catch_unwind(|| assert_pattern(&image, 5, 1024..2048));
        assert!(bad_pattern.is_err());
        let bad_zeros = std::panic::catch_unwind(|| assert_zeros(&image, 2048..4096));
        assert!(bad_zeros.is_err());
    }

    #[test]
    fn this_process_is_never_reported() {
        let me = std::fs::read(format!("/proc/{}/cmdline", std::process::id())).unwrap();
        let my_name = String::from_utf8_lossy(&me)
            .split('\0')
            .next()
            .unwrap()
            .to_string();
        assert!(!processes_mentioning(&my_name).contains(&std::process::id()));
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30.123456")
            .spawn()
            .unwrap();
        // Until the child has exec'd, its command line is still this test's.
        let cmdline = format!("/proc/{}/cmdline", sleeper.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read(&cmdline).is_ok_and(|c| c.starts_with(b"sleep\0")) {
            assert!(std::time::Instant::now() < deadline, "sleep never started");
            std::thread::yield_now();
        }
        assert_eq!(processes_mentioning("30.123456"), vec![sleeper.id()]);
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        assert!(processes_mentioning("30.123456").is_empty());
    }
}
