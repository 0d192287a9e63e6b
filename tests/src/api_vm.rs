//! [`ApiVm`]: a pvstack VM running in the background with its control
//! API, the guest's hypercall console in a file and pvstack's log in
//! another, for tests that talk to the VM (or its devices' backends)
//! while it runs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{pvstack, run_to_end, send_signal, wait_or_kill, Finished, ScratchDir, HANG_TIMEOUT};

/// A guest workload that computes for far longer than any test runs, so
/// that the VM stays up until the test ends it.
pub const LONG_COMPUTE: &str = "compute iterations=4000G";

/// A running `pvstack run --api-socket ...`.
pub struct ApiVm {
    child: Child,
    console: PathBuf,
    log: PathBuf,
    api: PathBuf,
}

impl ApiVm {
    /// Starts `pvstack run ARGS... --api-socket API --console-log FILE`
    /// with logging at info, and waits until its guest console shows
    /// `ready` and the API answers.
    pub fn start(dir: &ScratchDir, args: &[&str], ready: &str) -> ApiVm {
        let console = dir.path("console.log");
        let log = dir.path("pvstack.log");
        let api = dir.path("api.sock");
        let child = Command::new(pvstack())
            .arg("run")
            .args(args)
            .arg("--api-socket")
            .arg(&api)
            .arg("--console-log")
            .arg(&console)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create the pvstack log"))
            .spawn()
            .expect("spawn pvstack");
        let mut vm = ApiVm {
            child,
            console,
            log,
            api,
        };
        vm.wait_until(&format!("the guest prints {ready:?}"), |vm| {
            vm.console().contains(ready)
        });
        vm.wait_until("the API answers", |vm| vm.ctl(&["info"]).code() == 0);
        vm
    }

    /// The control API's socket.
    pub fn api(&self) -> &Path {
        &self.api
    }

    /// The guest's console output so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// pvstack's log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `pvstack ctl --api-socket API ARGS...`, run to its end.
    pub fn ctl(&self, args: &[&str]) -> Finished {
        run_to_end(
            Command::new(pvstack())
                .arg("ctl")
                .arg("--api-socket")
                .arg(&self.api)
                .args(args)
                .env("RUST_LOG", "warn"),
        )
    }

    /// `pvstack ctl ARGS...`, which must succeed; the response's `result`.
    pub fn ctl_ok(&self, args: &[&str]) -> Value {
        let out = self.ctl(args);
        assert_eq!(
            out.code(),
            0,
            "pvstack ctl {args:?}: {out:#?}\npvstack log:\n{}",
            self.log()
        );
        let response = response(&out.stdout);
        assert_eq!(response["ok"], true, "{out:#?}");
        response["result"].clone()
    }

    /// `pvstack ctl ARGS...`, which must be refused; the response's `error`.
    pub fn ctl_refused(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert_eq!(out.code(), 1, "pvstack ctl {args:?}: {out:#?}");
        refusal(&response(&out.stdout))
    }

    /// The result of `info`.
    pub fn info(&self) -> Value {
        self.ctl_ok(&["info"])
    }

    /// The first device `info` lists.
    pub fn first_device(&self) -> Value {
        self.info()["devices"][0].clone()
    }

    /// Whether pvstack still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("waitpid works").is_none()
    }

    /// Polls `done` until it holds; panics with pvstack's log if pvstack
    /// exits first or after [`HANG_TIMEOUT`] (a hang, not a time limit).
    pub fn wait_until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        let started = Instant::now();
        while !done(self) {
            if let Some(status) = self.child.try_wait().expect("waitpid works") {
                panic!(
                    "pvstack exited ({status}) before {what}:\nconsole:\n{}\nlog:\n{}",
                    self.console(),
                    self.log()
                );
            }
            assert!(
                started.elapsed() < HANG_TIMEOUT,
                "still waiting for {what} after {HANG_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to pvstack and waits for it to exit.
    pub fn signal_and_wait(&mut self, signal: libc::c_int) -> ExitStatus {
        send_signal(&self.child, signal);
        self.wait()
    }

    /// Waits for pvstack to exit by itself.
    pub fn wait(&mut self) -> ExitStatus {
        wait_or_kill(&mut self.child).unwrap_or_else(|| {
            panic!(
                "pvstack still ran after {HANG_TIMEOUT:?}; log:\n{}",
                self.log()
            )
        })
    }
}

/// One response line of the control API, parsed; it must carry API
/// version 1 and `ok`.
pub fn response(line: &str) -> Value {
    let response: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("the API answered with something not JSON ({e}): {line}"));
    assert_eq!(response["api_version"], 1, "{response:#}");
    assert!(response["ok"].is_boolean(), "{response:#}");
    response
}

/// The error message of a refused request.
pub fn refusal(response: &Value) -> String {
    assert_eq!(response["ok"], false, "{response:#}");
    response["error"]
        .as_str()
        .unwrap_or_else(|| panic!("a refusal without an error message: {response:#}"))
        .to_string()
}

impl Drop for ApiVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
