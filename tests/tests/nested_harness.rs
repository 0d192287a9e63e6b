//! scripts/nested-run itself: bad input refused in one line before anything
//! boots, a hung L1 killed and reported, an L1 that resets or powers off
//! by itself reported with QEMU's reason, an L2's triple fault traced, and
//! a command's exit status, its working directory and the files given with
//! --file reaching the L1; and
//! scripts/bench-linux-boot, which runs on it, refusing bad usage.

use std::process::Command;

use pvstack_tests::nested::harness;
use pvstack_tests::{run_to_end, target_profile_dir, ScratchDir};

fn nested_run(args: &[&str]) -> pvstack_tests::Finished {
    run_to_end(
        Command::new(harness())
            .arg("--bin-dir")
            .arg(target_profile_dir())
            .args(args),
    )
}

#[test]
fn bad_input_is_refused_in_one_line() {
    let scratch = ScratchDir::new("nested-bad-input");
    let file = scratch.path("file");
    std::fs::write(&file, b"x").unwrap();
    let file = file.to_str().unwrap();
    let to_dev = format!("{file}:/dev/file");
    let relative = format!("{file}:file");
    for (args, needle) in [
        (vec!["--frobnicate", "true"], "unknown option --frobnicate"),
        (vec![], "no COMMAND and no --script FILE"),
        (
            vec!["--memory", "2G", "true"],
            "--memory needs a size in MiB",
        ),
        (vec!["--cpus", "0", "true"], "--cpus needs a count"),
        (vec!["--timeout"], "--timeout needs a number of seconds"),
        (vec!["--script", "/nonexistent/l1.sh"], "no such file"),
        (
            vec!["--script", file, "true"],
            "either --script FILE or a COMMAND",
        ),
        (
            vec!["--file", &to_dev, "true"],
            "mounts a file system over /dev/file",
        ),
        (vec!["--file", &relative, "true"], "is not absolute"),
    ] {
        let run = nested_run(&args);
        run.assert_error("nested-run", 2, &[needle]);
        assert!(run.stdout.is_empty(), "{run:#?}");
    }
    let missing_file = nested_run(&["--file", "/nonexistent/file", "true"]);
    missing_file.assert_error("nested-run", 1, &["/nonexistent/file does not exist"]);
    let empty = scratch.path("no-binaries");
    std::fs::create_dir(&empty).unwrap();
    let no_binaries = run_to_end(
        Command::new(harness())
            .arg("--bin-dir")
            .arg(&empty)
            .arg("true"),
    );
    no_binaries.assert_error(
        "nested-run",
        1,
        &[
            "pvstack is missing",
            "cargo build --workspace --release --bins",
        ],
    );
}

#[test]
fn a_hung_l1_is_killed_and_reported() {
    let run = nested_run(&["--timeout", "5", "sleep", "1000"]);
    run.assert_error("nested-run", 1, &["still ran after 5s", "killed QEMU"]);
    assert!(!run.stdout.contains("NESTED-EXIT"), "{run:#?}");
}

#[test]
fn an_l1_that_stops_by_itself_is_reported_with_qemus_reason() {
    // The magic SysRq key: `b` resets the L1 at once, `o` powers it off,
    // neither from the command's own exit.
    for (key, reason) in [("b", "guest-reset"), ("o", "guest-shutdown")] {
        let command =
            format!("echo 1 >/proc/sys/kernel/sysrq; echo {key} >/proc/sysrq-trigger; sleep 60");
        let run = nested_run(&["sh", "-c", &command]);
        run.assert_error(
            "nested-run",
            1,
            &[
                "the L1 stopped before the command finished",
                &format!("QEMU's shutdown reason: {reason}"),
            ],
        );
        assert!(!run.stdout.contains("NESTED-EXIT"), "{run:#?}");
    }
}

#[test]
fn an_l2_triple_fault_is_traced_with_where_it_happened() {
    // The `fault` workload of pvstack's own guest ends in a triple fault.
    // KVM resets the vCPU's registers on that exit; the trace keeps them.
    let run = nested_run(&["pvstack", "run", "--guest-args", "fault"]);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(run.stdout.contains("stopped: triple fault"), "{run:#?}");
    let traced: Vec<&str> = run
        .stdout
        .lines()
        .filter(|line| line.starts_with("NESTED-L2-SHUTDOWN "))
        .collect();
    assert_eq!(traced.len(), 1, "{run:#?}");
    assert!(
        traced[0].contains("kvm_exit: vcpu 0 reason shutdown rip 0x"),
        "{run:#?}"
    );
    assert!(traced[0].contains(" intr_info 0x"), "{run:#?}");
}

#[test]
fn status_directory_and_files_reach_the_l1() {
    let scratch = ScratchDir::new("nested-files");
    let data = scratch.path("data.bin");
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(&data, &bytes).unwrap();
    let spec = format!("{}:/tmp/in-l1/data.bin", data.display());
    let host_cwd = std::env::current_dir().unwrap();
    let run = nested_run(&[
        "--file",
        &spec,
        "sh",
        "-c",
        "echo \"cwd $PWD\"; md5sum /tmp/in-l1/data.bin; echo 'quoted  words'; exit 3",
    ]);
    assert_eq!(run.code(), 3, "{run:#?}");
    assert!(run.stderr.is_empty(), "{run:#?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines.contains(&"NESTED-EXIT 3"), "{run:#?}");
    assert!(
        lines.contains(&format!("cwd {}", host_cwd.display()).as_str()),
        "{run:#?}"
    );
    assert!(lines.contains(&"quoted  words"), "{run:#?}");
    assert!(!run.stdout.contains("NESTED-L2-SHUTDOWN"), "{run:#?}");
    let host_md5 = Command::new("md5sum").arg(&data).output().unwrap();
    let host_md5 = String::from_utf8_lossy(&host_md5.stdout);
    let digest = host_md5.split_whitespace().next().unwrap();
    assert!(
        lines.contains(&format!("{digest}  /tmp/in-l1/data.bin").as_str()),
        "{run:#?}"
    );
}

#[test]
fn linux_boot_bench_refuses_bad_usage_in_one_line() {
    let bench =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench-linux-boot");
    for (args, needle) in [
        (vec!["--reps", "0"], "--reps needs a count"),
        (vec!["--memory", "lots"], "--memory needs MiB"),
        (vec!["--cpus"], "--cpus needs a count"),
        (vec!["--fast"], "unknown argument --fast"),
    ] {
        let run = run_to_end(Command::new(&bench).args(&args));
        run.assert_error("bench-linux-boot", 2, &[needle]);
        assert!(run.stdout.is_empty(), "{run:#?}");
    }
}
