//! pvstack-net's frame path on a hostile driver's queues: the transmit
//! queue's chains (any descriptors, indirect tables included) are checked
//! and sent by `datapath::transmit` to a real peer link (a Unix datagram
//! socket pair, pvstack-net's peer mode), and the input's frames come back
//! over it into the receive queue's buffers through `datapath::receive`,
//! with or without MRG_RXBUF. Beyond not crashing: every frame that
//! reaches the peer is a checked one (an Ethernet header up to a 64 KiB
//! TSO packet), and a frame that finds too few receive buffers waits
//! without consuming any.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pvstack_fuzz::input::Reader;
use pvstack_fuzz::memory::{load, memfd_memory};
use pvstack_fuzz::targets::net_frame::{Input, MAX_QUEUE, MEMORY};
use pvstack_net::datapath::{receive, transmit, Delivery, RxPending};
use pvstack_net::frame::{MAX_CHAIN_BYTES, MAX_FRAME_LEN, MIN_FRAME_LEN};
use pvstack_net::link::Link;
use pvstack_net::peer::PeerSocket;
use pvstack_net::stats::NetStats;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

struct Bench {
    mem: GuestMemoryMmap,
    /// pvstack-net's end of the wire ...
    link: Link,
    /// ... and the other pvstack-net's.
    peer: PeerSocket,
}

fn bench() -> &'static Bench {
    static BENCH: OnceLock<Bench> = OnceLock::new();
    BENCH.get_or_init(|| {
        let dir = pvstack_fuzz::scratch_dir();
        let (ours, theirs) = (dir.join("net-a.sock"), dir.join("net-b.sock"));
        Bench {
            mem: memfd_memory(MEMORY),
            link: Link::Peer(PeerSocket::bind(&ours, &theirs, 0o600).expect("bind the peer link")),
            peer: PeerSocket::bind(&theirs, &ours, 0o600).expect("bind the other end"),
        }
    })
}

/// Every datagram waiting on `peer`, as lengths.
fn drain(peer: &PeerSocket) -> Vec<usize> {
    let mut buf = vec![0u8; MAX_CHAIN_BYTES + 1];
    std::iter::from_fn(|| peer.recv(&mut buf).ok().flatten()).collect()
}

fuzz_target!(|data: &[u8]| {
    let bench = bench();
    let input = Input::read(&mut Reader::new(data));
    let mem = &bench.mem;
    // Frames left by a run that stopped early.
    drain(&bench.peer);
    let mut scratch = vec![0u8; MAX_CHAIN_BYTES];
    while bench.link.recv(&mut scratch).ok().flatten().is_some() {}
    load(mem, input.image);
    let stats = NetStats::default();

    let tx = input.tx.config(MAX_QUEUE);
    if tx.validate(1).is_ok() {
        if let Ok(mut queue) = tx.build_queue(1, input.event_idx(), mem) {
            transmit(&mut queue, mem, &bench.link, &mut scratch, &stats);
            let _ = queue.needs_notification(mem);
            for len in drain(&bench.peer) {
                assert!(
                    (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len),
                    "a {len}-byte frame reached the wire"
                );
            }
        }
    }

    let rx = input.rx.config(MAX_QUEUE);
    if rx.validate(0).is_err() {
        return;
    }
    let Ok(mut queue) = rx.build_queue(0, input.event_idx(), mem) else {
        return;
    };
    for frame in &input.frames {
        let _ = bench.peer.send(frame);
    }
    let mut pending = RxPending::default();
    let next_used = queue.next_used();
    let (_, delivery) = receive(
        &mut queue,
        mem,
        &bench.link,
        &mut pending,
        input.mergeable(),
        &stats,
    );
    if matches!(delivery, Delivery::NoBuffers { .. }) && input.frames.len() == 1 {
        assert_eq!(
            queue.next_used(),
            next_used,
            "a frame that found too few buffers consumed some"
        );
    }
});
