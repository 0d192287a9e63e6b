//! `blk-bench`: block throughput and latency-bound IOPS, with the cost of
//! the data path in doorbell kicks and VM exits per request.

use crate::disk::{check_depth, open_disk, DISK_KEYS};
use crate::pipeline::{Io, Job, Slots};
use crate::{Env, Outcome, Rate};
use pvstack_guest::args::{ArgError, Args};
use pvstack_guest::block::BlockDevice;
use pvstack_guest::clock::rdtsc;
use pvstack_guest::println;
use pvstack_guest::rng::Rng;
use pvstack_guest::virtio::blk::{request, status, SECTOR_SIZE};

/// Default amount moved when neither `bytes` nor `secs` is given.
const DEFAULT_BYTES: u64 = 64 << 20;

/// Issues `bs`-byte requests over `[offset, offset + span)` until `bytes`
/// are done or the deadline passes.
struct BenchJob {
    kind: u32,
    random: bool,
    bs: u32,
    offset: u64,
    blocks: u64,
    next_block: u64,
    rng: Rng,
    remaining: u64,
    deadline: Option<u64>,
    ios: u64,
    errors: u64,
}

impl Job for BenchJob {
    fn next(&mut self, _buf: &mut [u8]) -> Option<Io> {
        if self.remaining == 0 || self.deadline.is_some_and(|d| rdtsc() >= d) {
            return None;
        }
        self.remaining = self.remaining.saturating_sub(u64::from(self.bs));
        let block = if self.random {
            self.rng.below(self.blocks)
        } else {
            let block = self.next_block;
            self.next_block = (block + 1) % self.blocks;
            block
        };
        Some(Io {
            kind: self.kind,
            offset: self.offset + block * u64::from(self.bs),
            len: self.bs,
        })
    }

    fn done(&mut self, _io: &Io, status: u8, _buf: &[u8]) {
        self.ios += 1;
        if status != status::OK {
            self.errors += 1;
        }
    }
}

pub fn run<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(
        &[
            &DISK_KEYS,
            &["rw", "bs", "qd", "bytes", "secs", "offset", "span", "seed"],
        ],
        0,
    )?;
    let rw = args.value("rw").ok_or(ArgError::Missing("rw"))?;
    let (kind, random) = match rw {
        "randread" => (request::IN, true),
        "randwrite" => (request::OUT, true),
        "read" => (request::IN, false),
        "write" => (request::OUT, false),
        other => {
            return Err(ArgError::BadChoice {
                name: "rw",
                value: other,
            }
            .into())
        }
    };
    let bs = args.number_or("bs", 4096)?;
    let qd = args.number_or("qd", 1)?;
    let secs = args.number("secs")?;
    let bytes = match (args.number("bytes")?, secs) {
        (Some(bytes), _) => bytes,
        (None, Some(_)) => u64::MAX,
        (None, None) => DEFAULT_BYTES,
    };
    let mut device = open_disk(env, &args, 1)?;
    let capacity = device.capacity_bytes();
    let offset = args.number_or("offset", 0)?;
    let span = args.number_or("span", capacity.saturating_sub(offset))?;
    if bs == 0 || bs % SECTOR_SIZE != 0 || bs > u64::from(device.max_request_bytes()) || bs > span {
        return Err(ArgError::OutOfRange {
            name: "bs",
            value: bs,
        }
        .into());
    }
    if offset % SECTOR_SIZE != 0 || offset.checked_add(span).is_none_or(|end| end > capacity) {
        return Err(ArgError::OutOfRange {
            name: "span",
            value: span,
        }
        .into());
    }
    let depth = check_depth(&device, qd, bs as u32)?;
    let mut slots = Slots::new(env, &device, depth, bs as usize)?;
    let mut job = BenchJob {
        kind,
        random,
        bs: bs as u32,
        offset,
        blocks: span / bs,
        next_block: 0,
        rng: Rng::new(args.number_or("seed", 1)?),
        remaining: bytes,
        deadline: None,
        ios: 0,
        errors: 0,
    };

    let before = env.hypercall.counters()?;
    let kicks_before = device.kicks();
    let start = rdtsc();
    job.deadline = secs.map(|s| start + env.clock.us_to_ticks(s.saturating_mul(1_000_000)));
    slots.run(&mut device, &mut job)?;
    let usecs = env.clock.ticks_to_us(rdtsc().wrapping_sub(start)).max(1);
    let after = env.hypercall.counters()?;
    // The second COUNTERS call counts its own exit; leave it out.
    let exits = (after.exits - before.exits).saturating_sub(1);
    let kicks = device.kicks() - kicks_before;
    let moved = job.ios * bs;
    println!(
        "RESULT blk-bench rw={rw} bs={bs} qd={qd} queues={} ios={} bytes={moved} usecs={usecs} iops={} mbps={} \
         kicks_per_req={} exits_per_req={} errors={}",
        device.queue_count(),
        job.ios,
        Rate(job.ios * 1_000_000, usecs),
        Rate(moved, usecs),
        Rate(kicks, job.ios),
        Rate(exits, job.ios),
        job.errors
    );
    Ok(job.errors == 0 && job.ios > 0)
}
