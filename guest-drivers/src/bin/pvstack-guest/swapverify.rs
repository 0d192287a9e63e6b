//! `blk-swap-verify`: a continuous write-and-verify workload to run while
//! the host swaps or kills the disk's backend. Every 4 KiB block holds its
//! number, the sequence number of the write that put it there and a
//! pattern from both (`pvstack_guest::seqblock`). Blocks are written with
//! increasing sequence numbers and each write is read back and checked
//! before the block is written again, so at the end the table of each
//! block's last completed sequence number is exactly what the disk must
//! hold; its checksum (`table_fnv`) lets the host compare the image.
//!
//! With `stop=1` the workload runs until the host tells it to stop, however
//! long the host's swaps take: it reads the block after the ones it
//! verifies every [`STOP_POLL_US`] and stops writing once that block starts
//! with `seqblock::STOP_MARKER` (the host writes it into the image).
//!
//! Beside the disk it can answer pings and tick on the console (`aside`).
//!
//! With `mirror=N` it runs the same workload on disk N too (its own
//! blocks, its own stop block), driven from the first disk's polling
//! loop, and reports it with `mirror_` keys.
//!
//! With `report_ms=N` it prints the longest request latency of each N ms
//! window (`blk-swap-verify: window max_latency_us=U`), so the host can
//! tell what one event (a live replacement of the VMM) cost the guest.

use crate::aside::{Aside, ASIDE_KEYS};
use crate::disk::{open, open_at, DISK_KEYS};
use crate::net::NIC_KEYS;
use crate::pipeline::{Io, Job, Slots};
use crate::{Env, Failure, Outcome};
use pvstack_guest::args::{ArgError, Args};
use pvstack_guest::clock::{rdtsc, Clock};
use pvstack_guest::println;
use pvstack_guest::seqblock::{self, BLOCK_SIZE, STOP_MARKER};
use pvstack_guest::virtio::blk::{request, status, BlkDevice};
use pvstack_guest::virtio::VirtioError;

/// Blocks used when `blocks=` is not given.
const DEFAULT_BLOCKS: u64 = 256;
/// Requests in flight per queue when `depth=` is not given.
const DEFAULT_DEPTH: u64 = 8;
/// How often the stop block is read (`stop=1`).
const STOP_POLL_US: u64 = 20_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum BlockState {
    /// Written and checked (or never written): may be written again.
    Idle,
    Writing,
    /// The write completed; read it back next.
    Written,
    Reading,
}

/// When to stop issuing writes.
enum Limit {
    Writes(u64),
    Micros(u64),
    /// When the stop block holds [`STOP_MARKER`], or after the microseconds.
    StopBlock(StopBlock, u64),
}

/// The state of the stop block's polling.
struct StopBlock {
    /// Its byte offset: just past the verified blocks.
    offset: u64,
    /// TSC of the last read issued.
    last_read: u64,
    reading: bool,
    seen: bool,
}

/// The write-and-verify workload on one disk.
struct Verifier<'m> {
    clock: Clock,
    started: u64,
    limit: Limit,
    /// Last completed write of each block.
    table: &'m mut [u64],
    state: &'m mut [BlockState],
    /// The write in flight (or last completed) on each block.
    pending: &'m mut [u64],
    /// TSC when each block's request was issued.
    issued: &'m mut [u64],
    cursor: usize,
    next_seq: u64,
    writes: u64,
    reads: u64,
    mismatches: u64,
    errors: u64,
    max_latency_us: u64,
    /// Window reports (`report_ms=`).
    report: Option<Report>,
}

/// The workload on a second disk (`mirror=N`), whose pipeline the first
/// disk's loop turns.
struct Mirror<'m> {
    device: BlkDevice<'static>,
    slots: Slots,
    job: Verifier<'m>,
    done: bool,
}

impl Mirror<'_> {
    fn turn(&mut self) -> Result<(), VirtioError> {
        if !self.done {
            self.done = self.slots.turn(&mut self.device, &mut self.job)?;
        }
        Ok(())
    }
}

