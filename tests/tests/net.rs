//! pvstack's network path end to end: the guest's virtio-net driver and
//! smoltcp, the VMM's virtio-net device, and pvstack-net on a TAP (inside a
//! network namespace each test creates) or joining two VMs back to back.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::time::Duration;

use pvstack_tests::net::{run_ok, start_net_backend, start_vm, Background, NetNs};
use pvstack_tests::{binary, run_pvstack, Finished, ScratchDir};

const GUEST: &str = "10.0.0.2";
const HOST_CIDR: &str = "10.0.0.1/24";
/// Long enough that no test run comes near it; the tests stop the guest
/// with the `stop` datagram.
const SERVE: &str = "net-serve ip=10.0.0.2/24 secs=600";
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Ends net-serve with the `stop` datagram and returns its run.
fn stop_guest(ns: &NetNs, vm: Background) -> Finished {
    ns.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut reply = [0u8; 64];
        for _ in 0..5 {
            socket.send_to(b"stop", (GUEST, 7)).expect("send stop");
            if let Ok((len, _)) = socket.recv_from(&mut reply) {
                assert_eq!(&reply[..len], b"stopping");
                return;
            }
        }
        panic!("the guest never answered `stop`");
    });
    vm.finish()
}

/// Sends `count` datagrams to the UDP echo service, each once and the next
/// only after the echo of the one before; returns the numbers of those
/// that got no echo within [`IO_TIMEOUT`].
fn udp_echo(ns: &NetNs, count: usize) -> Vec<usize> {
    ns.run(move || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut lost = Vec::new();
        for i in 0..count {
            let message = format!("datagram {i} {}", "x".repeat(i % 1000));
            socket
                .send_to(message.as_bytes(), (GUEST, 7))
                .expect("send");
            let mut reply = [0u8; 2048];
            match socket.recv_from(&mut reply) {
                Ok((len, _)) => {
                    assert_eq!(&reply[..len], message.as_bytes(), "echo of datagram {i}")
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    lost.push(i)
                }
                Err(e) => panic!("receiving the echo of datagram {i}: {e}"),
            }
        }
        lost
    })
}

/// Asserts that every one of `count` datagrams came back. No loss is
/// allowed: one datagram is in flight at a time, so no queue on the path
/// (the TAP, the backend's, the rings, smoltcp's socket buffers) can
/// overflow, and the ping before has resolved both sides' ARP entries.
fn assert_udp_echoes_all(ns: &NetNs, count: usize, vm: &Background) {
    let lost = udp_echo(ns, count);
    assert!(
        lost.is_empty(),
        "{} of {count} datagrams got no echo within {IO_TIMEOUT:?}: {lost:?}; the VM's output:\n{}",
        lost.len(),
        vm.output()
    );
}

/// Sends `len` bytes to the TCP echo service; what came back, or why not.
fn tcp_echo(ns: &NetNs, len: usize) -> Result<(), String> {
    ns.run(move || {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut stream = TcpStream::connect((GUEST, 7)).expect("connect to TCP echo");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let writer_data = data.clone();
        let mut writer = stream.try_clone().expect("clone stream");
        let sender = std::thread::spawn(move || {
            writer.write_all(&writer_data).expect("send");
            writer.shutdown(Shutdown::Write).expect("shutdown");
        });
        let mut back = Vec::with_capacity(len);
        let read = stream.read_to_end(&mut back);
        sender.join().expect("sender");
        read.map_err(|e| format!("reading the echo failed after {} bytes: {e}", back.len()))?;
        if back != data {
            return Err(format!(
                "the echo ({} bytes) differs from the {len} sent",
                back.len()
            ));
        }
        Ok(())
    })
}

