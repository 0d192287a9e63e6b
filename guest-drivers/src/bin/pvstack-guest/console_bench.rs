//! `console-bench via=hypercall|virtio|uart [bytes=N]`: guest-to-host
//! console throughput. Writes N bytes of 64-byte text lines through the
//! chosen console in the way each is meant to be driven: CONSOLE_WRITE
//! hypercalls of up to 4 KiB, virtio-console buffers of 4 KiB (the time
//! includes the backend consuming the last one), or the UART's 16-byte
//! FIFO (every register access traps).

use pvstack_guest::args::Args;
use pvstack_guest::clock::rdtsc;
use pvstack_guest::println;
use pvstack_guest::uart::Uart;
use pvstack_guest::virtio::console::ConsoleDevice;
use pvstack_guest::virtio::mmio::MmioTransport;
use pvstack_guest::virtio::{device_id, find_device};
use pvstack_protocols::boot::device_kind;

use crate::{Env, Outcome, Rate};

/// Bytes per hypercall or virtio buffer.
const CHUNK: usize = 4096;
/// Bytes written when `bytes=` is not given.
const DEFAULT_BYTES: u64 = 1 << 20;

/// A 4 KiB block of numbered 64-byte lines.
fn fill_chunk(chunk: &mut [u8; CHUNK]) {
    for (i, line) in chunk.chunks_mut(64).enumerate() {
        line.fill(b'a' + (i % 26) as u8);
        line[63] = b'\n';
    }
}

pub fn run<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[&["via"], &["bytes"]], 0)?;
    let via = args.value("via").unwrap_or("virtio");
    let total = args.number_or("bytes", DEFAULT_BYTES)?;
    let mut chunk = [0u8; CHUNK];
    fill_chunk(&mut chunk);
    let before = env.hypercall.counters()?;
    let start = rdtsc();
    let kicks = match via {
        "hypercall" => {
            let mut left = total;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                env.hypercall.console_write(&chunk[..n])?;
                left -= n as u64;
            }
            0
        }
        "virtio" => {
            let info = find_device(&env.boot, device_id::CONSOLE, 0)?;
            // SAFETY: the window comes from the VMM's boot info, and this
            // is the only transport made for it.
            let transport = unsafe { MmioTransport::new(info.mmio_addr) };
            let mut device = ConsoleDevice::new(transport, &mut env.memory)?;
            // Setting the device up is not part of the measurement.
            let before = env.hypercall.counters()?;
            let start_after_setup = rdtsc();
            let mut left = total;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                let mut rest = &chunk[..n];
                while !rest.is_empty() {
                    let taken = device.write(rest)?;
                    rest = &rest[taken..];
                }
                left -= n as u64;
            }
            while !device.tx_idle()? {
                core::hint::spin_loop();
            }
            return report(env, via, total, start_after_setup, &before, device.kicks());
        }
        "uart" => {
            let Some(info) = env
                .boot
                .devices()
                .iter()
                .find(|d| d.kind == device_kind::UART_16550)
                .copied()
            else {
                println!("error: console-bench: no UART (start pvstack with --serial)");
                return Ok(false);
            };
            // SAFETY: the window comes from the VMM's boot info; nothing
            // else drives this UART.
            let mut uart = unsafe { Uart::new(info.mmio_addr) };
            let mut left = total;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                uart.write(&chunk[..n]);
                left -= n as u64;
            }
            0
        }
        _ => {
            println!("error: console-bench: via= is hypercall, virtio or uart");
            return Ok(false);
        }
    };
    report(env, via, total, start, &before, kicks)
}

fn report<'a>(
    env: &mut Env,
    via: &str,
    bytes: u64,
    start: u64,
    before: &pvstack_protocols::boot::Counters,
    kicks: u64,
) -> Outcome<'a> {
    let usecs = env.clock.us_since(start).max(1);
    let after = env.hypercall.counters()?;
    // The closing COUNTERS call is one of the exits counted; leave it out.
    let exits = after.exits.saturating_sub(before.exits + 1);
    println!(
        "RESULT console-bench via={via} bytes={bytes} usecs={usecs} bytes_per_sec={} exits={exits} kicks={kicks}",
        Rate(bytes * 1_000_000, usecs)
    );
    Ok(true)
}