/// The workload on the first disk, with the mirror and the work beside.
struct SwapVerifyJob<'m> {
    disk: Verifier<'m>,
    mirror: Option<Mirror<'m>>,
    aside: Aside,
    /// The first error of the mirror or the work beside the disk, which
    /// ends them.
    aside_error: Option<VirtioError>,
}

impl Job for SwapVerifyJob<'_> {
    fn next(&mut self, buf: &mut [u8]) -> Option<Io> {
        self.disk.next(buf)
    }

    fn done(&mut self, io: &Io, status: u8, buf: &[u8]) {
        self.disk.done(io, status, buf);
    }

    fn between(&mut self) {
        self.disk.between();
        if self.aside_error.is_none() {
            let mirror = self.mirror.as_mut().map_or(Ok(()), Mirror::turn);
            self.aside_error = mirror.and_then(|()| self.aside.poll()).err();
        }
    }
}

/// The longest request latency of the current window, printed and reset
/// every `every_us`.
struct Report {
    every_us: u64,
    /// TSC when the window began.
    began: u64,
    max_latency_us: u64,
}

impl Report {
    fn record(&mut self, latency_us: u64) {
        self.max_latency_us = self.max_latency_us.max(latency_us);
    }

    fn print_if_due(&mut self, clock: &Clock) {
        if clock.us_since(self.began) < self.every_us {
            return;
        }
        println!(
            "blk-swap-verify: window max_latency_us={}",
            self.max_latency_us
        );
        self.max_latency_us = 0;
        self.began = rdtsc();
    }
}

impl Verifier<'_> {
    fn may_write(&self) -> bool {
        match &self.limit {
            Limit::Writes(n) => self.next_seq <= *n,
            Limit::Micros(us) => self.clock.us_since(self.started) < *us,
            Limit::StopBlock(stop, us) => !stop.seen && self.clock.us_since(self.started) < *us,
        }
    }

    /// A read of the stop block, if one is due and writing goes on.
    fn stop_read(&mut self) -> Option<Io> {
        let writing = self.may_write();
        let Limit::StopBlock(stop, _) = &mut self.limit else {
            return None;
        };
        if !writing || stop.reading || self.clock.us_since(stop.last_read) < STOP_POLL_US {
            return None;
        }
        stop.reading = true;
        stop.last_read = rdtsc();
        Some(Io {
            kind: request::IN,
            offset: stop.offset,
            len: BLOCK_SIZE as u32,
        })
    }

    /// Records a completed read of the stop block; false if `io` is not one.
    fn stop_read_done(&mut self, io: &Io, status: u8, buf: &[u8]) -> bool {
        let Limit::StopBlock(stop, _) = &mut self.limit else {
            return false;
        };
        if io.offset != stop.offset {
            return false;
        }
        stop.reading = false;
        stop.seen |= status == status::OK && buf.starts_with(STOP_MARKER);
        true
    }
}

impl Job for Verifier<'_> {
    fn next(&mut self, buf: &mut [u8]) -> Option<Io> {
        if let Some(io) = self.stop_read() {
            return Some(io);
        }
        let blocks = self.table.len();
        let writing = self.may_write();
        for step in 0..blocks {
            let block = (self.cursor + step) % blocks;
            let kind = match self.state[block] {
                BlockState::Written => request::IN,
                BlockState::Idle if writing => request::OUT,
                _ => continue,
            };
            self.cursor = (block + 1) % blocks;
            if kind == request::OUT {
                self.pending[block] = self.next_seq;
                seqblock::fill(block as u64, self.next_seq, buf);
                self.next_seq += 1;
                self.state[block] = BlockState::Writing;
            } else {
                self.state[block] = BlockState::Reading;
            }
            self.issued[block] = rdtsc();
            return Some(Io {
                kind,
                offset: (block * BLOCK_SIZE) as u64,
                len: BLOCK_SIZE as u32,
            });
        }
        // Nothing left to read back, and no more writes wanted. (With more
        // blocks than slots there is always an idle or written block.)
        None
    }

    fn done(&mut self, io: &Io, status: u8, buf: &[u8]) {
        if self.stop_read_done(io, status, buf) {
            return;
        }
        let block = (io.offset / BLOCK_SIZE as u64) as usize;
        let latency_us = self.clock.us_since(self.issued[block]);
        self.max_latency_us = self.max_latency_us.max(latency_us);
        if let Some(report) = &mut self.report {
            report.record(latency_us);
        }
        if status != status::OK {
            self.errors += 1;
            println!("blk-swap-verify: block {block}: request failed with status {status}");
            // Whether the write landed is unknown; read it back to find out.
            self.state[block] = BlockState::Written;
            return;
        }
        if io.kind == request::OUT {
            self.writes += 1;
            self.table[block] = self.pending[block];
            self.state[block] = BlockState::Written;
        } else {
            self.reads += 1;
            let found = seqblock::check(block as u64, buf);
            if found != Some(self.table[block]) {
                self.mismatches += 1;
                println!(
                    "blk-swap-verify: block {block}: expected write {}, found {:?}",
                    self.table[block], found
                );
                if let Some(seq) = found {
                    self.table[block] = seq;
                }
            }
            self.state[block] = BlockState::Idle;
        }
    }

    fn between(&mut self) {
        if let Some(report) = &mut self.report {
            report.print_if_due(&self.clock);
        }
    }
}