#[test]
fn host_pings_and_echoes_through_a_tap_backend_pvstack_started() {
    let scratch = ScratchDir::new("net-tap");
    let ns = NetNs::new("tap");
    let nets = ["tap=pvtap0,mac=52:54:00:00:00:02".to_string()];
    let mut vm = start_vm(Some(&ns), &nets, SERVE, &scratch.path("vm.log"));
    vm.wait_for("net-serve:");
    assert!(
        vm.output()
            .contains("mac 52:54:00:00:00:02, mtu 1500, link up"),
        "{}",
        vm.output()
    );
    ns.configure("pvtap0", HOST_CIDR);

    let ping = run_ok(
        ns.command("busybox")
            .args(["ping", "-c", "100", "-i", "0.02", "-W", "10", GUEST]),
    );
    assert!(
        ping.contains("100 packets transmitted, 100 packets received, 0% packet loss"),
        "{ping}"
    );
    assert_udp_echoes_all(&ns, 50, &vm);
    if let Err(e) = tcp_echo(&ns, 1 << 20) {
        panic!("TCP echo: {e}; the VM's output:\n{}", vm.output());
    }

    let run = stop_guest(&ns, vm);
    assert_eq!(run.code(), 0, "{}", run.stdout);
    // Each datagram once: the guest echoed exactly what the host sent.
    assert_eq!(run.result_u64("net-serve", "udp_echoed"), 50);
    assert_eq!(run.result_u64("net-serve", "tcp_echo_bytes"), 1 << 20);
}

#[test]
fn tcp_sink_counts_256_mib_through_an_external_backend() {
    const BYTES: u64 = 256 << 20;
    let scratch = ScratchDir::new("net-sink");
    let ns = NetNs::new("sink");
    let socket = scratch.path("net.sock");
    let backend = start_net_backend(Some(&ns), &socket, &["--tap", "pvtap1"]);
    ns.configure("pvtap1", HOST_CIDR);
    let spec = format!("socket={}", socket.display());
    let mut vm = start_vm(None, &[spec], SERVE, &scratch.path("vm.log"));
    vm.wait_for("net-serve:");

    let answer = ns.run(|| {
        let mut stream = TcpStream::connect((GUEST, 9)).expect("connect to the sink");
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        let chunk: Vec<u8> = (0..1 << 16).map(|i| i as u8).collect();
        let mut sent = 0u64;
        while sent < BYTES {
            stream.write_all(&chunk).expect("send");
            sent += chunk.len() as u64;
        }
        stream.shutdown(Shutdown::Write).expect("shutdown");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read the count");
        answer
    });
    assert_eq!(answer, format!("bytes={BYTES}\n"));

    let run = stop_guest(&ns, vm);
    assert_eq!(run.code(), 0, "{}", run.stdout);
    assert_eq!(run.result_number("net-serve", "sink_bytes"), BYTES as f64);
    assert_eq!(run.result_number("net-serve", "sink_conns"), 1.0);
    let log = backend.terminate().stdout;
    assert!(log.contains("tx_bad=0"), "{log}");
    let sink_line = format!("sink: connection 1 bytes={BYTES}");
    assert!(run.stdout.contains(&sink_line), "{}", run.stdout);
}

#[test]
fn two_vms_in_peer_mode_ping_each_other() {
    let scratch = ScratchDir::new("net-peer");
    let (a_sock, b_sock) = (scratch.path("a.sock"), scratch.path("b.sock"));
    let (a_wire, b_wire) = (scratch.path("a.wire"), scratch.path("b.wire"));
    let wire = |bind: &std::path::Path, connect: &std::path::Path| {
        vec![
            "--peer-bind".to_string(),
            bind.display().to_string(),
            "--peer-connect".to_string(),
            connect.display().to_string(),
        ]
    };
    let a_args = wire(&a_wire, &b_wire);
    let b_args = wire(&b_wire, &a_wire);
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let _a_backend = start_net_backend(None, &a_sock, &a_args);
    let _b_backend = start_net_backend(None, &b_sock, &b_args);

    let a_spec = format!("socket={},mac=52:54:00:00:01:02", a_sock.display());
    let b_spec = format!("socket={},mac=52:54:00:00:01:03", b_sock.display());
    let mut server = start_vm(
        None,
        &[a_spec],
        "net-serve ip=10.0.1.2/24 secs=600",
        &scratch.path("a.log"),
    );
    server.wait_for("net-serve:");
    let pinger = start_vm(
        None,
        &[b_spec],
        "net-ping ip=10.0.1.3/24 target=10.0.1.2 count=20",
        &scratch.path("b.log"),
    );
    let run = pinger.finish();
    assert_eq!(run.code(), 0, "{}", run.stdout);
    assert_eq!(
        run.result_number("net-ping", "received"),
        20.0,
        "{}",
        run.stdout
    );
    server.terminate();
}

