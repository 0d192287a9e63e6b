//! Network workloads on the virtio-net driver and smoltcp: net-serve (ping
//! replies, UDP and TCP echo on port 7, a TCP sink on port 9), net-ping (the
//! guest pings a peer) and net-bench (the guest sends to a host sink).

use core::net::Ipv4Addr;

use crate::{Env, Failure, Outcome, Rate};
use pvstack_guest::args::{ArgError, Args};
use pvstack_guest::clock::rdtsc;
use pvstack_guest::netstack::{parse_cidr, parse_ipv4, SmolNic};
use pvstack_guest::println;
use pvstack_guest::virtio::mmio::MmioTransport;
use pvstack_guest::virtio::net::NetDevice;
use pvstack_guest::virtio::{device_id, find_device};
use smoltcp::iface::{Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::{icmp, tcp, udp};
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress, IpEndpoint};

/// Echo service port (UDP and TCP), as in RFC 862.
const ECHO_PORT: u16 = 7;
/// Discard-like sink port: counts what it receives and answers the count.
const SINK_PORT: u16 = 9;
/// TCP buffer sizes: big enough for a window that keeps a host sender busy.
const TCP_RX_BUFFER: usize = 256 * 1024;
const TCP_TX_BUFFER: usize = 256 * 1024;
/// UDP: datagrams and bytes buffered each way.
const UDP_PACKETS: usize = 64;
const UDP_BYTES: usize = 64 * 1024;
/// The datagram to port 7 that ends net-serve.
const STOP_DATAGRAM: &[u8] = b"stop";

/// Keys every net workload takes.
pub(crate) const NIC_KEYS: [&str; 3] = ["nic", "ip", "gw"];

/// A NIC with its interface, ready for sockets.
pub(crate) struct Stack {
    nic: SmolNic<'static>,
    iface: Interface,
}

impl Stack {
    /// Runs smoltcp once and shows the device what it queued.
    pub(crate) fn poll(&mut self, sockets: &mut SocketSet<'_>) {
        let now = self.nic.now();
        self.iface.poll(now, &mut self.nic, sockets);
        self.nic.device.flush();
    }

    pub(crate) fn us(&self) -> u64 {
        self.nic.now().total_micros() as u64
    }

    /// Prints the counters and whether the device misbehaved; true if not.
    pub(crate) fn report_fault(&self) -> bool {
        match self.nic.fault {
            Some(fault) => {
                println!("error: the device broke the virtio protocol: {fault}");
                false
            }
            None => true,
        }
    }
}

pub(crate) fn open<'a>(env: &mut Env, args: &Args<'a>) -> Result<Stack, Failure<'a>> {
    let index = args.number_or("nic", 0)?;
    let index = u32::try_from(index).map_err(|_| ArgError::OutOfRange {
        name: "nic",
        value: index,
    })?;
    let ip = args.value("ip").ok_or(ArgError::Missing("ip"))?;
    let cidr = parse_cidr(ip).ok_or(ArgError::BadChoice {
        name: "ip",
        value: ip,
    })?;
    let gateway = args
        .value("gw")
        .map(|gw| {
            parse_ipv4(gw).ok_or(ArgError::BadChoice {
                name: "gw",
                value: gw,
            })
        })
        .transpose()?;
    let info = find_device(&env.boot, device_id::NET, index)?;
    // SAFETY: the window comes from the VMM's boot info, and this is the
    // only transport made for it.
    let transport = unsafe { MmioTransport::new(info.mmio_addr) };
    let device = NetDevice::new(transport, &mut env.memory)?;
    let mac = device.mac();
    println!(
        "nic {index}: mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, mtu {}, link {}, ip {}",
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5],
        device.mtu(),
        if device.link_up() { "up" } else { "down" },
        cidr
    );
    let mut nic = SmolNic::new(device, env.clock);
    let iface = nic.interface(cidr, gateway);
    Ok(Stack { nic, iface })
}

fn tcp_socket<'a>(env: &mut Env) -> Result<tcp::Socket<'static>, Failure<'a>> {
    let rx = env
        .memory
        .alloc(TCP_RX_BUFFER, 64)
        .ok_or(Failure::OutOfMemory)?;
    let tx = env
        .memory
        .alloc(TCP_TX_BUFFER, 64)
        .ok_or(Failure::OutOfMemory)?;
    Ok(tcp::Socket::new(
        tcp::SocketBuffer::new(&mut rx[..]),
        tcp::SocketBuffer::new(&mut tx[..]),
    ))
}

