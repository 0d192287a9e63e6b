//! Snapshot, restore and live replacement of pvstack (issue 14), with
//! real processes: the guest runs `blk-swap-verify` on a disk served by
//! pvstack-blk and the same on a second disk on qemu-storage-daemon
//! (`mirror=1`), with a NIC on
//! pvstack-net in peer mode and a virtio-console on pvstack-console, all
//! external backends that keep running while pvstack is snapshotted and
//! restored, or replaced by a new pvstack process. Beside the disk the
//! guest answers pings from a second VM on the NIC's peer and writes
//! stamped tick lines on the console. At the end the image must hold
//! exactly the guest's completed writes, no ping may have gone unanswered
//! across a replacement, and no console line may be missing; the same
//! holds for the second image.

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pvstack_tests::blk_process::BlkProcess;
use pvstack_tests::blk_vm::{
    assert_swap_verify_image, newest_write, read_image, stop_swap_verify, utf8,
    wait_for_write_after,
};
use pvstack_tests::net::{start_vm, Background};
use pvstack_tests::process::LoggedProcess;
use pvstack_tests::qsd::QsdProcess;
use pvstack_tests::{
    binary, parse_result, pvstack, run_to_end, wait_or_kill, Finished, ScratchDir, HANG_TIMEOUT,
};
use serde_json::Value;

/// Snapshot/restore cycles, then live replacements, in a row.
const SNAPSHOT_CYCLES: usize = 20;
const TAKEOVER_CYCLES: usize = 20;
/// Blocks the workload cycles over.
const BLOCKS: usize = 256;
const IMAGE_LEN: usize = 4 << 20;
/// The guest's address on its NIC and the pinging VM's, on the peer wire.
const GUEST_IP: &str = "10.0.9.2";
const PINGER_IP: &str = "10.0.9.3";
/// Pings the pinging VM sends between two tallies it prints.
const PINGS_PER_TALLY: usize = 25;

/// Polls `ready` until it holds; panics after [`HANG_TIMEOUT`] (a hang,
/// not a timing requirement).
fn wait_until(what: &str, ready: impl FnMut() -> bool) {
    wait_until_or(what, ready, String::new);
}

