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
//!
//! Every backend serves through it, because it is also where a hostile or
//! broken frontend is held in check before the daemon (which serves one
//! frontend at a time and trusts what it is sent) sees anything:
//! - a frontend of another user (SO_PEERCRED: not this backend's user,
//!   root or `--frontend-uid`) is refused at once, with one log line;
//! - at most [`MAX_CONNECTIONS`] frontends at once; more are closed;
//! - a connection must reach SET_OWNER within the negotiation timeout,
//!   and every message, once begun, must arrive whole within it, so a
//!   client that connects and waits, or stops mid-message, does not hold
//!   the daemon;
//! - memory tables are checked ([`MemoryTableGuard`]) before the daemon
//!   maps them, and queue sizes before it takes them;
//! - the daemon listens in a directory only this user can enter, so no
//!   one else reaches it around the filter (or desynchronises the
//!   numbering of connections that filters and backends share).

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pvstack_logging::warn_limited;
use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::Listener;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::mem_table::MemoryTableGuard;
use crate::peer::TrustedUsers;
use crate::ring_requests::check_ring_request;
use crate::{block_stop_signals, listen, listen_with_mode, prepare_socket_path, Error, SocketArgs};

/// Most frontend connections held at once (each costs two threads and
/// four descriptors). The daemon serves one; the others wait their turn.
pub const MAX_CONNECTIONS: usize = 8;

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

    /// A request carrying `fds`, as a frontend sends it.
    #[cfg(test)]
    pub(crate) fn with_fds(request: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Message {
        Message::build(request, FLAG_VERSION, payload, fds)
    }

    fn build(request: u32, flags: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Message {
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(&request.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(payload);
        Message { bytes, fds }
    }

    /// Asks for a REPLY_ACK answer (as a frontend that negotiated
    /// REPLY_ACK does).
    pub fn set_need_reply(&mut self) {
        let flags = u32_at(&self.bytes, 4) | FLAG_NEED_REPLY;
        self.bytes[4..8].copy_from_slice(&flags.to_le_bytes());
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

/// Passes every request on: for a backend that needs no filter of its
/// own, only the checks every connection gets.
pub struct PassThrough;

impl Filter for PassThrough {
    fn request(&mut self, message: Message) -> io::Result<Verdict> {
        Ok(Verdict::forward(message))
    }
}

/// Refuses `message`: a REPLY_ACK failure if the frontend wants an
/// answer, otherwise an error that ends the connection.
pub fn refuse(message: &Message, why: &str) -> io::Result<Verdict> {
    let code = message.code();
    if message.wants_ack() {
        warn_limited!("refused request {code}: {why}");
        let failure = Message::reply(code, &1u64.to_le_bytes(), Vec::new());
        return Ok(Verdict::answer(Some(failure)));
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("request {code}: {why}"),
    ))
}

/// The public socket, with the filter listening on it; removed when this
/// drops, with the daemon's directory. The daemon listens in a directory
/// beside it that only this user may enter, the public path with
/// `.daemon` appended; a crashed process leaves at most that behind,
/// which the next backend on the same path takes over.
pub struct FilteredSocket {
    public: PathBuf,
    daemon_dir: PathBuf,
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
        let mut daemon_dir = args.socket.clone().into_os_string();
        daemon_dir.push(".daemon");
        let daemon_dir = PathBuf::from(daemon_dir);
        private_dir(&daemon_dir)?;
        let daemon_socket = daemon_dir.join(DAEMON_SOCKET);
        // The daemon listens before any frontend can reach the filter.
        let daemon = listen(&daemon_socket)?;
        // Checked and bound before `filtered` exists: its drop removes the
        // public path, which must never be a file this did not create.
        prepare_socket_path(&args.socket)?;
        let listener =
            listen_with_mode(&args.socket, args.socket_mode).map_err(|source| Error::Filter {
                path: args.socket.clone(),
                what: "cannot listen",
                cause: source,
            })?;
        let filtered = FilteredSocket {
            public: args.socket.clone(),
            daemon_dir,
        };
        let timeout = args.negotiation_timeout;
        let trusted = args.trusted_frontends();
        let open = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("filter".into())
            .spawn(move || {
                for front in listener.incoming() {
                    let front = match front {
                        Ok(front) => front,
                        Err(e) => {
                            warn_limited!("filter: cannot accept a frontend: {e}");
                            continue;
                        }
                    };
                    if !may_serve(&front, trusted) {
                        continue;
                    }
                    let Some(slot) = ConnectionSlot::take(&open) else {
                        warn_limited!(
                            "filter: refused a frontend: {MAX_CONNECTIONS} connections are open"
                        );
                        continue;
                    };
                    let joined = join(front, &daemon_socket, &new_filter, timeout, slot);
                    if let Err(e) = joined {
                        warn_limited!("filter: cannot join a frontend to the daemon: {e}");
                    }
                }
            })
            .map_err(|source| Error::Filter {
                path: args.socket.clone(),
                what: "cannot start the filter thread",
                cause: source,
            })?;
        Ok((filtered, daemon))
    }
}

impl FilteredSocket {
    /// The files this made and removes when it drops, in the order they
    /// were made: the daemon's directory, its socket, the public socket.
    /// A process that gives up its user (pvstack-sandbox) hands them to
    /// the new one.
    pub fn paths(&self) -> [PathBuf; 3] {
        [
            self.daemon_dir.clone(),
            self.daemon_dir.join(DAEMON_SOCKET),
            self.public.clone(),
        ]
    }
}

impl Drop for FilteredSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.public);
        let _ = std::fs::remove_file(self.daemon_dir.join(DAEMON_SOCKET));
        let _ = std::fs::remove_dir(&self.daemon_dir);
    }
}

