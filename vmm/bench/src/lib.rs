//! `pvstack bench`: the same guest block workloads on every disk mode,
//! and network workloads on every NIC mode, in one run, each repeated, as
//! a table, a JSON report and a bar chart.
//!
//! Each VM measurement is a child `pvstack run` (so runs are isolated and
//! the VMM's and backends' CPU time can be read from /proc): disks over
//! one image in a private directory on tmpfs (the stack is measured) or
//! on a disk (`--image-dir`), next to qemu-storage-daemon and to fio on
//! the host (the ceiling); NICs on a TAP in a network namespace made for
//! the benchmark, sending to sinks there. Modes run interleaved within
//! each repetition, in alternating order.

mod backend;
mod chart;
mod child;
mod disk;
mod error;
mod fio;
mod image;
mod load;
mod mode;
mod net;
mod netns;
mod procstat;
mod programs;
mod running;
mod sink;
mod summary;
mod workload;

use std::fmt::Display;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use clap::Args;
use pvstack_devices::net::NetMode;

pub use child::Sample;
pub use error::{Error, Result};
pub use mode::DiskMode;
pub use summary::{Report, Spread, Summary};
pub use workload::Workload;

use pvstack_options::parse_size;
use summary::{RunGroup, Skipped};

/// Options of `pvstack bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Runs of each mode and workload; the table shows their median, min
    /// and max. Within a repetition every mode runs each workload in turn,
    /// in the opposite order to the repetition before.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub reps: u32,

    /// Seconds each run measures for (the guest's blk-bench secs=, fio's
    /// --runtime).
    #[arg(long, value_name = "SECS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,

    /// Size of the disk image (K, M, G suffixes).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_image_size)]
    pub image_size: u64,

    /// Directory in which the image gets a private directory (mode 0700,
    /// removed at the end): a tmpfs (the default) measures the stack; a
    /// directory on a disk measures it with the disk, with O_DIRECT for
    /// pvstack-blk, qemu-storage-daemon and fio where the file system
    /// takes it.
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    pub image_dir: PathBuf,

    /// Disk modes to compare, comma separated: emulated-legacy,
    /// emulated-virtio, vhost-user, vhost-user-poll (pvstack's), qsd
    /// (qemu-storage-daemon at its best: io_uring, an iothread that polls,
    /// O_DIRECT on a disk), host (fio on the image, no VM: the ceiling),
    /// vhost-user-unconfined (vhost-user with pvstack and pvstack-blk
    /// under no seccomp filter and pvstack-blk keeping root: compared with
    /// vhost-user, whose pvstack-blk also switches to 65534:65534, it measures
    /// what the sandbox costs).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "emulated-legacy,emulated-virtio,vhost-user,vhost-user-poll,qsd,host"
    )]
    pub modes: Vec<DiskMode>,

    /// Workloads, comma separated: 4k-randread-qd1, 4k-randread-qd32,
    /// 4k-randread-qd32-2q (QD32 spread over two queues), 4k-randwrite-qd32,
    /// 64k-seqwrite, 1m-seqread, 1m-seqwrite (disks, on every --modes
    /// mode); net-tcp-tx, net-udp-64 (guest-to-host TCP throughput and
    /// 64-byte UDP frames, on every --net-modes mode, in a network
    /// namespace the benchmark makes: needs CAP_NET_ADMIN).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "4k-randread-qd1,4k-randread-qd32,4k-randread-qd32-2q,64k-seqwrite,1m-seqread"
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

    /// Busy-spinning host threads the benchmark runs during every run (and
    /// stops after the last), to show how each mode holds up on a loaded
    /// host.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=256))]
    pub background_load: u16,

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

