//! `pvstack bench`: the same guest block workloads on every disk mode,
//! and network workloads on every NIC mode, in one run, each repeated, as
//! a table, a JSON report and a bar chart.
//!
//! Each measurement is a child `pvstack run` (so runs are isolated and the
//! VMM's and backend's CPU time can be read from /proc): disks over one
//! image on tmpfs, so the stack, not a disk, is measured; NICs on a TAP in
//! a network namespace made for the benchmark, sending to sinks there.

mod chart;
mod child;
mod error;
mod image;
mod net;
mod netns;
mod procstat;
mod sink;
mod summary;
mod workload;

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use clap::Args;
use pvstack_devices::blk::BlkMode;
use pvstack_devices::net::NetMode;

pub use child::Sample;
pub use error::{Error, Result};
pub use summary::{Report, Spread, Summary};
pub use workload::Workload;

use pvstack_options::parse_size;

/// Options of `pvstack bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Runs of each mode and workload; the table shows their median, min
    /// and max.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub reps: u32,

    /// Seconds each run measures for (the guest's blk-bench secs=).
    #[arg(long, value_name = "SECS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,

    /// Size of the disk image (K, M, G suffixes), created on tmpfs.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_image_size)]
    pub image_size: u64,

    /// Directory for the image; a tmpfs so no disk is measured.
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    pub image_dir: PathBuf,

    /// Disk modes to compare, comma separated: emulated-legacy,
    /// emulated-virtio, vhost-user, vhost-user-poll.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "emulated-legacy,emulated-virtio,vhost-user,vhost-user-poll"
    )]
    pub modes: Vec<BlkMode>,

    /// Workloads, comma separated: 4k-randread-qd1, 4k-randread-qd32,
    /// 64k-seqwrite, 1m-seqread (disks, on every --modes mode); net-tcp-tx,
    /// net-udp-64 (guest-to-host TCP throughput and 64-byte UDP frames, on
    /// every --net-modes mode, in a network namespace the benchmark makes:
    /// needs CAP_NET_ADMIN).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "4k-randread-qd1,4k-randread-qd32,64k-seqwrite,1m-seqread"
    )]
    pub workloads: Vec<Workload>,

    /// NIC modes the net-* workloads compare, comma separated: vhost-user
    /// (pvstack-net), emulated (virtio-net served in the VMM).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "vhost-user,emulated",
        value_parser = net::parse_net_mode
    )]
    pub net_modes: Vec<NetMode>,

    /// Bytes each net-tcp-tx run sends (K, M, G suffixes); net-udp-64 runs
    /// for --duration.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_byte_count)]
    pub net_tcp_bytes: u64,

    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Also draw a bar chart of IOPS (SVG) to FILE.
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,

    /// Guest ELF to run instead of the built-in pvstack-guest.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
}

/// An image size: a whole number of MiB, at least 4M (the smallest disk
/// the workloads spread their requests over).
fn parse_image_size(text: &str) -> std::result::Result<u64, String> {
    let bytes = parse_size(text)?;
    if bytes < 4 << 20 || bytes % (1 << 20) != 0 {
        return Err(format!("'{text}' is not a whole number of MiB from 4M"));
    }
    Ok(bytes)
}

/// A byte count that is not zero.
fn parse_byte_count(text: &str) -> std::result::Result<u64, String> {
    match parse_size(text)? {
        0 => Err("the byte count cannot be 0".to_string()),
        bytes => Ok(bytes),
    }
}

/// The termination signal that stopped the benchmark, or 0.
static STOPPED_BY: AtomicI32 = AtomicI32::new(0);

/// How `pvstack bench` ended.
pub enum BenchEnd {
    /// Every run finished; the report was printed.
    Done,
    /// SIGTERM or SIGINT stopped it; the image was removed.
    Signal(i32),
}