#[test]
fn bad_tap_names_and_socket_paths_are_refused_clearly() {
    let scratch = ScratchDir::new("net-bad");
    let net = binary("pvstack-net");
    let socket = scratch.path("net.sock");
    let too_long = run_to_end_of(
        std::process::Command::new(&net)
            .arg("--socket")
            .arg(&socket)
            .args(["--tap", "a-name-much-too-long"]),
    );
    assert_eq!(too_long.code(), 2, "{}", too_long.stderr);
    assert!(
        too_long.stderr.contains("at most 15 fit"),
        "{}",
        too_long.stderr
    );
    let slash = run_to_end_of(
        std::process::Command::new(&net)
            .arg("--socket")
            .arg(&socket)
            .args(["--tap", "a/b"]),
    );
    assert_eq!(slash.code(), 2, "{}", slash.stderr);
    assert!(slash.stderr.contains("contains '/'"), "{}", slash.stderr);

    let regular = scratch.path("regular");
    std::fs::write(&regular, b"keep me").expect("write file");
    let refused = run_to_end_of(
        std::process::Command::new(&net)
            .arg("--socket")
            .arg(&regular)
            .args(["--tap", "pvtapx"]),
    );
    assert_eq!(refused.code(), 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("exists and is not a socket"),
        "{}",
        refused.stderr
    );
    assert_eq!(std::fs::read(&regular).expect("read back"), b"keep me");

    let vm = run_pvstack(&[
        "run",
        "--net",
        "tap=a-name-much-too-long",
        "--guest-args",
        "hello",
    ]);
    assert_eq!(vm.code(), 2, "{}", vm.stderr);
    assert!(
        vm.stderr.contains("not a valid interface name"),
        "{}",
        vm.stderr
    );
    let vm = run_pvstack(&[
        "run",
        "--net",
        "socket=/nonexistent/net.sock",
        "--guest-args",
        "hello",
    ]);
    assert_eq!(vm.code(), 1, "{}", vm.stderr);
    assert!(vm.stderr.contains("/nonexistent/net.sock"), "{}", vm.stderr);
}

/// pvstack-net run as `nobody` may not open the TAP: one clear line that
/// names the TAP and the permission problem, exit status 1.
#[test]
fn pvstack_net_without_permission_for_the_tap_says_so() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = ScratchDir::new("net-noperm");
    // A directory `nobody` can create its socket in.
    let dir = scratch.path("open");
    std::fs::create_dir(&dir).expect("create dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let run = run_to_end_of(
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(binary("pvstack-net"))
            .arg("--socket")
            .arg(dir.join("net.sock"))
            .args(["--tap", "pvtapnobody"]),
    );
    assert_eq!(run.code(), 1, "{run:#?}");
    let stderr = run.stderr.trim();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("TAP pvtapnobody"), "{stderr}");
    assert!(stderr.contains("no permission"), "{stderr}");
}

