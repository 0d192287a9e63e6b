//! Swapping a running disk between backends and surviving backend crashes
//! (issue 4), with real processes: pvstack with its control API, the guest
//! running `blk-swap-verify`, pvstack-blk and qemu-storage-daemon. After
//! each run the image must hold exactly the guest's completed writes: each
//! block intact and carrying the sequence number of the last write the
//! guest saw complete (compared through the guest's `table_fnv`).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pvstack_tests::api_vm::{refusal, response, ApiVm};
use pvstack_tests::blk_process::BlkProcess;
use pvstack_tests::blk_vm::{
    assert_swap_verify_image, finish_swap_verify, newest_write, read_image, utf8,
    wait_for_write_after,
};
use pvstack_tests::qsd::QsdProcess;
use pvstack_tests::{wait_until, ScratchDir, HANG_TIMEOUT};
use serde_json::Value;

/// Blocks the workload cycles over (1 MiB).
const BLOCKS: usize = 256;
/// Image size: room for the workload's blocks and then some.
const IMAGE_LEN: usize = 4 << 20;

/// Starts a pvstack-blk serving `image` on `socket`, logging to a file of
/// its own (a restarted backend on the same socket keeps the old log).
fn start_backend(socket: &Path, image: &Path, extra: &[&str]) -> BlkProcess {
    let log = socket.with_extension(format!("{}.log", unique()));
    let image = image.to_str().expect("scratch paths are UTF-8");
    let args: Vec<&str> = ["--image", image].iter().chain(extra).copied().collect();
    BlkProcess::start_logging_to(socket, log, &args)
}

