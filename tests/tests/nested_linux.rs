//! A stock Linux kernel under pvstack, which needs VMX or SVM: the Debian
//! cloud kernel and the busybox initramfs of scripts/fetch-linux-guest
//! (an L2 guest) booted by pvstack inside an L1 with KVM on emulated AMD
//! SVM (scripts/nested-run, driven through `pvstack_tests::nested`). The
//! initramfs runs the script in `pvtest=` (base64) and powers off; each
//! test is one L1 boot, and asserts on what the L2 printed on its serial
//! console, what reached the host side of its consoles, the bytes in its
//! disk image and pvstack's exit status.

use pvstack_tests::nested::{guest_script, line_after, Nested};

/// A 64 MiB image whose first MiB is random; prints its md5.
const MAKE_DISK: &str = "dd if=/dev/urandom of=/tmp/disk.img bs=65536 count=16 2>/dev/null && \
     truncate -s 64M /tmp/disk.img && \
     echo \"HEAD-MD5 $(dd if=/tmp/disk.img bs=65536 count=16 2>/dev/null | md5sum)\"";

/// What the L2 reports: vCPUs online, NICs, virtio devices, the md5 of
/// its disk's first MiB; then it writes a marker at 2 MiB, prints one
/// line to hvc0, and echoes one line read from ttyS0 and one from hvc0.
const L2_DEVICES: &str = r#"echo "L2-CPUS $(cat /sys/devices/system/cpu/online)"
echo "L2-NET $(ls /sys/class/net | tr '\n' ' ')"
echo "L2-VIRTIO $(ls /sys/bus/virtio/devices | tr '\n' ' ')"
echo "L2-MD5 $(dd if=/dev/vda bs=65536 count=16 2>/dev/null | md5sum)"
printf PVSTACK-LINUX-WRITE | dd of=/dev/vda bs=1 seek=2097152 conv=notrunc 2>/dev/null
sync
echo HVC-OUT-FROM-GUEST >/dev/hvc0
echo READY-FOR-INPUT
read -r line
echo "GOT-SERIAL:$line"
read -r hvc </dev/hvc0
echo "GOT-HVC:$hvc""#;

#[test]
fn debian_kernel_uses_the_backends_consoles_and_powers_off() {
    let run = Nested::new("linux-devices")
        .with_linux_guest()
        .step("disk", MAKE_DISK)
        .step("script", &guest_script(L2_DEVICES))
        .step(
            "linux",
            r#"
mkfifo /tmp/serial-in /tmp/hvc-in
pvstack-net --socket /tmp/net.sock --peer-bind /tmp/peer-a --peer-connect /tmp/peer-b 2>/tmp/net.log &
pvstack-console --socket /tmp/con.sock --stdio </tmp/hvc-in >/tmp/hvc.out 2>/tmp/hvc.err &
exec 4>/tmp/hvc-in
wait_until "pvstack-net and pvstack-console" test -S /tmp/net.sock -a -S /tmp/con.sock || exit 1
pvstack run --kernel /l2/vmlinuz --initrd /l2/initramfs.cpio.gz --cpus 2 --memory 512M \
    --serial --blk image=/tmp/disk.img --net socket=/tmp/net.sock --console socket=/tmp/con.sock \
    --cmdline "console=ttyS0 quiet panic=-1 pvtest=$(cat /tmp/guest.b64)" \
    </tmp/serial-in >/tmp/linux.out 2>/tmp/linux.err &
vm=$!
exec 3>/tmp/serial-in
wait_until "the L2 to read ttyS0" grep -q READY-FOR-INPUT /tmp/linux.out || exit 1
echo ping-from-host >&3
wait_until "the L2's line on hvc0" grep -q HVC-OUT-FROM-GUEST /tmp/hvc.out || exit 1
echo ping-hvc >&4
wait $vm
status=$?
cat /tmp/linux.out
echo "HVC-HOST-SAW $(head -n1 /tmp/hvc.out)"
grep "pvstack" /tmp/linux.err
exit $status
"#,
        )
        .step(
            "written",
            "dd if=/tmp/disk.img bs=1 skip=2097152 count=19 2>/dev/null; echo",
        )
        .run();

    run.assert_status("disk", 0);
    run.assert_status("script", 0);
    // `poweroff -f` at the end of the initramfs ends pvstack with 0.
    run.assert_status("linux", 0);
    let linux = run.output("linux");
    assert!(
        linux.contains("acpi: the guest entered S5 (power off)"),
        "{linux}"
    );
    assert_eq!(line_after(&linux, "PVTEST-EXIT "), "0", "{linux}");
    assert_eq!(line_after(&linux, "L2-CPUS "), "0-1", "--cpus 2: {linux}");
    assert!(
        line_after(&linux, "L2-NET ")
            .split_whitespace()
            .any(|n| n == "eth0"),
        "{linux}"
    );
    assert_eq!(
        line_after(&linux, "L2-VIRTIO ").split_whitespace().count(),
        3,
        "disk, NIC and console: {linux}"
    );
    let host_md5 = line_after(&run.output("disk"), "HEAD-MD5 ").to_string();
    assert_eq!(line_after(&linux, "L2-MD5 "), host_md5, "{linux}");
    assert_eq!(
        line_after(&linux, "GOT-SERIAL:"),
        "ping-from-host",
        "{linux}"
    );
    assert_eq!(line_after(&linux, "GOT-HVC:"), "ping-hvc", "{linux}");
    assert_eq!(
        line_after(&linux, "HVC-HOST-SAW "),
        "HVC-OUT-FROM-GUEST",
        "{linux}"
    );
    run.assert_status("written", 0);
    assert_eq!(run.output("written").trim(), "PVSTACK-LINUX-WRITE");
}

