//! A stock Linux L2 guest's I/O through pvstack under nested SVM (see
//! nested_linux.rs for the set-up): its NIC on a TAP in the L1, pinged
//! and carrying 8 MiB each way over TCP; its console over `--console
//! unix=`, where a typed command is answered; and its disk, written and
//! read back without a pause while the backend is swapped (pvstack-blk
//! to another pvstack-blk, to qemu-storage-daemon and back) and
//! SIGKILLed; and that disk loop, with pings, going on across a
//! snapshot, a restore and a live replacement of pvstack. Each test is
//! one L1 boot; the assertions are on checksums taken on both sides,
//! what the L2 printed (its kernel log included) and the control API's
//! counters.

use std::time::Duration;

use pvstack_tests::nested::{guest_script, line_after, Nested, NestedRun, L2_INITRAMFS, L2_KERNEL};
use pvstack_tests::qemu::GuestRun;

/// MiB sent each way over TCP, checked by md5 at both ends. Not more:
/// the emulated platform's failures (see `L2_CPUS`) struck this test
/// mostly during the L2-to-L1 transfer, and ended 5 of 8 of its boots in
/// clean-clone runs with 64 MiB, against 6 of 19 on one machine with
/// 8 MiB.
const TCP_MIB: u32 = 8;
/// When an L1 of these tests counts as hung: their I/O goes through an
/// L2 and an L1 both emulated (QEMU's TCG under KVM under TCG); the TAP
/// test's 128 MiB had not finished after 20 minutes on a loaded 2-core
/// host, nor had the disk test's swaps, SIGKILLs and write loop.
const HANG_TIMEOUT: Duration = Duration::from_secs(3600);
/// vCPUs of these tests' L2. One: with two, the L2 died of a triple fault
/// at random moments in 4 of 10 runs of the disk test on a loaded L1
/// (twice during boot, before any disk request; twice after a reconnect),
/// and in none of 8 runs with one; 80 boots of an L2 with two vCPUs on an
/// otherwise idle L1 all passed. Such triple faults also come with no
/// device at all and with one vCPU, only rarer, and are taken for the
/// emulated platform's (see `platform_failure` in pvstack_tests::nested,
/// which boots the L1 again after one, up to ten boots). What these
/// tests check, I/O through the backends, does not need a second vCPU;
/// nested_linux.rs boots L2s with two and three.
const L2_CPUS: u32 = 1;

/// The L2's side of the network test: eth0 at 10.0.2.2, a shell on hvc0,
/// receives the L1's bytes on port 5001 (0x1389), then sends its own to
/// the L1's port 5002 (busybox nc listens on IPv6's any address, which
/// takes IPv4 too: /proc/net/tcp6 shows it), and waits for the shell on hvc0 to leave
/// /tmp/hvc-done. A busybox nc that reads EOF on its stdin shuts the
/// connection's sending half, and the other nc then stops reading: the
/// receivers read from a FIFO that no one writes (opened read-write, so
/// it never ends).
fn l2_network_script() -> String {
    format!(
        r#"ip addr add 10.0.2.2/24 dev eth0 && ip link set eth0 up || exit 1
sh </dev/hvc0 >/dev/hvc0 2>&1 &
dd if=/dev/urandom of=/tmp/to-l1 bs=1M count={TCP_MIB} 2>/dev/null
echo "L2-SENT-MD5 $(md5sum </tmp/to-l1)"
mkfifo /tmp/hold
nc -l -p 5001 <>/tmp/hold | md5sum >/tmp/from-l1.md5 &
receiver=$!
until grep -qs ':1389 [0-9A-F]*:0000 0A' /proc/net/tcp /proc/net/tcp6; do sleep 0.1; done
echo L2-LISTENING
wait $receiver
echo "L2-RECEIVED-MD5 $(cat /tmp/from-l1.md5)"
nc 10.0.2.1 5002 </tmp/to-l1 >/dev/null
echo "L2-SEND-STATUS $?"
until [ -e /tmp/hvc-done ]; do sleep 0.1; done
echo BEGIN dmesg; dmesg; echo END dmesg"#
    )
}

