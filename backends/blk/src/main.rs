//! pvstack-blk: a vhost-user block device backend serving a raw image file.

use std::cell::RefCell;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pvstack_backend_common::inflight::{InflightFilter, InflightSlot};
use pvstack_backend_common::message_filter::FilteredSocket;
use pvstack_backend_common::{backend_main, parse_queue_size, serve_on, SocketArgs};

use pvstack_blk::backend::{BlkBackend, BlkSettings};
use pvstack_blk::engine::{self, EngineChoice};
use pvstack_blk::Error;
use pvstack_block::config::{self, ID_BYTES};
use pvstack_block::image::DiskImage;
use pvstack_sandbox::landlock::{Access, Rule};
use pvstack_sandbox::{backend::SERVE, runtime::RUNTIME, SandboxArgs};

const DEVICE: &str = "pvstack-blk";

/// `--poll-us` by default: longer than a 4 KiB read from a virtio disk
/// (about 40 us when the host is quiet) and than a polling guest's gap
/// between requests, so a busy queue rarely needs a kick or a completion
/// wake-up; short enough that a queue with a request now and then shrinks
/// its window to nothing. Measured on a loaded 2-core host (4K random
/// reads at QD1, io_uring engine, medians of 5): bounds of 25 and 50 us
/// stayed within the run-to-run spread of no polling, 100 and 200 us cost
/// a quarter to a half of the throughput on the disk (the poller took its
/// CPU from the guest's vCPU; pvstack-blk now also stops polling while the
/// host has no CPU to spare).
const DEFAULT_POLL_US: u32 = 50;

/// Serve a raw disk image to a VMM (pvstack, QEMU, ...) as a virtio-blk device
/// over vhost-user: the VMM shares guest memory, and this process reads and
/// writes the guest's buffers directly.
#[derive(Debug, Parser)]
#[command(name = DEVICE, version)]
struct Args {
    #[command(flatten)]
    socket: SocketArgs,

    #[command(flatten)]
    sandbox: SandboxArgs,

    /// Raw image file (or block device) holding the disk's contents.
    #[arg(long, value_name = "FILE")]
    image: PathBuf,

    /// Open the image read-only and offer a read-only disk (VIRTIO_BLK_F_RO);
    /// writes, discards and write-zeroes are answered with an I/O error.
    #[arg(long)]
    readonly: bool,

    /// Number of request queues (1-64), each served by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    num_queues: u16,

    /// Largest queue size the frontend may set (a power of two, 2-32768).
    /// The disk advertises seg_max for queues of min(N, 128) entries (QEMU
    /// sets 128 by default); drivers on smaller queues send long requests
    /// in indirect descriptor tables.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,

    /// Open the image with O_DIRECT, bypassing the host page cache (the disk
    /// then reports a 4096-byte block size so the guest issues aligned I/O).
    /// Guest buffers that O_DIRECT cannot take as they are go through a
    /// bounce buffer, 1 MiB at a time.
    #[arg(long)]
    direct: bool,

    /// What carries out each queue's requests: io-uring (every request
    /// the driver sends in flight at once, completed in any order), sync
    /// (one request at a time per queue, with plain system calls), or auto:
    /// io-uring where the kernel allows it, else sync. io-uring where the
    /// kernel does not allow it is refused.
    #[arg(long, value_enum, value_name = "ENGINE", default_value = "auto")]
    engine: EngineChoice,

    /// Bound of the adaptive polling window, in microseconds. After each
    /// batch a queue's worker keeps polling its ring and its engine's
    /// completions, with guest kicks suppressed (VRING_USED_F_NO_NOTIFY /
    /// EVENT_IDX), for a window that doubles while work comes back sooner
    /// than N and halves down to zero while it does not; then it sleeps
    /// until the next kick or completion. An idle queue costs nothing, and
    /// nothing is polled while the host has more runnable threads than
    /// CPUs. 0 never polls.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_POLL_US,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    poll_us: u32,

