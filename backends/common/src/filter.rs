//! A vhost-user control-channel filter between the frontend and the
//! vhost-user-backend daemon, for protocol messages the library does not
//! handle (or handles too strictly).
//!
//! The frontend connects to the public socket; for each connection the
//! filter connects to the daemon's private socket and passes messages both
//! ways with their file descriptors. Requests go through a [`Filter`],
//! which may forward them, answer them itself or hold them back; replies
//! pass unchanged. Only the control channel goes through it: the data path
//! (shared memory and eventfds) never does.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::{block_stop_signals, listen, prepare_socket_path, Error, SocketArgs};

const HEADER_LEN: usize = 12;
/// Most file descriptors one vhost-user message carries.
const MAX_FDS: usize = 32;
/// Largest payload accepted; real messages are a few KiB at most.
const MAX_PAYLOAD: usize = 1 << 20;
/// Header flags: protocol version 1, a reply, a reply wanted.
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// One vhost-user message (header and payload) and the descriptors sent
/// with it.
pub struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    /// A request from the frontend's side, as the filter sends it on.
    pub fn request(request: u32, payload: &[u8]) -> Message {
        Message::build(request, FLAG_VERSION, payload, Vec::new())
    }

    /// A reply to `request` carrying `payload` and `fds`.
    pub fn reply(request: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Message {
        Message::build(request, FLAG_VERSION | FLAG_REPLY, payload, fds)
    }

    /// The REPLY_ACK success answer to `request`.
    pub fn ack(request: u32) -> Message {
        Message::reply(request, &0u64.to_le_bytes(), Vec::new())
    }

    fn build(request: u32, flags: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Message {
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(&request.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(payload);
        Message { bytes, fds }
    }

    /// The request code (vhost's `FrontendReq` values).
    pub fn code(&self) -> u32 {
        u32_at(&self.bytes, 0)
    }

    /// Whether the frontend asked for a REPLY_ACK answer.
    pub fn wants_ack(&self) -> bool {
        u32_at(&self.bytes, 4) & FLAG_NEED_REPLY != 0
    }

    pub fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// The descriptors that came with the message.
    pub fn fds(&self) -> &[OwnedFd] {
        &self.fds
    }

    /// Takes the descriptors that came with the message.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }
}

/// What becomes of one request from the frontend.
pub struct Verdict {
    /// Sent on to the daemon, in this order.
    pub to_daemon: Vec<Message>,
    /// Sent back to the frontend by the filter itself.
    pub to_frontend: Option<Message>,
}

impl Verdict {
    /// Pass the request on unchanged.
    pub fn forward(message: Message) -> Verdict {
        Verdict {
            to_daemon: vec![message],
            to_frontend: None,
        }
    }

    /// Answer the request here (with `reply`, or nothing when it wants none).
    pub fn answer(reply: Option<Message>) -> Verdict {
        Verdict {
            to_daemon: Vec::new(),
            to_frontend: reply,
        }
    }
}

/// Decides the fate of each request of one frontend connection.
pub trait Filter: Send {
    /// An error ends the connection (logged), as a protocol error in the
    /// daemon would.
    fn request(&mut self, message: Message) -> io::Result<Verdict>;
}

/// The public socket, with the filter listening on it; removed when this
/// drops. The daemon listens beside it, on the public path with `.daemon`
/// appended, so a crashed process leaves at most that file behind, which
/// the next backend on the same path replaces.
pub struct FilteredSocket {
    public: PathBuf,
}

impl FilteredSocket {
    /// Makes the daemon's listener (returned, for [`crate::serve_on`]),
    /// then listens on `args.socket` and joins each frontend to the daemon
    /// through a fresh filter from `new_filter`, made for each connection
    /// in the order the daemon will accept them. Blocks SIGTERM and SIGINT
    /// in the calling thread first so that the filter's threads inherit
    /// the mask and leave the signals to the serving loop's signal thread.
    pub fn start<F>(args: &SocketArgs, new_filter: F) -> Result<(Self, Listener), Error>
    where
        F: Fn() -> Box<dyn Filter> + Send + 'static,
    {
        block_stop_signals()?;
        let mut daemon_socket = args.socket.clone().into_os_string();
        daemon_socket.push(".daemon");
        let daemon_socket = PathBuf::from(daemon_socket);
        // The daemon listens before any frontend can reach the filter.
        let daemon = listen(&daemon_socket)?;
        // Checked and bound before `filtered` exists: its drop removes the
        // public path, which must never be a file this did not create.
        prepare_socket_path(&args.socket)?;
        let listener = UnixListener::bind(&args.socket).map_err(|source| Error::Filter {
            path: args.socket.clone(),
            what: "cannot listen",
            source,
        })?;
        let filtered = FilteredSocket {
            public: args.socket.clone(),
        };
        std::thread::Builder::new()
            .name("filter".into())
            .spawn(move || {
                for front in listener.incoming() {
                    match front.and_then(|front| join(front, &daemon_socket, &new_filter)) {
                        Ok(()) => {}
                        Err(e) => log::warn!("filter: cannot join a frontend to the daemon: {e}"),
                    }
                }
            })
            .map_err(|source| Error::Filter {
                path: args.socket.clone(),
                what: "cannot start the filter thread",
                source,
            })?;
        Ok((filtered, daemon))
    }
}

impl Drop for FilteredSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.public);
    }
}

/// Connects the daemon for `front`. The filter is made only once that
/// succeeded, so the n-th filter made serves the daemon's n-th connection.
fn join(
    front: UnixStream,
    internal: &Path,
    new_filter: &dyn Fn() -> Box<dyn Filter>,
) -> io::Result<()> {
    let back = UnixStream::connect(internal)?;
    // The relay runs on its own; nothing here waits for it to end.
    relay(front, back, new_filter())?;
    Ok(())
}