/// The shell function `start_l2 MEMORY DEVICE-ARGS...`: pvstack runs the
/// L2 in the background (its pid in `$vm`) with `MEMORY` of RAM, its
/// console on `--serial` appended to /tmp/linux.out (made empty first, so
/// it is counted from the start), its log in /tmp/linux.err and its
/// control API on /tmp/vm.sock. Appending lets a restored pvstack write
/// to the same files.
fn start_l2_function() -> String {
    format!(
        r#"
start_l2() {{
    memory=$1
    shift
    : >/tmp/linux.out
    RUST_LOG=info pvstack run --kernel {L2_KERNEL} --initrd {L2_INITRAMFS} --cpus {L2_CPUS} \
        --memory $memory --serial --api-socket /tmp/vm.sock "$@" \
        --cmdline "console=ttyS0 quiet panic=-1 pvtest=$(cat /tmp/guest.b64)" \
        </dev/null >>/tmp/linux.out 2>>/tmp/linux.err &
    vm=$!
}}"#
    )
}

/// The L1's side: pvstack runs the L2 with `--net tap=tap0` and
/// `--console unix=`; the L1 gives tap0 10.0.2.1, pings the L2, sends its
/// bytes, receives the L2's, then types a command on the L2's hvc0
/// through the console socket (socat) and reads the answer.
fn l1_network_script() -> String {
    format!(
        r#"
dd if=/dev/urandom of=/tmp/to-l2 bs=1M count={TCP_MIB} 2>/dev/null
echo "L1-SENT-MD5 $(md5sum </tmp/to-l2)"
mkfifo /tmp/hold
nc -l -p 5002 <>/tmp/hold | md5sum >/tmp/from-l2.md5 &
receiver=$!
wait_until "the L1's listener" grep -qs ':138A [0-9A-F]*:0000 0A' /proc/net/tcp /proc/net/tcp6 || exit 1
{start_l2}
start_l2 1G --net tap=tap0 --console unix=/tmp/hvc.sock
# Ends the step after a failure (at once when pvstack has ended), with
# what the L2 and pvstack printed and both ends' view of the link: tap0's
# counters here, and, asked on its hvc0 shell, the L2's interrupts, eth0's
# counters and TCP sockets.
give_up() {{
    echo "GAVE-UP $* at $(date -u +%T)"
    ip -s link show tap0
    if running $vm; then
        echo "pvstack still runs; the L2's view:"
        echo 'cat /proc/interrupts /proc/net/dev /proc/net/tcp /proc/net/tcp6' |
            socat -t 30 - UNIX-CONNECT:/tmp/hvc.sock
    else
        echo "pvstack had ended"
    fi
    kill $vm
    wait $vm
    cat /tmp/linux.out /tmp/linux.err
    exit 1
}}
wait_until "pvstack-net's tap0" ended_or $vm sh -c 'ip link show tap0 >/dev/null 2>&1' &&
    running $vm || give_up tap0
ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up || give_up "configuring tap0"
wait_until "the L2's listener" ended_or $vm grep -q L2-LISTENING /tmp/linux.out && running $vm ||
    give_up "the L2's listener"
ping -c 5 10.0.2.2 >/tmp/ping.out 2>&1
echo "PING-STATUS $?"
cat /tmp/ping.out
nc 10.0.2.2 5001 </tmp/to-l2 >/dev/null &
sender=$!
wait_until "the L1's bytes to go" ended_or $vm ended_or $sender false && running $vm ||
    give_up "sending to the L2"
wait $sender
echo "L1-SEND-STATUS $?"
wait_until "the L2's bytes" ended_or $vm test -s /tmp/from-l2.md5 && running $vm ||
    give_up "receiving from the L2"
wait $receiver
echo "L1-RECEIVED-MD5 $(cat /tmp/from-l2.md5)"
mkfifo /tmp/typed
socat -t 600 - UNIX-CONNECT:/tmp/hvc.sock </tmp/typed >/tmp/seen &
exec 3>/tmp/typed
echo 'echo HVC-ANSWER-$((6 * 7)); touch /tmp/hvc-done' >&3
wait_until "the answer on hvc0" ended_or $vm grep -q HVC-ANSWER-42 /tmp/seen || give_up "hvc0"
wait $vm
status=$?
exec 3>&-
wait
cat /tmp/linux.out
echo "HVC-SEEN $(tr -d '\r\n' </tmp/seen)"
grep pvstack /tmp/linux.err
exit $status
"#,
        start_l2 = start_l2_function(),
    )
}

