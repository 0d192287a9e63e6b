//! The guest shell on a virtio-console served by pvstack-console, driven
//! as a person would through the console server's Unix socket (`--console
//! unix=PATH`, or a pvstack-console the test runs itself): commands,
//! a 1 MiB paste, clients attaching and detaching, a flooding client, and
//! a backend killed and restarted mid-output.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use pvstack_guest::checksum::fnv1a64;
use pvstack_tests::process::Background;
use pvstack_tests::{
    binary, guest_image, pvstack, wait_or_kill, Finished, ScratchDir, HANG_TIMEOUT,
};

/// What one client has received so far, with a signal for each arrival.
type Received = Arc<(Mutex<Vec<u8>>, Condvar)>;

/// One person at the console: a connection to the console server.
struct Client {
    stream: UnixStream,
    received: Received,
    reader: Option<JoinHandle<()>>,
}

impl Client {
    /// Connects to the console server at `path`, waiting for it to appear.
    fn attach(path: &Path) -> Client {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if started.elapsed() > HANG_TIMEOUT => {
                    panic!("console server {} never came up: {e}", path.display())
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        let received: Received = Arc::default();
        let mut source = stream.try_clone().expect("clone the client socket");
        let sink = Arc::clone(&received);
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n @ 1..) = source.read(&mut buf) {
                let (bytes, arrived) = &*sink;
                bytes.lock().unwrap().extend_from_slice(&buf[..n]);
                arrived.notify_all();
            }
        });
        Client {
            stream,
            received,
            reader: Some(reader),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to the console");
    }

    fn type_line(&mut self, line: &str) {
        self.send(format!("{line}\n").as_bytes());
    }

    /// Everything received, with the terminal's carriage returns removed.
    fn text(&self) -> String {
        let bytes = self.received.0.lock().unwrap();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }

    /// Waits until `done` finds what it looks for in the text received.
    fn wait_until<T>(&self, what: &str, done: impl Fn(&str) -> Option<T>) -> T {
        let started = Instant::now();
        let (bytes, arrived) = &*self.received;
        let mut guard = bytes.lock().unwrap();
        loop {
            // Look at a copy, so the reader is not held up meanwhile (a
            // client that stops reading for long is detached).
            let copy = guard.clone();
            drop(guard);
            let text = String::from_utf8_lossy(&copy).replace('\r', "");
            if let Some(found) = done(&text) {
                return found;
            }
            if started.elapsed() > HANG_TIMEOUT {
                panic!("never saw {what}; received so far:\n{text}");
            }
            guard = bytes.lock().unwrap();
            if guard.len() == copy.len() {
                guard = arrived
                    .wait_timeout(guard, Duration::from_millis(200))
                    .unwrap()
                    .0;
            }
        }
    }

    /// Waits until `needle` has been received `count` times; returns the text.
    fn wait_for_count(&self, needle: &str, count: usize) -> String {
        self.wait_until(&format!("{needle:?} x{count}"), |text| {
            (text.matches(needle).count() >= count).then(|| text.to_string())
        })
    }

    /// Waits for a whole line starting with `prefix`; returns it.
    fn wait_for_line(&self, prefix: &str) -> String {
        self.wait_until(&format!("a line {prefix:?}..."), |text| {
            let start = text.find(prefix)?;
            let end = text[start..].find('\n')?;
            Some(text[start..start + end].to_string())
        })
    }

    fn wait_for(&self, needle: &str) -> String {
        self.wait_for_count(needle, 1)
    }

    /// Hangs up and waits for the reader to see it.
    fn detach(mut self) -> String {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            reader.join().expect("client reader");
        }
        self.text()
    }

    /// Waits for the server to hang up (the backend went away).
    fn wait_closed(mut self) -> String {
        if let Some(reader) = self.reader.take() {
            reader.join().expect("client reader");
        }
        self.text()
    }
}

/// A running `pvstack run` whose output (the hypercall console, and
/// warnings) goes to a file the test can watch.
struct Vm(Background);

impl Vm {
    fn start(log: &Path, args: &[&str]) -> Vm {
        let mut command = Command::new(pvstack());
        command.arg("run").args(args).env("RUST_LOG", "warn");
        Vm(Background::start("pvstack", command, log))
    }

    /// Waits until the output contains `needle`.
    fn wait_for(&mut self, needle: &str) {
        self.0.wait_for(needle);
    }

    fn finish(self) -> Finished {
        self.0.finish()
    }
}