/// `blk-swap-verify [disk=N] [mirror=N] [blocks=N] [secs=N|rounds=N] [stop=1] [depth=N] [report_ms=N]`,
/// and what `aside` takes: `[ip=CIDR [gw=IP] [nic=N]] [tick_ms=N [console=N]]`.
pub fn run<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(
        &[
            &DISK_KEYS,
            &[
                "mirror",
                "blocks",
                "secs",
                "rounds",
                "stop",
                "depth",
                "report_ms",
            ],
            &NIC_KEYS,
            &ASIDE_KEYS,
        ],
        0,
    )?;
    let mut device = open(env, &args, 1)?;
    let aside = Aside::open(env, &args)?;
    let depth = args.number_or("depth", DEFAULT_DEPTH)?;
    let slots = depth * u64::from(device.queue_count());
    let blocks = args.number_or("blocks", DEFAULT_BLOCKS)?;
    let capacity_blocks = device.config().capacity_bytes() / BLOCK_SIZE as u64;
    if !(1..=256).contains(&depth) {
        return Err(ArgError::OutOfRange {
            name: "depth",
            value: depth,
        }
        .into());
    }
    let stop = match args.number_or("stop", 0)? {
        0 => false,
        1 => true,
        other => {
            return Err(ArgError::OutOfRange {
                name: "stop",
                value: other,
            }
            .into())
        }
    };
    // With stop=1 the stop block follows the verified ones.
    if blocks <= slots || blocks + u64::from(stop) > capacity_blocks {
        return Err(ArgError::OutOfRange {
            name: "blocks",
            value: blocks,
        }
        .into());
    }
    let report = match args.number("report_ms")? {
        Some(0) => {
            return Err(ArgError::OutOfRange {
                name: "report_ms",
                value: 0,
            }
            .into())
        }
        Some(ms) => Some(Report {
            every_us: ms.saturating_mul(1000),
            began: rdtsc(),
            max_latency_us: 0,
        }),
        None => None,
    };
    let mirror = match args.number("mirror")? {
        Some(index) => {
            let device = open_at(env, &args, "mirror", index, 1)?;
            let capacity_blocks = device.config().capacity_bytes() / BLOCK_SIZE as u64;
            if blocks + u64::from(stop) > capacity_blocks {
                return Err(ArgError::OutOfRange {
                    name: "blocks",
                    value: blocks,
                }
                .into());
            }
            let slots = Slots::new(env, &device, depth as u16, BLOCK_SIZE)?;
            let job = verifier(env, blocks, limit(&args, stop, blocks)?, None)?;
            Some(Mirror {
                device,
                slots,
                job,
                done: false,
            })
        }
        None => None,
    };
    let mut job = SwapVerifyJob {
        disk: verifier(env, blocks, limit(&args, stop, blocks)?, report)?,
        mirror,
        aside,
        aside_error: None,
    };
    let mut slots = Slots::new(env, &device, depth as u16, BLOCK_SIZE)?;
    println!("blk-swap-verify: running on {blocks} blocks, depth {depth}");
    slots.run(&mut device, &mut job)?;
    // The mirror's own stop comes when it comes.
    while job.aside_error.is_none() && job.mirror.as_ref().is_some_and(|m| !m.done) {
        job.between();
    }
    if let Some(error) = job.aside_error {
        return Err(error.into());
    }
    let (aside, aside_healthy) = job.aside.finish()?;
    let disk = &job.disk;
    let mirror = job.mirror.as_ref().map(|m| &m.job);
    println!(
        "RESULT blk-swap-verify writes={} reads={} mismatches={} errors={} blocks={blocks} \
         last_seq={} max_latency_us={} table_fnv={:#018x}{}{aside}",
        disk.writes,
        disk.reads,
        disk.mismatches,
        disk.errors,
        disk.next_seq - 1,
        disk.max_latency_us,
        disk.table_fnv(),
        MirrorSummary(mirror),
    );
    Ok(disk.passed() && mirror.is_none_or(Verifier::passed) && aside_healthy)
}