/// Whether `front` runs as a user this backend serves; one that does not
/// is refused (dropped) with one log line, as is one whose credentials
/// cannot be read.
fn may_serve(front: &UnixStream, trusted: TrustedUsers) -> bool {
    match trusted.check(front) {
        Ok(Ok(_)) => true,
        Ok(Err(untrusted)) => {
            warn_limited!(
                "filter: refused a frontend: {untrusted}; start the backend with --frontend-uid {} to serve it",
                untrusted.peer.uid
            );
            false
        }
        Err(e) => {
            warn_limited!("filter: refused a frontend: cannot learn who it is (SO_PEERCRED): {e}");
            false
        }
    }
}

/// The daemon's socket, in its private directory.
const DAEMON_SOCKET: &str = "socket";

/// Makes `dir` a directory only this user can enter: created 0700 if
/// missing; one left by an earlier run is taken over if this user owns it
/// and no one else may enter it. A socket file there (from a version that
/// put the daemon's socket at this path) is replaced as a stale socket is.
fn private_dir(dir: &Path) -> Result<(), Error> {
    let refuse = |what: &'static str| Error::Filter {
        path: dir.to_owned(),
        what,
        cause: io::ErrorKind::PermissionDenied.into(),
    };
    let inspect = |source| Error::InspectSocket {
        path: dir.to_owned(),
        cause: source,
    };
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            if meta.uid() != me {
                return Err(refuse("the daemon's directory belongs to another user"));
            }
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(refuse("the daemon's directory is open to other users"));
            }
            return Ok(());
        }
        Ok(_) => prepare_socket_path(dir)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(inspect(e)),
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Filter {
            path: dir.to_owned(),
            what: "cannot create the daemon's directory",
            cause: source,
        })
}

/// One of the [`MAX_CONNECTIONS`], given back when both of its threads
/// are done with it.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(open: &Arc<AtomicUsize>) -> Option<Arc<ConnectionSlot>> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_CONNECTIONS).then_some(n + 1)
        })
        .ok()?;
        Some(Arc::new(ConnectionSlot(Arc::clone(open))))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connects the daemon for `front`. The filter is made only once that
/// succeeded, so the n-th filter made serves the daemon's n-th connection.
fn join(
    front: UnixStream,
    internal: &Path,
    new_filter: &dyn Fn() -> Box<dyn Filter>,
    timeout: Duration,
    slot: Arc<ConnectionSlot>,
) -> io::Result<()> {
    let back = UnixStream::connect(internal)?;
    // The relay runs on its own; nothing here waits for it to end.
    relay(front, back, new_filter(), timeout, slot)?;
    Ok(())
}

