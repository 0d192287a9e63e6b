//! Interop: QEMU (software emulation) as the vhost-user frontend and a
//! stock Debian kernel's virtio_net as the guest driver, on pvstack-net
//! with a TAP in a network namespace. The Linux guest pings the host.

use pvstack_tests::net::{start_net_backend, NetNs};
use pvstack_tests::qemu::{linux_guest_assets, run_linux_guest_net, KERNEL_LOG_SECTION};
use pvstack_tests::ScratchDir;

#[test]
fn linux_guest_under_qemu_pings_the_host_through_pvstack_net() {
    let assets = linux_guest_assets();
    let scratch = ScratchDir::new("net-qemu");
    let ns = NetNs::new("qemu");
    let socket = scratch.path("net.sock");
    let backend = start_net_backend(
        Some(&ns),
        &socket,
        &["--tap", "pvtapq", "--filter-early-vring-enable"],
    );
    ns.configure("pvtapq", "10.0.2.1/24");

    let script = r#"
dev=
for path in /sys/class/net/*; do
    name=${path##*/}
    [ "$name" = lo ] || dev=$name
done
[ -n "$dev" ] || { echo "no network interface"; exit 1; }
busybox ip link set "$dev" up
busybox ip addr add 10.0.2.2/24 dev "$dev"
echo "BEGIN mac"
cat /sys/class/net/$dev/address
echo "END mac"
echo "BEGIN ping"
busybox ping -c 10 -W 10 10.0.2.1
status=$?
echo "END ping"
"#;
    let script = format!("{script}{KERNEL_LOG_SECTION}\nexit $status\n");
    let run = run_linux_guest_net(&assets, &[(&socket, "52:54:00:12:34:99")], &script);
    assert_eq!(
        run.script_status,
        Some(0),
        "{}\npvstack-net:\n{}",
        run.console,
        backend.output()
    );
    assert_eq!(run.section("mac"), ["52:54:00:12:34:99"], "{}", run.console);
    // "eth0: link becomes ready" is no anchor: IPv6 prints it only when
    // the carrier comes up after the interface, which is a race.
    run.assert_clean_kernel_log("Run /init as init process");
    let ping = run.section("ping").join("\n");
    assert!(
        ping.contains("10 packets transmitted, 10 packets received, 0% packet loss"),
        "{}",
        run.console
    );
    let log = backend.terminate().stdout;
    assert!(log.contains("tx_bad=0"), "{log}");
}
