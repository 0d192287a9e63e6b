//! `blk-evil`: malformed requests that a device must answer with an error
//! status (or, when it cannot even find the status byte, consume without
//! hanging), followed by one good read showing the device still serves.

use crate::disk::{open, DISK_KEYS};
use crate::{Env, Failure, Outcome};
use pvstack_guest::args::Args;
use pvstack_guest::clock::rdtsc;
use pvstack_guest::println;
use pvstack_guest::virtio::blk::{request, status, BlkDevice, Malformation};
use pvstack_guest::virtio::queue::Buffer;
use pvstack_protocols::layout;

/// How long to wait for an answer to one bad request.
const ANSWER_TIMEOUT_US: u64 = 2_000_000;
/// Size of the (valid) data buffer most cases use.
const DATA_LEN: u32 = 4096;

struct Case {
    name: &'static str,
    kind: u32,
    sector: u64,
    data: Option<Buffer>,
    how: Malformation,
}

/// How the device dealt with one case.
enum Answer {
    /// Completed with this status byte.
    Status(u8),
    /// Completed, but the device never wrote the status byte.
    Consumed,
    /// Not completed within the timeout.
    TimedOut,
}

/// The first guest physical address past all RAM.
fn end_of_ram(mem_size: u64) -> u64 {
    let [(low_start, low_len), (high_start, high_len)] = layout::ram_ranges(mem_size);
    if high_len > 0 {
        high_start + high_len
    } else {
        low_start + low_len
    }
}

pub fn run<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[&DISK_KEYS], 0)?;
    let mut device = open(env, &args, 1)?;
    let capacity = device.config().capacity;
    let ram_end = end_of_ram(env.boot.mem_size);
    let outside = ram_end + (1 << 30);
    let buf = env
        .memory
        .alloc(DATA_LEN as usize, 4096)
        .ok_or(Failure::OutOfMemory)?;
    let good = Buffer {
        addr: buf.as_ptr() as u64,
        len: DATA_LEN,
        device_writes: true,
    };
    let read = |name, sector, data: Option<Buffer>| Case {
        name,
        kind: request::IN,
        sector,
        data,
        how: Malformation::default(),
    };
    let cases = [
        read(
            "data outside guest memory",
            0,
            Some(Buffer {
                addr: outside,
                ..good
            }),
        ),
        read(
            "data straddling the end of RAM",
            0,
            Some(Buffer {
                addr: ram_end - 2048,
                ..good
            }),
        ),
        Case {
            how: Malformation {
                header_addr: Some(outside),
                ..Malformation::default()
            },
            ..read("header outside guest memory", 0, Some(good))
        },
        Case {
            how: Malformation {
                header_len: Some(8),
                ..Malformation::default()
            },
            ..read("header too short", 0, Some(good))
        },
        Case {
            how: Malformation {
                loop_back: true,
                ..Malformation::default()
            },
            ..read("looping descriptor chain", 0, Some(good))
        },
        read("zero-length data", 0, Some(Buffer { len: 0, ..good })),
        read(
            "data length not a sector multiple",
            0,
            Some(Buffer { len: 100, ..good }),
        ),
        read("read past the end of the disk", capacity, Some(good)),
        read(
            "read straddling the end of the disk",
            capacity - 1,
            Some(good),
        ),
        Case {
            kind: 0x7f,
            ..read("unknown request type", 0, Some(good))
        },
    ];

    let (mut errors_returned, mut unanswered, mut wrongly_ok) = (0u32, 0u32, 0u32);
    for case in &cases {
        let data: &[Buffer] = match &case.data {
            Some(data) => core::slice::from_ref(data),
            None => &[],
        };
        // SAFETY: the data buffers are `buf` (bump memory only this workload
        // uses) or addresses outside guest RAM, which hold no Rust data.
        let token = unsafe { device.submit_malformed(0, case.kind, case.sector, data, case.how)? };
        device.kick(0)?;
        match wait(env, &mut device, token)? {
            Answer::Status(status::OK) => {
                wrongly_ok += 1;
                println!("blk-evil: {}: answered OK (should be an error)", case.name);
            }
            Answer::Status(code) => {
                errors_returned += 1;
                println!("blk-evil: {}: error status {code}", case.name);
            }
            Answer::Consumed => {
                unanswered += 1;
                println!("blk-evil: {}: consumed without a status", case.name);
            }
            Answer::TimedOut => {
                unanswered += 1;
                println!(
                    "blk-evil: {}: no answer within {} ms",
                    case.name,
                    ANSWER_TIMEOUT_US / 1000
                );
            }
        }
    }

    // SAFETY: `buf` is bump memory only this workload uses.
    let token = unsafe { device.submit(0, request::IN, 0, Some(good))? };
    device.kick(0)?;
    let after = wait(env, &mut device, token)?;
    let after_ok = matches!(after, Answer::Status(status::OK));
    println!(
        "blk-evil: a valid read afterwards: {}",
        if after_ok { "OK" } else { "FAILED" }
    );
    println!(
        "RESULT blk-evil cases={} errors_returned={errors_returned} unanswered={unanswered} ok_returned={wrongly_ok} \
         after_ok={}",
        cases.len(),
        u8::from(after_ok)
    );
    Ok(wrongly_ok == 0 && after_ok)
}

/// Polls queue 0 until request `token` completes (other completions are
/// late answers to earlier cases and are dropped) or the timeout passes.
fn wait<'a>(env: &Env, device: &mut BlkDevice<'_>, token: u16) -> Result<Answer, Failure<'a>> {
    let deadline = rdtsc() + env.clock.us_to_ticks(ANSWER_TIMEOUT_US);
    while rdtsc() < deadline {
        match device.poll(0)? {
            Some(done) if done.token == token => {
                return Ok(match done.status {
                    status::NONE => Answer::Consumed,
                    code => Answer::Status(code),
                })
            }
            Some(_) => {}
            None => core::hint::spin_loop(),
        }
    }
    Ok(Answer::TimedOut)
}