/// Passes the messages of one connection between the frontend (`front`)
/// and the daemon (`back`) on two threads, requests through the checks
/// and `filter`, replies unchanged, until either side hangs up, breaks the
/// protocol or is slower than `timeout` (see [`forward_requests`]); then
/// both sockets are shut down. Each thread holds `slot` (the connection's
/// place among the open ones) until it ends. Returns the two threads, for
/// a caller that must know when the relay is over (the fuzz target in
/// tests/fuzz).
pub fn relay<S: Send + Sync + 'static>(
    front: UnixStream,
    back: UnixStream,
    filter: Box<dyn Filter>,
    timeout: Duration,
    slot: Arc<S>,
) -> io::Result<[JoinHandle<()>; 2]> {
    let (front2, back2) = (front.try_clone()?, back.try_clone()?);
    let slot2 = Arc::clone(&slot);
    let up = std::thread::Builder::new()
        .name("filter-up".into())
        .spawn(move || {
            let result = forward_requests(&front, &back, filter, timeout);
            end(&front, &back, "dropped the frontend connection", result);
            drop(slot);
        })?;
    let down = std::thread::Builder::new()
        .name("filter-down".into())
        .spawn(move || {
            let result = forward_replies(&back2, &front2);
            end(&back2, &front2, "filter: lost the daemon", result);
            drop(slot2);
        })?;
    Ok([up, down])
}