/// The guest shell on the console `console`, with the output in `log`.
fn shell_vm(log: &Path, console: &str, extra: &[&str]) -> Vm {
    let image = guest_image();
    let mut args = vec![
        "--kernel",
        image.to_str().expect("UTF-8 path"),
        "--guest-args",
        "shell",
        "--console",
        console,
    ];
    args.extend_from_slice(extra);
    Vm::start(log, &args)
}

#[test]
fn shell_commands_print_what_they_should() {
    let dir = ScratchDir::new("console-commands");
    let disk = dir.path("disk.img");
    let mut contents = vec![0u8; 1 << 20];
    contents[1024..1024 + 13].copy_from_slice(b"sector two ok");
    fs::write(&disk, &contents).unwrap();
    let server = dir.path("console.sock");
    let blk = format!("image={}", disk.display());
    let console = format!("unix={}", server.display());
    let vm = shell_vm(&dir.path("vm.log"), &console, &["--blk", &blk]);
    let mut person = Client::attach(&server);
    person.wait_for("pvstack> ");

    person.type_line("help");
    let text = person.wait_for("exit N ");
    for command in [
        "info",
        "devices",
        "blk read",
        "blk write",
        "stats",
        "echo",
        "paste-check",
    ] {
        assert!(text.contains(command), "help lacks {command}:\n{text}");
    }
    person.type_line("echo hello   there");
    person.wait_for("\nhello   there\n");
    person.type_line("info");
    let text = person.wait_for("cmdline: shell");
    assert!(text.contains("cpus: 1"), "{text}");
    assert!(text.contains("memory: 256 MiB"), "{text}");
    person.type_line("devices");
    let text = person.wait_for("virtio-console index 0");
    assert!(text.contains("2 devices"), "{text}");
    assert!(text.contains("0: virtio-blk index 0"), "{text}");
    person.type_line("blk read 2 1");
    let text = person.wait_for("|sector two ok");
    assert!(
        text.contains(
            "00000400: 73 65 63 74 6f 72 20 74 77 6f 20 6f 6b 00 00 00 |sector two ok...|"
        ),
        "{text}"
    );
    person.type_line("blk write 5 hello from  the shell");
    person.wait_for("wrote 21 bytes to sector 5");
    person.type_line("blk read 5 1");
    let text = person.wait_for("00000a10: ");
    assert!(text.contains("|hello from  the |"), "{text}");
    person.type_line("bogus");
    person.wait_for("bogus: unknown command");
    person.type_line("stats");
    let text = person.wait_for("kicks: console ");
    let kicks_line = text.lines().find(|l| l.starts_with("kicks:")).unwrap();
    let blk_kicks: u64 = kicks_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(blk_kicks >= 1, "three disk requests so far: {kicks_line}");
    assert!(text.contains("exits "), "{text}");
    // Backspace edits the line before it runs.
    person.send(b"echo typoo\x7f\x7f\n");
    person.wait_for("\ntyp\n");
    person.type_line("exit 7");

    let run = vm.finish();
    assert_eq!(run.code(), 7, "{run:#?}");
    assert_eq!(run.result("shell")["lost_lines"], "0", "{run:#?}");
    let image = fs::read(&disk).unwrap();
    assert_eq!(&image[5 * 512..5 * 512 + 21], b"hello from  the shell");
    assert!(image[5 * 512 + 21..6 * 512].iter().all(|&b| b == 0));
}

/// Printable bytes with newlines, different on every line.
fn paste_text(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if i % 97 == 96 {
                b'\n'
            } else {
                b' ' + (state % 95) as u8
            }
        })
        .collect()
}

#[test]
fn one_mib_paste_round_trips() {
    let dir = ScratchDir::new("console-paste");
    let server = dir.path("console.sock");
    let vm = shell_vm(
        &dir.path("vm.log"),
        &format!("unix={}", server.display()),
        &[],
    );
    let mut person = Client::attach(&server);
    person.wait_for("pvstack> ");
    let paste = paste_text(1 << 20);
    person.type_line(&format!("paste-check {}", paste.len()));
    person.send(&paste);
    let line = person.wait_for_line("paste-check bytes=");
    let expected = format!(
        "paste-check bytes={} fnv={:#018x}",
        paste.len(),
        fnv1a64(&paste)
    );
    assert_eq!(line, expected);
    // The shell still takes commands after the paste.
    person.type_line("echo after paste");
    person.wait_for("\nafter paste\n");
    person.type_line("exit 0");
    let run = vm.finish();
    assert_eq!(run.code(), 0, "{run:#?}");
}