#[test]
fn linux_nic_over_a_tap_and_console_over_a_unix_socket() {
    let run = Nested::new("linux-tap-console")
        .timeout(HANG_TIMEOUT)
        .with_linux_guest()
        .program("socat")
        .step("script", &guest_script(&l2_network_script()))
        .step("network", &l1_network_script())
        .run();
    run.assert_status("script", 0);
    run.assert_status("network", 0);
    let out = run.output("network");
    assert_eq!(line_after(&out, "PVTEST-EXIT "), "0", "{out}");

    // Every ping answered through the TAP.
    assert_eq!(line_after(&out, "PING-STATUS "), "0", "{out}");
    assert!(
        out.contains("5 packets transmitted, 5 packets received"),
        "{out}"
    );

    // TCP_MIB each way, the same bytes at both ends.
    let digest = |prefix| first_word(line_after(&out, prefix));
    assert_eq!(line_after(&out, "L1-SEND-STATUS "), "0", "{out}");
    assert_eq!(line_after(&out, "L2-SEND-STATUS "), "0", "{out}");
    assert_eq!(
        digest("L1-SENT-MD5 "),
        digest("L2-RECEIVED-MD5 "),
        "L1 to L2: {out}"
    );
    assert_eq!(
        digest("L2-SENT-MD5 "),
        digest("L1-RECEIVED-MD5 "),
        "L2 to L1: {out}"
    );
    assert_ne!(digest("L1-SENT-MD5 "), digest("L2-SENT-MD5 "), "{out}");

    // The command typed on hvc0 ran in the L2 and its answer came back
    // (the echo of the typed line holds `$((6 * 7))`, not 42).
    assert!(
        line_after(&out, "HVC-SEEN ").contains("HVC-ANSWER-42"),
        "{out}"
    );

    kernel_log(&run, "network").assert_clean_kernel_log("Run /init as init process");
}

/// First 4 KiB block after the disk's 1 MiB slots (at 32 MiB): the L1
/// writes the stop marker there when it is done, and the L2 looks for it
/// before each round.
const STOP_BLOCK: u32 = 8192;
const STOP_MARKER: &str = "STOP-THE-LOOP";
/// 1 MiB slots (MiB 1 to 8) the L2 writes directly (O_DIRECT), and as many
/// after them (MiB 9 to 16) it writes through its page cache.
const SLOTS: u32 = 8;