/// [`wait_until`], with `context()` in the panic message.
fn wait_until_or(what: &str, mut ready: impl FnMut() -> bool, context: impl Fn() -> String) {
    let started = Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < HANG_TIMEOUT,
            "{what}: still waiting after {HANG_TIMEOUT:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The backends of the scene, which outlive every pvstack process.
struct Backends {
    _blk: BlkProcess,
    _qsd: QsdProcess,
    _net: [LoggedProcess; 2],
    _console: LoggedProcess,
    specs: Vec<String>,
    /// The image qemu-storage-daemon serves.
    second_image: PathBuf,
    /// The pvstack-net on the other end of the guest NIC's peer wire.
    peer_socket: PathBuf,
    /// Where people attach to the guest's console.
    console_server: PathBuf,
}

impl Backends {
    fn start(dir: &ScratchDir, image: &Path) -> Backends {
        let blk_socket = dir.path("blk.sock");
        let blk = BlkProcess::start(&blk_socket, &["--image", utf8(image)]);
        let second = dir.path("second.img");
        std::fs::write(&second, vec![0u8; IMAGE_LEN]).expect("second image");
        let qsd_socket = dir.path("qsd.sock");
        let qsd = QsdProcess::start(&second, &qsd_socket, 1);
        let [a, b] = [dir.path("peer-a"), dir.path("peer-b")];
        let net_socket = dir.path("net.sock");
        let net = |socket: &Path, bind: &Path, connect: &Path, name: &str| {
            let mut command = Command::new(binary("pvstack-net"));
            command
                .arg("--socket")
                .arg(socket)
                .arg("--peer-bind")
                .arg(bind)
                .arg("--peer-connect")
                .arg(connect);
            let mut process =
                LoggedProcess::spawn(name, &mut command, dir.path(&format!("{name}.log")))
                    .expect("start pvstack-net");
            process.wait_until_listening(socket, |_| true);
            process
        };
        let net_a = net(&net_socket, &a, &b, "net-a");
        let net_b = net(&dir.path("net-b.sock"), &b, &a, "net-b");
        let console_socket = dir.path("console.sock");
        let mut command = Command::new(binary("pvstack-console"));
        command
            .arg("--socket")
            .arg(&console_socket)
            .arg("--listen")
            .arg(dir.path("console-server.sock"));
        let mut console = LoggedProcess::spawn(
            "pvstack-console",
            &mut command,
            dir.path("pvstack-console.log"),
        )
        .expect("start pvstack-console");
        console.wait_until_listening(&console_socket, |_| true);
        let specs = vec![
            format!("--blk=socket={}", utf8(&blk_socket)),
            format!("--blk=socket={}", utf8(&qsd_socket)),
            format!("--net=socket={}", utf8(&net_socket)),
            format!("--console=socket={}", utf8(&console_socket)),
        ];
        Backends {
            _blk: blk,
            _qsd: qsd,
            _net: [net_a, net_b],
            _console: console,
            specs,
            second_image: second,
            peer_socket: dir.path("net-b.sock"),
            console_server: dir.path("console-server.sock"),
        }
    }
}

/// A person at the guest's console: everything pvstack-console's server
/// sent, collected by a thread.
struct ConsoleClient {
    received: Arc<Mutex<Vec<u8>>>,
}

impl ConsoleClient {
    fn attach(server: &Path) -> ConsoleClient {
        let mut stream = UnixStream::connect(server)
            .unwrap_or_else(|e| panic!("attach to {}: {e}", server.display()));
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n @ 1..) = stream.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        ConsoleClient { received }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).replace('\r', "")
    }

    /// Asserts the console showed exactly ticks 1..=`ticks`, in order,
    /// and pvstack-console never reported lost lines.
    fn assert_every_tick(&self, ticks: u64) {
        wait_until("the last tick on the console", || {
            self.text().contains(&format!("tick {ticks}\n"))
        });
        let text = self.text();
        assert!(
            !text.contains("lines lost]"),
            "pvstack-console reported lost lines:\n{text}"
        );
        let seen: Vec<u64> = text
            .lines()
            .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
            .collect();
        let expected: Vec<u64> = (1..=ticks).collect();
        assert!(seen == expected, "ticks 1..={ticks} in order, got {seen:?}");
    }
}

/// A second VM on the peer wire that pings the guest without a pause and
/// prints its tally every [`PINGS_PER_TALLY`] pings.
struct Pinger(Background);

impl Pinger {
    fn start(dir: &ScratchDir, backends: &Backends) -> Pinger {
        let nic = format!(
            "socket={},mac=52:54:00:00:09:03",
            utf8(&backends.peer_socket)
        );
        let args = format!(
            "net-ping ip={PINGER_IP}/24 target={GUEST_IP} count=0 gap_ms=2 every={PINGS_PER_TALLY}"
        );
        let mut pinger = Pinger(start_vm(None, &[nic], &args, &dir.path("pinger.log")));
        pinger
            .0
            .wait_for(&format!("net-ping: sent={PINGS_PER_TALLY} "));
        pinger
    }

    fn tallies(&self) -> usize {
        self.0.output().matches("net-ping: sent=").count()
    }

    /// Waits for `more` tallies after the `since`th, and asserts every
    /// ping so far was answered.
    fn wait_for_answers(&self, since: usize, more: usize) {
        wait_until("pings after the replacement", || {
            self.tallies() >= since + more
        });
        let output = self.0.output();
        assert!(
            !output.contains("unanswered"),
            "a ping went unanswered:\n{output}"
        );
    }
}

/// The pvstack process this test started last (run or restore); after a
/// take-over the VM runs in a process that is not this test's child.
struct Vm {
    dir: PathBuf,
    api: PathBuf,
    console: PathBuf,
    child: Option<Child>,
    logs: usize,
}