fn udp_socket<'a>(env: &mut Env) -> Result<udp::Socket<'static>, Failure<'a>> {
    let mut buffer = || -> Result<udp::PacketBuffer<'static>, Failure<'a>> {
        let meta = env
            .memory
            .alloc_slice(UDP_PACKETS, udp::PacketMetadata::EMPTY)
            .ok_or(Failure::OutOfMemory)?;
        let bytes = env
            .memory
            .alloc(UDP_BYTES, 64)
            .ok_or(Failure::OutOfMemory)?;
        Ok(udp::PacketBuffer::new(meta, bytes))
    };
    let rx = buffer()?;
    let tx = buffer()?;
    Ok(udp::Socket::new(rx, tx))
}

/// What net-serve saw.
#[derive(Default)]
struct ServeCounts {
    udp_echoed: u64,
    tcp_echo_bytes: u64,
    sink_conns: u64,
    sink_bytes: u64,
}

/// `net-serve ip=CIDR [gw=IP] [secs=N] [nic=N]`: answers ping, echoes UDP
/// and TCP on port 7, and on port 9 counts a connection's bytes, answering
/// `bytes=N` once the peer has finished sending. Ends after `secs`
/// (default 600) or on a UDP datagram `stop` to port 7.
pub fn serve<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[&NIC_KEYS, &["secs"]], 0)?;
    let secs = args.number_or("secs", 600)?;
    let mut stack = open(env, &args)?;
    let mut storage = [
        SocketStorage::EMPTY,
        SocketStorage::EMPTY,
        SocketStorage::EMPTY,
    ];
    let mut sockets = SocketSet::new(&mut storage[..]);
    let udp = sockets.add(udp_socket(env)?);
    let echo = sockets.add(tcp_socket(env)?);
    let sink = sockets.add(tcp_socket(env)?);
    let bind = sockets.get_mut::<udp::Socket>(udp).bind(ECHO_PORT);
    bind.map_err(|_| ArgError::OutOfRange {
        name: "port",
        value: u64::from(ECHO_PORT),
    })?;
    println!("net-serve: ping, UDP and TCP echo on port {ECHO_PORT}, TCP sink on port {SINK_PORT}");
    let mut counts = ServeCounts::default();
    let mut sink_bytes_now = 0u64;
    let mut sink_answered = false;
    let deadline = stack.us() + secs * 1_000_000;
    let mut stop = false;
    while !stop && stack.us() < deadline {
        stack.poll(&mut sockets);
        stop = serve_udp(sockets.get_mut::<udp::Socket>(udp), &mut counts);
        serve_echo(sockets.get_mut::<tcp::Socket>(echo), &mut counts);
        let socket = sockets.get_mut::<tcp::Socket>(sink);
        if !socket.is_open() {
            if sink_answered {
                println!(
                    "sink: connection {} bytes={sink_bytes_now}",
                    counts.sink_conns
                );
            }
            let _ = socket.listen(SINK_PORT);
            sink_bytes_now = 0;
            sink_answered = false;
        }
        serve_sink(socket, &mut sink_bytes_now, &mut sink_answered, &mut counts);
    }
    // Let the answer to `stop` leave.
    let linger = stack.us() + 100_000;
    while stack.us() < linger {
        stack.poll(&mut sockets);
    }
    let c = stack.nic.device.counters();
    println!(
        "RESULT net-serve udp_echoed={} tcp_echo_bytes={} sink_conns={} sink_bytes={} \
         rx_frames={} tx_frames={} kicks={}",
        counts.udp_echoed,
        counts.tcp_echo_bytes,
        counts.sink_conns,
        counts.sink_bytes,
        c.rx_frames,
        c.tx_frames,
        c.kicks
    );
    Ok(stack.report_fault())
}