/// The L2's disk loop: each round writes fresh random bytes to one slot
/// with O_DIRECT and to another through the page cache (fsync), reads
/// both back with O_DIRECT and compares; prints `ROUND n ok` or what
/// failed. After the stop marker, it prints each slot's md5, its kernel
/// log and the tally.
fn l2_disk_script() -> String {
    format!(
        r#"round=0
bad=0
while :; do
    marker=$(dd if=/dev/vda bs=4096 skip={STOP_BLOCK} count=1 iflag=direct 2>/dev/null | head -c {marker_len})
    [ "$marker" = {STOP_MARKER} ] && break
    direct=$((round % {SLOTS} + 1))
    cached=$((direct + {SLOTS}))
    dd if=/dev/urandom of=/tmp/w bs=1M count=2 2>/dev/null
    ok=1
    dd if=/tmp/w of=/dev/vda bs=1M count=1 seek=$direct oflag=direct 2>/tmp/err || {{ ok=0; cat /tmp/err; }}
    dd if=/tmp/w of=/dev/vda bs=1M skip=1 count=1 seek=$cached conv=fsync 2>/tmp/err || {{ ok=0; cat /tmp/err; }}
    dd if=/dev/vda of=/tmp/r bs=1M skip=$direct count=1 iflag=direct 2>/tmp/err || {{ ok=0; cat /tmp/err; }}
    dd if=/dev/vda bs=1M skip=$cached count=1 iflag=direct 2>>/tmp/err >>/tmp/r || {{ ok=0; cat /tmp/err; }}
    cmp -s /tmp/w /tmp/r || ok=0
    if [ $ok = 1 ]; then echo "ROUND $round ok"; else echo "ROUND $round FAILED"; bad=$((bad + 1)); fi
    round=$((round + 1))
done
slot=1
while [ $slot -le $((2 * {SLOTS})) ]; do
    echo "L2-SLOT $slot $(dd if=/dev/vda bs=1M skip=$slot count=1 iflag=direct 2>/dev/null | md5sum)"
    slot=$((slot + 1))
done
echo "L2-ROUNDS $round"
echo "L2-BAD-ROUNDS $bad"
echo BEGIN dmesg; dmesg; echo END dmesg"#,
        marker_len = STOP_MARKER.len()
    )
}

/// The L1's side: the disk image served by two pvstack-blk and a
/// qemu-storage-daemon on three sockets; pvstack starts on the first and
/// is swapped to each in turn, then the serving pvstack-blk is SIGKILLed
/// twice and started again on its socket. Between any two of these the
/// L2 completes at least two more rounds. Then the stop marker, and each
/// slot's md5 as the image holds it.
fn l1_disk_script() -> String {
    format!(
        r#"
img=/tmp/vda.img
truncate -s 64M $img
pvstack-blk --socket /tmp/a.sock --image $img 2>/tmp/a.log &
a=$!
pvstack-blk --socket /tmp/b.sock --image $img 2>/tmp/b.log &
b=$!
qemu-storage-daemon --blockdev driver=file,node-name=f,filename=$img \
    --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/tmp/q.sock,writable=on \
    >/tmp/q.log 2>&1 &
q=$!
wait_until "the three backends" test -S /tmp/a.sock -a -S /tmp/b.sock -a -S /tmp/q.sock || exit 1
{start_l2}
start_l2 512M --blk socket=/tmp/a.sock,id=blk0
{helpers}
two_more_rounds "the start"
for target in b q a; do
    pvstack ctl --api-socket /tmp/vm.sock device swap blk0 --socket /tmp/$target.sock >/tmp/swap.json
    echo "SWAP $target $? $(cat /tmp/swap.json)"
    two_more_rounds "the swap to $target"
done
for crash in 1 2; do
    kill -KILL $a
    wait $a
    rm -f /tmp/a.sock
    pvstack-blk --socket /tmp/a.sock --image $img 2>>/tmp/a.log &
    a=$!
    wait_until "reconnect $crash" ended_or $vm sh -c \
        "pvstack ctl --api-socket /tmp/vm.sock info | grep -q '\"reconnects\":{{\"count\":$crash,'" &&
        running $vm || give_up "reconnect $crash"
    echo "RECONNECTED $crash"
    two_more_rounds "crash $crash"
done
echo "INFO $(pvstack ctl --api-socket /tmp/vm.sock info)"
printf {STOP_MARKER} | dd of=$img bs=4096 seek={STOP_BLOCK} conv=notrunc 2>/dev/null
wait $vm
status=$?
cat /tmp/linux.out
grep pvstack /tmp/linux.err
kill $a $b $q
wait
{image_slots}
exit $status
"#,
        start_l2 = start_l2_function(),
        helpers = l1_disk_loop_helpers("/tmp/a.log /tmp/b.log /tmp/q.log"),
        image_slots = image_slots_script(),
    )
}