/// When to stop writing, as `rounds=`, `secs=` and `stop=1` say; the stop
/// block (`stop=1`) follows the `blocks` verified ones.
fn limit<'a>(args: &Args<'a>, stop: bool, blocks: u64) -> Result<Limit, Failure<'a>> {
    Ok(match (args.number("rounds")?, args.number("secs")?) {
        (Some(rounds), None) if !stop => Limit::Writes(rounds),
        (None, secs) if stop => Limit::StopBlock(
            StopBlock {
                offset: blocks * BLOCK_SIZE as u64,
                last_read: 0,
                reading: false,
                seen: false,
            },
            secs.map_or(u64::MAX, |secs| secs.saturating_mul(1_000_000)),
        ),
        (None, Some(secs)) => Limit::Micros(secs.saturating_mul(1_000_000)),
        (None, None) => Limit::Micros(10_000_000),
        (Some(rounds), _) => {
            return Err(ArgError::OutOfRange {
                name: "rounds",
                value: rounds,
            }
            .into())
        }
    })
}

/// A fresh workload over `blocks` blocks.
fn verifier<'a>(
    env: &mut Env,
    blocks: u64,
    limit: Limit,
    report: Option<Report>,
) -> Result<Verifier<'static>, Failure<'a>> {
    let count = blocks as usize;
    let memory = &mut env.memory;
    Ok(Verifier {
        clock: env.clock,
        started: rdtsc(),
        limit,
        table: memory
            .alloc_slice(count, 0u64)
            .ok_or(Failure::OutOfMemory)?,
        state: memory
            .alloc_slice(count, BlockState::Idle)
            .ok_or(Failure::OutOfMemory)?,
        pending: memory
            .alloc_slice(count, 0u64)
            .ok_or(Failure::OutOfMemory)?,
        issued: memory
            .alloc_slice(count, 0u64)
            .ok_or(Failure::OutOfMemory)?,
        cursor: 0,
        next_seq: 1,
        writes: 0,
        reads: 0,
        mismatches: 0,
        errors: 0,
        max_latency_us: 0,
        report,
    })
}

impl Verifier<'_> {
    fn passed(&self) -> bool {
        self.mismatches == 0 && self.errors == 0
    }

    fn table_fnv(&self) -> u64 {
        seqblock::table_fnv(self.table.iter().copied())
    }
}

/// The mirror's part of the RESULT line, if there is a mirror.
struct MirrorSummary<'r>(Option<&'r Verifier<'r>>);

impl core::fmt::Display for MirrorSummary<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let Some(mirror) = self.0 else {
            return Ok(());
        };
        write!(
            f,
            " mirror_writes={} mirror_reads={} mirror_mismatches={} mirror_errors={} \
             mirror_table_fnv={:#018x}",
            mirror.writes,
            mirror.reads,
            mirror.mismatches,
            mirror.errors,
            mirror.table_fnv()
        )
    }
}