#[test]
fn reboot_ends_pvstack_with_the_disks_in_place() {
    let l2 = r#"echo "L2-CPUS $(cat /sys/devices/system/cpu/online)"
echo "L2-VDA $(dd if=/dev/vda bs=65536 count=16 2>/dev/null | md5sum)"
echo "L2-VDB $(dd if=/dev/vdb bs=65536 count=16 2>/dev/null | md5sum)"
printf PVSTACK-QSD-WRITE | dd of=/dev/vda bs=1 seek=4194304 conv=notrunc 2>/dev/null
printf PVSTACK-EMULATED-WRITE | dd of=/dev/vdb bs=1 seek=4194304 conv=notrunc 2>/dev/null
sync
/bin/busybox reboot -f"#;
    let run = Nested::new("linux-reboot")
        .with_linux_guest()
        .program("qemu-storage-daemon")
        .step("disks", &format!("{MAKE_DISK} && mv /tmp/disk.img /tmp/qsd.img && {MAKE_DISK} && mv /tmp/disk.img /tmp/vmm.img"))
        .step("script", &guest_script(l2))
        .step(
            "linux",
            r#"
qemu-storage-daemon --blockdev driver=file,node-name=f,filename=/tmp/qsd.img \
    --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/tmp/qsd.sock,writable=on \
    >/tmp/qsd.log 2>&1 &
qsd=$!
wait_until "qemu-storage-daemon" test -S /tmp/qsd.sock || exit 1
pvstack run --kernel /l2/vmlinuz --initrd /l2/initramfs.cpio.gz --cpus 3 --memory 1G --serial \
    --blk socket=/tmp/qsd.sock --blk image=/tmp/vmm.img,mode=emulated-virtio \
    --cmdline "console=ttyS0 quiet pvtest=$(cat /tmp/guest.b64)" </dev/null
status=$?
kill $qsd
wait $qsd
exit $status
"#,
        )
        .step(
            "written",
            "dd if=/tmp/qsd.img bs=1 skip=4194304 count=17 2>/dev/null; echo; \
             dd if=/tmp/vmm.img bs=1 skip=4194304 count=22 2>/dev/null; echo",
        )
        .run();

    // A reboot ends pvstack with 1 and one line saying how.
    run.assert_status("linux", 1);
    let linux = run.output("linux");
    assert!(
        linux.contains(
            "pvstack: the guest reset the machine (ACPI reset register); pvstack does not restart guests"
        ),
        "{linux}"
    );
    assert_eq!(line_after(&linux, "L2-CPUS "), "0-2", "--cpus 3: {linux}");
    let disks = run.output("disks");
    let md5s: Vec<&str> = disks
        .lines()
        .filter_map(|line| line.trim_end().strip_prefix("HEAD-MD5 "))
        .collect();
    assert_eq!(md5s.len(), 2, "{disks}");
    assert_eq!(
        line_after(&linux, "L2-VDA "),
        md5s[0],
        "qemu-storage-daemon's disk: {linux}"
    );
    assert_eq!(
        line_after(&linux, "L2-VDB "),
        md5s[1],
        "the in-VMM disk: {linux}"
    );
    let written: Vec<String> = run
        .output("written")
        .lines()
        .map(|line| line.trim().to_string())
        .collect();
    assert_eq!(written, ["PVSTACK-QSD-WRITE", "PVSTACK-EMULATED-WRITE"]);
}