#[test]
fn clients_detach_and_reattach_mid_session() {
    let dir = ScratchDir::new("console-attach");
    let server = dir.path("console.sock");
    let vm = shell_vm(
        &dir.path("vm.log"),
        &format!("unix={}", server.display()),
        &[],
    );
    let mut first = Client::attach(&server);
    first.wait_for("pvstack> ");
    first.type_line("echo one-1");
    first.wait_for("\none-1\n");
    first.detach();

    // A late client sees the recent output, then takes over the typing.
    let mut second = Client::attach(&server);
    second.wait_for("\none-1\n");
    second.type_line("echo two-2");
    second.wait_for("\ntwo-2\n");

    // The first one comes back: history, then live output shared by both.
    let mut again = Client::attach(&server);
    let text = again.wait_for("\ntwo-2\n");
    assert!(text.contains("\none-1\n"), "{text}");
    again.type_line("echo three-3");
    second.wait_for("\nthree-3\n");
    again.wait_for("\nthree-3\n");
    second.type_line("echo four-4");
    again.wait_for("\nfour-4\n");
    again.type_line("exit 0");
    let run = vm.finish();
    assert_eq!(run.code(), 0, "{run:#?}");
}

#[test]
fn flooding_client_does_not_wedge_the_guest() {
    let dir = ScratchDir::new("console-flood");
    let server = dir.path("console.sock");
    let vm = shell_vm(
        &dir.path("vm.log"),
        &format!("unix={}", server.display()),
        &[],
    );
    let mut reader = Client::attach(&server);
    reader.wait_for("pvstack> ");
    let mut flooder = Client::attach(&server);
    const FLOOD_LINES: usize = 20_000;
    let flood = thread::spawn(move || {
        for i in 0..FLOOD_LINES {
            flooder.type_line(&format!("echo flood {i} {}", "x".repeat(100)));
        }
        flooder
    });
    // Meanwhile the other client's commands keep being answered.
    for i in 0..20 {
        reader.type_line(&format!("echo marker-{i}-end"));
        reader.wait_for(&format!("marker-{i}-end\n"));
    }
    let flooder = flood.join().expect("flooder");
    flooder.wait_for("flood 19999 ");
    reader.type_line("exit 0");
    let run = vm.finish();
    assert_eq!(run.code(), 0, "{run:#?}");
    let seen = reader.detach();
    assert!(
        seen.matches("\nflood ").count() > FLOOD_LINES / 2,
        "the reader saw the flood too"
    );
}

/// A pvstack-console the test runs itself, on the same two sockets each time.
fn start_backend(socket: &Path, server: &Path, log: &Path) -> Child {
    Command::new(binary("pvstack-console"))
        .arg("--socket")
        .arg(socket)
        .arg("--listen")
        .arg(server)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).expect("backend log"))
        .spawn()
        .expect("start pvstack-console")
}

