//! Opening a disk, and the data workloads: blk-verify, blk-checksum, blk-zero.
//! They run on any [`BlockDevice`]: a virtio-blk disk (whichever mode serves
//! it) or the emulated legacy controller.

use crate::pipeline::{Io, Job, Slots};
use crate::{Env, Failure, Outcome};
use pvstack_guest::args::{ArgError, Args};
use pvstack_guest::block::{BlockDevice, Disk};
use pvstack_guest::checksum::Fnv1a64;
use pvstack_guest::legacy_blk::{self, LegacyBlk};
use pvstack_guest::pattern;
use pvstack_guest::println;
use pvstack_guest::virtio::blk::{
    self, request, status, BlkDevice, BlkOptions, ID_LEN, SECTOR_SIZE,
};
use pvstack_guest::virtio::mmio::MmioTransport;
use pvstack_guest::virtio::queue::Buffer;
use pvstack_guest::virtio::{device_id, find_device, VirtioError};

/// Arguments every disk workload takes.
pub const DISK_KEYS: [&str; 3] = ["disk", "queues", "event_idx"];

/// Descriptors per queue the workloads ask for (capped by the device).
const QUEUE_SIZE: u16 = 1024;

/// Opens disk `disk=N` (default 0), a virtio-blk disk (as [`open`]) or a
/// legacy controller (one queue only), printing what it found.
pub fn open_disk<'a>(
    env: &mut Env,
    args: &Args<'a>,
    default_queues: u16,
) -> Result<Disk<'static>, Failure<'a>> {
    let index = args.number_or("disk", 0)?;
    let Some(base) = u32::try_from(index)
        .ok()
        .and_then(|index| legacy_blk::find(&env.boot, index))
    else {
        return Ok(Disk::Virtio(open(env, args, default_queues)?));
    };
    let queues = args.number_or("queues", u64::from(default_queues))?;
    if queues != 1 {
        println!("disk {index}: a legacy controller has one queue");
        return Err(ArgError::OutOfRange {
            name: "queues",
            value: queues,
        }
        .into());
    }
    // SAFETY: the window comes from the VMM's boot info, and this is the
    // only driver made for it.
    let disk = unsafe { LegacyBlk::new(base) }.ok_or(Failure::Device(VirtioError::NotFound {
        device_id: device_id::BLOCK,
        index: index as u32,
    }))?;
    println!(
        "disk {index}: legacy controller, {} sectors ({} MiB), ro={}",
        disk.capacity(),
        disk.capacity_bytes() >> 20,
        u8::from(disk.read_only()),
    );
    Ok(Disk::Legacy(disk))
}

/// Opens virtio-blk disk `disk=N` (default 0) with `queues=N` queues
/// (default `default_queues`), printing what it found.
pub fn open<'a>(
    env: &mut Env,
    args: &Args<'a>,
    default_queues: u16,
) -> Result<BlkDevice<'static>, Failure<'a>> {
    let index = args.number_or("disk", 0)?;
    open_at(env, args, "disk", index, default_queues)
}

/// As [`open`], for disk `index`, which the argument `name` gave.
pub fn open_at<'a>(
    env: &mut Env,
    args: &Args<'a>,
    name: &'static str,
    index: u64,
    default_queues: u16,
) -> Result<BlkDevice<'static>, Failure<'a>> {
    let index = u32::try_from(index).map_err(|_| ArgError::OutOfRange { name, value: index })?;
    let queues = args.number_or("queues", u64::from(default_queues))?;
    if !(1..=blk::MAX_QUEUES as u64).contains(&queues) {
        return Err(ArgError::OutOfRange {
            name: "queues",
            value: queues,
        }
        .into());
    }
    let mut device = start(env, index, queues as u16, args)?;
    if u64::from(device.queue_count()) < queues {
        println!(
            "disk {index}: the device offers only {} queues",
            device.queue_count()
        );
        return Err(ArgError::OutOfRange {
            name: "queues",
            value: queues,
        }
        .into());
    }
    let id = read_id(env, &mut device)?;
    let config = *device.config();
    println!(
        "disk {index}: {} sectors ({} MiB), blk_size {}, queues {} of {}, queue size {}, ro={}, \
         event_idx={}, size_max {}, seg_max {}, features {:#x}, id \"{}\"",
        config.capacity,
        config.capacity_bytes() >> 20,
        config.blk_size,
        device.queue_count(),
        config.num_queues,
        device.queue_size(0)?,
        u8::from(config.read_only()),
        u8::from(config.features & pvstack_guest::virtio::feature::RING_EVENT_IDX != 0),
        config.size_max,
        config.seg_max,
        config.features,
        id.as_ref().map_or("(GET_ID failed)", |id| id.as_str()),
    );
    Ok(device)
}