/// Runs the benchmark `args` describe: the disk rows, then the network
/// rows. If the network rows fail (no CAP_NET_ADMIN, say), the disk rows
/// are still reported before the error.
///
/// `wait_for_stop` blocks until SIGTERM or SIGINT arrives and returns it;
/// the caller must have blocked both signals in every thread.
pub fn run(args: &BenchArgs, wait_for_stop: fn() -> i32) -> Result<BenchEnd> {
    let pvstack = child::current_pvstack()?;
    watch_termination(wait_for_stop)?;
    let (net_workloads, blk_workloads): (Vec<Workload>, Vec<Workload>) =
        args.workloads.iter().partition(|w| w.is_net());
    let mut runs = Runs {
        reps: args.reps,
        done: 0,
        total: (args.modes.len() * blk_workloads.len()
            + args.net_modes.len() * net_workloads.len())
            * args.reps as usize,
    };
    let mut results = Vec::new();
    let image = if blk_workloads.is_empty() {
        None
    } else {
        Some(image::BenchImage::create(&args.image_dir, args.image_size)?)
    };
    if let Some(image) = &image {
        for &mode in &args.modes {
            for &workload in &blk_workloads {
                let spec = child::RunSpec {
                    pvstack: &pvstack,
                    kernel: args.kernel.as_deref(),
                    image: image.path(),
                    mode,
                    workload,
                    secs: args.duration,
                };
                let label = format!("{mode} {workload}");
                let Some(samples) = runs.repeat(&label, || child::run_once(&spec))? else {
                    end_progress();
                    return Ok(BenchEnd::Signal(STOPPED_BY.load(Ordering::SeqCst)));
                };
                results.extend(Summary::new(mode.name(), workload, samples));
            }
        }
    }
    let net_outcome = if net_workloads.is_empty() {
        Ok(true)
    } else {
        run_net(args, &pvstack, &net_workloads, &mut runs, &mut results)
    };
    end_progress();
    match net_outcome {
        Ok(false) => return Ok(BenchEnd::Signal(STOPPED_BY.load(Ordering::SeqCst))),
        Err(e) if results.is_empty() => return Err(e),
        _ => {}
    }
    let mut report = Report {
        repetitions: args.reps,
        duration_secs: args.duration,
        image_bytes: args.image_size,
        image: image.as_ref().map(|i| i.path().display().to_string()),
        net_tcp_bytes: net_workloads
            .contains(&Workload::NetTcpTx)
            .then_some(args.net_tcp_bytes),
        results,
        ratios: Vec::new(),
    };
    report.compute_ratios();
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| Error::Bench {
            what: "JSON report".to_string(),
            reason: e.to_string(),
        })?;
        std::fs::write(path, text + "\n").map_err(|source| Error::File {
            action: "write the JSON report to",
            path: path.clone(),
            source,
        })?;
    }
    if let Some(path) = &args.chart {
        chart::draw(&report, path)?;
    }
    net_outcome.map(|_| BenchEnd::Done)
}

/// Measures every NIC mode on every network workload into `results`;
/// false if a signal stopped it. The namespace goes when this returns.
fn run_net(
    args: &BenchArgs,
    pvstack: &std::path::Path,
    workloads: &[Workload],
    runs: &mut Runs,
    results: &mut Vec<Summary>,
) -> Result<bool> {
    let bench = net::NetBench::start()?;
    for &mode in &args.net_modes {
        for &workload in workloads {
            let spec = net::NetRunSpec {
                pvstack,
                kernel: args.kernel.as_deref(),
                mode,
                workload,
                secs: args.duration,
                tcp_bytes: args.net_tcp_bytes,
            };
            let label = format!("{mode} {workload}");
            let Some(samples) = runs.repeat(&label, || bench.run_once(&spec))? else {
                return Ok(false);
            };
            results.extend(Summary::new(mode.name(), workload, samples));
        }
    }
    Ok(true)
}

/// The repetitions of every run, counted for the progress line.
struct Runs {
    reps: u32,
    done: usize,
    total: usize,
}

impl Runs {
    /// Runs `once` `reps` times, showing progress; `None` if SIGTERM or
    /// SIGINT stopped it.
    fn repeat(
        &mut self,
        label: &str,
        mut once: impl FnMut() -> Result<Sample>,
    ) -> Result<Option<Vec<Sample>>> {
        let mut samples = Vec::new();
        for rep in 1..=self.reps {
            self.done += 1;
            progress(&format!(
                "[{}/{}] {label} run {rep}/{}",
                self.done, self.total, self.reps
            ));
            let sample = once();
            if STOPPED_BY.load(Ordering::SeqCst) != 0 {
                return Ok(None);
            }
            samples.push(sample?);
        }
        Ok(Some(samples))
    }
}

/// Shows which run is going on: one line on stderr, rewritten in place on
/// a terminal, one line per run otherwise (logs).
fn progress(text: &str) {
    let mut stderr = std::io::stderr().lock();
    // Progress is a courtesy: a closed stderr must not stop the benchmark.
    let _ = if stderr.is_terminal() {
        write!(stderr, "\r\x1b[2K{text}")
    } else {
        writeln!(stderr, "{text}")
    };
    let _ = stderr.flush();
}

/// Ends the progress line, if it is one rewritten in place.
fn end_progress() {
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
}

/// On SIGTERM or SIGINT (`wait_for_stop` returns it), stops the running
/// child VM and records the signal, so the benchmark ends after it and
/// removes its image.
fn watch_termination(wait_for_stop: fn() -> i32) -> Result<()> {
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(move || {
            let signal = wait_for_stop();
            STOPPED_BY.store(signal, Ordering::SeqCst);
            let pid = child::RUNNING_CHILD.load(Ordering::SeqCst);
            if pid != 0 {
                // SAFETY: kill has no memory-safety preconditions; at worst
                // the child already exited and the call fails.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
        })
        .map(drop)
        .map_err(|source| Error::Os {
            what: "spawn the benchmark's signal thread",
            source,
        })
}