fn wait_for_path(path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < HANG_TIMEOUT,
            "{} never appeared",
            path.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn killed_backend_is_replaced_and_lost_lines_are_reported() {
    let dir = ScratchDir::new("console-restart");
    let socket = dir.path("vhost-user.sock");
    let server = dir.path("console.sock");
    let mut backend = start_backend(&socket, &server, &dir.path("backend1.log"));
    wait_for_path(&socket);
    let mut vm = shell_vm(
        &dir.path("vm.log"),
        &format!("socket={}", socket.display()),
        &[],
    );
    let mut person = Client::attach(&server);
    person.wait_for("pvstack> ");
    const TICKS: usize = 400;
    person.type_line(&format!("ticks {TICKS} 5"));
    person.wait_for("tick 20\n");
    backend.kill().expect("SIGKILL pvstack-console");
    backend.wait().expect("reap pvstack-console");
    let before = person.wait_closed();
    // The backend stays down until the guest's transmit ring has filled
    // up and the shell has begun to drop lines.
    vm.wait_for("shell: console output stalled for 100 ms; dropping lines");
    let mut backend = start_backend(&socket, &server, &dir.path("backend2.log"));
    let mut person = Client::attach(&server);
    let after = person.wait_for("ticks done");
    person.type_line("echo back again");
    person.wait_for("\nback again\n");
    person.type_line("exit 0");
    let run = vm.finish();
    assert_eq!(run.code(), 0, "{run:#?}");
    backend.kill().expect("stop pvstack-console");
    wait_or_kill(&mut backend);

    let text = before + &after;
    let mut seen: Vec<usize> = text
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    let reported: usize = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("[pvstack-console: ")?
                .strip_suffix(" lines lost]")?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert!(
        seen.len() < TICKS,
        "the shell said it dropped lines:\n{text}"
    );
    assert_eq!(
        seen.len() + reported,
        TICKS,
        "every tick is either shown or reported lost:\n{text}"
    );
    let lost_in_guest: usize = run.result("shell")["lost_lines"].parse().unwrap();
    assert_eq!(lost_in_guest, reported, "{run:#?}");
}

/// What console-bench writes: 64-byte lines of one letter each, `a` to `z`
/// in turn, restarting every 4 KiB.
fn bench_pattern(bytes: usize) -> Vec<u8> {
    (0..bytes)
        .map(|i| {
            let line = (i % 4096) / 64;
            if i % 64 == 63 {
                b'\n'
            } else {
                b'a' + (line % 26) as u8
            }
        })
        .collect()
}

/// Asserts that `got` is exactly console-bench's `bytes`-byte output,
/// naming the first byte that differs rather than printing a megabyte.
fn assert_bench_pattern(what: &str, got: &[u8], bytes: usize) {
    let expected = bench_pattern(bytes);
    if got == expected.as_slice() {
        return;
    }
    let first = got
        .iter()
        .zip(&expected)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(expected.len()));
    let around = |data: &[u8]| {
        String::from_utf8_lossy(&data[first.saturating_sub(16)..data.len().min(first + 16)])
            .into_owned()
    };
    panic!(
        "{what}: {} bytes where {bytes} were written, the first difference at offset {first}: \
         {:?} instead of {:?}",
        got.len(),
        around(got),
        around(&expected)
    );
}

/// Asserts that a console-bench run's stdout is all `bytes` of the
/// pattern and then the RESULT line, nothing else.
fn assert_bench_stdout(via: &str, run: &Finished, bytes: usize) {
    let at = run
        .stdout
        .rfind("RESULT console-bench ")
        .unwrap_or_else(|| panic!("{via}: no RESULT line: {}", run.stderr));
    let (data, result) = run.stdout.split_at(at);
    assert_eq!(result.lines().count(), 1, "{via}: {result}");
    assert_bench_pattern(via, data.as_bytes(), bytes);
}

#[test]
fn console_bench_moves_the_bytes_with_the_expected_exits() {
    let dir = ScratchDir::new("console-bench");
    let socket = dir.path("vhost-user.sock");
    let log = dir.path("virtio.out");
    let mut backend = Command::new(binary("pvstack-console"))
        .arg("--socket")
        .arg(&socket)
        .arg("--listen")
        .arg(dir.path("console.sock"))
        .arg("--log")
        .arg(&log)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start pvstack-console");
    wait_for_path(&socket);
    let image = guest_image();
    let image = image.to_str().expect("UTF-8 path");
    let bench = |via: &str, bytes: usize, extra: &[&str]| {
        let guest_args = format!("console-bench via={via} bytes={bytes}");
        let mut args = vec!["run", "--kernel", image, "--guest-args", &guest_args];
        args.extend_from_slice(extra);
        let run = pvstack_tests::run_pvstack(&args);
        assert_eq!(run.code(), 0, "{run:#?}");
        assert_eq!(run.result("console-bench")["bytes"], bytes.to_string());
        let exits: usize = run.result("console-bench")["exits"].parse().unwrap();
        (run, exits)
    };

    // The virtio console: no exits at all while the data moves, and the
    // bytes reach pvstack-console's log intact.
    let console = format!("socket={}", socket.display());
    let (_, exits) = bench("virtio", 1 << 20, &["--console", &console]);
    assert_eq!(exits, 0);
    backend.kill().expect("stop pvstack-console");
    wait_or_kill(&mut backend);
    assert_bench_pattern("virtio log", &fs::read(&log).unwrap(), 1 << 20);

    // The hypercall console: one exit per 4 KiB, and every byte on stdout.
    let (run, exits) = bench("hypercall", 1 << 20, &[]);
    assert_eq!(exits, 256);
    assert_bench_stdout("hypercall", &run, 1 << 20);

    // The UART: an exit per byte, and one per 16 for the line status.
    let (run, exits) = bench("uart", 8192, &["--serial"]);
    assert_eq!(exits, 8192 + 8192 / 16);
    assert_bench_stdout("uart", &run, 8192);
}