/// Shell functions of an L1 script whose L2 runs [`l2_disk_script`] with
/// its console in /tmp/linux.out, pvstack's log in /tmp/linux.err and
/// pvstack's pid in `$vm`: `give_up WHY` ends the step after a failure
/// (at once when pvstack has ended) with what the L2, pvstack and the
/// backends (their logs: `backend_logs`) printed; `two_more_rounds
/// AFTER` waits until the L2 has finished two more rounds than it had.
fn l1_disk_loop_helpers(backend_logs: &str) -> String {
    format!(
        r#"
give_up() {{
    echo "GAVE-UP $* at $(date -u +%T)"
    running $vm && echo "pvstack still runs" || echo "pvstack had ended"
    kill $vm
    wait $vm
    cat /tmp/linux.out /tmp/linux.err
    for log in {backend_logs}; do echo "== $log"; cat $log; done
    exit 1
}}
rounds_at_least() {{
    [ $(grep -c '^ROUND ' /tmp/linux.out) -ge $1 ]
}}
two_more_rounds() {{
    done_before=$(grep -c '^ROUND ' /tmp/linux.out)
    wait_until "two more rounds after $1" ended_or $vm rounds_at_least $((done_before + 2)) &&
        running $vm || give_up "$1"
}}"#
    )
}

/// Prints `IMAGE-SLOT n md5` for each slot of the image at `$img`.
fn image_slots_script() -> String {
    format!(
        r#"slot=1
while [ $slot -le $((2 * {SLOTS})) ]; do
    echo "IMAGE-SLOT $slot $(dd if=$img bs=1M skip=$slot count=1 2>/dev/null | md5sum)"
    slot=$((slot + 1))
done"#
    )
}

#[test]
fn linux_disk_survives_backend_swaps_and_sigkills_under_a_write_loop() {
    let run = Nested::new("linux-blk-swap")
        .timeout(HANG_TIMEOUT)
        .with_linux_guest()
        .program("qemu-storage-daemon")
        .step("script", &guest_script(&l2_disk_script()))
        .step("disk", &l1_disk_script())
        .run();
    run.assert_status("script", 0);
    run.assert_status("disk", 0);
    let out = run.output("disk");
    assert_eq!(line_after(&out, "PVTEST-EXIT "), "0", "{out}");

    // Each swap accepted, each crash followed by a reconnect.
    for target in ["b", "q", "a"] {
        let swap = line_after(&out, &format!("SWAP {target} "));
        assert!(swap.starts_with("0 "), "swap to {target}: {out}");
    }
    let info: serde_json::Value = serde_json::from_str(line_after(&out, "INFO "))
        .unwrap_or_else(|e| panic!("info is not JSON ({e}):\n{out}"));
    let disk = &info["result"]["devices"][0];
    assert_eq!(disk["swaps"]["count"], 3, "{disk}");
    assert_eq!(disk["reconnects"]["count"], 2, "{disk}");
    assert_eq!(disk["socket"], "/tmp/a.sock", "{disk}");

    // Two rounds after the start and after each of five events.
    assert_disk_loop_checks_out(&run, "disk", 12);
}

/// Asserts that step `step`'s L2 ran [`l2_disk_script`] for at least
/// `min_rounds` rounds, each of which read back what it wrote, that the
/// image holds what the L2 last wrote in every slot, and that its kernel
/// log shows no I/O error and no warning.
fn assert_disk_loop_checks_out(run: &NestedRun, step: &str, min_rounds: u32) {
    let out = run.output(step);
    let rounds: u32 = line_after(&out, "L2-ROUNDS ").parse().expect("a count");
    assert!(rounds >= min_rounds, "{rounds} rounds: {out}");
    assert_eq!(line_after(&out, "L2-BAD-ROUNDS "), "0", "{out}");
    for slot in 1..=2 * SLOTS {
        let l2 = first_word(line_after(&out, &format!("L2-SLOT {slot} ")));
        let image = first_word(line_after(&out, &format!("IMAGE-SLOT {slot} ")));
        assert_eq!(l2, image, "slot {slot}: {out}");
    }
    kernel_log(run, step).assert_clean_kernel_log("virtio_blk virtio0");
}

