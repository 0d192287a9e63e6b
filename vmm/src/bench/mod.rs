//! `pvstack bench`: the same guest block workloads on every disk mode in
//! one run, each repeated, as a table, a JSON report and a bar chart.
//!
//! Each measurement is a child `pvstack run` (so runs are isolated and the
//! VMM's and backend's CPU time can be read from /proc) over one image on
//! tmpfs, so the stack, not a disk, is measured.

mod chart;
mod child;
mod image;
mod procstat;
mod summary;
mod workload;

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use clap::Args;
use pvstack_devices::blk::BlkMode;

pub use summary::{Report, Spread, Summary};
pub use workload::Workload;

use crate::cli::parse_memory_size;
use crate::error::{Error, Result};

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
    /// 64k-seqwrite, 1m-seqread.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "4k-randread-qd1,4k-randread-qd32,64k-seqwrite,1m-seqread"
    )]
    pub workloads: Vec<Workload>,

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

fn parse_image_size(text: &str) -> std::result::Result<u64, String> {
    // The same notation as --memory, but any whole number of MiB from 4M.
    let bytes = parse_memory_size(text)?;
    if bytes % (1 << 20) != 0 {
        return Err(format!("'{text}' is not a whole number of MiB"));
    }
    Ok(bytes)
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

/// Runs the benchmark `args` describe.
pub fn run(args: &BenchArgs) -> Result<BenchEnd> {
    let pvstack = child::current_pvstack()?;
    watch_termination()?;
    let image = image::BenchImage::create(&args.image_dir, args.image_size)?;
    let mut results = Vec::new();
    let total = args.modes.len() * args.workloads.len() * args.reps as usize;
    let mut done = 0;
    for &mode in &args.modes {
        for &workload in &args.workloads {
            let mut samples = Vec::new();
            for rep in 1..=args.reps {
                done += 1;
                progress(&format!(
                    "[{done}/{total}] {mode} {workload} run {rep}/{}",
                    args.reps
                ));
                let spec = child::RunSpec {
                    pvstack: &pvstack,
                    kernel: args.kernel.as_deref(),
                    image: image.path(),
                    mode,
                    workload,
                    secs: args.duration,
                };
                let sample = child::run_once(&spec);
                let signal = STOPPED_BY.load(Ordering::SeqCst);
                if signal != 0 {
                    end_progress();
                    return Ok(BenchEnd::Signal(signal));
                }
                samples.push(sample?);
            }
            results.extend(Summary::new(mode, workload, samples));
        }
    }
    end_progress();
    let mut report = Report {
        repetitions: args.reps,
        duration_secs: args.duration,
        image_bytes: args.image_size,
        image: image.path().display().to_string(),
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
    Ok(BenchEnd::Done)
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

/// On SIGTERM or SIGINT (blocked in every thread by `main`), stops the
/// running child VM and records the signal, so the benchmark ends after it
/// and removes its image.
fn watch_termination() -> Result<()> {
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(|| {
            let signal = crate::signals::wait_for_termination();
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
