//! Work `blk-swap-verify` can do beside its disk, so that one guest keeps
//! every kind of device busy while its VMM is snapshotted or replaced:
//! answering pings on a NIC (`ip=CIDR [gw=IP] [nic=N]`; smoltcp replies to
//! echo requests for its address) and writing a stamped `tick N` line on
//! the virtio console every `tick_ms=N` milliseconds (`console=N` picks the
//! console), which lets the host see that no line was lost.

use crate::net::{self, Stack};
use crate::term::Term;
use crate::{outln, Env, Failure};
use pvstack_guest::args::{ArgError, Args};
use pvstack_guest::clock::{rdtsc, Clock};
use pvstack_guest::println;
use pvstack_guest::virtio::console::ConsoleDevice;
use pvstack_guest::virtio::mmio::MmioTransport;
use pvstack_guest::virtio::{device_id, find_device, VirtioError};
use smoltcp::iface::{SocketSet, SocketStorage};

/// The keys this module takes, besides the NIC's.
pub const ASIDE_KEYS: [&str; 2] = ["tick_ms", "console"];

/// How often the NIC is polled while the disk keeps the loop busy.
const NET_POLL_US: u64 = 100;
/// How long the last ticks may take to leave the console at the end.
const DRAIN_US: u64 = 1_000_000;

struct Ticker {
    term: Term,
    every_us: u64,
    last: u64,
    ticks: u64,
}

/// What the workload does beside the disk; each part is optional.
pub struct Aside {
    clock: Clock,
    net: Option<(Stack, u64)>,
    ticker: Option<Ticker>,
}

impl Aside {
    /// Opens the NIC if `ip=` is given and the console if `tick_ms=` is.
    pub fn open<'a>(env: &mut Env, args: &Args<'a>) -> Result<Aside, Failure<'a>> {
        let net = match args.value("ip") {
            Some(_) => Some((net::open(env, args)?, 0)),
            None => None,
        };
        let ticker = match args.number("tick_ms")? {
            Some(0) => {
                return Err(ArgError::OutOfRange {
                    name: "tick_ms",
                    value: 0,
                }
                .into())
            }
            Some(ms) => Some(Ticker {
                term: Term::new(open_console(env, args)?, env.clock),
                every_us: ms.saturating_mul(1000),
                last: rdtsc(),
                ticks: 0,
            }),
            None => None,
        };
        Ok(Aside {
            clock: env.clock,
            net,
            ticker,
        })
    }

    /// One turn: polls the NIC now and then, and ticks when it is time.
    pub fn poll(&mut self) -> Result<(), VirtioError> {
        if let Some((stack, last_poll)) = &mut self.net {
            let now = stack.us();
            if now >= *last_poll + NET_POLL_US {
                // No sockets: the interface itself answers pings.
                let mut storage: [SocketStorage<'_>; 0] = [];
                stack.poll(&mut SocketSet::new(&mut storage[..]));
                *last_poll = now;
            }
        }
        if let Some(ticker) = &mut self.ticker {
            if self.clock.us_since(ticker.last) >= ticker.every_us {
                ticker.last = rdtsc();
                ticker.ticks += 1;
                outln!(ticker.term, "tick {}", ticker.ticks)?;
            }
        }
        Ok(())
    }

    /// Lets the last ticks leave; returns the RESULT fields of this work
    /// (` ticks=N ticks_lost=N`, or nothing without a console) and whether
    /// the NIC's device kept to the virtio protocol.
    pub fn finish(&mut self) -> Result<(Summary, bool), VirtioError> {
        let mut summary = Summary::default();
        if let Some(ticker) = &mut self.ticker {
            if !ticker.term.drain(DRAIN_US)? {
                println!("blk-swap-verify: the console did not take the last ticks");
            }
            summary.ticks = Some((ticker.ticks, ticker.term.lost_total()));
        }
        let healthy = self
            .net
            .as_ref()
            .is_none_or(|(stack, _)| stack.report_fault());
        Ok((summary, healthy))
    }
}

/// What [`Aside::finish`] reports.
#[derive(Default)]
pub struct Summary {
    /// Ticks written and lines the console dropped.
    ticks: Option<(u64, u64)>,
}

impl core::fmt::Display for Summary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.ticks {
            Some((ticks, lost)) => write!(f, " ticks={ticks} ticks_lost={lost}"),
            None => Ok(()),
        }
    }
}

fn open_console<'a>(env: &mut Env, args: &Args<'a>) -> Result<ConsoleDevice<'static>, Failure<'a>> {
    let index = args.number_or("console", 0)?;
    let index = u32::try_from(index).map_err(|_| ArgError::OutOfRange {
        name: "console",
        value: index,
    })?;
    let info = find_device(&env.boot, device_id::CONSOLE, index)?;
    // SAFETY: the window comes from the VMM's boot info, and this is the
    // only transport made for it.
    let transport = unsafe { MmioTransport::new(info.mmio_addr) };
    Ok(ConsoleDevice::new(transport, &mut env.memory)?)
}