impl Vm {
    fn new(dir: &ScratchDir) -> Vm {
        Vm {
            dir: dir.path(""),
            api: dir.path("api.sock"),
            console: dir.path("console.log"),
            child: None,
            logs: 0,
        }
    }

    /// Starts `pvstack ARGS` and waits until its API answers.
    fn spawn(&mut self, args: &[String]) {
        self.logs += 1;
        let log = self.dir.join(format!("pvstack-{}.log", self.logs));
        let child = Command::new(pvstack())
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("pvstack log"))
            .spawn()
            .expect("spawn pvstack");
        self.child = Some(child);
        wait_until("the VM's API answers", || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "pvstack {args:?} exited early ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            self.api.exists() && self.ctl(&["info"]).code() == 0
        });
    }

    fn ctl(&self, args: &[&str]) -> Finished {
        run_to_end(
            Command::new(pvstack())
                .arg("ctl")
                .arg("--api-socket")
                .arg(&self.api)
                .args(args)
                .env("RUST_LOG", "warn"),
        )
    }

    /// `pvstack ctl ARGS`, which must succeed; its `result`.
    fn ctl_ok(&self, args: &[&str]) -> Value {
        let out = self.ctl(args);
        assert_eq!(
            out.code(),
            0,
            "pvstack ctl {args:?}: {out:#?}\npvstack's logs:\n{}",
            self.logs()
        );
        let response: Value = serde_json::from_str(out.stdout.trim()).expect("JSON response");
        assert_eq!(response["ok"], Value::Bool(true), "{response}");
        response["result"].clone()
    }

    /// Waits for the child this test started to exit, with status 0.
    fn wait_for_exit(&mut self) {
        let mut child = self.child.take().expect("a pvstack child");
        let status = wait_or_kill(&mut child).expect("pvstack exits");
        assert!(status.success(), "pvstack exited with {status}");
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn logs(&self) -> String {
        (1..=self.logs)
            .map(|n| {
                std::fs::read_to_string(self.dir.join(format!("pvstack-{n}.log")))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Ends the guest's `blk-swap-verify stop=1` on `image` (and on its
    /// `mirror` disk's image), waits for its RESULT line and for the VM's
    /// process to end (its API socket goes away).
    fn finish(
        &mut self,
        image: &Path,
        mirror: Option<&Path>,
    ) -> std::collections::BTreeMap<String, String> {
        stop_swap_verify(image, BLOCKS);
        if let Some(mirror) = mirror {
            stop_swap_verify(mirror, BLOCKS);
        }
        wait_until("the guest's RESULT", || {
            parse_result(&self.console(), "blk-swap-verify").is_some()
        });
        wait_until("the VM ends", || !self.api.exists());
        if let Some(mut child) = self.child.take() {
            let _ = wait_or_kill(&mut child);
        }
        parse_result(&self.console(), "blk-swap-verify").expect("RESULT")
    }
}

impl Drop for Vm {
    /// A failed test leaves no VM running: after a take-over the VM runs
    /// in a process that is not this test's child, so it is asked to shut
    /// down through its API.
    fn drop(&mut self) {
        if std::thread::panicking() && self.api.exists() {
            let _ = self.ctl(&["shutdown"]);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run_args(backends: &Backends, vm: &Vm, guest_args: &str) -> Vec<String> {
    let mut args = vec!["run".to_string()];
    args.extend(backends.specs.iter().cloned());
    args.extend([
        "--api-socket".into(),
        utf8(&vm.api).into(),
        "--console-log".into(),
        utf8(&vm.console).into(),
        "--guest-args".into(),
        guest_args.into(),
    ]);
    args
}

#[test]
fn snapshot_restore_cycles_then_live_replacements_lose_no_write() {
    let dir = ScratchDir::new("snapshot-cycles");
    let image = dir.path("disk.img");
    std::fs::write(&image, vec![0u8; IMAGE_LEN]).expect("image");
    let backends = Backends::start(&dir, &image);
    let console = ConsoleClient::attach(&backends.console_server);
    let mut vm = Vm::new(&dir);
    vm.spawn(&run_args(
        &backends,
        &vm,
        &format!("blk-swap-verify stop=1 mirror=1 ip={GUEST_IP}/24 tick_ms=20"),
    ));
    wait_until_or(
        "the workload runs",
        || vm.console().contains("blk-swap-verify: running"),
        || vm.console() + &vm.logs(),
    );

    let began = Instant::now();
    for cycle in 0..SNAPSHOT_CYCLES {
        let snapshot = dir.path(&format!("snapshot-{cycle}"));
        let written = vm.ctl_ok(&["snapshot", "--to", utf8(&snapshot)]);
        assert_eq!(written["state"], "paused", "{written}");
        assert!(written["data_bytes"].as_u64().unwrap() > 0, "{written}");
        assert!(snapshot.join("memory.bin").is_file() && snapshot.join("state.json").is_file());
        vm.ctl_ok(&["shutdown"]);
        vm.wait_for_exit();
        vm.spawn(&["restore".into(), "--from".into(), utf8(&snapshot).into()]);
        // Let the guest make progress between snapshots.
        std::thread::sleep(Duration::from_millis(100));
    }
    let snapshots = began.elapsed();
    let pinger = Pinger::start(&dir, &backends);
    let began = Instant::now();
    let mut pids = Vec::new();
    let mut paused_us = Vec::new();
    for _ in 0..TAKEOVER_CYCLES {
        let tallies = pinger.tallies();
        let done = vm.ctl_ok(&["upgrade", "--binary", utf8(&pvstack())]);
        let pid = done["pid"].as_u64().expect("pid");
        assert!(!pids.contains(&pid), "a new process each time: {done}");
        pids.push(pid);
        paused_us.push(done["paused_us"].as_u64().expect("paused_us"));
        // Pings were in flight while pvstack was replaced (one at a time,
        // every 2 ms), and go on being answered by the new process.
        pinger.wait_for_answers(tallies, 2);
    }
    let takeovers = began.elapsed();
    let pings = pinger.0.terminate().stdout;
    let max_rtt = pings
        .lines()
        .filter_map(|l| l.split("max_rtt_us=").nth(1)?.trim().parse::<u64>().ok())
        .max();
    paused_us.sort_unstable();
    eprintln!(
        "longest ping round trip across the replacements: {max_rtt:?} us; \
         pvstack paused for {paused_us:?} us"
    );
    eprintln!("{SNAPSHOT_CYCLES} snapshot/restore cycles took {snapshots:?}, {TAKEOVER_CYCLES} live replacements {takeovers:?}");
    // The first replaced process was this test's child, and exits 0.
    vm.wait_for_exit();

    let result = vm.finish(&image, Some(&backends.second_image));
    assert_swap_verify_image(&read_image(&image), BLOCKS, &result);
    // The disk on qemu-storage-daemon took writes across every snapshot
    // and replacement too, and holds exactly those the guest saw complete.
    assert_swap_verify_image(
        &read_image(&backends.second_image),
        BLOCKS,
        &mirror_result(&result),
    );
    assert_eq!(result["ticks_lost"], "0", "{result:?}");
    console.assert_every_tick(result["ticks"].parse().expect("ticks"));
    let logs = vm.logs();
    assert_eq!(
        logs.matches("take-over: running the VM").count(),
        TAKEOVER_CYCLES,
        "every new process ran the VM"
    );
    // Each restore restarts the rings of both disks, the NIC and the
    // console.
    assert_eq!(
        logs.matches("rings restored on").count(),
        SNAPSHOT_CYCLES * 4
    );
}

/// The mirror disk's part of a `blk-swap-verify` RESULT, under the keys
/// of the first disk's.
fn mirror_result(
    result: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    let mirror: std::collections::BTreeMap<String, String> = result
        .iter()
        .filter_map(|(key, value)| Some((key.strip_prefix("mirror_")?.to_string(), value.clone())))
        .collect();
    assert!(mirror.contains_key("table_fnv"), "no mirror in {result:?}");
    mirror
}

#[test]
fn bad_snapshots_are_refused_with_one_line_and_harm_nothing() {
    let dir = ScratchDir::new("snapshot-bad");
    let image = dir.path("disk.img");
    std::fs::write(&image, vec![0u8; IMAGE_LEN]).expect("image");
    let blk_socket = dir.path("blk.sock");
    let _blk = BlkProcess::start(&blk_socket, &["--image", utf8(&image)]);
    let mut vm = Vm::new(&dir);
    vm.spawn(&[
        "run".into(),
        "--memory".into(),
        "16M".into(),
        format!("--blk=socket={}", utf8(&blk_socket)),
        "--api-socket".into(),
        utf8(&vm.api).into(),
        "--console-log".into(),
        utf8(&vm.console).into(),
        "--guest-args".into(),
        "blk-swap-verify stop=1".into(),
    ]);
    let good = dir.path("good");
    let written = vm.ctl_ok(&["snapshot", "--to", utf8(&good), "--resume"]);
    assert_eq!(written["state"], "running", "{written}");
    // A snapshot is never overwritten.
    let again = vm.ctl(&["snapshot", "--to", utf8(&good), "--resume"]);
    assert_eq!(again.code(), 1);
    assert!(again.stdout.contains("never overwritten"), "{again:#?}");

    let state = std::fs::read_to_string(good.join("state.json")).expect("state");
    let copy = |name: &str, state: &str, memory_len: Option<u64>| {
        let bad = dir.path(name);
        std::fs::create_dir(&bad).expect("bad dir");
        std::fs::write(bad.join("state.json"), state).expect("state");
        std::fs::copy(good.join("memory.bin"), bad.join("memory.bin")).expect("memory");
        if let Some(len) = memory_len {
            File::options()
                .write(true)
                .open(bad.join("memory.bin"))
                .and_then(|f| f.set_len(len))
                .expect("truncate");
        }
        bad
    };
    let cases = [
        (dir.path("missing"), "no such directory"),
        (
            copy("truncated", &state[..state.len() / 2], None),
            "not a complete pvstack VM state",
        ),
        (
            copy("version", &with_version(&state, 99), None),
            "state version 99",
        ),
        (copy("short", &state, Some(8 << 20)), "holds 8388608 bytes"),
        (
            copy("stray-uart", &with_stray_uart(&state), None),
            "its VM has no emulated UART, but it holds the UART state",
        ),
        (
            copy("flavour", &other_host(&state, "flavour"), None),
            "a VM moves only between hosts of one KVM flavour",
        ),
        (
            copy("cpu", &other_host(&state, "cpu"), None),
            "CPU, this host has a",
        ),
    ];
    for (bad, needle) in cases {
        let other_api = dir.path("other-api.sock");
        let run = run_to_end(
            Command::new(pvstack())
                .args([
                    "restore",
                    "--from",
                    utf8(&bad),
                    "--api-socket",
                    utf8(&other_api),
                ])
                .env("RUST_LOG", "warn"),
        );
        run.assert_error("pvstack", 1, &[needle]);
        run.assert_stderr_one_line();
    }
    // The VM the snapshot came from goes on writing.
    wait_for_write_after(&image, BLOCKS, newest_write(&image, BLOCKS));
    let result = vm.finish(&image, None);
    assert_swap_verify_image(&read_image(&image), BLOCKS, &result);
}

/// `state` claiming state format `version` (whatever the current one is).
fn with_version(state: &str, version: u32) -> String {
    let mut state: Value = serde_json::from_str(state).expect("state JSON");
    state["version"] = version.into();
    state.to_string()
}

/// `state` holding the state of a UART its VM (no `--serial`) lacks.
fn with_stray_uart(state: &str) -> String {
    let mut state: Value = serde_json::from_str(state).expect("state JSON");
    assert_eq!(state["uart"], Value::Null, "a VM without --serial");
    state["uart"] = serde_json::json!({
        "divisor_low": 1, "divisor_high": 0, "interrupt_enable": 0,
        "interrupt_identification": 1, "line_control": 3, "line_status": 0x60,
        "modem_control": 0, "modem_status": 0, "scratch": 0, "receive_fifo": []
    });
    state.to_string()
}

/// `state` as if taken on a host with another KVM flavour (`what` is
/// "flavour") or another CPU model ("cpu").
fn other_host(state: &str, what: &str) -> String {
    let mut state: Value = serde_json::from_str(state).expect("state JSON");
    let host = &mut state["host"];
    match what {
        "flavour" => {
            let other = if host["flavour"] == "Pvm" {
                "Svm"
            } else {
                "Pvm"
            };
            host["flavour"] = other.into();
        }
        _ => {
            let model = host["cpu"]["model"].as_u64().expect("CPU model");
            host["cpu"]["model"] = (model + 1).into();
        }
    }
    state.to_string()
}

#[test]
fn a_take_over_that_fails_leaves_the_guest_running_here() {
    let dir = ScratchDir::new("takeover-fault");
    let image = dir.path("disk.img");
    std::fs::write(&image, vec![0u8; IMAGE_LEN]).expect("image");
    let blk_socket = dir.path("blk.sock");
    let _blk = BlkProcess::start(&blk_socket, &["--image", utf8(&image)]);
    let mut vm = Vm::new(&dir);
    vm.spawn(&[
        "run".into(),
        format!("--blk=socket={}", utf8(&blk_socket)),
        "--api-socket".into(),
        utf8(&vm.api).into(),
        "--console-log".into(),
        utf8(&vm.console).into(),
        "--guest-args".into(),
        "blk-swap-verify stop=1".into(),
    ]);
    // A binary that dies at once, and a pvstack killed after each step.
    let dies = dir.path("dies.sh");
    std::fs::write(&dies, "#!/bin/sh\nkill -9 $$\n").expect("script");
    std::process::Command::new("chmod")
        .arg("755")
        .arg(&dies)
        .status()
        .expect("chmod");
    let killed_at = |step: &str| {
        let script = dir.path(&format!("dies-at-{step}.sh"));
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nPVSTACK_TEST_TAKE_OVER_DIE_AT={step} exec {} \"$@\"\n",
                utf8(&pvstack())
            ),
        )
        .expect("script");
        std::process::Command::new("chmod")
            .arg("755")
            .arg(&script)
            .status()
            .expect("chmod");
        script
    };
    for binary in [
        dies,
        killed_at("prepared"),
        killed_at("state"),
        dir.path("no-such-binary"),
    ] {
        let out = vm.ctl(&["upgrade", "--binary", utf8(&binary)]);
        assert_eq!(out.code(), 1, "{out:#?}");
        let response: Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
        let error = response["error"].as_str().expect("error");
        assert!(
            error.starts_with("upgrade failed, the VM runs on here"),
            "{error}"
        );
        let info = vm.ctl_ok(&["info"]);
        assert_eq!(info["state"], "running", "{info}");
        // The guest's writes go on here.
        wait_for_write_after(&image, BLOCKS, newest_write(&image, BLOCKS));
    }
    // A take-over that succeeds, then a snapshot the new process resumes
    // from: the backend it adopted learns its memory table before the
    // rings start again (it knew guest memory by the old process's
    // addresses).
    vm.ctl_ok(&["upgrade", "--binary", utf8(&pvstack())]);
    vm.wait_for_exit();
    let written = vm.ctl_ok(&[
        "snapshot",
        "--to",
        utf8(&dir.path("after-take-over")),
        "--resume",
    ]);
    assert_eq!(written["state"], "running", "{written}");
    wait_for_write_after(&image, BLOCKS, newest_write(&image, BLOCKS));
    let result = vm.finish(&image, None);
    assert_swap_verify_image(&read_image(&image), BLOCKS, &result);
}

#[test]
fn a_vm_with_device_state_in_the_vmm_is_neither_snapshotted_nor_handed_over() {
    let dir = ScratchDir::new("snapshot-unsupported");
    let image = dir.path("disk.img");
    std::fs::write(&image, vec![0u8; IMAGE_LEN]).expect("image");
    let mut vm = Vm::new(&dir);
    vm.spawn(&[
        "run".into(),
        format!("--blk=image={},mode=emulated-virtio", utf8(&image)),
        "--api-socket".into(),
        utf8(&vm.api).into(),
        "--console-log".into(),
        utf8(&vm.console).into(),
        "--guest-args".into(),
        "compute iterations=1000000000000".into(),
    ]);
    let snapshot = dir.path("snapshot");
    for request in [
        vec!["snapshot", "--to", utf8(&snapshot)],
        vec!["upgrade", "--binary", utf8(&pvstack())],
    ] {
        let out = vm.ctl(&request);
        assert_eq!(out.code(), 1, "{out:#?}");
        let response: Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
        let error = response["error"].as_str().expect("error");
        assert!(
            error.contains("blk0 is served in the VMM (mode=emulated-virtio)"),
            "{error}"
        );
        assert_eq!(vm.ctl_ok(&["info"])["state"], "running");
    }
    assert!(!snapshot.exists(), "nothing written");
    vm.ctl_ok(&["shutdown"]);
    vm.wait_for_exit();
}

/// scripts/bench-upgrade at a tiny size: it measures, and says so in the
/// shape its readers rely on (the numbers themselves are not judged).
#[test]
fn the_upgrade_benchmark_reports_its_percentiles() {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench-upgrade");
    let bin_dir = pvstack().parent().expect("a directory").to_path_buf();
    for (args, needle) in [
        (
            vec!["--replacements", "0"],
            "--replacements takes a positive number",
        ),
        (vec!["--sizes", "lots"], "--sizes takes sizes"),
        (vec!["--fast"], "unknown argument '--fast'"),
    ] {
        let run = run_to_end(Command::new(&bench).args(&args));
        run.assert_error("bench-upgrade", 2, &[needle]);
    }
    let run = run_to_end(
        Command::new(&bench)
            .args([
                "--replacements",
                "3",
                "--sizes",
                "64M",
                "--restores",
                "2",
                "--restore-sizes",
                "64M",
            ])
            .env("PVSTACK_BIN_DIR", &bin_dir),
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    let upgrade = result_fields(&run.stdout, "RESULT upgrade ");
    assert_eq!(upgrade["size"], "64M", "{run:#?}");
    assert_eq!(upgrade["replacements"], "3", "{run:#?}");
    assert_eq!(upgrade["mismatches"], "0", "{run:#?}");
    assert_eq!(upgrade["errors"], "0", "{run:#?}");
    for key in ["pause", "guest"] {
        let p50: u64 = upgrade[&format!("{key}_p50_us")].parse().expect("p50");
        let p99: u64 = upgrade[&format!("{key}_p99_us")].parse().expect("p99");
        let max: u64 = upgrade[&format!("{key}_max_us")].parse().expect("max");
        assert!(0 < p50 && p50 <= p99 && p99 <= max, "{key}: {upgrade:?}");
    }
    assert!(
        run.stdout.contains("pause phases, medians (us):") && run.stdout.contains("new:"),
        "{run:#?}"
    );
    let restore = result_fields(&run.stdout, "RESULT restore ");
    assert_eq!(restore["restores"], "2", "{run:#?}");
    let p50: f64 = restore["first_instruction_p50_ms"].parse().expect("p50");
    let max: f64 = restore["first_instruction_max_ms"].parse().expect("max");
    assert!(0.0 < p50 && p50 <= max, "{restore:?}");
}

/// The `key=value` fields of the line of `output` that starts with `prefix`.
fn result_fields(output: &str, prefix: &str) -> std::collections::BTreeMap<String, String> {
    let line = output
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{output}"));
    line.split_whitespace()
        .filter_map(|field| field.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}