/// `pvstack bench` with the network workloads: both NIC modes in the JSON
/// report and the chart, and the benchmark's namespace gone afterwards.
#[test]
fn bench_reports_both_net_modes_as_json_and_a_chart() {
    const MODES: [&str; 2] = ["vhost-user", "emulated"];
    const WORKLOADS: [&str; 2] = ["net-tcp-tx", "net-udp-64"];
    let scratch = ScratchDir::new("net-bench");
    let (json, chart) = (scratch.path("bench.json"), scratch.path("bench.svg"));
    let run = run_to_end_of(
        std::process::Command::new(pvstack_tests::pvstack())
            .args(["bench", "--reps", "2", "--duration", "1"])
            .args([
                "--workloads",
                "net-tcp-tx,net-udp-64",
                "--net-tcp-bytes",
                "4M",
            ])
            .arg("--json")
            .arg(&json)
            .arg("--chart")
            .arg(&chart)
            .env("RUST_LOG", "warn"),
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report exists"))
            .expect("the JSON report parses");
    assert_eq!(report["net_tcp_bytes"], 4 << 20, "{report:#}");
    let results = report["results"].as_array().expect("results is a list");
    assert_eq!(results.len(), MODES.len() * WORKLOADS.len(), "{report:#}");
    for mode in MODES {
        for workload in WORKLOADS {
            let entry = results
                .iter()
                .find(|r| r["mode"] == mode && r["workload"] == workload)
                .unwrap_or_else(|| panic!("no {mode} {workload} in {report:#}"));
            for metric in ["iops", "mbps", "kicks_per_req", "cpu_s_per_gib"] {
                let spread = &entry[metric];
                let (min, median, max) = (
                    spread["min"].as_f64().expect("min"),
                    spread["median"].as_f64().expect("median"),
                    spread["max"].as_f64().expect("max"),
                );
                assert!(
                    0.0 < min && min <= median && median <= max,
                    "{mode} {workload} {metric}: {spread}"
                );
            }
            assert!(entry["exits_note"].is_string(), "{entry:#}");
            let samples = entry["samples"].as_array().expect("samples");
            assert_eq!(samples.len(), 2, "{entry:#}");
            if workload == "net-tcp-tx" {
                for sample in samples {
                    assert_eq!(sample["bytes"], 4 << 20, "{entry:#}");
                }
            }
            assert!(
                run.stdout
                    .lines()
                    .any(|l| l.starts_with(mode) && l.contains(workload)),
                "no table row for {mode} {workload}: {}",
                run.stdout
            );
        }
    }
    let ratios = report["ratios"].as_array().expect("ratios");
    assert_eq!(ratios.len(), 2, "{report:#}");
    let svg = std::fs::read_to_string(&chart).expect("the chart exists");
    assert!(svg.starts_with("<svg"), "not an SVG");
    for name in MODES.iter().chain(&WORKLOADS) {
        assert!(svg.contains(name), "the chart does not name {name}");
    }
    let namespaces = run_ok(std::process::Command::new("ip").args(["netns", "list"]));
    assert!(
        !namespaces.contains("pvbench-"),
        "the bench left its namespace: {namespaces}"
    );
}

fn run_to_end_of(command: &mut std::process::Command) -> Finished {
    pvstack_tests::run_to_end(command)
}

#[test]
fn the_in_vmm_emulated_baseline_serves_the_same_guest() {
    let scratch = ScratchDir::new("net-emulated");
    let ns = NetNs::new("emul");
    let nets = ["tap=pvtape,mode=emulated".to_string()];
    let mut vm = start_vm(Some(&ns), &nets, SERVE, &scratch.path("vm.log"));
    vm.wait_for("net-serve:");
    ns.configure("pvtape", HOST_CIDR);
    let ping = run_ok(
        ns.command("busybox")
            .args(["ping", "-c", "20", "-i", "0.02", "-W", "10", GUEST]),
    );
    assert!(
        ping.contains("20 packets transmitted, 20 packets received, 0% packet loss"),
        "{ping}"
    );
    assert_udp_echoes_all(&ns, 20, &vm);
    if let Err(e) = tcp_echo(&ns, 1 << 20) {
        panic!("TCP echo: {e}; the VM's output:\n{}", vm.output());
    }
    let run = stop_guest(&ns, vm);
    assert_eq!(run.code(), 0, "{}", run.stdout);
    assert_eq!(run.result_u64("net-serve", "udp_echoed"), 20);
    assert_eq!(run.result_u64("net-serve", "tcp_echo_bytes"), 1 << 20);
}

/// A NIC's configuration space is the VMM's, so a restarted pvstack-net
/// (which offers no GET_CONFIG) must still be taken back: after SIGKILL and
/// a restart on the same socket, the guest answers pings again.
#[test]
fn guest_is_reachable_again_after_its_backend_is_killed_and_restarted() {
    let scratch = ScratchDir::new("net-restart");
    let ns = NetNs::new("restart");
    let socket = scratch.path("net.sock");
    let backend = start_net_backend(Some(&ns), &socket, &["--tap", "pvtap2"]);
    ns.configure("pvtap2", HOST_CIDR);
    let spec = format!("socket={}", socket.display());
    let mut vm = start_vm(None, &[spec], SERVE, &scratch.path("vm.log"));
    vm.wait_for("net-serve:");
    let ping = |count: &str| {
        ns.command("busybox")
            .args(["ping", "-c", count, "-i", "0.05", "-W", "2", GUEST])
            .output()
            .expect("run ping")
    };
    assert!(ping("5").status.success(), "ping before the restart");

    drop(backend); // SIGKILL; the TAP goes with the process
    let backend = start_net_backend(Some(&ns), &socket, &["--tap", "pvtap2"]);
    ns.configure("pvtap2", HOST_CIDR);
    // pvstack reconnects with backoff; give it a few tries to get there.
    let reachable = (0..30).any(|_| ping("1").status.success());
    assert!(reachable, "no reply after the restart:\n{}", vm.output());
    let after = String::from_utf8_lossy(&ping("20").stdout).into_owned();
    assert!(after.contains("20 packets received"), "{after}");

    let run = stop_guest(&ns, vm);
    assert_eq!(run.code(), 0, "{}", run.stdout);
    drop(backend);
}