/// Echoes datagrams; returns true on `stop`.
fn serve_udp(socket: &mut udp::Socket<'_>, counts: &mut ServeCounts) -> bool {
    let mut buffer = [0u8; 2048];
    while socket.can_recv() && socket.can_send() {
        let Ok((len, meta)) = socket.recv_slice(&mut buffer) else {
            break;
        };
        if &buffer[..len] == STOP_DATAGRAM {
            let _ = socket.send_slice(b"stopping", meta.endpoint);
            return true;
        }
        if socket.send_slice(&buffer[..len], meta.endpoint).is_ok() {
            counts.udp_echoed += 1;
        }
    }
    false
}

fn serve_echo(socket: &mut tcp::Socket<'_>, counts: &mut ServeCounts) {
    if !socket.is_open() {
        let _ = socket.listen(ECHO_PORT);
        return;
    }
    let mut buffer = [0u8; 4096];
    while socket.can_recv() {
        let room = socket.send_capacity() - socket.send_queue();
        if room == 0 {
            break;
        }
        let take = room.min(buffer.len());
        let Ok(len) = socket.recv_slice(&mut buffer[..take]) else {
            break;
        };
        // Cannot fall short: `room` bytes of the send buffer are free.
        let _ = socket.send_slice(&buffer[..len]);
        counts.tcp_echo_bytes += len as u64;
    }
    // The peer finished sending and everything was echoed.
    if socket.state() == tcp::State::CloseWait && socket.send_queue() == 0 {
        socket.close();
    }
}

fn serve_sink(
    socket: &mut tcp::Socket<'_>,
    bytes: &mut u64,
    answered: &mut bool,
    counts: &mut ServeCounts,
) {
    let mut buffer = [0u8; 16384];
    while socket.can_recv() {
        match socket.recv_slice(&mut buffer) {
            Ok(len) => {
                *bytes += len as u64;
                counts.sink_bytes += len as u64;
            }
            Err(_) => break,
        }
    }
    // The peer finished sending: answer the count and close.
    if socket.is_active() && !socket.may_recv() && !*answered && socket.may_send() {
        let mut line = [0u8; 32];
        let len = format_count(&mut line, *bytes);
        let _ = socket.send_slice(&line[..len]);
        socket.close();
        *answered = true;
        counts.sink_conns += 1;
    }
}

/// Writes `bytes=N\n` into `out`; returns its length.
fn format_count(out: &mut [u8; 32], value: u64) -> usize {
    let prefix = b"bytes=";
    out[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 20];
    let mut n = value;
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..count {
        out[prefix.len() + i] = digits[count - 1 - i];
    }
    out[prefix.len() + count] = b'\n';
    prefix.len() + count + 1
}

/// `net-ping ip=CIDR target=IP [count=N] [gap_ms=N] [every=N] [nic=N]`:
/// sends `count` (default 10; 0: until the VM is stopped) ICMP echo
/// requests, one at a time, waiting up to a second for each reply and then
/// `gap_ms` (default 0) before the next, after up to 10 uncounted requests
/// that resolve the target's MAC. Each unanswered request is reported at
/// once; with `every=N`, so is the tally after every N requests (for a
/// host watching a long run). Passes if every counted request was answered.
pub fn ping<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[&NIC_KEYS, &["target", "count", "gap_ms", "every"]], 0)?;
    let target = target(&args)?;
    let count = args.number_or("count", 10)?;
    let gap_us = args.number_or("gap_ms", 0)?.saturating_mul(1000);
    let every = args.number_or("every", 0)?;
    let mut stack = open(env, &args)?;
    let mut storage = [SocketStorage::EMPTY];
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut buffer = || -> Result<icmp::PacketBuffer<'static>, Failure<'a>> {
        let meta = env
            .memory
            .alloc_slice(8, icmp::PacketMetadata::EMPTY)
            .ok_or(Failure::OutOfMemory)?;
        let bytes = env.memory.alloc(4096, 64).ok_or(Failure::OutOfMemory)?;
        Ok(icmp::PacketBuffer::new(meta, bytes))
    };
    let (rx, tx) = (buffer()?, buffer()?);
    let handle = sockets.add(icmp::Socket::new(rx, tx));
    const IDENT: u16 = 0x7076;
    let bind = sockets
        .get_mut::<icmp::Socket>(handle)
        .bind(icmp::Endpoint::Ident(IDENT));
    bind.map_err(|_| ArgError::Missing("ident"))?;
    // Resolving the target's MAC may cost the first requests.
    let mut resolved = false;
    for attempt in 0..10u16 {
        if echo(&mut stack, &mut sockets, handle, target, IDENT, attempt).is_some() {
            resolved = true;
            break;
        }
    }
    let mut tally = PingTally::default();
    if resolved {
        let mut seq = 0u64;
        while count == 0 || seq < count {
            let gap_start = stack.us();
            while stack.us() < gap_start + gap_us {
                stack.poll(&mut sockets);
            }
            let seq_no = (seq as u16).wrapping_add(100);
            match echo(&mut stack, &mut sockets, handle, target, IDENT, seq_no) {
                Some(rtt) => tally.answered(rtt),
                None => println!("net-ping: request {seq} unanswered"),
            }
            seq += 1;
            if every != 0 && seq % every == 0 {
                println!(
                    "net-ping: sent={seq} received={} max_rtt_us={}",
                    tally.received, tally.max_us
                );
            }
        }
    }
    println!(
        "RESULT net-ping target={target} sent={count} received={} avg_rtt_us={} max_rtt_us={}",
        tally.received,
        tally.total_us.checked_div(tally.received).unwrap_or(0),
        tally.max_us
    );
    Ok(stack.report_fault() && tally.received == count)
}