/// Ends both sides of a connection; `what` says what an error (other
/// than a plain hang-up) means.
fn end(from: &UnixStream, to: &UnixStream, what: &str, result: io::Result<()>) {
    if let Err(e) = result {
        if e.kind() != io::ErrorKind::UnexpectedEof {
            warn_limited!("{what}: {e}");
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Frontend to daemon, through the memory-table checks and the filter.
/// The filter's own answers go out on this thread while the daemon's
/// replies go out on the other; the two never interleave because a
/// frontend waits for the answer to one request before it sends a
/// request that is answered.
///
/// Until SET_OWNER, the frontend has `timeout` in all; after it, it may
/// wait as long as it likes between messages (a driver may take minutes
/// to start the device), but each message must arrive whole within
/// `timeout` of its first bytes.
fn forward_requests(
    front: &UnixStream,
    back: &UnixStream,
    mut filter: Box<dyn Filter>,
    timeout: Duration,
) -> io::Result<()> {
    let mut memory = MemoryTableGuard::default();
    let mut handshake = Some(Instant::now() + timeout);
    loop {
        let message = receive_from_frontend(front, handshake, timeout)?;
        if message.code() == FrontendReq::SET_OWNER as u32 {
            handshake = None;
        }
        let checked = check_ring_request(&message).and_then(|()| memory.check(&message));
        let verdict = match checked {
            Ok(()) => filter.request(message)?,
            Err(why) => refuse(&message, &why)?,
        };
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
        send(front, &receive(back, None)?)?;
    }
}

/// The frontend's next message: its first bytes by `first_by` (any time
/// if None), all of it within `whole_within` of them. A frontend too slow
/// for either gets a TimedOut error that says which.
fn receive_from_frontend(
    front: &UnixStream,
    first_by: Option<Instant>,
    whole_within: Duration,
) -> io::Result<Message> {
    let no_owner = || {
        timed_out(format!(
            "no SET_OWNER within {} s of connecting",
            whole_within.as_secs_f32()
        ))
    };
    let wait = match first_by {
        Some(deadline) => Some(remaining(deadline).ok_or_else(no_owner)?),
        None => None,
    };
    front.set_read_timeout(wait)?;
    receive(front, Some(whole_within)).map_err(|e| match e.kind() {
        // The first read timed out (a stalled rest is TimedOut already).
        io::ErrorKind::WouldBlock => no_owner(),
        _ => e,
    })
}

fn timed_out(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, message)
}

/// Time left until `deadline`, None if none (a zero read timeout would
/// mean no timeout at all).
fn remaining(deadline: Instant) -> Option<Duration> {
    Some(deadline.checked_duration_since(Instant::now())?).filter(|left| !left.is_zero())
}

/// Fills `buf` from `socket` by `deadline` (at any pace if None).
fn read_exact_by(socket: &UnixStream, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<()> {
    let mut filled = 0;
    let mut reader = socket;
    while filled < buf.len() {
        if let Some(deadline) = deadline {
            let left = remaining(deadline).ok_or(io::ErrorKind::TimedOut)?;
            socket.set_read_timeout(Some(left))?;
        }
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

/// One message and the descriptors sent with it; once its first bytes
/// are in, the rest must follow within `rest_within` (if given).
fn receive(socket: &UnixStream, rest_within: Option<Duration>) -> io::Result<Message> {
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
    let deadline = rest_within.map(|within| Instant::now() + within);
    let rest = |buf: &mut [u8], part| read_rest(socket, buf, part, rest_within, deadline);
    rest(&mut header[len..], "header")?;
    let size = u32_at(&header, 8) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {size}-byte vhost-user payload"),
        ));
    }
    let mut bytes = vec![0u8; HEADER_LEN + size];
    bytes[..HEADER_LEN].copy_from_slice(&header);
    rest(&mut bytes[HEADER_LEN..], "payload")?;
    Ok(Message { bytes, fds })
}

/// Reads the rest of a message that has begun to arrive. A hang-up here
/// cuts the message short, a protocol error, not the plain hang-up that
/// ends a session between messages.
/// The rest of a message whose first bytes are in, by `deadline` (sent
/// `within` after them) if there is one: a hang-up or a stall now is an
/// error that says so.
fn read_rest(
    socket: &UnixStream,
    buf: &mut [u8],
    part: &str,
    within: Option<Duration>,
    deadline: Option<Instant>,
) -> io::Result<()> {
    read_exact_by(socket, buf, deadline).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("hung up in the middle of a vhost-user message {part}"),
        ),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(format!(
            "a message did not arrive whole within {} s of its first bytes",
            within.unwrap_or_default().as_secs_f32()
        )),
        _ => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn messages_round_trip_with_their_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (keep, passed) = UnixStream::pair().unwrap();
        let mut sent = Message::request(12, &[7, 0, 0, 0, 0, 0, 0, 0]);
        sent.fds.push(OwnedFd::from(passed));
        send(&a, &sent).unwrap();
        send(&a, &Message::ack(32)).unwrap();
        let mut got = receive(&b, None).unwrap();
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
        let ack = receive(&b, None).unwrap();
        assert_eq!((ack.code(), ack.payload()), (32, &0u64.to_le_bytes()[..]));
    }

    #[test]
    fn the_daemons_directory_is_private() {
        let dir = std::env::temp_dir().join(format!("pvstack-filter-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let private = dir.join("blk.sock.daemon");
        private_dir(&private).unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Taken over again by the next run.
        private_dir(&private).unwrap();
        // One others may enter is refused, and kept.
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = private_dir(&private).unwrap_err();
        assert!(err.to_string().contains("open to other users"), "{err}");
        assert!(private.is_dir());
        // A stale socket from a version that listened at this path goes.
        std::fs::remove_dir(&private).unwrap();
        drop(UnixListener::bind(&private).unwrap());
        private_dir(&private).unwrap();
        assert!(private.is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_message_must_arrive_whole_in_time() {
        let (a, b) = UnixStream::pair().unwrap();
        io::Write::write_all(&mut &a, &[1, 0, 0, 0, 1]).unwrap();
        let err = receive(&b, Some(Duration::from_millis(50))).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("did not arrive whole"), "{err}");
        // Before SET_OWNER, silence is timed out too.
        let (_a, b) = UnixStream::pair().unwrap();
        let deadline = Instant::now() + Duration::from_millis(50);
        let err = receive_from_frontend(&b, Some(deadline), Duration::from_millis(50))
            .err()
            .unwrap();
        assert!(err.to_string().contains("no SET_OWNER within"), "{err}");
    }

    #[test]
    fn oversize_and_truncated_messages_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut header = Vec::new();
        header.extend_from_slice(&1u32.to_le_bytes());
        header.extend_from_slice(&FLAG_VERSION.to_le_bytes());
        header.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        io::Write::write_all(&mut &a, &header).unwrap();
        let err = receive(&b, None).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        io::Write::write_all(&mut &a, &header[..5]).unwrap();
        drop(a);
        let err = receive(&b, None).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err
            .to_string()
            .contains("middle of a vhost-user message header"));
        // A hang-up between messages is a plain end of the session.
        assert_eq!(
            receive(&b, None).err().unwrap().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn a_payload_cut_short_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let message = Message::request(1, &[0; 8]);
        io::Write::write_all(&mut &a, &message.bytes[..HEADER_LEN + 3]).unwrap();
        drop(a);
        let err = receive(&b, None).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err
            .to_string()
            .contains("middle of a vhost-user message payload"));
    }
}