/// Resets virtio-blk disk `index` and starts its driver with `queues`
/// queues: negotiation, ring setup, DRIVER_OK.
fn start<'a>(
    env: &mut Env,
    index: u32,
    queues: u16,
    args: &Args<'a>,
) -> Result<BlkDevice<'static>, Failure<'a>> {
    let options = BlkOptions {
        queues,
        queue_size: QUEUE_SIZE,
        event_idx: args.number_or("event_idx", 1)? != 0,
    };
    let info = find_device(&env.boot, device_id::BLOCK, index)?;
    // SAFETY: the window comes from the VMM's boot info, and a driver made
    // earlier for it is dropped (its rings are given up by the reset this
    // driver starts with).
    let transport = unsafe { MmioTransport::new(info.mmio_addr) };
    Ok(BlkDevice::new(transport, &options, &mut env.memory)?)
}

/// `blk-reset [count=N]`: starts disk `disk=N`'s driver, then resets the
/// running device and starts it again, N times (default 1). Sends no
/// request, so any backend that sets rings up and stops them will do.
pub fn reset<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[&DISK_KEYS, &["count"]], 0)?;
    let index = args.number_or("disk", 0)?;
    let index = u32::try_from(index).map_err(|_| ArgError::OutOfRange {
        name: "disk",
        value: index,
    })?;
    let count = args.number_or("count", 1)?;
    let mut starts = 0u64;
    for _ in 0..=count {
        // Each driver is given up when the next one resets the device.
        let _driver = start(env, index, 1, &args)?;
        starts += 1;
        println!("blk-reset: driver started ({starts})");
    }
    println!("RESULT blk-reset starts={starts}");
    Ok(true)
}

/// A GET_ID answer: up to 20 bytes, NUL-padded.
struct DeviceId {
    bytes: [u8; ID_LEN],
}

impl DeviceId {
    fn as_str(&self) -> &str {
        let len = self.bytes.iter().position(|&b| b == 0).unwrap_or(ID_LEN);
        core::str::from_utf8(&self.bytes[..len]).unwrap_or("(not UTF-8)")
    }
}

fn read_id<'a>(env: &mut Env, device: &mut BlkDevice<'_>) -> Result<Option<DeviceId>, Failure<'a>> {
    let buf = env.memory.alloc(ID_LEN, 8).ok_or(Failure::OutOfMemory)?;
    let data = Buffer {
        addr: buf.as_ptr() as u64,
        len: ID_LEN as u32,
        device_writes: true,
    };
    // SAFETY: `buf` is fresh bump memory nothing else uses.
    let answer = unsafe { device.run(0, request::GET_ID, 0, Some(data))? };
    Ok((answer == status::OK).then(|| DeviceId {
        bytes: buf.try_into().unwrap_or([0; ID_LEN]),
    }))
}

/// A byte range of the disk from `offset=`/`len=` (or positional) arguments.
fn range<'a>(device: &Disk<'_>, offset: u64, len: u64) -> Result<(), Failure<'a>> {
    let capacity = device.capacity_bytes();
    if offset.checked_add(len).is_none_or(|end| end > capacity) {
        return Err(ArgError::OutOfRange {
            name: "len",
            value: len,
        }
        .into());
    }
    Ok(())
}

fn require_sectors<'a>(name: &'a str, value: u64) -> Result<(), Failure<'a>> {
    if value % SECTOR_SIZE != 0 {
        return Err(ArgError::OutOfRange { name, value }.into());
    }
    Ok(())
}