/// The L2's side of the snapshot test: eth0 at 10.0.2.2 for the L1's
/// pings, then the disk loop of [`l2_disk_script`].
fn l2_snapshot_script() -> String {
    format!(
        r#"ip addr add 10.0.2.2/24 dev eth0 && ip link set eth0 up || exit 1
echo L2-NET-UP
{disk_loop}"#,
        disk_loop = l2_disk_script()
    )
}

/// The L1's side of the snapshot test: pvstack-blk and pvstack-net (on
/// tap0) run on their own, outliving every pvstack process; pvstack runs
/// the L2 with its console on --serial. After two rounds of the L2's
/// disk loop and answered pings: a snapshot (the VM stays paused), the
/// original pvstack shut down, a restore from the snapshot (both
/// backends see their frontend reconnect), then a live replacement by
/// the same binary. After each step the L2 completes two more rounds,
/// printed on its console, and answers pings. Then the stop marker and
/// each slot's md5 as the image holds it.
fn l1_snapshot_script() -> String {
    format!(
        r#"
img=/tmp/vda.img
truncate -s 64M $img
pvstack-blk --socket /tmp/a.sock --image $img 2>/tmp/a.log &
a=$!
pvstack-net --socket /tmp/n.sock --tap tap0 2>/tmp/n.log &
n=$!
wait_until "the backends" test -S /tmp/a.sock -a -S /tmp/n.sock || exit 1
ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up || exit 1
{start_l2}
start_l2 {L2_MEMORY} --blk socket=/tmp/a.sock,id=blk0 --net socket=/tmp/n.sock,id=net0
{helpers}
# ping_l2 STEP: three pings to the L2, answered or not.
ping_l2() {{
    ping -c 3 -W 5 10.0.2.2 >/tmp/ping.out 2>&1
    echo "PING $1 $? $(grep 'packets transmitted' /tmp/ping.out)"
}}
wait_until "the L2's eth0" ended_or $vm grep -q L2-NET-UP /tmp/linux.out && running $vm ||
    give_up "the L2's eth0"
two_more_rounds "the start"
ping_l2 start

pvstack ctl --api-socket /tmp/vm.sock snapshot --to /tmp/snap >/tmp/ctl.json
echo "SNAPSHOT $? $(cat /tmp/ctl.json)"
echo "ROUNDS-AT-SNAPSHOT $(grep -c '^ROUND ' /tmp/linux.out)"
pvstack ctl --api-socket /tmp/vm.sock shutdown >/dev/null
wait $vm
echo "ORIGINAL-EXIT $?"
RUST_LOG=info pvstack restore --from /tmp/snap </dev/null >>/tmp/linux.out 2>>/tmp/linux.err &
vm=$!
two_more_rounds "the restore"
ping_l2 restore

pvstack ctl --api-socket /tmp/vm.sock upgrade --binary "$(command -v pvstack)" >/tmp/ctl.json
echo "UPGRADE $? $(cat /tmp/ctl.json)"
wait $vm
echo "REPLACED-EXIT $?"
# The new process is not this shell's child: it ends when the L2 does.
vm=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' /tmp/ctl.json)
[ -n "$vm" ] || give_up "the upgrade's answer has no pid"
two_more_rounds "the upgrade"
ping_l2 upgrade

echo "INFO $(pvstack ctl --api-socket /tmp/vm.sock info)"
printf {STOP_MARKER} | dd of=$img bs=4096 seek={STOP_BLOCK} conv=notrunc 2>/dev/null
wait_until "the L2's end" ended_or $vm false
cat /tmp/linux.out
grep -E 'restore|take-over|rings' /tmp/linux.err
kill $a $n
wait
{image_slots}
"#,
        start_l2 = start_l2_function(),
        helpers = l1_disk_loop_helpers("/tmp/a.log /tmp/n.log"),
        image_slots = image_slots_script(),
    )
}

