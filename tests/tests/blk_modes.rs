//! Every disk mode (`--blk image=...,mode=...`) on real KVM over real image
//! files: the emulated legacy controller and emulated virtio-blk served in
//! the VMM, vhost-user and vhost-user with polling served by pvstack-blk.
//! Each passes blk-verify and leaves the guest's pattern in the file;
//! `pvstack bench` reports every mode and workload as JSON and a chart;
//! bad mode options are refused with one clear line.

use std::process::Command;
use std::time::Duration;

use pvstack_guest::checksum::fnv1a64;
use pvstack_tests::blk_vm::{
    assert_pattern, assert_zeros, image_spec, pattern_image, read_image, run_with_disks, utf8,
    zeroed_image,
};
use pvstack_tests::{pvstack, run_pvstack, run_to_end_within, ScratchDir};

const MIB: usize = 1 << 20;
const MODES: [&str; 4] = [
    "emulated-legacy",
    "emulated-virtio",
    "vhost-user",
    "vhost-user-poll",
];
const WORKLOADS: [&str; 4] = [
    "4k-randread-qd1",
    "4k-randread-qd32",
    "64k-seqwrite",
    "1m-seqread",
];

/// Bytes blk-verify covers in `mode`: every data word of the legacy
/// controller traps (~25 us each on PVM), so it gets less.
fn verify_len(mode: &str) -> usize {
    if mode == "emulated-legacy" {
        256 * 1024
    } else {
        16 * MIB
    }
}

#[test]
fn every_mode_passes_blk_verify_and_leaves_the_pattern_in_the_image() {
    let dir = ScratchDir::new("blk-modes-verify");
    for (seed, mode) in (11u64..).zip(MODES) {
        let image = dir.path(&format!("{mode}.img"));
        let size = 20 * MIB;
        zeroed_image(&image, size);
        let (offset, len) = (MIB + 3 * 512, verify_len(mode));
        let run = run_with_disks(
            &[image_spec(&image, &[&format!("mode={mode}")])],
            &format!("blk-verify seed={seed} offset={offset} len={len}"),
        );
        assert_eq!(run.code(), 0, "{mode}: {run:#?}");
        let result = run.result("blk-verify");
        assert_eq!(result["bytes"], len.to_string(), "{mode}");
        assert_eq!(result["mismatches"], "0", "{mode}");
        assert_eq!(result["errors"], "0", "{mode}");
        let bytes = read_image(&image);
        assert_pattern(&bytes, seed, offset..offset + len);
        assert_zeros(&bytes, 0..offset);
        assert_zeros(&bytes, offset + len..size);
    }
}

#[test]
fn emulated_modes_read_what_the_host_wrote() {
    let dir = ScratchDir::new("blk-modes-checksum");
    let image = dir.path("disk.img");
    let bytes = pattern_image(&image, 5, 4 * MIB);
    let (offset, len) = (123_457, 100_000);
    let expected = fnv1a64(&bytes[offset..offset + len]);
    for mode in ["emulated-legacy", "emulated-virtio"] {
        let run = run_with_disks(
            &[image_spec(&image, &[&format!("mode={mode}")])],
            &format!("blk-checksum {offset} {len}"),
        );
        assert_eq!(run.code(), 0, "{mode}: {run:#?}");
        assert_eq!(run.result_u64("blk-checksum", "fnv"), expected, "{mode}");
    }
}

#[test]
fn readonly_emulated_disks_refuse_writes_and_keep_the_file() {
    let dir = ScratchDir::new("blk-modes-readonly");
    let image = dir.path("disk.img");
    let before = pattern_image(&image, 9, 2 * MIB);
    for mode in ["emulated-legacy", "emulated-virtio"] {
        let run = run_with_disks(
            &[image_spec(&image, &[&format!("mode={mode}"), "readonly"])],
            "blk-verify len=64K",
        );
        assert_eq!(run.code(), 1, "{mode}: {run:#?}");
        let errors: u64 = run.result("blk-verify")["errors"].parse().unwrap();
        assert!(
            errors > 0,
            "{mode}: writes to a readonly disk must fail: {run:#?}"
        );
        assert_eq!(
            read_image(&image),
            before,
            "{mode} changed a readonly image"
        );
    }
}

/// Repetitions of each bench run: two, so that a row's median, min and max
/// come from different samples and can be checked against them.
const BENCH_REPS: usize = 2;

/// Asserts that `entry[metric]` is the median, min and max of the
/// samples' values of `metric`, all of them present.
fn assert_spread_of_samples(entry: &serde_json::Value, metric: &str) {
    let mut values: Vec<f64> = entry["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .map(|sample| {
            sample[metric]
                .as_f64()
                .unwrap_or_else(|| panic!("a sample without {metric}: {entry:#}"))
        })
        .collect();
    values.sort_by(f64::total_cmp);
    let [low, high] = values[..] else {
        panic!("{BENCH_REPS} samples expected: {entry:#}");
    };
    let spread = &entry[metric];
    for (field, expected) in [("min", low), ("median", (low + high) / 2.0), ("max", high)] {
        let reported = spread[field]
            .as_f64()
            .unwrap_or_else(|| panic!("no {metric} {field}: {entry:#}"));
        // serde_json may read a decimal back one unit in the last place
        // off; a wrong sample or statistic is off by far more.
        assert!(
            (reported - expected).abs() <= 1e-12 * expected.abs(),
            "{metric} {field} is {reported}, its samples make it {expected}: {entry:#}"
        );
    }
}