/// Answered requests and their round trips.
#[derive(Default)]
struct PingTally {
    received: u64,
    total_us: u64,
    max_us: u64,
}

impl PingTally {
    fn answered(&mut self, rtt_us: u64) {
        self.received += 1;
        self.total_us += rtt_us;
        self.max_us = self.max_us.max(rtt_us);
    }
}

/// One echo request; the round trip in microseconds if answered within a second.
fn echo(
    stack: &mut Stack,
    sockets: &mut SocketSet<'_>,
    handle: SocketHandle,
    target: Ipv4Addr,
    ident: u16,
    seq_no: u16,
) -> Option<u64> {
    let payload = b"pvstack net-ping";
    let repr = Icmpv4Repr::EchoRequest {
        ident,
        seq_no,
        data: payload,
    };
    let sent = stack.us();
    {
        let socket = sockets.get_mut::<icmp::Socket>(handle);
        let buffer = socket
            .send(repr.buffer_len(), IpAddress::Ipv4(target))
            .ok()?;
        let mut packet = Icmpv4Packet::new_unchecked(buffer);
        repr.emit(&mut packet, &ChecksumCapabilities::default());
    }
    while stack.us() < sent + 1_000_000 {
        stack.poll(sockets);
        let socket = sockets.get_mut::<icmp::Socket>(handle);
        while socket.can_recv() {
            let Ok((data, from)) = socket.recv() else {
                break;
            };
            let Ok(packet) = Icmpv4Packet::new_checked(data) else {
                continue;
            };
            let reply = Icmpv4Repr::parse(&packet, &ChecksumCapabilities::default());
            if let (Ok(Icmpv4Repr::EchoReply { seq_no: s, .. }), IpAddress::Ipv4(from)) =
                (reply, from)
            {
                if s == seq_no && from == target {
                    return Some(stack.us() - sent);
                }
            }
        }
    }
    None
}

fn target<'a>(args: &Args<'a>) -> Result<Ipv4Addr, Failure<'a>> {
    let text = args.value("target").ok_or(ArgError::Missing("target"))?;
    Ok(parse_ipv4(text).ok_or(ArgError::BadChoice {
        name: "target",
        value: text,
    })?)
}