/// RAM of the snapshot test's L2: what the snapshot writes and the
/// restore copies, through two emulated levels, grows with what the L2
/// touched, not with this.
const L2_MEMORY: &str = "256M";

#[test]
fn linux_guest_io_survives_a_snapshot_restore_and_a_live_replacement() {
    let run = Nested::new("linux-snapshot")
        .timeout(HANG_TIMEOUT)
        .with_linux_guest()
        .step("script", &guest_script(&l2_snapshot_script()))
        .step("snapshot", &l1_snapshot_script())
        .run();
    run.assert_status("script", 0);
    run.assert_status("snapshot", 0);
    let out = run.output("snapshot");
    assert_eq!(line_after(&out, "PVTEST-EXIT "), "0", "{out}");

    // The snapshot was written and left the VM paused; the original then
    // ended cleanly, and the restored one handed over to a new process.
    let snapshot = line_after(&out, "SNAPSHOT ");
    assert!(
        snapshot.starts_with("0 ") && snapshot.contains(r#""state":"paused""#),
        "{out}"
    );
    assert_eq!(line_after(&out, "ORIGINAL-EXIT "), "0", "{out}");
    let upgrade = line_after(&out, "UPGRADE ");
    assert!(
        upgrade.starts_with("0 ") && upgrade.contains(r#""pid":"#),
        "{out}"
    );
    assert_eq!(line_after(&out, "REPLACED-EXIT "), "0", "{out}");
    // The restore started the rings of the disk and the NIC where the
    // snapshot stopped them, on the backends that kept running; the new
    // process ran the VM.
    assert_eq!(out.matches("rings restored on").count(), 2, "{out}");
    assert!(out.contains("take-over: running the VM"), "{out}");

    // Pings answered before and after each step.
    for step in ["start", "restore", "upgrade"] {
        let ping = line_after(&out, &format!("PING {step} "));
        assert!(
            ping.starts_with("0 ") && ping.contains("3 packets transmitted, 3 packets received"),
            "pings after the {step}: {out}"
        );
    }

    // The console went on after the restore: the rounds the L1 waited
    // for after it came through the restored UART, and so did the rest.
    let at_snapshot: u32 = line_after(&out, "ROUNDS-AT-SNAPSHOT ")
        .parse()
        .expect("a count");
    let info: serde_json::Value = serde_json::from_str(line_after(&out, "INFO "))
        .unwrap_or_else(|e| panic!("info is not JSON ({e}):\n{out}"));
    assert_eq!(
        info["result"]["devices"][0]["socket"], "/tmp/a.sock",
        "{info}"
    );
    // Two rounds before the snapshot and after each of the two steps,
    // every one read back what it wrote; the image holds the L2's last
    // writes; no I/O error in the L2's kernel log.
    assert_disk_loop_checks_out(&run, "snapshot", at_snapshot + 4);
    eprintln!(
        "L2 rounds: {at_snapshot} before the snapshot, {} in all; snapshot: {snapshot}; upgrade: {upgrade}",
        line_after(&out, "L2-ROUNDS ")
    );
}

/// The first word of `text` (an md5 of `md5sum`'s line).
fn first_word(text: &str) -> &str {
    text.split_whitespace().next().unwrap_or_default()
}

/// The L2's kernel log, as the section `dmesg` of step `step`'s output.
fn kernel_log(run: &NestedRun, step: &str) -> GuestRun {
    GuestRun {
        console: run.output(step),
        script_status: None,
    }
}
