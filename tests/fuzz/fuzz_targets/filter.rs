//! The vhost-user message filter on a hostile frontend: the input's byte
//! stream, cut into sendmsg pieces that carry file descriptors, goes
//! through the real relay (`message_filter::relay`: the ring and memory-table
//! checks, then pvstack-blk's `InflightFilter`) over socket pairs, with a
//! daemon that sends the input's replies and reads what the filter passes
//! on. Beyond not crashing or hanging:
//! - framing: what reaches the daemon is the frontend's messages, byte for
//!   byte and in order, missing only those the filter answers or refuses
//!   itself (and everything before the first of those arrives);
//! - no file descriptor outlives the connection.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use pvstack_backend_common::inflight::{InflightFilter, InflightSlot};
use pvstack_backend_common::message_filter::relay;
use pvstack_fuzz::input::Reader;
use pvstack_fuzz::targets::filter::{code, messages, Fds, Input, Piece};
use vhost::vhost_user::message::{FrontendReq, MAX_ATTACHED_FD_ENTRIES};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The device the filter answers for: two queues of up to 256
/// descriptors, so a GET_INFLIGHT_FD may ask for more than one queue and
/// for more than the device has.
const MAX_QUEUES: u16 = 2;
const MAX_QUEUE_SIZE: u16 = 256;
/// How long the relay gives a frontend (it sends at once, then hangs up).
const TIMEOUT: Duration = Duration::from_secs(5);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("list /proc/self/fd")
        .count()
}

fn descriptors(fds: Fds) -> Vec<OwnedFd> {
    match fds {
        Fds::Events(count) => (0..count)
            .map(|_| {
                let event = EventFd::new(0).expect("eventfd");
                // SAFETY: the eventfd gives up its descriptor, which only
                // this OwnedFd holds from now on.
                unsafe { OwnedFd::from_raw_fd(event.into_raw_fd()) }
            })
            .collect(),
        Fds::Memfds(count, len) => (0..count)
            .map(|_| {
                let file = memfd::MemfdOptions::default()
                    .create("pvstack-fuzz-fd")
                    .expect("memfd_create")
                    .into_file();
                file.set_len(u64::from(len) % (1 << 20))
                    .expect("size memfd");
                file.into()
            })
            .collect(),
    }
}

/// The frontend: sends every piece with its descriptors, then hangs up.
fn send_pieces(socket: UnixStream, pieces: Vec<(Vec<OwnedFd>, Vec<u8>)>) {
    for (fds, bytes) in pieces {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let sent = if bytes.is_empty() {
            Ok(0)
        } else {
            socket.send_with_fds(&[&bytes[..]], &raw)
        };
        match sent {
            Ok(n) if n < bytes.len() => {
                if (&socket).write_all(&bytes[n..]).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            // The relay hung up (it refused a message).
            Err(_) => break,
        }
    }
    let _ = socket.shutdown(Shutdown::Write);
}

/// The index of the message of `messages` (laid end to end) that holds
/// byte `at` of the stream (`messages.len()` past their end).
fn message_index(messages: &[&[u8]], at: usize) -> usize {
    let mut end = 0;
    messages
        .iter()
        .position(|m| {
            end += m.len();
            at < end
        })
        .unwrap_or(messages.len())
}

fn read_all(mut socket: UnixStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    let _ = socket.read_to_end(&mut bytes);
    bytes
}

fuzz_target!(|data: &[u8]| {
    pvstack_fuzz::ignore_sigpipe();
    let input = Input::read(&mut Reader::new(data));
    let fds_before = open_fds();
    {
        let (frontend, front) = UnixStream::pair().expect("socketpair");
        let (back, daemon) = UnixStream::pair().expect("socketpair");
        let slot = Arc::new(InflightSlot::default());
        let filter = Box::new(InflightFilter::new(
            Arc::clone(&slot),
            MAX_QUEUES,
            MAX_QUEUE_SIZE,
        ));
        let relayed = relay(front, back, filter, TIMEOUT, Arc::new(())).expect("start the relay");
        let stream: Vec<u8> = input.pieces.iter().flat_map(|p| p.bytes).copied().collect();
        let pieces = input
            .pieces
            .iter()
            .map(|Piece { fds, bytes }| (descriptors(*fds), bytes.to_vec()))
            .collect();
        let frontend_reader = frontend.try_clone().expect("dup");
        let sender = std::thread::spawn(move || send_pieces(frontend, pieces));
        let receiver = std::thread::spawn(move || read_all(frontend_reader));
        // The daemon sends its replies and reads until the relay ends.
        let replies = input.replies.to_vec();
        let daemon_side = std::thread::spawn(move || {
            let _ = (&daemon).write_all(&replies);
            read_all(daemon)
        });
        let passed = daemon_side.join().expect("daemon thread");
        sender.join().expect("frontend sender");
        receiver.join().expect("frontend receiver");
        for thread in relayed {
            thread.join().expect("a relay thread panicked");
        }
        drop(slot);

        // A daemon that breaks the framing ends the connection at once:
        // only the frontend's side is then predictable.
        let replies_framed = messages(input.replies).concat() == input.replies;
        let sent = messages(&stream);
        let got = messages(&passed);
        assert_eq!(got.concat(), passed, "the daemon got a message cut short");
        let mut rest = sent.iter();
        for message in &got {
            assert!(
                rest.any(|m| m == message),
                "the daemon got a message the frontend did not send, or out of order"
            );
        }
        // Requests the filter answers or checks itself (and may refuse):
        // the inflight ones, ring sizes and the memory table.
        let answered_here = |m: &&[u8]| {
            [
                FrontendReq::GET_INFLIGHT_FD,
                FrontendReq::SET_INFLIGHT_FD,
                FrontendReq::SET_VRING_NUM,
                FrontendReq::SET_MEM_TABLE,
                FrontendReq::ADD_MEM_REG,
                FrontendReq::REM_MEM_REG,
            ]
            .iter()
            .any(|&request| code(m) == request as u32)
        };
        // A piece with more descriptors than a message may carry makes
        // the relay's receive fail (ENOBUFS) when it arrives with a header,
        // which ends the connection; only the messages before the one it
        // lands in are sure to pass.
        let refused_at = input
            .pieces
            .iter()
            .scan(0, |start, piece| {
                let at = *start;
                *start += piece.bytes.len();
                Some((at, piece))
            })
            .filter(|(_, piece)| {
                !piece.bytes.is_empty() && piece.fds.count() > MAX_ATTACHED_FD_ENTRIES
            })
            .map(|(at, _)| message_index(&sent, at))
            .min()
            .unwrap_or(sent.len());
        let before_filtered = sent
            .iter()
            .take_while(|m| !answered_here(m))
            .count()
            .min(refused_at);
        if replies_framed {
            assert!(
                got.len() >= before_filtered && got[..before_filtered] == sent[..before_filtered],
                "the daemon missed messages the filter had no reason to hold: got {} of the first {before_filtered}",
                got.len()
            );
        }
    }
    assert_eq!(open_fds(), fds_before, "file descriptors leaked");
});