/// Passes the messages of one connection between the frontend (`front`)
/// and the daemon (`back`) on two threads, requests through `filter`,
/// replies unchanged, until either side hangs up or breaks the protocol;
/// then both sockets are shut down. Returns the two threads, for a caller
/// that must know when the relay is over (the fuzz target in tests/fuzz).
pub fn relay(
    front: UnixStream,
    back: UnixStream,
    filter: Box<dyn Filter>,
) -> io::Result<[JoinHandle<()>; 2]> {
    let (front2, back2) = (front.try_clone()?, back.try_clone()?);
    let up = std::thread::Builder::new()
        .name("filter-up".into())
        .spawn(move || {
            let result = forward_requests(&front, &back, filter);
            end(&front, &back, "dropped the frontend connection", result);
        })?;
    let down = std::thread::Builder::new()
        .name("filter-down".into())
        .spawn(move || {
            let result = forward_replies(&back2, &front2);
            end(&back2, &front2, "filter: lost the daemon", result);
        })?;
    Ok([up, down])
}

/// Ends both sides of a connection; `what` says what an error (other
/// than a plain hang-up) means.
fn end(from: &UnixStream, to: &UnixStream, what: &str, result: io::Result<()>) {
    if let Err(e) = result {
        if e.kind() != io::ErrorKind::UnexpectedEof {
            log::warn!("{what}: {e}");
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Frontend to daemon, through the filter. The filter's own answers go
/// out on this thread while the daemon's replies go out on the other; the
/// two never interleave because a frontend waits for the answer to one
/// request before it sends a request that is answered.
fn forward_requests(
    front: &UnixStream,
    back: &UnixStream,
    mut filter: Box<dyn Filter>,
) -> io::Result<()> {
    loop {
        let verdict = filter.request(receive(front)?)?;
        for message in &verdict.to_daemon {
            send(back, message)?;
        }
        if let Some(reply) = &verdict.to_frontend {
            send(front, reply)?;
        }
    }
}

/// Daemon to frontend: replies, unchanged.
fn forward_replies(back: &UnixStream, front: &UnixStream) -> io::Result<()> {
    loop {
        send(front, &receive(back)?)?;
    }
}

/// The little-endian u32 at `offset`.
fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(field)
}

fn send(socket: &UnixStream, message: &Message) -> io::Result<()> {
    let raw: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = socket
        .send_with_fds(&[&message.bytes[..]], &raw)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent < message.bytes.len() {
        // The descriptors went with the first part; the rest follows.
        let mut writer = socket;
        io::Write::write_all(&mut writer, &message.bytes[sent..])?;
    }
    Ok(())
}

/// One message and the descriptors sent with it.
fn receive(socket: &UnixStream) -> io::Result<Message> {
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
    read_rest(socket, &mut header[len..], "header")?;
    let size = u32_at(&header, 8) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {size}-byte vhost-user payload"),
        ));
    }
    let mut bytes = vec![0u8; HEADER_LEN + size];
    bytes[..HEADER_LEN].copy_from_slice(&header);
    read_rest(socket, &mut bytes[HEADER_LEN..], "payload")?;
    Ok(Message { bytes, fds })
}

/// Reads the rest of a message that has begun to arrive. A hang-up here
/// cuts the message short, a protocol error, not the plain hang-up that
/// ends a session between messages.
fn read_rest(mut socket: &UnixStream, buf: &mut [u8], part: &str) -> io::Result<()> {
    socket.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("hung up in the middle of a vhost-user message {part}"),
            )
        } else {
            e
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_their_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (keep, passed) = UnixStream::pair().unwrap();
        let mut sent = Message::request(12, &[7, 0, 0, 0, 0, 0, 0, 0]);
        sent.fds.push(OwnedFd::from(passed));
        send(&a, &sent).unwrap();
        send(&a, &Message::ack(32)).unwrap();
        let mut got = receive(&b).unwrap();
        assert_eq!(got.code(), 12);
        assert_eq!(got.payload(), &[7, 0, 0, 0, 0, 0, 0, 0]);
        assert!(!got.wants_ack());
        let fd = got.take_fds().pop().expect("the descriptor came along");
        // The passed descriptor is the same socket: what goes in at `keep`
        // comes out of it.
        io::Write::write_all(&mut &keep, b"x").unwrap();
        let mut byte = [0u8];
        (&UnixStream::from(fd)).read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        let ack = receive(&b).unwrap();
        assert_eq!((ack.code(), ack.payload()), (32, &0u64.to_le_bytes()[..]));
    }

    #[test]
    fn oversize_and_truncated_messages_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut header = Vec::new();
        header.extend_from_slice(&1u32.to_le_bytes());
        header.extend_from_slice(&FLAG_VERSION.to_le_bytes());
        header.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        io::Write::write_all(&mut &a, &header).unwrap();
        let err = receive(&b).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        io::Write::write_all(&mut &a, &header[..5]).unwrap();
        drop(a);
        let err = receive(&b).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err
            .to_string()
            .contains("middle of a vhost-user message header"));
        // A hang-up between messages is a plain end of the session.
        assert_eq!(
            receive(&b).err().unwrap().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn a_payload_cut_short_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let message = Message::request(1, &[0; 8]);
        io::Write::write_all(&mut &a, &message.bytes[..HEADER_LEN + 3]).unwrap();
        drop(a);
        let err = receive(&b).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err
            .to_string()
            .contains("middle of a vhost-user message payload"));
    }
}
