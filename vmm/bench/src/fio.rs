//! The `host` row: fio on the host with the same block size, queue depth
//! and pattern on the same image file (io_uring; O_DIRECT on a disk), with
//! no VM in the way: the ceiling every other mode is measured against.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;
use serde_json::Value;

use crate::child::{cpu_s_per_gib, Sample};
use crate::error::{Error, Result};
use crate::running;
use crate::workload::DiskPattern;

/// How fio runs, for the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FioConfig {
    pub program: PathBuf,
    pub ioengine: &'static str,
    /// `--direct=1` (O_DIRECT): on a disk that accepts it.
    pub direct: bool,
}

impl FioConfig {
    /// fio at `program`, with O_DIRECT if `direct`.
    pub fn new(program: PathBuf, direct: bool) -> FioConfig {
        FioConfig {
            program,
            ioengine: "io_uring",
            direct,
        }
    }

    /// fio's command line for `pattern` over the first `size` bytes of
    /// `image` for `secs` seconds: one job per queue, each with the
    /// pattern's depth, reported as one group.
    fn args(&self, image: &Path, size: u64, pattern: &DiskPattern, secs: u64) -> Vec<OsString> {
        let mut filename = OsString::from("--filename=");
        filename.push(fio_escape(image));
        let mut args: Vec<OsString> = vec!["--name=host".into(), filename];
        args.extend(
            [
                format!("--size={size}"),
                "--allow_file_create=0".into(),
                format!("--ioengine={}", self.ioengine),
                format!("--direct={}", u8::from(self.direct)),
                format!("--rw={}", pattern.rw),
                format!("--bs={}", pattern.bs),
                format!("--iodepth={}", pattern.qd),
                format!("--numjobs={}", pattern.queues),
                "--group_reporting".into(),
                "--time_based".into(),
                format!("--runtime={secs}"),
                // Uniform random offsets with repeats, as blk-bench draws them.
                "--norandommap".into(),
                "--randrepeat=0".into(),
                "--output-format=json".into(),
            ]
            .map(OsString::from),
        );
        args
    }

    /// Runs `pattern` once and reads what fio reported.
    pub fn run_once(
        &self,
        image: &Path,
        size: u64,
        pattern: &DiskPattern,
        secs: u64,
    ) -> Result<Sample> {
        let failed = |reason: String| Error::Bench {
            what: format!("host {} bs={} qd={}", pattern.rw, pattern.bs, pattern.qd),
            reason,
        };
        let cpu_before = children_cpu_seconds();
        let mut child = running::spawn(
            Command::new(&self.program)
                .args(self.args(image, size, pattern, secs))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .map_err(|e| failed(format!("cannot start {}: {e}", self.program.display())))?;
        let stderr = child.stderr.take();
        let stderr_reader = std::thread::spawn(move || {
            let mut text = String::new();
            // A read error only loses fio's warnings.
            let _ = stderr.map(|mut s| s.read_to_string(&mut text));
            text
        });
        let mut output = String::new();
        let read = child
            .stdout
            .take()
            .map(|mut s| s.read_to_string(&mut output));
        let status =
            running::wait(&mut child).map_err(|e| failed(format!("cannot wait for fio: {e}")))?;
        let cpu_seconds = children_cpu_seconds() - cpu_before;
        let errors = stderr_reader.join().unwrap_or_default();
        if !status.success() {
            let last = errors.lines().rev().find(|l| !l.trim().is_empty());
            return Err(failed(format!(
                "fio ended with {status}: {}",
                last.unwrap_or("no error message")
            )));
        }
        if let Some(Err(e)) = read {
            return Err(failed(format!("cannot read fio's output: {e}")));
        }
        parse_output(&output, cpu_seconds).map_err(failed)
    }
}

/// A path as a fio file name: fio separates names with ':', so a colon
/// is escaped.
fn fio_escape(path: &Path) -> OsString {
    let mut bytes = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        if b == b':' {
            bytes.push(b'\\');
        }
        bytes.push(b);
    }
    OsString::from_vec(bytes)
}

/// CPU seconds of this process's reaped children (fio and the job
/// processes it reaped), from getrusage(RUSAGE_CHILDREN).
fn children_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain data; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into `usage`, which outlives the call.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0.0;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// A sample from fio's JSON report (its one group: `jobs[0]`).
fn parse_output(output: &str, cpu_seconds: f64) -> std::result::Result<Sample, String> {
    // fio may print notes before the JSON document.
    let start = output
        .find('{')
        .ok_or_else(|| format!("fio printed no JSON: {}", output.trim()))?;
    let report: Value = serde_json::from_str(&output[start..])
        .map_err(|e| format!("fio's JSON does not parse: {e}"))?;
    let job = &report["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(format!("fio's job failed with error {}", job["error"]));
    }
    let sum = |key: &str| -> std::result::Result<f64, String> {
        ["read", "write"]
            .iter()
            .map(|dir| {
                job[dir][key]
                    .as_f64()
                    .ok_or_else(|| format!("fio's JSON lacks jobs[0].{dir}.{key}"))
            })
            .sum()
    };
    let ios = sum("total_ios")? as u64;
    let bytes = sum("io_bytes")? as u64;
    if ios == 0 {
        return Err("fio completed no I/O".to_string());
    }
    Ok(Sample {
        ios,
        bytes,
        iops: sum("iops")?,
        mbps: sum("bw_bytes")? / 1e6,
        exits_per_req: None,
        kicks_per_req: None,
        interrupts_per_req: None,
        cpu_s_per_gib: cpu_s_per_gib(cpu_seconds, bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "host", "error" : 0,
      "read" : { "io_bytes" : 8192000, "bw_bytes" : 4096000, "iops" : 1000.0, "total_ios" : 2000 },
      "write" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0, "total_ios" : 0 }
    }
  ]
}"#;

    #[test]
    fn fio_json_becomes_a_sample() {
        let sample = parse_output(OUTPUT, 1.0).unwrap();
        assert_eq!((sample.ios, sample.bytes), (2000, 8_192_000));
        assert_eq!((sample.iops, sample.mbps), (1000.0, 4.096));
        assert_eq!(sample.kicks_per_req, None);
        assert!(parse_output("garbage", 1.0)
            .unwrap_err()
            .contains("no JSON"));
        let idle = OUTPUT.replace("\"total_ios\" : 2000", "\"total_ios\" : 0");
        assert!(parse_output(&idle, 1.0).unwrap_err().contains("no I/O"));
    }

    #[test]
    fn fio_arguments_match_the_pattern() {
        let config = FioConfig {
            program: "fio".into(),
            ioengine: "io_uring",
            direct: true,
        };
        let pattern = DiskPattern {
            rw: "randread",
            bs: 4096,
            qd: 16,
            queues: 2,
        };
        let args: Vec<String> = config
            .args(Path::new("/x:y/disk.img"), 1 << 30, &pattern, 2)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        for expected in [
            "--filename=/x\\:y/disk.img",
            "--size=1073741824",
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randread",
            "--bs=4096",
            "--iodepth=16",
            "--numjobs=2",
            "--runtime=2",
        ] {
            assert!(args.iter().any(|a| a == expected), "{expected}: {args:?}");
        }
    }
}
