//! pvstack's VMX/SVM path, which the host's own KVM (PVM) never takes: the
//! guest at CPL0, under KVM with AMD SVM inside an L1 that QEMU emulates
//! (scripts/nested-run, driven through `pvstack_tests::nested`). Each test
//! is one L1 boot running several steps; the assertions are on what each
//! step reported (exit codes, RESULT lines, the API's counters) and on the
//! bytes it left in its image files, brought back from the L1.

use std::path::Path;
use std::process::Command;

use pvstack_guest::seqblock::STOP_MARKER;
use pvstack_tests::blk_vm::{assert_swap_verify_image, pattern_image};
use pvstack_tests::nested::Nested;
use pvstack_tests::ScratchDir;

/// Blocks `blk-swap-verify` cycles over (256 KiB): the image is brought
/// back over the L1's serial console, so it is kept small.
const SWAP_BLOCKS: usize = 64;
/// Where the stop marker goes in the image: the block after the verified
/// ones (`blk-swap-verify stop=1` runs until it finds the marker there,
/// however long the swaps or crashes take in a slow L1).
const STOP_SEEK: usize = SWAP_BLOCKS;

#[test]
fn guest_runs_at_cpl0_under_svm_and_its_disk_works() {
    let run = Nested::new("cpl0-basics")
        .step("check", "pvstack check")
        .step("hello", "RUST_LOG=warn pvstack run --guest-args hello")
        .step("exit", "RUST_LOG=warn pvstack run --guest-args 'exit 7'")
        .step(
            "selftest",
            "RUST_LOG=warn pvstack run --cpus 2 --guest-args selftest",
        )
        .step(
            "blk-verify",
            "truncate -s 64M /tmp/disk.img && RUST_LOG=warn pvstack run \
             --blk image=/tmp/disk.img,num-queues=2 \
             --guest-args 'blk-verify queues=2 depth=32 seed=7'",
        )
        .step("disk-md5", "md5sum /tmp/disk.img")
        // --hugepages with the L1's own reserved huge pages: a backend maps
        // the hugetlbfs memfd and the guest's disk works; then one page
        // more than are free is refused before the guest runs.
        .step(
            "hugepages",
            "echo 40 >/proc/sys/vm/nr_hugepages && truncate -s 16M /tmp/huge.img && \
             RUST_LOG=info pvstack run --hugepages --memory 64M --blk image=/tmp/huge.img \
             --guest-args 'blk-verify depth=8 seed=3'",
        )
        .step(
            "hugepages-short",
            "RUST_LOG=warn pvstack run --hugepages --memory 82M --guest-args hello",
        )
        .run();

    run.assert_status("check", 0);
    let check = run.output("check");
    let flavour = check
        .lines()
        .find(|line| line.contains("KVM flavour"))
        .unwrap_or_else(|| panic!("no KVM flavour line:\n{check}"));
    assert!(
        flavour.starts_with("ok") && flavour.ends_with("SVM (guest runs at CPL0 by default)"),
        "{check}"
    );

    run.assert_status("hello", 0);
    assert!(
        run.output("hello")
            .contains("Hello from the pvstack guest (vCPU 0 of 1, 256 MiB, SVM, CPL0)"),
        "{}",
        run.output("hello")
    );
    assert_eq!(run.result("hello", "hello")["ok"], "1");

    run.assert_status("exit", 7);

    run.assert_status("selftest", 0);
    let selftest = run.result("selftest", "selftest");
    assert_eq!(selftest["failed"], "0", "{}", run.output("selftest"));
    assert!(selftest["passed"].parse::<u32>().expect("a count") > 0);
    assert!(
        run.output("selftest").contains("check vCPU 1 runs: ok"),
        "{}",
        run.output("selftest")
    );

    run.assert_status("blk-verify", 0);
    let verify = run.result("blk-verify", "blk-verify");
    assert_eq!(verify["bytes"], (64u64 << 20).to_string());
    assert_eq!(verify["mismatches"], "0");
    assert_eq!(verify["errors"], "0");

    run.assert_status("hugepages", 0);
    let huge = run.output("hugepages");
    assert!(
        huge.contains("guest RAM: 32 reserved huge pages of 2 MiB (hugetlbfs), all taken"),
        "{huge}"
    );
    let verify = run.result("hugepages", "blk-verify");
    assert_eq!(verify["bytes"], (16u64 << 20).to_string(), "{huge}");
    assert_eq!(verify["mismatches"], "0", "{huge}");
    assert_eq!(verify["errors"], "0", "{huge}");
    run.assert_status("hugepages-short", 1);
    let short = run.output("hugepages-short");
    assert!(
        short.contains(
            "pvstack: error: --hugepages: cannot take 41 huge pages of 2 MiB for guest RAM"
        ) && short.contains("the host has 40 free"),
        "{short}"
    );
    assert!(!short.contains("Hello"), "{short}");

    // The image in the L1 holds the pattern the guest wrote.
    run.assert_status("disk-md5", 0);
    let scratch = ScratchDir::new("nested-cpl0-pattern");
    let expected = scratch.path("pattern.img");
    pattern_image(&expected, 7, 64 << 20);
    let l1_md5 = run.output("disk-md5");
    assert_eq!(
        l1_md5.split_whitespace().next(),
        Some(host_md5(&expected).as_str()),
        "the L1's image is not the pattern of seed 7"
    );
}

