//! `pvstack bench` against its peers on a real disk: pvstack-blk next to
//! qemu-storage-daemon and fio on the host, on an image under /var/tmp
//! (not a tmpfs), interleaved, with every ratio consistent with the
//! medians; the image is made safely and removed (also on SIGTERM); the
//! background load runs and stops; a missing fio and other bad input are
//! one clear line. No timing value is a pass/fail criterion.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pvstack_tests::{
    pvstack, run_pvstack, run_to_end_within, send_signal, wait_or_kill_after, Finished,
};
use serde_json::Value;

/// Longest a whole short benchmark may take before it counts as hung (not
/// a performance limit: each run measures for a second).
const BENCH_HANG_TIMEOUT: Duration = Duration::from_secs(900);

/// A fresh directory under /var/tmp, which is on the root disk on the
/// project's machines (the test checks that the bench agrees), removed on
/// drop.
struct DiskDir(PathBuf);

impl DiskDir {
    fn new(test: &str) -> DiskDir {
        let dir = PathBuf::from(format!(
            "/var/tmp/pvstack-test-{}-{test}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("can create a directory in /var/tmp");
        DiskDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Entries the bench made here (its private directories).
    fn bench_leftovers(&self) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .expect("the test directory is readable")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("pvstack-bench."))
            .collect()
    }
}

impl Drop for DiskDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read(path).expect("the JSON report exists");
    serde_json::from_slice(&text).expect("the JSON report parses")
}

fn row<'a>(report: &'a Value, mode: &str, workload: &str) -> &'a Value {
    report["results"]
        .as_array()
        .expect("results is a list")
        .iter()
        .find(|r| r["mode"] == mode && r["workload"] == workload)
        .unwrap_or_else(|| panic!("no {mode} {workload} row in {report:#}"))
}

fn median(row: &Value, metric: &str) -> f64 {
    row[metric]["median"]
        .as_f64()
        .unwrap_or_else(|| panic!("no {metric} median in {row:#}"))
}

const MODES: [&str; 3] = ["vhost-user", "qsd", "host"];
const WORKLOADS: [&str; 3] = ["4k-randread-qd1", "4k-randread-qd32", "4k-randread-qd32-2q"];