/// A scratch directory for `test` holding `disk.img`, IMAGE_LEN zero bytes.
fn scratch_with_image(test: &str) -> (ScratchDir, PathBuf) {
    let dir = ScratchDir::new(test);
    let image = dir.path("disk.img");
    std::fs::write(&image, vec![0u8; IMAGE_LEN]).expect("image");
    (dir, image)
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// pvstack running the guest workload `guest_args` on the disk `blk`, in
/// the background with its API; returns once the workload runs.
fn start_vm(dir: &ScratchDir, blk: &str, guest_args: &str) -> ApiVm {
    ApiVm::start(
        dir,
        &["--blk", blk, "--guest-args", guest_args],
        "blk-swap-verify: running",
    )
}

/// The one device, blk0, in `info`.
fn blk0(vm: &ApiVm) -> Value {
    let info = vm.info();
    let devices = info["devices"].as_array().expect("info lists devices");
    assert_eq!(devices.len(), 1, "{info:#}");
    assert_eq!(devices[0]["id"], "blk0", "{info:#}");
    devices[0].clone()
}

/// Stops the guest's `blk-swap-verify stop=1` on `image` and waits for
/// pvstack to end; returns the RESULT values.
fn finish(vm: ApiVm, image: &Path) -> std::collections::BTreeMap<String, String> {
    finish_swap_verify(vm, image, BLOCKS)
}

/// The `count` of the device's `swaps` or `reconnects` statistics.
fn count(device: &Value, events: &str) -> u64 {
    device[events]["count"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {events} count: {device:#}"))
}

/// Sends raw bytes to the API socket and returns the first response line.
fn raw_request(api: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(api).expect("connect to the API");
    stream
        .set_read_timeout(Some(HANG_TIMEOUT))
        .expect("read timeout");
    stream.write_all(bytes).expect("send");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("read");
    line
}

/// The guest writes and verifies until the test stops it ([`finish`]),
/// however long the test's swaps or crashes take.
fn guest_args() -> String {
    format!("blk-swap-verify blocks={BLOCKS} stop=1 depth=8")
}

/// Checks the workload's verdict and that the image holds exactly the
/// writes the guest completed.
fn assert_image_matches(image: &Path, result: &std::collections::BTreeMap<String, String>) {
    assert_swap_verify_image(&read_image(image), BLOCKS, result);
}

/// Two pvstack-blk on one image (sockets `a.sock` and `b.sock`) and the
/// guest's workload on blk0, served by the first.
fn two_backends_and_a_vm(
    test: &str,
) -> (ScratchDir, PathBuf, [PathBuf; 2], [BlkProcess; 2], ApiVm) {
    let (dir, image) = scratch_with_image(test);
    let sockets = [dir.path("a.sock"), dir.path("b.sock")];
    let backends = sockets
        .clone()
        .map(|socket| start_backend(&socket, &image, &[]));
    let vm = start_vm(
        &dir,
        &format!("socket={},id=blk0", sockets[0].display()),
        &guest_args(),
    );
    (dir, image, sockets, backends, vm)
}

/// `pvstack ctl device swap blk0 --socket TO FLAGS...`, which must
/// succeed; its result.
fn swap_blk0(vm: &ApiVm, to: &Path, flags: &[&str]) -> Value {
    let mut args = vec!["device", "swap", "blk0", "--socket", utf8(to)];
    args.extend_from_slice(flags);
    vm.ctl_ok(&args)
}

#[test]
fn swap_between_two_pvstack_blk_20_times() {
    let (_dir, image, sockets, _backends, vm) = two_backends_and_a_vm("swap-two-blk");
    for swap in 1..=20 {
        let target = &sockets[swap % 2];
        let out = swap_blk0(&vm, target, &[]);
        assert_eq!(out["device"], "blk0", "{out:#}");
        assert!(out["stall_us"].is_u64(), "{out:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let blk0 = blk0(&vm);
    assert_eq!(count(&blk0, "swaps"), 20, "{blk0:#}");
    assert_eq!(blk0["socket"], utf8(&sockets[0]), "{blk0:#}");
    let result = finish(vm, &image);
    assert_image_matches(&image, &result);
}

/// `device swap --pause-vcpus` stops the vCPUs only for the swap: a
/// running VM runs on (its writes go on past the swap), a VM the API had
/// paused stays paused, and no write is lost.
#[test]
fn a_swap_that_pauses_the_vcpus_leaves_them_as_it_found_them() {
    let (_dir, image, sockets, _backends, vm) = two_backends_and_a_vm("swap-pause-vcpus");
    let swap = |to: &Path| {
        let out = swap_blk0(&vm, to, &["--pause-vcpus"]);
        assert!(out["stall_us"].is_u64(), "{out:#}");
    };
    for round in 1..=6 {
        swap(&sockets[round % 2]);
        assert_eq!(vm.info()["state"], "running");
        wait_for_write_after(&image, BLOCKS, newest_write(&image, BLOCKS));
    }
    vm.ctl_ok(&["pause"]);
    swap(&sockets[1]);
    assert_eq!(vm.info()["state"], "paused");
    vm.ctl_ok(&["resume"]);
    wait_for_write_after(&image, BLOCKS, newest_write(&image, BLOCKS));
    let blk0 = blk0(&vm);
    assert_eq!(count(&blk0, "swaps"), 7, "{blk0:#}");
    assert_eq!(blk0["socket"], utf8(&sockets[1]), "{blk0:#}");
    let result = finish(vm, &image);
    assert_image_matches(&image, &result);
}

#[test]
fn swap_alternating_pvstack_blk_and_qemu_storage_daemon() {
    let (dir, image) = scratch_with_image("swap-blk-qsd");
    let sockets = [dir.path("blk.sock"), dir.path("qsd.sock")];
    let _blk = start_backend(&sockets[0], &image, &[]);
    let _qsd = QsdProcess::start(&image, &sockets[1], 1);
    let vm = start_vm(
        &dir,
        &format!("socket={}", sockets[0].display()),
        &guest_args(),
    );
    for swap in 1..=20 {
        let target = &sockets[swap % 2];
        swap_blk0(&vm, target, &[]);
        // pvstack-blk keeps an inflight log; qemu-storage-daemon 10 offers none.
        let on_pvstack_blk = swap % 2 == 0;
        let blk0 = blk0(&vm);
        assert_eq!(
            blk0["inflight_log"], on_pvstack_blk,
            "after swap {swap}: {blk0:#}"
        );
        assert_eq!(blk0["socket"], utf8(target), "after swap {swap}: {blk0:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let blk0 = blk0(&vm);
    assert_eq!(count(&blk0, "swaps"), 20, "{blk0:#}");
    let result = finish(vm, &image);
    assert_image_matches(&image, &result);
}

#[test]
fn sigkill_pvstack_blk_20_times_during_writes() {
    let (dir, image) = scratch_with_image("swap-sigkill");
    let socket = dir.path("blk.sock");
    let mut backend = start_backend(&socket, &image, &[]);
    let vm = start_vm(&dir, &format!("socket={}", socket.display()), &guest_args());
    let mut log = inflight_log_of(backend.pid());
    let log_inode = log.metadata().expect("inflight log metadata").ino();
    // Per restart: requests the killed backend's log showed in flight, and
    // how many its successor served again.
    let mut counts = Vec::new();
    for crash in 1..=20 {
        std::thread::sleep(Duration::from_millis(150));
        backend.kill();
        // Dead, the backend writes nothing more: this is what it left.
        let left = LogSnapshot::read(&mut log);
        let _ = std::fs::remove_file(&socket);
        backend = start_backend(&socket, &image, &[]);
        wait_until("pvstack reconnects", || {
            count(&blk0(&vm), "reconnects") == crash
        });
        assert_eq!(
            inflight_log_of(backend.pid())
                .metadata()
                .expect("inflight log metadata")
                .ino(),
            log_inode,
            "pvstack gave backend {} another inflight log:\n{}",
            crash + 1,
            backend.log()
        );
        counts.push(served_again_after(&backend, &left, &mut log));
    }
    assert_eq!(blk0(&vm)["inflight_log"], true);
    let result = finish(vm, &image);
    // The last backend's totals, logged when pvstack hung up, agree with
    // what it said it served again.
    backend.wait_for_output("of the requests left by a previous backend)");
    let totals = backend.log();
    let resubmitted: u64 = totals
        .lines()
        .find_map(|line| {
            let (_, rest) = line.split_once(" interrupts (")?;
            let (count, _) = rest.split_once(" of the requests left by a previous backend)")?;
            Some(count)
        })
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no totals line:\n{totals}"));
    assert_eq!(
        Some(resubmitted),
        counts.last().map(|&(_, served)| served),
        "{totals}"
    );
    eprintln!("(in flight at the kill, served again) per restart: {counts:?}");
    assert_image_matches(&image, &result);
}

#[test]
fn sigkill_while_the_log_shows_requests_in_flight_and_they_are_served_again() {
    let (dir, image) = scratch_with_image("swap-sigkill-in-flight");
    let socket = dir.path("blk.sock");
    let mut backend = start_backend(&socket, &image, &[]);
    let vm = start_vm(&dir, &format!("socket={}", socket.display()), &guest_args());
    // Per crash: requests the log showed in flight, and served again.
    let mut counts = Vec::new();
    for crash in 1..=3 {
        let mut log = inflight_log_of(backend.pid());
        let left = stop_with_requests_in_flight(&mut backend, &mut log);
        backend.kill();
        let _ = std::fs::remove_file(&socket);
        backend = start_backend(&socket, &image, &[]);
        wait_until("pvstack reconnects", || {
            count(&blk0(&vm), "reconnects") == crash
        });
        counts.push(served_again_after(&backend, &left, &mut log));
    }
    eprintln!("(in flight at the kill, served again) per crash: {counts:?}");
    let result = finish(vm, &image);
    assert_image_matches(&image, &result);
}

/// Stops `backend` (SIGSTOP) at a moment its inflight `log` shows at least
/// two requests taken and not completed; returns the log as it stands.
/// Tries again (SIGCONT, a short run, SIGSTOP) until it catches one.
fn stop_with_requests_in_flight(backend: &mut BlkProcess, log: &mut File) -> LogSnapshot {
    let pid = backend.pid();
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < HANG_TIMEOUT,
            "pvstack-blk never had two requests in flight when stopped"
        );
        signal(pid, libc::SIGSTOP);
        wait_until("pvstack-blk stops", || all_threads_stopped(pid));
        let snapshot = LogSnapshot::read(log);
        if snapshot.in_flight() >= 2 {
            return snapshot;
        }
        signal(pid, libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(3));
    }
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a process ID; no memory is passed.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

fn all_threads_stopped(pid: u32) -> bool {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("threads");
    tasks.flatten().all(|task| {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // The state follows the parenthesised command name.
        stat.rsplit(") ")
            .next()
            .is_some_and(|rest| rest.starts_with('T'))
    })
}

/// pvstack-blk's inflight log (the memfd pvstack handed it), opened
/// through /proc once the backend holds it.
fn inflight_log_of(pid: u32) -> File {
    wait_until("pvstack-blk maps its inflight log", || {
        find_inflight_log(pid).is_some()
    });
    find_inflight_log(pid).expect("found above")
}

fn find_inflight_log(pid: u32) -> Option<File> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                target
                    .to_string_lossy()
                    .starts_with("/memfd:pvstack-inflight")
            })
        })
        .and_then(|fd| File::open(fd.path()).ok())
}

/// Queue 0's inflight log at one moment, in the vhost-user layout: a
/// 16-byte header (last_batch_head at offset 12, desc_num at 10), then 16
/// bytes per descriptor: the in-flight flag first, the counter (the order
/// it was taken in) at 8.
struct LogSnapshot {
    last_batch_head: u16,
    /// Per descriptor: (in flight, counter).
    states: Vec<(bool, u64)>,
}

impl LogSnapshot {
    fn read(log: &mut File) -> LogSnapshot {
        use std::io::Seek;
        let mut header = [0u8; 16];
        log.rewind().expect("rewind the log");
        log.read_exact(&mut header).expect("log header");
        let desc_num = usize::from(u16::from_le_bytes([header[10], header[11]]));
        let mut states = vec![0u8; 16 * desc_num];
        log.read_exact(&mut states).expect("descriptor states");
        LogSnapshot {
            last_batch_head: u16::from_le_bytes([header[12], header[13]]),
            states: states
                .chunks(16)
                .map(|state| {
                    let counter = state[8..16].try_into().expect("8 bytes");
                    (state[0] == 1, u64::from_le_bytes(counter))
                })
                .collect(),
        }
    }

    /// Requests taken and not completed.
    fn in_flight(&self) -> u64 {
        self.states.iter().filter(|(flag, _)| *flag).count() as u64
    }

    /// Whether the last request the backend began to return is still
    /// logged in flight: if it died after moving the used index and before
    /// clearing the flag, its successor rightly does not serve it again.
    fn last_returned_in_flight(&self) -> bool {
        self.states
            .get(usize::from(self.last_batch_head))
            .is_some_and(|(flag, _)| *flag)
    }

    /// Whether `now` shows every request in flight here done (flag
    /// cleared) or taken again (a new counter): the next backend has
    /// recovered this log.
    fn all_moved_on(&self, now: &LogSnapshot) -> bool {
        self.states
            .iter()
            .zip(&now.states)
            .all(|(&(was, counter), &now)| !was || now != (true, counter))
    }
}

/// Waits until `backend` has recovered the log its killed predecessor
/// `left`, then checks that it served again exactly the requests left in
/// flight: all of them, or all but the one whose completion had reached
/// the used ring (see [`LogSnapshot::last_returned_in_flight`]). Returns
/// (in flight, served again).
fn served_again_after(backend: &BlkProcess, left: &LogSnapshot, log: &mut File) -> (u64, u64) {
    let in_flight = left.in_flight();
    if in_flight > 0 {
        // Recovery logs the count, then serves and returns every one of
        // them before the backend takes anything new.
        wait_until("the new backend recovers the inflight log", || {
            left.all_moved_on(&LogSnapshot::read(log))
        });
    }
    // Nothing in flight: nothing to serve again, and nothing is logged.
    let served = requests_served_again(&backend.log());
    let exact = served == in_flight;
    let all_but_the_returned_one = served + 1 == in_flight && left.last_returned_in_flight();
    assert!(
        exact || all_but_the_returned_one,
        "{in_flight} requests were in flight at the kill (the last returned one among them: {}), \
         the new backend served {served} again:\n{}",
        left.last_returned_in_flight(),
        backend.log()
    );
    (in_flight, served)
}

/// How many requests a pvstack-blk served again from its predecessor's
/// inflight log, from its log.
fn requests_served_again(log: &str) -> u64 {
    log.lines()
        .filter_map(|line| line.split("serving ").nth(1))
        .filter_map(|rest| {
            rest.strip_suffix(" requests a previous backend took and did not complete")
        })
        .filter_map(|count| count.parse::<u64>().ok())
        .sum()
}

#[test]
fn refused_swaps_leave_the_old_backend_serving() {
    let (dir, image) = scratch_with_image("swap-refused");
    let small = dir.path("small.img");
    std::fs::write(&small, vec![0u8; IMAGE_LEN / 2]).expect("small image");
    let socket = dir.path("blk.sock");
    let small_socket = dir.path("small.sock");
    let one_queue = dir.path("one-queue.sock");
    let _blk = start_backend(&socket, &image, &["--num-queues", "2"]);
    let _small = start_backend(&small_socket, &small, &["--num-queues", "2"]);
    let _one = start_backend(&one_queue, &image, &["--num-queues", "1"]);
    let vm = start_vm(
        &dir,
        &format!("socket={}", socket.display()),
        &format!("blk-swap-verify blocks={BLOCKS} stop=1 depth=4 queues=2"),
    );
    let missing = dir.path("missing.sock");
    for (target, reason) in [
        (&missing, "cannot connect"),
        (&small_socket, "sectors"),
        (&one_queue, "queues"),
    ] {
        let error = vm.ctl_refused(&[
            "device",
            "swap",
            "blk0",
            "--socket",
            target.to_str().unwrap(),
        ]);
        assert!(error.contains(reason), "`{reason}` missing: {error}");
    }
    let blk0 = blk0(&vm);
    assert_eq!(blk0["refused_swaps"], 3, "{blk0:#}");
    assert_eq!(count(&blk0, "swaps"), 0, "{blk0:#}");
    assert_eq!(blk0["socket"], utf8(&socket), "{blk0:#}");
    // The old backend goes on serving after the refusals.
    wait_for_write_after(&image, BLOCKS, newest_write(&image, BLOCKS));
    let result = finish(vm, &image);
    assert_image_matches(&image, &result);
}

#[test]
fn api_survives_bad_requests_and_silent_clients() {
    let (dir, image) = scratch_with_image("swap-api");
    let socket = dir.path("blk.sock");
    let _blk = start_backend(&socket, &image, &[]);
    let mut vm = start_vm(
        &dir,
        &format!("socket={}", socket.display()),
        &format!("blk-swap-verify blocks={BLOCKS} secs=600 depth=4"),
    );
    // A silent client first: the server must drop it and serve the next.
    let silent = UnixStream::connect(vm.api()).expect("connect");
    for (request, needle) in [
        (&b"{not json\n"[..], "bad request"),
        (b"{\"command\":\"reboot\"}\n", "unknown variant"),
        (
            b"{\"command\":\"device-swap\",\"id\":\"blk9\",\"socket\":\"/x\"}\n",
            "no device \"blk9\"",
        ),
        (b"{\"command\":\"device-reconnect\"}\n", "missing field"),
        (b"[1,2,3]\n", "bad request"),
    ] {
        let error = refusal(&response(&raw_request(vm.api(), request)));
        assert!(error.contains(needle), "`{needle}` missing: {error}");
    }
    let long = vec![b'x'; 70 * 1024];
    let error = refusal(&response(&raw_request(vm.api(), &long)));
    assert!(error.contains("longer than"), "{error}");
    drop(silent);
    assert_eq!(vm.info()["state"], "running");
    assert_eq!(
        vm.ctl_ok(&["pause"]),
        serde_json::json!({"state": "paused"})
    );
    assert_eq!(vm.info()["state"], "paused");
    assert_eq!(
        vm.ctl_ok(&["resume"]),
        serde_json::json!({"state": "running"})
    );
    assert_eq!(vm.info()["state"], "running");
    let out = vm.ctl_ok(&["device", "reconnect", "blk0"]);
    assert_eq!(out["device"], "blk0", "{out:#}");
    assert!(out["stall_us"].is_u64(), "{out:#}");
    assert_eq!(count(&blk0(&vm), "reconnects"), 1);
    assert_eq!(
        vm.ctl_ok(&["shutdown"]),
        serde_json::json!({"state": "shutting-down"})
    );
    let status = vm.wait();
    assert!(status.success(), "{status}\n{}", vm.log());
}

/// The `backend_pid` of blk0 in `info`.
fn backend_pid(vm: &ApiVm) -> libc::pid_t {
    let blk0 = blk0(vm);
    blk0["backend_pid"]
        .as_i64()
        .and_then(|pid| libc::pid_t::try_from(pid).ok())
        .unwrap_or_else(|| panic!("no backend_pid: {blk0:#}"))
}

#[test]
fn sigkill_of_the_vmms_own_child_restarts_it() {
    let (dir, image) = scratch_with_image("swap-image-child");
    let vm = start_vm(&dir, &format!("image={}", image.display()), &guest_args());
    for crash in 1..=5 {
        std::thread::sleep(Duration::from_millis(200));
        let pid = backend_pid(&vm);
        // SAFETY: kill() with the pid of pvstack's child backend.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        wait_until("pvstack restarts its backend", || {
            count(&blk0(&vm), "reconnects") == crash
        });
        assert_ne!(backend_pid(&vm), pid, "a new child");
    }
    let result = finish(vm, &image);
    assert_image_matches(&image, &result);
}