#[test]
fn disk_backend_swapped_and_crashed_under_svm_loses_nothing() {
    let guest_args = format!("blk-swap-verify blocks={SWAP_BLOCKS} stop=1 depth=8");
    // Each step's script names its image $img.
    let marker = std::str::from_utf8(STOP_MARKER).expect("the marker is ASCII");
    let stop_workload =
        format!("printf {marker} | dd of=$img bs=4096 seek={STOP_SEEK} conv=notrunc 2>/dev/null");
    let swaps = format!(
        r#"
img=/tmp/swap.img
truncate -s 4M $img
pvstack-blk --socket /tmp/a.sock --image $img 2>/tmp/a.log &
a=$!
pvstack-blk --socket /tmp/b.sock --image $img 2>/tmp/b.log &
b=$!
wait_until "pvstack-blk on a.sock and b.sock" test -S /tmp/a.sock -a -S /tmp/b.sock || exit 1
RUST_LOG=info pvstack run --api-socket /tmp/vm.sock --blk socket=/tmp/a.sock,id=blk0 \
    --console-log /tmp/swap.out --guest-args "{guest_args}" 2>/tmp/vm.log &
vm=$!
wait_until "the guest's workload" grep -qs "blk-swap-verify: running" /tmp/swap.out || exit 1
for i in 1 2 3 4 5 6 7 8 9 10; do
    if [ $((i % 2)) = 1 ]; then target=b; else target=a; fi
    pvstack ctl --api-socket /tmp/vm.sock device swap blk0 --socket /tmp/$target.sock >/tmp/swap-$i.json
    echo "SWAP $i $?"
    sleep 0.2
done
if kill -0 $vm; then echo "WORKLOAD running after the swaps"; fi
echo "INFO $(pvstack ctl --api-socket /tmp/vm.sock info)"
{stop_workload}
wait $vm
vm_status=$?
cat /tmp/swap.out
kill $a $b
wait
exit $vm_status
"#
    );
    let crashes = format!(
        r#"
img=/tmp/crash.img
truncate -s 4M $img
start_backend() {{
    rm -f /tmp/c.sock
    pvstack-blk --socket /tmp/c.sock --image $img 2>>/tmp/c.log &
    backend=$!
    wait_until "pvstack-blk on c.sock" test -S /tmp/c.sock
}}
start_backend || exit 1
RUST_LOG=info pvstack run --api-socket /tmp/vm2.sock --blk socket=/tmp/c.sock \
    --console-log /tmp/crash.out --guest-args "{guest_args}" 2>/tmp/vm2.log &
vm=$!
wait_until "the guest's workload" grep -qs "blk-swap-verify: running" /tmp/crash.out || exit 1
for i in 1 2 3; do
    sleep 1
    kill -KILL $backend
    wait $backend
    echo "KILLED $i"
    start_backend || exit 1
    wait_until "reconnect $i" sh -c \
        "pvstack ctl --api-socket /tmp/vm2.sock info | grep -q '\"reconnects\":{{\"count\":$i,'" || exit 1
done
if kill -0 $vm; then echo "WORKLOAD running after the crashes"; fi
echo "INFO $(pvstack ctl --api-socket /tmp/vm2.sock info)"
echo "INFLIGHT-LOGS $(grep -c 'inflight region set for 1 queues' /tmp/c.log)"
{stop_workload}
wait $vm
vm_status=$?
cat /tmp/crash.out
kill $backend
wait
exit $vm_status
"#
    );
    let image_bytes = SWAP_BLOCKS * 4096;
    let run = Nested::new("cpl0-blk-swap")
        .step("swaps", &swaps)
        .step(
            "swap-image",
            &format!("head -c {image_bytes} /tmp/swap.img | base64"),
        )
        .step("crashes", &crashes)
        .step(
            "crash-image",
            &format!("head -c {image_bytes} /tmp/crash.img | base64"),
        )
        .run();

    // Ten swaps between two pvstack-blk processes, each accepted, while the
    // guest kept writing and verifying.
    run.assert_status("swaps", 0);
    for i in 1..=10 {
        assert_eq!(run.line_after("swaps", &format!("SWAP {i} ")), "0");
    }
    run.line_after("swaps", "WORKLOAD running after the swaps");
    let disk = first_device(&run.line_after("swaps", "INFO "));
    assert_eq!(disk["swaps"]["count"], 10, "{disk}");
    assert_eq!(disk["socket"], "/tmp/a.sock", "{disk}");
    let result = run.result("swaps", "blk-swap-verify");
    assert_swap_verify_image(&run.bytes("swap-image"), SWAP_BLOCKS, &result);

    // Three SIGKILLed pvstack-blk, each replaced on the same socket; every
    // one of the four got the inflight log.
    run.assert_status("crashes", 0);
    run.line_after("crashes", "WORKLOAD running after the crashes");
    let disk = first_device(&run.line_after("crashes", "INFO "));
    assert_eq!(disk["reconnects"]["count"], 3, "{disk}");
    assert_eq!(disk["inflight_log"], true, "{disk}");
    assert_eq!(run.line_after("crashes", "INFLIGHT-LOGS "), "4");
    let result = run.result("crashes", "blk-swap-verify");
    assert_swap_verify_image(&run.bytes("crash-image"), SWAP_BLOCKS, &result);
}