#[test]
fn bench_on_a_disk_compares_pvstack_with_qsd_and_the_host() {
    let dir = DiskDir::new("bench-disk");
    let json = dir.path().join("bench.json");
    // A file planted where the old bench put its image, and a symbolic
    // link to it at that predictable path (/DIR/pvstack-bench-PID.img): sh
    // plants it for its own pid, then execs pvstack under the same pid.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"must stay as it is").unwrap();
    let script = format!(
        "ln -s '{}' '{}/pvstack-bench-'$$.img && exec \"$0\" \"$@\"",
        utf8(&victim),
        utf8(dir.path())
    );
    let run = run_to_end_within(
        Command::new("sh")
            .arg("-c")
            .arg(&script)
            .arg(pvstack())
            .args([
                "bench",
                "--reps",
                "2",
                "--duration",
                "1",
                "--image-size",
                "16M",
            ])
            .args(["--image-dir", utf8(dir.path())])
            .args(["--modes", &MODES.join(",")])
            .args(["--workloads", &WORKLOADS.join(",")])
            .args(["--json", utf8(&json)])
            .env("RUST_LOG", "warn"),
        BENCH_HANG_TIMEOUT,
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    let report = read_json(&json);

    // Every row ran, on the disk, with O_DIRECT.
    assert_eq!(report["storage"]["kind"], "disk", "{report:#}");
    assert_eq!(report["storage"]["direct"], true, "{report:#}");
    assert_eq!(report["qsd"]["cache_direct"], true, "{report:#}");
    assert_eq!(report["fio"]["direct"], true, "{report:#}");
    assert_eq!(
        report["results"].as_array().map(Vec::len),
        Some(MODES.len() * WORKLOADS.len()),
        "{report:#}"
    );
    for mode in MODES {
        for workload in WORKLOADS {
            let r = row(&report, mode, workload);
            assert!(median(r, "iops") > 0.0, "{r:#}");
            assert_eq!(r["direct"], true, "{r:#}");
            let samples = r["samples"].as_array().expect("samples");
            assert_eq!(samples.len(), 2, "{r:#}");
            assert!(samples.iter().all(|s| s["ios"].as_u64() > Some(0)), "{r:#}");
            assert!(
                run.stdout
                    .lines()
                    .any(|l| l.starts_with(mode) && l.contains(workload)),
                "no table row for {mode} {workload}: {}",
                run.stdout
            );
        }
    }

    // Every row but the host's is compared with the host and (but qsd's)
    // with qsd, every mode's two queues with its one, and every ratio is
    // its two medians divided.
    let ratios = report["ratios"].as_array().expect("ratios is a list");
    let find = |mode: &str, workload: &str, base_mode: &str, base_workload: &str| {
        ratios.iter().find(|r| {
            r["numerator"]["mode"] == mode
                && r["numerator"]["workload"] == workload
                && r["denominator"]["mode"] == base_mode
                && r["denominator"]["workload"] == base_workload
        })
    };
    for workload in WORKLOADS {
        for (mode, baselines) in [("vhost-user", &["host", "qsd"][..]), ("qsd", &["host"])] {
            for baseline in baselines {
                assert!(
                    find(mode, workload, baseline, workload).is_some(),
                    "no {mode} / {baseline} ratio for {workload}: {report:#}"
                );
            }
        }
    }
    for mode in MODES {
        assert!(
            find(mode, "4k-randread-qd32-2q", mode, "4k-randread-qd32").is_some(),
            "no two-queue scaling ratio for {mode}: {report:#}"
        );
    }
    for ratio in ratios {
        let top = row(
            &report,
            ratio["numerator"]["mode"].as_str().unwrap(),
            ratio["numerator"]["workload"].as_str().unwrap(),
        );
        let bottom = row(
            &report,
            ratio["denominator"]["mode"].as_str().unwrap(),
            ratio["denominator"]["workload"].as_str().unwrap(),
        );
        let metric = ratio["metric"].as_str().expect("metric");
        let expected = median(top, metric) / median(bottom, metric);
        let value = ratio["value"].as_f64().expect("value");
        assert!(
            (value - expected).abs() <= 1e-9 * expected.abs(),
            "{ratio:#}: expected {expected}"
        );
    }
    assert!(run.stdout.contains("vs host") && run.stdout.contains("vs qsd"));

    // The modes ran interleaved: each repetition ran each workload on all
    // of them, in the opposite order to the repetition before.
    let order = report["run_order"].as_array().expect("run_order is a list");
    assert_eq!(order.len(), 2 * WORKLOADS.len(), "{order:#?}");
    for workload in WORKLOADS {
        let groups: Vec<Vec<&str>> = order
            .iter()
            .filter(|g| g["workload"] == workload)
            .map(|g| {
                g["modes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m.as_str().unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(groups.len(), 2, "{order:#?}");
        assert_eq!(groups[0], MODES, "{order:#?}");
        let reversed: Vec<&str> = MODES.iter().rev().copied().collect();
        assert_eq!(groups[1], reversed, "{order:#?}");
    }

    // The image lived in a private directory that is gone, and the link
    // planted at the old path was neither followed nor touched.
    let image = PathBuf::from(report["image"].as_str().expect("image path"));
    let private = image.parent().expect("the image has a directory");
    assert_eq!(private.parent(), Some(dir.path()), "{}", image.display());
    assert!(!image.exists() && !private.exists(), "{}", image.display());
    assert!(
        dir.bench_leftovers().is_empty(),
        "{:?}",
        dir.bench_leftovers()
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"must stay as it is");
    let planted: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("pvstack-bench-")
        })
        .collect();
    assert_eq!(planted.len(), 1, "the planted link is still there");
    assert_eq!(std::fs::read_link(planted[0].path()).unwrap(), victim);
}

/// Threads of `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|comm| comm.starts_with(prefix))
        .count()
}

#[test]
fn background_load_spins_during_the_runs_and_stops() {
    let dir = DiskDir::new("bench-load");
    let json = dir.path().join("bench.json");
    let mut child = Command::new(pvstack())
        .args([
            "bench",
            "--reps",
            "2",
            "--duration",
            "2",
            "--image-size",
            "8M",
        ])
        .args(["--image-dir", "/dev/shm"])
        .args(["--modes", "vhost-user,host"])
        .args(["--workloads", "4k-randread-qd1"])
        .args(["--background-load", "2", "--json", utf8(&json)])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pvstack starts");
    // While it runs, the bench has its two spinning threads.
    let mut most = 0;
    let started = Instant::now();
    while child.try_wait().expect("waitpid works").is_none()
        && started.elapsed() < BENCH_HANG_TIMEOUT
    {
        most = most.max(threads_named(child.id(), "bench-load-"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = wait_or_kill_after(&mut child, Duration::from_secs(1)).expect("the bench ended");
    assert!(status.success(), "{status}");
    assert_eq!(most, 2, "bench-load threads seen while it ran");
    let report = read_json(&json);
    let load = &report["background_load"];
    assert_eq!(load["threads"], 2, "{load}");
    assert!(load["cpu_seconds"].as_f64().unwrap() > 0.0, "{load}");
    assert_eq!(load["threads_left_after_stop"], 0, "{load}");
    for mode in ["vhost-user", "host"] {
        assert!(median(row(&report, mode, "4k-randread-qd1"), "iops") > 0.0);
    }
    // A tmpfs image: nothing bypasses the page cache there.
    assert_eq!(report["storage"]["kind"], "tmpfs", "{report:#}");
    assert_eq!(report["storage"]["direct"], false, "{report:#}");
}

#[test]
fn sigterm_stops_the_bench_its_peer_and_removes_the_image() {
    let dir = DiskDir::new("bench-sigterm");
    let log = dir.path().join("bench.log");
    let mut child = Command::new(pvstack())
        .args([
            "bench",
            "--reps",
            "1",
            "--duration",
            "60",
            "--image-size",
            "8M",
        ])
        .args(["--image-dir", utf8(dir.path())])
        .args(["--modes", "qsd", "--workloads", "4k-randread-qd1"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("the log file"))
        .spawn()
        .expect("pvstack starts");
    // Wait until qemu-storage-daemon serves the run's VM.
    let started = Instant::now();
    let qsd = loop {
        let found = children_of(child.id())
            .into_iter()
            .find(|&pid| command_name(pid).starts_with("qemu-storage"));
        let vm_running = children_of(child.id())
            .into_iter()
            .any(|pid| command_name(pid) == "pvstack");
        if let (Some(qsd), true) = (found, vm_running) {
            break qsd;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the bench ended before its run started"
        );
        assert!(started.elapsed() < BENCH_HANG_TIMEOUT, "no qsd run started");
        std::thread::sleep(Duration::from_millis(20));
    };
    send_signal(&child, libc::SIGTERM);
    let status = wait_or_kill_after(&mut child, Duration::from_secs(120))
        .expect("the bench ends on SIGTERM");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    assert!(status.signal().is_none());
    assert!(
        !Path::new(&format!("/proc/{qsd}")).exists(),
        "qemu-storage-daemon {qsd} outlived the bench"
    );
    // qsd stopped on SIGTERM, not on the SIGKILL that follows a refusal.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("ignored SIGTERM"), "{log}");
    assert!(
        dir.bench_leftovers().is_empty(),
        "{:?}",
        dir.bench_leftovers()
    );
}

/// Pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
                    rest.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn command_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn a_missing_fio_is_one_clear_line_and_leaves_nothing() {
    let dir = DiskDir::new("bench-nofio");
    let empty = dir.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let run = run_to_end_within(
        Command::new(pvstack())
            .args([
                "bench",
                "--reps",
                "1",
                "--duration",
                "1",
                "--image-size",
                "4M",
            ])
            .args(["--image-dir", utf8(dir.path())])
            .args([
                "--modes",
                "vhost-user,host",
                "--workloads",
                "4k-randread-qd1",
            ])
            .env("PATH", &empty)
            .env("RUST_LOG", "warn"),
        BENCH_HANG_TIMEOUT,
    );
    assert_bench_error(&run, 1, &["fio is not installed", "install-deps"]);
    assert!(
        dir.bench_leftovers().is_empty(),
        "{:?}",
        dir.bench_leftovers()
    );
}

#[test]
fn bad_bench_input_is_one_clear_line() {
    let dir = DiskDir::new("bench-bad");
    let missing = dir.path().join("absent");
    let run = run_pvstack(&[
        "bench",
        "--workloads",
        "4k-randread-qd1",
        "--modes",
        "host",
        "--image-dir",
        utf8(&missing),
    ]);
    assert_bench_error(&run, 1, &["absent"]);
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let run = run_pvstack(&[
        "bench",
        "--workloads",
        "4k-randread-qd1",
        "--modes",
        "host",
        "--image-dir",
        utf8(&file),
    ]);
    assert_bench_error(&run, 1, &["a-file"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    for args in [
        &["bench", "--modes", "qsd,warp"][..],
        &["bench", "--modes", ""],
        &["bench", "--workloads", "4k-randread-qd64"],
        &["bench", "--background-load", "-1"],
        &["bench", "--background-load", "many"],
        &["bench", "--background-load", "257"],
    ] {
        let run = run_pvstack(args);
        assert_eq!(run.code(), 2, "{args:?}: {run:#?}");
        run.assert_stderr_one_line();
    }
}

/// The bench failed with `code` and one `pvstack: error:` line holding
/// every one of `needles`, and printed no table.
fn assert_bench_error(run: &Finished, code: i32, needles: &[&str]) {
    run.assert_error("pvstack", code, needles);
    run.assert_stderr_one_line();
    assert!(run.stdout.is_empty(), "{run:#?}");
}