/// The request sizes `blk-verify` cycles through (4K to 128K, some not
/// powers of two, so request boundaries fall at mixed alignments).
const VERIFY_SIZES: [u32; 8] = [4096, 131_072, 12_800, 65_536, 1536, 32_768, 8192, 102_400];
/// Default bytes `blk-verify` covers.
const VERIFY_DEFAULT_LEN: u64 = 64 << 20;

/// Writes or reads `[offset, offset + len)` in `VERIFY_SIZES` pieces,
/// checking reads against the pattern.
struct VerifyJob {
    kind: u32,
    seed: u64,
    next: u64,
    end: u64,
    step: usize,
    mismatches: u64,
    errors: u64,
}

impl VerifyJob {
    fn new(kind: u32, seed: u64, offset: u64, len: u64) -> Self {
        VerifyJob {
            kind,
            seed,
            next: offset,
            end: offset + len,
            step: 0,
            mismatches: 0,
            errors: 0,
        }
    }
}

impl Job for VerifyJob {
    fn next(&mut self, buf: &mut [u8]) -> Option<Io> {
        if self.next >= self.end {
            return None;
        }
        let size = VERIFY_SIZES[self.step % VERIFY_SIZES.len()];
        self.step += 1;
        let len = u64::from(size).min(self.end - self.next) as u32;
        let io = Io {
            kind: self.kind,
            offset: self.next,
            len,
        };
        self.next += u64::from(len);
        if self.kind == request::OUT {
            pattern::fill(self.seed, io.offset, &mut buf[..len as usize]);
        }
        Some(io)
    }

    fn done(&mut self, io: &Io, status: u8, buf: &[u8]) {
        if status != status::OK {
            self.errors += 1;
        } else if io.kind == request::IN {
            self.mismatches += pattern::mismatches(self.seed, io.offset, buf);
        }
    }
}

/// `blk-verify`: writes the pattern over a range, reads it back, compares.
pub fn verify<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[&DISK_KEYS, &["offset", "len", "depth", "seed"]], 0)?;
    let mut device = open_disk(env, &args, 1)?;
    let capacity = device.capacity_bytes();
    let offset = args.number_or("offset", 0)?;
    let len = args.number_or(
        "len",
        VERIFY_DEFAULT_LEN.min(capacity.saturating_sub(offset)),
    )?;
    let depth = args.number_or("depth", 8)?;
    let seed = args.number_or("seed", 1)?;
    require_sectors("offset", offset)?;
    require_sectors("len", len)?;
    range(&device, offset, len)?;
    let max_size = *VERIFY_SIZES.iter().max().unwrap_or(&131_072);
    let depth = check_depth(&device, depth, max_size)?;
    let mut slots = Slots::new(env, &device, depth, max_size as usize)?;

    let mut write = VerifyJob::new(request::OUT, seed, offset, len);
    slots.run(&mut device, &mut write)?;
    let flush = if device.can_flush() {
        // SAFETY: FLUSH carries no data.
        unsafe { device.run(0, request::FLUSH, 0, None)? }
    } else {
        status::OK
    };
    let mut read = VerifyJob::new(request::IN, seed, offset, len);
    slots.run(&mut device, &mut read)?;
    let errors = write.errors + read.errors + u64::from(flush != status::OK);
    println!(
        "blk-verify: wrote {} requests ({} errors), flush status {flush}, read back ({} errors)",
        write.step, write.errors, read.errors
    );
    println!(
        "RESULT blk-verify bytes={len} mismatches={} errors={errors}",
        read.mismatches
    );
    Ok(read.mismatches == 0 && errors == 0)
}

/// Checks that `depth` requests of `max_len` bytes fit in each queue.
pub fn check_depth<'a>(
    device: &impl BlockDevice,
    depth: u64,
    max_len: u32,
) -> Result<u16, Failure<'a>> {
    let fit = u64::from(device.max_in_flight(max_len)?);
    if depth == 0 || depth > fit {
        println!("depth: at most {fit} requests of {max_len} bytes fit in a queue");
        return Err(ArgError::OutOfRange {
            name: "depth",
            value: depth,
        }
        .into());
    }
    Ok(depth as u16)
}