#[test]
fn bench_reports_every_mode_and_workload_as_json_and_a_chart() {
    let dir = ScratchDir::new("blk-modes-bench");
    let json = dir.path("bench.json");
    let chart = dir.path("bench.svg");
    // 32 one-second runs, each starting a VM (and a backend): several
    // minutes on a loaded host, so more than the usual hang timeout.
    let run = run_to_end_within(
        Command::new(pvstack())
            .args([
                "bench",
                "--reps",
                &BENCH_REPS.to_string(),
                "--duration",
                "1",
                "--image-size",
                "8M",
            ])
            .args(["--image-dir", utf8(&dir.path(""))])
            .args(["--json", utf8(&json), "--chart", utf8(&chart)])
            // pvstack's own modes (the default adds qsd and host, tested in bench.rs).
            .args([
                "--modes",
                &MODES.join(","),
                "--workloads",
                &WORKLOADS.join(","),
            ])
            .env("RUST_LOG", "warn"),
        Duration::from_secs(900),
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report exists"))
            .expect("the JSON report parses");
    let results = report["results"].as_array().expect("results is a list");
    assert_eq!(results.len(), MODES.len() * WORKLOADS.len(), "{report:#}");
    for mode in MODES {
        for workload in WORKLOADS {
            let entry = results
                .iter()
                .find(|r| r["mode"] == mode && r["workload"] == workload)
                .unwrap_or_else(|| panic!("no {mode} {workload} in {report:#}"));
            assert_eq!(entry["samples"].as_array().map(Vec::len), Some(BENCH_REPS));
            for metric in [
                "iops",
                "mbps",
                "exits_per_req",
                "kicks_per_req",
                "interrupts_per_req",
                "cpu_s_per_gib",
            ] {
                assert_spread_of_samples(entry, metric);
            }
            assert!(entry["iops"]["min"].as_f64().unwrap() > 0.0, "{entry:#}");
            assert!(
                run.stdout
                    .lines()
                    .any(|l| l.starts_with(mode) && l.contains(workload)),
                "no table row for {mode} {workload}: {}",
                run.stdout
            );
        }
    }
    // The emulated devices report their interrupts; the guest polls, so
    // the legacy controller (which has none) and every mode stay below one
    // interrupt per request.
    let legacy = &results[0];
    assert_eq!(legacy["mode"], "emulated-legacy");
    assert_eq!(legacy["interrupts_per_req"]["max"], 0.0, "{legacy:#}");
    // Every data word of the legacy controller exits: a 4K read is 1024
    // words plus the command registers.
    assert!(legacy["exits_per_req"]["median"].as_f64().unwrap() >= 1024.0);
    let svg = std::fs::read_to_string(&chart).expect("the chart exists");
    assert!(
        svg.starts_with("<svg"),
        "not an SVG: {}",
        &svg[..svg.len().min(200)]
    );
    for name in MODES.iter().chain(&WORKLOADS) {
        assert!(svg.contains(name), "the chart does not name {name}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path(""))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().ends_with(".img"))
        .collect();
    assert!(leftovers.is_empty(), "the bench left {leftovers:?} behind");
}

#[test]
fn bad_mode_options_are_usage_errors() {
    let dir = ScratchDir::new("blk-modes-bad");
    let image = dir.path("disk.img");
    zeroed_image(&image, MIB);
    let socket = dir.path("none.sock");
    let cases = [
        (image_spec(&image, &["mode=fast"]), "unknown mode \"fast\""),
        (image_spec(&image, &["mode="]), "mode needs a value"),
        (
            format!("socket={},mode=emulated-virtio", utf8(&socket)),
            "needs image=PATH",
        ),
        (
            format!("socket={},mode=emulated-legacy", utf8(&socket)),
            "needs image=PATH",
        ),
        (
            format!("socket={},mode=vhost-user-poll", utf8(&socket)),
            "needs image=PATH",
        ),
        (
            image_spec(&image, &["mode=emulated-legacy", "num-queues=2"]),
            "has no queues",
        ),
    ];
    for (spec, expected) in cases {
        let run = run_pvstack(&["run", "--blk", &spec, "--guest-args", "hello"]);
        assert_eq!(run.code(), 2, "{spec}: {run:#?}");
        assert!(run.stderr.contains(expected), "{spec}: {}", run.stderr);
        assert_eq!(
            run.stderr.trim().lines().count(),
            1,
            "{spec}: {}",
            run.stderr
        );
    }
    for args in [
        &["bench", "--modes", "emulated-legacy,turbo"][..],
        &["bench", "--workloads", "8k-randwrite"],
        &["bench", "--reps", "0"],
        &["bench", "--image-size", "1M"],
    ] {
        let run = run_pvstack(args);
        assert_eq!(run.code(), 2, "{args:?}: {run:#?}");
        assert_eq!(
            run.stderr.trim().lines().count(),
            1,
            "{args:?}: {}",
            run.stderr
        );
    }
}

#[test]
fn emulated_disk_with_a_missing_image_is_a_clear_runtime_error() {
    let dir = ScratchDir::new("blk-modes-missing");
    let image = dir.path("absent.img");
    for mode in ["emulated-legacy", "emulated-virtio"] {
        let run = run_pvstack(&[
            "run",
            "--blk",
            &image_spec(&image, &[&format!("mode={mode}")]),
            "--guest-args",
            "hello",
        ]);
        assert_eq!(run.code(), 1, "{mode}: {run:#?}");
        assert!(
            run.stderr.contains("absent.img") && run.stderr.contains("cannot open image"),
            "{mode}: {}",
            run.stderr
        );
    }
}
