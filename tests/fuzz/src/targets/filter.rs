//! `filter`: one vhost-user connection through pvstack-blk's message filter
//! (`relay` with an `InflightFilter`). Input: the daemon's reply stream,
//! then the frontend's stream as the pieces it is sent in, each with the
//! file descriptors that go with it.

use vhost::vhost_user::message::FrontendReq;

use super::Seed;
use crate::input::{Reader, Writer};

/// Bytes of a vhost-user message header (request, flags, size).
pub const HEADER_LEN: usize = 12;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Descriptors sent with one piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fds {
    /// `count` eventfds.
    Events(usize),
    /// `count` memfds of `len` bytes.
    Memfds(usize, u32),
}

impl Fds {
    pub fn count(&self) -> usize {
        match *self {
            Fds::Events(count) | Fds::Memfds(count, _) => count,
        }
    }
}

/// One sendmsg of the frontend.
pub struct Piece<'a> {
    pub fds: Fds,
    pub bytes: &'a [u8],
}

pub struct Input<'a> {
    pub replies: &'a [u8],
    pub pieces: Vec<Piece<'a>>,
}

impl<'a> Input<'a> {
    pub fn read(r: &mut Reader<'a>) -> Self {
        let replies = r.sized();
        let mut pieces = Vec::new();
        while !r.is_empty() {
            // Bits 0-1: up to 3 descriptors; bit 2: memfds rather than
            // eventfds; bit 7: 40 descriptors, more than a message may have.
            let spec = r.u8();
            let len = r.u32();
            let count = if spec & 0x80 != 0 {
                40
            } else {
                usize::from(spec & 3)
            };
            let fds = if spec & 4 != 0 {
                Fds::Memfds(count, len)
            } else {
                Fds::Events(count)
            };
            pieces.push(Piece {
                fds,
                bytes: r.sized(),
            });
        }
        Input { replies, pieces }
    }

    fn write(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.sized(self.replies);
        for piece in &self.pieces {
            let count = |count: usize| if count > 3 { 0x80 } else { count as u8 };
            let (spec, len) = match piece.fds {
                Fds::Events(n) => (count(n), 0),
                Fds::Memfds(n, len) => (count(n) | 4, len),
            };
            w.u8(spec).u32(len).sized(piece.bytes);
        }
        w.into_bytes()
    }
}

/// The complete messages at the start of `stream`, in order.
pub fn messages(stream: &[u8]) -> Vec<&[u8]> {
    let mut found = Vec::new();
    let mut rest = stream;
    while rest.len() >= HEADER_LEN {
        let size = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]) as usize;
        let Some(message) = rest.get(..HEADER_LEN + size) else {
            break;
        };
        found.push(message);
        rest = &rest[message.len()..];
    }
    found
}

/// The request code of a message.
pub fn code(message: &[u8]) -> u32 {
    u32::from_le_bytes([message[0], message[1], message[2], message[3]])
}

fn message(request: FrontendReq, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&(request as u32).to_le_bytes());
    bytes.extend_from_slice(&(FLAG_VERSION | flags).to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// VhostUserInflight: mmap_size, mmap_offset, num_queues, queue_size,
/// and the C struct's tail padding.
fn inflight(mmap_size: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&mmap_size.to_le_bytes());
    payload.extend_from_slice(&0u64.to_le_bytes());
    payload.extend_from_slice(&num_queues.to_le_bytes());
    payload.extend_from_slice(&queue_size.to_le_bytes());
    payload.extend_from_slice(&[0; 4]);
    payload
}

fn piece(fds: Fds, bytes: &[u8]) -> Piece<'_> {
    Piece { fds, bytes }
}

pub fn seeds() -> Vec<Seed> {
    let get_features = message(FrontendReq::GET_FEATURES, 0, &[]);
    let features_reply = message(
        FrontendReq::GET_FEATURES,
        FLAG_REPLY,
        &(1u64 << 30).to_le_bytes(),
    );
    let set_owner = message(FrontendReq::SET_OWNER, 0, &[]);
    let get_inflight = message(FrontendReq::GET_INFLIGHT_FD, 0, &inflight(0, 1, 128));
    // One queue of 128: 2112 bytes of log.
    let set_inflight = message(
        FrontendReq::SET_INFLIGHT_FD,
        FLAG_NEED_REPLY,
        &inflight(2112, 1, 128),
    );
    let kick = message(FrontendReq::SET_VRING_KICK, 0, &0u64.to_le_bytes());
    let session = Input {
        replies: &features_reply,
        pieces: vec![
            piece(Fds::Events(0), &get_features),
            piece(Fds::Events(0), &set_owner),
            piece(Fds::Events(0), &get_inflight),
            piece(Fds::Memfds(1, 4096), &set_inflight),
            piece(Fds::Events(1), &kick),
        ],
    };
    // A message sent in three pieces, its descriptor with the second.
    let (head, tail) = set_inflight.split_at(HEADER_LEN + 4);
    let split = Input {
        replies: &[],
        pieces: vec![
            piece(Fds::Events(0), &head[..5]),
            piece(Fds::Memfds(1, 2112), &head[5..]),
            piece(Fds::Events(0), tail),
            piece(Fds::Events(0), &get_features),
        ],
    };
    // SET_INFLIGHT_FD without its file, answered with a failure, and one
    // with too many descriptors.
    let refused = Input {
        replies: &features_reply,
        pieces: vec![
            piece(Fds::Events(0), &set_inflight),
            piece(Fds::Events(0), &get_features),
            piece(Fds::Events(40), &kick),
        ],
    };
    let mut oversize = message(FrontendReq::SET_MEM_TABLE, 0, &[]);
    oversize[8..12].copy_from_slice(&(2u32 << 20).to_le_bytes());
    let too_long = Input {
        replies: &[],
        pieces: vec![piece(Fds::Events(0), &oversize)],
    };
    vec![
        ("session", session.write()),
        ("split", split.write()),
        ("refused", refused.write()),
        ("oversize", too_long.write()),
    ]
}