/// Whether SIGTERM or SIGINT has stopped the benchmark.
fn stopped() -> bool {
    STOPPED_BY.load(Ordering::SeqCst) != 0
}

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
    let modes = distinct(&args.modes);
    let net_modes = distinct(&args.net_modes);
    let (net_workloads, blk_workloads): (Vec<Workload>, Vec<Workload>) = distinct(&args.workloads)
        .into_iter()
        .partition(|w| w.is_net());
    // Programs first: a missing one fails before an image is written.
    let (image, programs) = if blk_workloads.is_empty() {
        (None, None)
    } else {
        let programs = disk::DiskPrograms::find(&modes)?;
        let image = image::BenchImage::create(&args.image_dir, args.image_size)?;
        (Some(image), Some(programs))
    };
    let disk = image
        .as_ref()
        .zip(programs)
        .map(|(image, programs)| {
            disk::DiskBench::prepare(
                &pvstack,
                args.kernel.as_deref(),
                image,
                args.image_size,
                args.duration,
                programs,
            )
        })
        .transpose()?;
    let skipped: Vec<Skipped> = blk_workloads
        .iter()
        .flat_map(|&w| modes.iter().map(move |&m| (m, w)))
        .filter_map(|(mode, workload)| {
            disk::DiskBench::cannot_run(mode, workload).map(|reason| Skipped {
                mode: mode.to_string(),
                workload: workload.to_string(),
                reason,
            })
        })
        .collect();
    let mut runs = Runs {
        reps: args.reps,
        done: 0,
        total: ((modes.len() * blk_workloads.len() - skipped.len())
            + net_modes.len() * net_workloads.len())
            * args.reps as usize,
        order: Vec::new(),
    };
    let load = load::BackgroundLoad::start(usize::from(args.background_load))?;
    let mut results = Vec::new();
    if let Some(disk) = &disk {
        let can_run = |m: DiskMode, w: Workload| disk::DiskBench::cannot_run(m, w).is_none();
        let Some(rows) = runs.interleaved(&blk_workloads, &modes, can_run, |mode, w| {
            disk.run_once(mode, w)
        })?
        else {
            end_progress();
            return Ok(BenchEnd::Signal(STOPPED_BY.load(Ordering::SeqCst)));
        };
        results.extend(rows.into_iter().filter_map(|(mode, workload, samples)| {
            Summary::new(mode.name(), workload, Some(disk.direct(mode)), samples)
        }));
    }
    let net_outcome = if net_workloads.is_empty() {
        Ok(true)
    } else {
        run_net(
            args,
            &pvstack,
            &net_modes,
            &net_workloads,
            &mut runs,
            &mut results,
        )
    };
    let background_load = load.stop();
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
        storage: image.as_ref().map(|i| i.storage().clone()),
        qsd: disk.as_ref().and_then(|d| d.qsd_config().cloned()),
        fio: disk.as_ref().and_then(|d| d.fio_config().cloned()),
        background_load,
        net_tcp_bytes: net_workloads
            .contains(&Workload::NetTcpTx)
            .then_some(args.net_tcp_bytes),
        run_order: runs.order,
        skipped,
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
            cause: source,
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
    modes: &[NetMode],
    workloads: &[Workload],
    runs: &mut Runs,
    results: &mut Vec<Summary>,
) -> Result<bool> {
    let bench = net::NetBench::start()?;
    let Some(rows) = runs.interleaved(
        workloads,
        modes,
        |_, _| true,
        |mode, workload| {
            bench.run_once(&net::NetRunSpec {
                pvstack,
                kernel: args.kernel.as_deref(),
                mode,
                workload,
                secs: args.duration,
                tcp_bytes: args.net_tcp_bytes,
            })
        },
    )?
    else {
        return Ok(false);
    };
    results.extend(rows.into_iter().filter_map(|(mode, workload, samples)| {
        Summary::new(mode.name(), workload, None, samples)
    }));
    Ok(true)
}

/// `items` without repeats, in their first order (`--modes a,a` runs a once).
fn distinct<T: Copy + PartialEq>(items: &[T]) -> Vec<T> {
    let mut seen = Vec::new();
    for &item in items {
        if !seen.contains(&item) {
            seen.push(item);
        }
    }
    seen
}

/// Every run of the benchmark, counted for the progress line and recorded
/// in the order it ran.
struct Runs {
    reps: u32,
    done: usize,
    total: usize,
    order: Vec<RunGroup>,
}

/// The samples of one mode and workload.
type Row<M> = (M, Workload, Vec<Sample>);

impl Runs {
    /// Runs every workload on every mode (where `can_run`) `reps` times:
    /// each repetition runs each workload on the modes in turn, forwards
    /// in odd repetitions and backwards in even ones (A B C, then C B A),
    /// so a drifting host favours no mode. The rows come back in mode
    /// order, then workload order; `None` if SIGTERM or SIGINT stopped it.
    fn interleaved<M: Copy + Display + PartialEq>(
        &mut self,
        workloads: &[Workload],
        modes: &[M],
        can_run: impl Fn(M, Workload) -> bool,
        mut once: impl FnMut(M, Workload) -> Result<Sample>,
    ) -> Result<Option<Vec<Row<M>>>> {
        let mut rows: Vec<Row<M>> = modes
            .iter()
            .flat_map(|&m| workloads.iter().map(move |&w| (m, w, Vec::new())))
            .filter(|&(m, w, _)| can_run(m, w))
            .collect();
        for rep in 1..=self.reps {
            for &workload in workloads {
                let mut order: Vec<M> = modes
                    .iter()
                    .copied()
                    .filter(|&m| can_run(m, workload))
                    .collect();
                if rep % 2 == 0 {
                    order.reverse();
                }
                self.order.push(RunGroup {
                    rep,
                    workload: workload.to_string(),
                    modes: order.iter().map(|m| m.to_string()).collect(),
                });
                for mode in order {
                    // A signal that came between runs (or while the image
                    // was being written) ends the benchmark here.
                    if stopped() {
                        return Ok(None);
                    }
                    self.done += 1;
                    progress(&format!(
                        "[{}/{}] rep {rep}/{}: {mode} {workload}",
                        self.done, self.total, self.reps
                    ));
                    let sample = once(mode, workload);
                    if stopped() {
                        return Ok(None);
                    }
                    let sample = sample?;
                    if let Some(row) = rows.iter_mut().find(|r| r.0 == mode && r.1 == workload) {
                        row.2.push(sample);
                    }
                }
            }
        }
        Ok(Some(rows))
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
/// children (the VM, its backend, fio) and records the signal, so the
/// benchmark ends after them and removes its image.
fn watch_termination(wait_for_stop: fn() -> i32) -> Result<()> {
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(move || {
            let signal = wait_for_stop();
            STOPPED_BY.store(signal, Ordering::SeqCst);
            running::terminate_all();
        })
        .map(drop)
        .map_err(|source| Error::Os {
            what: "spawn the benchmark's signal thread",
            cause: source,
        })
}