    /// Device serial returned by GET_ID (at most 20 bytes).
    #[arg(long, value_name = "STRING", default_value = DEVICE, value_parser = parse_serial)]
    serial: String,
}

/// Set up: from here on the image, the socket directory and the
/// allow-list are all this process has (pvstack_sandbox::confine).
fn confine(args: &Args, filtered: &FilteredSocket) -> Result<(), Error> {
    let mut files = pvstack_sandbox::serving_files(&args.socket.socket);
    files.push(Rule {
        path: args.image.clone(),
        access: if args.readonly {
            Access::ReadFile
        } else {
            Access::ReadWriteFile
        },
    });
    pvstack_sandbox::confine_backend(
        &args.sandbox,
        &pvstack_sandbox::Confinement {
            program: DEVICE,
            syscalls: &[RUNTIME, SERVE, pvstack_blk::syscalls::BLK],
            sockets: filtered.paths().to_vec(),
            files,
        },
    )?;
    Ok(())
}

fn parse_serial(text: &str) -> Result<String, String> {
    if text.len() > ID_BYTES {
        return Err(format!("{} bytes, at most {ID_BYTES} fit", text.len()));
    }
    Ok(text.to_owned())
}

fn main() -> ExitCode {
    backend_main(DEVICE, |args: &Args| &args.socket, run)
}

fn run(args: &Args) -> Result<(), Error> {
    let engine = engine::choose(args.engine)?;
    let mut image = DiskImage::open(&args.image, args.readonly, args.direct)?;
    if image.is_in_memory() {
        if let Err(why) = image.map() {
            log::info!("image in memory not mapped, served with system calls: {why}");
        }
    }
    let image = Arc::new(image);
    let mut serial = [0u8; ID_BYTES];
    serial[..args.serial.len()].copy_from_slice(args.serial.as_bytes());
    let settings = BlkSettings {
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        serial,
        engine,
        poll_max: Duration::from_micros(u64::from(args.poll_us)),
    };
    log::info!(
        "serving {} ({} sectors{}{}{}) with {} queue(s) of up to {} entries, seg_max {}, engine {engine}, polling up to {} us",
        image.path().display(),
        image.capacity_sectors(),
        if image.is_readonly() {
            ", read-only"
        } else {
            ""
        },
        if image.is_direct() { ", O_DIRECT" } else { "" },
        match (image.is_in_memory(), image.mapping().is_some()) {
            (true, true) => ", in memory, mapped",
            (true, false) => ", in memory",
            _ => "",
        },
        settings.num_queues,
        settings.queue_size,
        config::seg_max(settings.queue_size),
        args.poll_us
    );
    // vhost-user-backend does not handle the inflight messages, so the
    // daemon always sits behind a filter that does.
    let inflight = Arc::new(InflightSlot::default());
    let filter_slot = Arc::clone(&inflight);
    let (num_queues, queue_size) = (settings.num_queues, settings.queue_size);
    let (filtered, daemon) = FilteredSocket::start(&args.socket, move || {
        Box::new(InflightFilter::new(
            Arc::clone(&filter_slot),
            num_queues,
            queue_size,
        ))
    })?;
    confine(args, &filtered)?;
    // The daemon is made from the backend; the backend's completions are
    // then registered with the daemon's workers.
    let newest = RefCell::new(None);
    let new_backend = || {
        let backend = BlkBackend::new(Arc::clone(&image), &settings, Arc::clone(&inflight))?;
        *newest.borrow_mut() = Some(backend.clone());
        Ok(backend)
    };
    let attach = |daemon: &_| match newest.borrow_mut().take() {
        Some(backend) => BlkBackend::register_completions(&backend, daemon),
        None => Ok(()),
    };
    serve_on(DEVICE, &args.socket, daemon, new_backend, attach)?;
    log::info!("stopped");
    Ok(())
}