/// Largest read `blk-checksum` and `blk-zero` issue at once.
const CHUNK: u32 = 1 << 20;

/// Reads the sectors covering `[offset, offset + len)` in chunks and hands
/// each chunk's bytes inside the range to `f`; the first non-OK status
/// stops it and is returned.
fn read_range<'a>(
    env: &mut Env,
    device: &mut Disk<'_>,
    offset: u64,
    len: u64,
    mut f: impl FnMut(&[u8]),
) -> Result<u8, Failure<'a>> {
    let chunk = CHUNK.min(device.max_request_bytes());
    let buf = env
        .memory
        .alloc(chunk as usize, 4096)
        .ok_or(Failure::OutOfMemory)?;
    let end = offset + len;
    let mut pos = offset - offset % SECTOR_SIZE;
    while pos < end {
        let n = u64::from(chunk).min((end - pos).next_multiple_of(SECTOR_SIZE));
        let data = Buffer {
            addr: buf.as_ptr() as u64,
            len: n as u32,
            device_writes: true,
        };
        // SAFETY: `buf` is bump memory only this loop uses; `run` returns
        // after the device is done with it.
        let answer = unsafe { device.run(0, request::IN, pos / SECTOR_SIZE, Some(data))? };
        if answer != status::OK {
            return Ok(answer);
        }
        let from = offset.saturating_sub(pos) as usize;
        let to = (end.min(pos + n) - pos) as usize;
        f(&buf[from..to]);
        pos += n;
    }
    Ok(status::OK)
}

/// `blk-checksum OFFSET LEN`: FNV-1a 64 of a disk range.
pub fn checksum<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[&DISK_KEYS], 2)?;
    let offset = args.positional_number(0, "offset")?;
    let len = args.positional_number(1, "len")?;
    let mut device = open_disk(env, &args, 1)?;
    range(&device, offset, len)?;
    let mut hasher = Fnv1a64::new();
    let answer = read_range(env, &mut device, offset, len, |bytes| hasher.update(bytes))?;
    if answer != status::OK {
        println!("blk-checksum: read failed with status {answer}");
        return Ok(false);
    }
    println!(
        "RESULT blk-checksum bytes={len} fnv={:#018x}",
        hasher.finish()
    );
    Ok(true)
}

/// `blk-zero OFFSET LEN [discard=1]`: WRITE_ZEROES (or DISCARD) a range,
/// then read it back (after WRITE_ZEROES every byte must be zero).
pub fn zero<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[&DISK_KEYS, &["discard"]], 2)?;
    let offset = args.positional_number(0, "offset")?;
    let len = args.positional_number(1, "len")?;
    let discard = args.number_or("discard", 0)? != 0;
    require_sectors("offset", offset)?;
    require_sectors("len", len)?;
    let sectors = u32::try_from(len / SECTOR_SIZE).map_err(|_| ArgError::OutOfRange {
        name: "len",
        value: len,
    })?;
    let mut device = open_disk(env, &args, 1)?;
    range(&device, offset, len)?;
    let (kind, name) = if discard {
        (request::DISCARD, "discard")
    } else {
        (request::WRITE_ZEROES, "write_zeroes")
    };
    let descriptor = env.memory.alloc(16, 16).ok_or(Failure::OutOfMemory)?;
    descriptor.copy_from_slice(&blk::range_descriptor(offset / SECTOR_SIZE, sectors, false));
    let data = Buffer {
        addr: descriptor.as_ptr() as u64,
        len: 16,
        device_writes: false,
    };
    // SAFETY: `descriptor` is bump memory only this request uses.
    let answer = unsafe { device.run(0, kind, 0, Some(data))? };
    let mut nonzero = 0u64;
    if !discard && answer == status::OK {
        let read = read_range(env, &mut device, offset, len, |bytes| {
            nonzero += bytes.iter().filter(|&&b| b != 0).count() as u64;
        })?;
        if read != status::OK {
            println!("blk-zero: read back failed with status {read}");
            return Ok(false);
        }
    }
    println!("RESULT blk-zero op={name} bytes={len} status={answer} nonzero={nonzero}");
    Ok(answer == status::OK && nonzero == 0)
}