#[test]
fn two_vms_ping_and_the_shell_answers_under_svm() {
    let ping = r#"
pvstack-net --socket /tmp/n1.sock --peer-bind /tmp/p1 --peer-connect /tmp/p2 2>/tmp/n1.log &
n1=$!
pvstack-net --socket /tmp/n2.sock --peer-bind /tmp/p2 --peer-connect /tmp/p1 2>/tmp/n2.log &
n2=$!
wait_until "pvstack-net on n1.sock" grep -qs "listening for a vhost-user frontend" /tmp/n1.log || exit 1
wait_until "pvstack-net on n2.sock" grep -qs "listening for a vhost-user frontend" /tmp/n2.log || exit 1
RUST_LOG=warn pvstack run --net socket=/tmp/n1.sock,mac=52:54:00:00:01:02 \
    --guest-args "net-serve ip=10.0.1.2/24 secs=600" >/tmp/serve.out 2>&1 &
server=$!
wait_until "net-serve" grep -qs "net-serve:" /tmp/serve.out || exit 1
RUST_LOG=warn pvstack run --net socket=/tmp/n2.sock,mac=52:54:00:00:01:03 \
    --guest-args "net-ping ip=10.0.1.3/24 target=10.0.1.2 count=10"
ping_status=$?
kill $server
wait $server
kill $n1 $n2
wait
exit $ping_status
"#;
    // A person at the console: attaches once the VM runs, waits for the
    // prompt, types a command, reads its answer, types `exit 5`.
    let shell = r#"
RUST_LOG=warn pvstack run --guest-args shell --console unix=/tmp/console.sock >/tmp/vm.out 2>&1 &
vm=$!
wait_until "the console server" test -S /tmp/console.sock || exit 1
mkfifo /tmp/typed
socat -t 600 - UNIX-CONNECT:/tmp/console.sock </tmp/typed >/tmp/seen &
exec 3>/tmp/typed
wait_until "the prompt" grep -qs "pvstack> " /tmp/seen || exit 1
echo "echo typed into the nested guest" >&3
wait_until "the answer" sh -c '[ "$(grep -c "typed into the nested guest" /tmp/seen)" -ge 2 ]' || exit 1
echo "exit 5" >&3
wait $vm
echo "VM-STATUS $?"
exec 3>&-
wait
tr -d '\r' </tmp/seen
echo
cat /tmp/vm.out
"#;
    let run = Nested::new("cpl0-net-console")
        .program("socat")
        .step("ping", ping)
        .step("shell", shell)
        .run();

    run.assert_status("ping", 0);
    let ping = run.result("ping", "net-ping");
    assert_eq!(ping["sent"], "10", "{}", run.output("ping"));
    assert_eq!(ping["received"], "10", "{}", run.output("ping"));

    run.assert_status("shell", 0);
    assert_eq!(run.line_after("shell", "VM-STATUS "), "5");
    let output = run.output("shell");
    assert!(
        output.contains("pvstack> echo typed into the nested guest\ntyped into the nested guest\npvstack> exit 5"),
        "{output}"
    );
    assert_eq!(run.result("shell", "shell")["commands"], "2", "{output}");
}

/// The MD5 of a host file, by md5sum (as busybox's md5sum prints it in the
/// L1).
fn host_md5(path: &Path) -> String {
    let output = Command::new("md5sum")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run md5sum: {e}"));
    assert!(output.status.success(), "md5sum {}", path.display());
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("md5sum prints a digest")
        .to_string()
}

/// The first device of a `pvstack ctl info` response.
fn first_device(info: &str) -> serde_json::Value {
    let response: serde_json::Value =
        serde_json::from_str(info).unwrap_or_else(|e| panic!("info is not JSON ({e}): {info}"));
    assert_eq!(response["ok"], true, "{info}");
    response["result"]["devices"][0].clone()
}
