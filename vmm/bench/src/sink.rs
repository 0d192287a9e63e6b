//! The host's end of the network workloads, inside the benchmark's
//! namespace: a TCP sink that counts each connection's bytes and segments
//! and a UDP counter of datagrams.

use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::netns::{self, BenchNetns};
use super::workload::{NET_TCP_PORT, NET_UDP_PORT};
use crate::error::{Error, Result};

/// How often the sink threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// One connection the TCP sink served to its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpConnection {
    pub bytes: u64,
    /// Segments the host received on it (TCP_INFO's tcpi_segs_in): one
    /// per frame the guest sent.
    pub segments: u64,
}

#[derive(Default)]
struct Counts {
    udp_datagrams: AtomicU64,
    tcp_done: Mutex<Vec<TcpConnection>>,
    tcp_finished: Condvar,
}

/// The running sinks; stopped when dropped.
pub struct Sinks {
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Sinks {
    /// Starts both sinks in `ns`, returning once they listen.
    pub fn start(ns: &BenchNetns) -> Result<Sinks> {
        let mut sinks = Sinks {
            counts: Arc::default(),
            stop: Arc::default(),
            threads: Vec::new(),
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        for (name, serve) in [
            ("bench-tcp-sink", tcp_sink as fn(_, _, _)),
            ("bench-udp-sink", udp_counter),
        ] {
            let (counts, stop, ready) =
                (sinks.counts.clone(), sinks.stop.clone(), ready_tx.clone());
            let path = ns.path();
            let thread = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || match netns::enter(&path) {
                    Ok(()) => serve(counts, stop, ready),
                    Err(e) => drop(ready.send(Err(e))),
                })
                .map_err(|source| Error::Os {
                    what: "spawn a benchmark sink thread",
                    cause: source,
                })?;
            sinks.threads.push(thread);
        }
        for _ in 0..sinks.threads.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    return Err(Error::Bench {
                        what: "host sinks".into(),
                        reason,
                    })
                }
                Err(_) => {
                    return Err(Error::Bench {
                        what: "host sinks".into(),
                        reason: "a sink thread ended before it listened".into(),
                    })
                }
            }
        }
        Ok(sinks)
    }

    /// Datagrams the UDP counter has received so far.
    pub fn udp_datagrams(&self) -> u64 {
        self.counts.udp_datagrams.load(Ordering::SeqCst)
    }

    /// Forgets connections that ended before now.
    pub fn clear_tcp(&self) {
        lock(&self.counts.tcp_done).clear();
    }

    /// The oldest connection that ended since [`Sinks::clear_tcp`],
    /// waiting up to `timeout` for one.
    pub fn take_tcp(&self, timeout: Duration) -> Option<TcpConnection> {
        let deadline = Instant::now() + timeout;
        let mut done = lock(&self.counts.tcp_done);
        while done.is_empty() {
            let left = deadline.checked_duration_since(Instant::now())?;
            done = match self.counts.tcp_finished.wait_timeout(done, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        Some(done.remove(0))
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data (plain counts) stays valid even if a holder panicked.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

type Ready = mpsc::Sender<std::result::Result<(), String>>;

fn tcp_sink(counts: Arc<Counts>, stop: Arc<AtomicBool>, ready: Ready) {
    let listener = match TcpListener::bind(("0.0.0.0", NET_TCP_PORT))
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
    {
        Ok(listener) => listener,
        Err(e) => {
            let _ = ready.send(Err(format!("TCP sink port {NET_TCP_PORT}: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => match drain(stream, &stop) {
                Ok(Some(connection)) => {
                    lock(&counts.tcp_done).push(connection);
                    counts.tcp_finished.notify_all();
                }
                Ok(None) => {}
                Err(e) => log::warn!("TCP sink: connection from {peer}: {e}"),
            },
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => {
                log::warn!("TCP sink: accept: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

/// Reads `stream` to its end; what it carried (`None` if stopped first).
fn drain(mut stream: TcpStream, stop: &AtomicBool) -> std::io::Result<Option<TcpConnection>> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => bytes += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::SeqCst) {
                    return Ok(None);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(TcpConnection {
        bytes,
        segments: segments_in(&stream)?,
    }))
}

/// TCP_INFO's count of segments received on `stream`.
fn segments_in(stream: &TcpStream) -> std::io::Result<u64> {
    // SAFETY: tcp_info is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is
    // that large and outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from(info.tcpi_segs_in))
}

fn udp_counter(counts: Arc<Counts>, stop: Arc<AtomicBool>, ready: Ready) {
    let socket = match UdpSocket::bind(("0.0.0.0", NET_UDP_PORT))
        .and_then(|s| s.set_read_timeout(Some(POLL)).map(|()| s))
    {
        Ok(socket) => socket,
        Err(e) => {
            let _ = ready.send(Err(format!("UDP counter port {NET_UDP_PORT}: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut buffer = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        match socket.recv(&mut buffer) {
            Ok(_) => {
                counts.udp_datagrams.fetch_add(1, Ordering::SeqCst);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                log::warn!("UDP counter: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}
