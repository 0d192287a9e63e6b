//! `--filter-early-vring-enable`: a vhost-user message filter between the
//! frontend and the daemon, for QEMU's `-netdev vhost-user`.
//!
//! QEMU's virtio-net enables its queue pair (VHOST_USER_SET_VRING_ENABLE)
//! as soon as the guest driver accepts features, before it sends the
//! backend SET_FEATURES; the vhost crate refuses that message until
//! VHOST_USER_F_PROTOCOL_FEATURES is acked and drops the connection (and
//! QEMU 10 does not send it again when it starts the device). The filter
//! answers early SET_VRING_ENABLEs itself (when a reply is asked for),
//! keeps the last state asked for each ring, and hands those to the daemon
//! right after SET_FEATURES; every other message passes through unchanged
//! with its file descriptors. It sees only the control channel; the data
//! path (shared memory and eventfds) never passes through it.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HEADER_LEN: usize = 12;
/// Most file descriptors one vhost-user message carries.
const MAX_FDS: usize = 32;
/// Largest payload accepted; real messages are a few KiB at most.
const MAX_PAYLOAD: usize = 1 << 20;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
/// Header flags: protocol version 1, a reply, a reply wanted.
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Accepts frontends on `public` and joins each to the daemon listening on
/// `internal`, filtering as described above. Runs on its own threads for
/// the life of the process; the caller blocks SIGTERM and SIGINT first
/// (`block_stop_signals`) so that these threads, which predate the serving
/// loop's signal thread, inherit the mask and leave the signals to it.
pub fn spawn(public: &Path, internal: PathBuf) -> io::Result<()> {
    let listener = UnixListener::bind(public)?;
    std::thread::Builder::new()
        .name("filter".into())
        .spawn(move || {
            for front in listener.incoming() {
                match front.and_then(|front| join(front, &internal)) {
                    Ok(()) => {}
                    Err(e) => log::warn!("filter: cannot join a frontend to the daemon: {e}"),
                }
            }
        })?;
    Ok(())
}

fn join(front: UnixStream, internal: &Path) -> io::Result<()> {
    let back = UnixStream::connect(internal)?;
    let (front2, back2) = (front.try_clone()?, back.try_clone()?);
    std::thread::Builder::new()
        .name("filter-up".into())
        .spawn(move || {
            let result = forward_requests(&front, &back);
            end(&front, &back, "frontend", result);
        })?;
    std::thread::Builder::new()
        .name("filter-down".into())
        .spawn(move || {
            let result = forward_replies(&back2, &front2);
            end(&back2, &front2, "daemon", result);
        })?;
    Ok(())
}

fn end(from: &UnixStream, to: &UnixStream, side: &str, result: io::Result<()>) {
    if let Err(e) = result {
        if e.kind() != io::ErrorKind::UnexpectedEof {
            log::warn!("filter: {side} side: {e}");
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Frontend to daemon, deferring early SET_VRING_ENABLEs.
fn forward_requests(front: &UnixStream, back: &UnixStream) -> io::Result<()> {
    let mut features_seen = false;
    // The last enable state asked for each ring before SET_FEATURES.
    let mut deferred: BTreeMap<u32, u32> = BTreeMap::new();
    loop {
        let (message, fds) = receive(front)?;
        let request = field(&message, 0);
        if request == SET_VRING_ENABLE && !features_seen {
            if message.len() >= HEADER_LEN + 8 {
                deferred.insert(field(&message, HEADER_LEN), field(&message, HEADER_LEN + 4));
            }
            if field(&message, 4) & FLAG_NEED_REPLY != 0 {
                acknowledge(front, request)?;
            }
            continue;
        }
        send(back, &message, &fds)?;
        if request == SET_FEATURES && !features_seen {
            features_seen = true;
            for (index, enable) in std::mem::take(&mut deferred) {
                log::info!("filter: ring {index}: passing the early SET_VRING_ENABLE {enable} after SET_FEATURES");
                let mut late = [0u8; HEADER_LEN + 8];
                late[0..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                late[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
                late[8..12].copy_from_slice(&8u32.to_le_bytes());
                late[12..16].copy_from_slice(&index.to_le_bytes());
                late[16..20].copy_from_slice(&enable.to_le_bytes());
                send(back, &late, &[])?;
            }
        }
    }
}

/// Daemon to frontend: replies, unchanged.
fn forward_replies(back: &UnixStream, front: &UnixStream) -> io::Result<()> {
    loop {
        let (message, fds) = receive(back)?;
        send(front, &message, &fds)?;
    }
}

/// The little-endian u32 at `offset`.
fn field(message: &[u8], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&message[offset..offset + 4]);
    u32::from_le_bytes(bytes)
}

fn send(socket: &UnixStream, message: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    socket
        .send_with_fds(&[message], &raw)
        .map(|_| ())
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// A REPLY_ACK success answer to `request`.
fn acknowledge(mut front: &UnixStream, request: u32) -> io::Result<()> {
    let mut reply = [0u8; HEADER_LEN + 8];
    reply[0..4].copy_from_slice(&request.to_le_bytes());
    reply[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    reply[8..12].copy_from_slice(&8u32.to_le_bytes());
    front.write_all(&reply)
}

/// One message (header and payload) and the descriptors sent with it.
fn receive(socket: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the iovec points at `header`, which outlives the call.
    let (len, count) = unsafe { socket.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: recvmsg gave us these `count` descriptors; nothing else owns them.
    let fds = raw[..count]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if len == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut reader = socket;
    reader.read_exact(&mut header[len..])?;
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {size}-byte vhost-user payload"),
        ));
    }
    let mut message = vec![0u8; HEADER_LEN + size];
    message[..HEADER_LEN].copy_from_slice(&header);
    reader.read_exact(&mut message[HEADER_LEN..])?;
    Ok((message, fds))
}