/// blk0's `backend_state`.
fn backend_state(vm: &ApiVm) -> String {
    let blk0 = blk0(vm);
    blk0["backend_state"]
        .as_str()
        .unwrap_or_else(|| panic!("no backend_state: {blk0:#}"))
        .to_string()
}

/// Waits until blk0 is no longer connected after its backend was killed;
/// it must then be reconnecting, not failed.
fn wait_for_reconnecting(vm: &ApiVm) {
    let mut state = String::new();
    wait_until("pvstack notices the hang-up", || {
        state = backend_state(vm);
        state != "connected"
    });
    assert_eq!(state, "reconnecting", "gave up at once:\n{}", vm.log());
}

#[test]
fn reconnecting_gives_up_after_the_configured_window() {
    const WINDOW: Duration = Duration::from_secs(2);
    let (dir, image) = scratch_with_image("swap-window");
    let socket = dir.path("blk.sock");
    let mut backend = start_backend(&socket, &image, &[]);
    // A second backend listens elsewhere from the start, so that it can
    // appear on the device's socket at a moment the test chooses, in an
    // instant (a rename), rather than after a process start.
    let spare_socket = dir.path("spare.sock");
    let mut spare = start_backend(&spare_socket, &image, &[]);
    let mut vm = start_vm(
        &dir,
        &format!(
            "socket={},reconnect-timeout={}",
            socket.display(),
            WINDOW.as_secs()
        ),
        &guest_args(),
    );

    // Inside the window pvstack keeps trying: a backend that appears
    // while it is reconnecting is taken back.
    backend.kill();
    wait_for_reconnecting(&vm);
    std::fs::rename(&spare_socket, &socket).expect("move the spare backend's socket");
    wait_until("pvstack reconnects to the backend that appeared", || {
        let state = backend_state(&vm);
        assert_ne!(
            state,
            "failed",
            "gave up with a backend listening:\n{}",
            vm.log()
        );
        state == "connected"
    });
    assert_eq!(count(&blk0(&vm), "reconnects"), 1);

    // With nobody listening, it gives up, and not before the window is
    // over: pvstack counts the window from the hang-up it saw, which
    // came after `killed` (a slow test only makes the wait longer).
    let killed = Instant::now();
    spare.kill();
    wait_for_reconnecting(&vm);
    wait_until("the device gives up", || backend_state(&vm) == "failed");
    let gave_up_after = killed.elapsed();
    assert!(
        gave_up_after > WINDOW,
        "gave up {gave_up_after:?} after the hang-up, inside the {WINDOW:?} window:\n{}",
        vm.log()
    );
    assert_eq!(count(&blk0(&vm), "reconnects"), 1);
    assert!(
        vm.log().contains("blk0: gave up reconnecting"),
        "{}",
        vm.log()
    );
    // The guest's requests wait for ever; the VM itself still obeys.
    vm.ctl_ok(&["shutdown"]);
    let status = vm.wait();
    assert!(status.success(), "{status}\n{}", vm.log());
}