/// `net-bench ip=CIDR target=IP proto=tcp|udp [port=N] [bytes=B] [secs=N]
/// [size=B] [nic=N]`: the guest sends to a host sink. TCP: `bytes`
/// (default 64M) over one connection, timed from the connection until the
/// host has acknowledged everything. UDP: datagrams of `size` payload bytes
/// (default 64) for `secs` seconds (default 5).
pub fn bench<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(
        &[
            &NIC_KEYS,
            &["target", "proto", "port", "bytes", "secs", "size"],
        ],
        0,
    )?;
    let target = target(&args)?;
    let port = args.number_or("port", 5001)?;
    let port = u16::try_from(port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or(ArgError::OutOfRange {
            name: "port",
            value: port,
        })?;
    let proto = args.value("proto").unwrap_or("tcp");
    let mut stack = open(env, &args)?;
    let mut storage = [SocketStorage::EMPTY];
    let mut sockets = SocketSet::new(&mut storage[..]);
    let endpoint = IpEndpoint::new(IpAddress::Ipv4(target), port);
    let passed = match proto {
        "tcp" => {
            let bytes = args.number_or("bytes", 64 << 20)?;
            let handle = sockets.add(tcp_socket(env)?);
            bench_tcp(&mut stack, &mut sockets, handle, endpoint, bytes)
        }
        "udp" => {
            let secs = args.number_or("secs", 5)?;
            let size = args.number_or("size", 64)?;
            if !(1..=1472).contains(&size) {
                return Err(ArgError::OutOfRange {
                    name: "size",
                    value: size,
                }
                .into());
            }
            let handle = sockets.add(udp_socket(env)?);
            bench_udp(
                &mut stack,
                &mut sockets,
                handle,
                endpoint,
                size as usize,
                secs,
            )
        }
        other => {
            return Err(ArgError::BadChoice {
                name: "proto",
                value: other,
            }
            .into())
        }
    };
    Ok(stack.report_fault() && passed)
}

fn bench_tcp(
    stack: &mut Stack,
    sockets: &mut SocketSet<'_>,
    handle: SocketHandle,
    endpoint: IpEndpoint,
    bytes: u64,
) -> bool {
    let local_port = 49152 + (rdtsc() % 16384) as u16;
    let connect =
        sockets
            .get_mut::<tcp::Socket>(handle)
            .connect(stack.iface.context(), endpoint, local_port);
    if connect.is_err() {
        println!("error: cannot connect to {endpoint}");
        return false;
    }
    let chunk = [0x5au8; 16384];
    let started = stack.us();
    let give_up = started + 120_000_000;
    let mut queued = 0u64;
    let kicks_before = stack.nic.device.counters().kicks;
    loop {
        stack.poll(sockets);
        let socket = sockets.get_mut::<tcp::Socket>(handle);
        if queued < bytes && socket.can_send() {
            let want = (bytes - queued).min(chunk.len() as u64) as usize;
            if let Ok(n) = socket.send_slice(&chunk[..want]) {
                queued += n as u64;
            }
        }
        if queued == bytes && socket.send_queue() == 0 && socket.is_active() {
            socket.close();
        }
        if queued == bytes && !socket.is_open() {
            break;
        }
        if queued == bytes && socket.state() == tcp::State::TimeWait {
            break;
        }
        if stack.us() > give_up
            || (!socket.is_open() && queued < bytes && stack.us() > started + 5_000_000)
        {
            println!("error: the connection to {endpoint} ended after {queued} of {bytes} bytes");
            return false;
        }
    }
    let usecs = (stack.us() - started).max(1);
    let kicks = stack.nic.device.counters().kicks - kicks_before;
    println!(
        "RESULT net-bench proto=tcp bytes={bytes} usecs={usecs} mbps={} kicks={kicks}",
        Rate(bytes * 8, usecs)
    );
    true
}

fn bench_udp(
    stack: &mut Stack,
    sockets: &mut SocketSet<'_>,
    handle: SocketHandle,
    endpoint: IpEndpoint,
    size: usize,
    secs: u64,
) -> bool {
    if sockets.get_mut::<udp::Socket>(handle).bind(40000).is_err() {
        return false;
    }
    let payload = [0xa5u8; 1472];
    let started = stack.us();
    let end = started + secs * 1_000_000;
    let kicks_before = stack.nic.device.counters().kicks;
    let frames_before = stack.nic.device.counters().tx_frames;
    let mut packets = 0u64;
    while stack.us() < end {
        let socket = sockets.get_mut::<udp::Socket>(handle);
        while socket.can_send() {
            if socket.send_slice(&payload[..size], endpoint).is_err() {
                break;
            }
            packets += 1;
        }
        stack.poll(sockets);
    }
    let usecs = (stack.us() - started).max(1);
    let counters = stack.nic.device.counters();
    let frames = counters.tx_frames - frames_before;
    println!(
        "RESULT net-bench proto=udp size={size} packets={frames} usecs={usecs} pps={} kicks={}",
        Rate(frames * 1_000_000, usecs),
        counters.kicks - kicks_before
    );
    packets > 0
}
