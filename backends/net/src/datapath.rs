//! The frame engine: moving frames between virtqueues and a [`Link`].
//! pvstack-net runs it in its worker thread; pvstack's in-VMM emulated
//! virtio-net baseline runs the very same code on its vCPU exits, so the
//! two differ only in where the queues are processed.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::frame::{check_chain_len, BadFrame, MAX_CHAIN_BYTES, NUM_BUFFERS_OFFSET, VNET_HDR_LEN};
use crate::link::Link;
use crate::stats::NetStats;

/// What became of a frame offered to the receive queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written into the driver's buffers.
    Delivered,
    /// Not enough receive buffers; the frame waits. `posted` is the
    /// available index it found: the buffers the driver had posted.
    NoBuffers { posted: u16 },
    /// Dropped: the driver's buffers cannot hold it (or are broken).
    Dropped,
}

/// A frame read from the link that found no receive buffers yet.
pub struct RxPending {
    buffer: Vec<u8>,
    len: usize,
}

impl Default for RxPending {
    fn default() -> Self {
        RxPending {
            buffer: vec![0; MAX_CHAIN_BYTES],
            len: 0,
        }
    }
}

/// Sends every frame on the transmit queue to `link`, checking each;
/// returns whether any chain was returned (the driver may need a signal).
/// `scratch` must hold [`MAX_CHAIN_BYTES`].
pub fn transmit<M>(
    queue: &mut Queue,
    mem: &M,
    link: &Link,
    scratch: &mut [u8],
    stats: &NetStats,
) -> bool
where
    M: GuestMemory,
{
    let mut returned = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match gather(chain, mem, scratch) {
            Ok(len) => match link.send(&scratch[..len]) {
                Ok(()) => stats.tx_frame(len - VNET_HDR_LEN),
                Err(e) => stats.tx_link_error(&e),
            },
            Err(bad) => stats.tx_bad(head, bad),
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            log::warn!("transmit queue: cannot return chain {head}: {e}");
        }
        returned = true;
    }
    returned
}

/// Moves frames from `link` into the receive queue until the link has
/// none or the driver's buffers run out (the frame then waits in
/// `pending`). Returns whether any chain was returned.
pub fn receive<M>(
    queue: &mut Queue,
    mem: &M,
    link: &Link,
    pending: &mut RxPending,
    mergeable: bool,
    stats: &NetStats,
) -> (bool, Delivery)
where
    M: GuestMemory,
{
    let mut returned = false;
    loop {
        if pending.len == 0 {
            match link.recv(&mut pending.buffer) {
                Ok(Some(n)) if n > VNET_HDR_LEN => pending.len = n,
                Ok(Some(n)) => {
                    log::warn!("dropped a {n}-byte frame from {}", link.describe());
                    continue;
                }
                Ok(None) => return (returned, Delivery::Delivered),
                Err(e) => {
                    log::warn!("cannot read from {}: {e}", link.describe());
                    return (returned, Delivery::Delivered);
                }
            }
        }
        let len = pending.len;
        match deliver(queue, mem, &mut pending.buffer[..len], mergeable, stats) {
            Delivery::Delivered => {
                stats.rx_frame(len - VNET_HDR_LEN);
                pending.len = 0;
                returned = true;
            }
            Delivery::Dropped => {
                stats.rx_dropped();
                pending.len = 0;
                returned = true;
            }
            outcome @ Delivery::NoBuffers { .. } => return (returned, outcome),
        }
    }
}

/// After [`Delivery::NoBuffers`] at available index `posted`: asks the
/// driver to notify the device when it posts another receive buffer, and
/// returns whether it has posted one since (then deliver again).
///
/// With EVENT_IDX the driver notifies when it moves the available index
/// past the device's `avail_event`. Enabling notifications at the queue's
/// own position would put `avail_event` at the frame's first buffer,
/// which the driver has already posted: it would not notify again, and
/// the buffers it did post would make the caller retry at once, in a
/// loop, until enough came. So `avail_event` goes to `posted`.
pub fn notify_on_more_buffers<M>(
    queue: &mut Queue,
    mem: &M,
    posted: u16,
) -> Result<bool, virtio_queue::Error>
where
    M: GuestMemory,
{
    let start = queue.next_avail();
    queue.set_next_avail(posted);
    let more = queue.enable_notification(mem);
    queue.set_next_avail(start);
    more
}

/// Copies a transmit chain (header + frame) into `buffer`, checking every
/// descriptor and that the chain ends (the queue stops yielding a broken
/// chain, indirect table included, before its end); returns the length.
pub fn gather<M, N>(
    chain: DescriptorChain<N>,
    mem: &M,
    buffer: &mut [u8],
) -> Result<usize, BadFrame>
where
    M: GuestMemory,
    N: Deref + Clone,
    N::Target: GuestMemory,
{
    let mut len = 0usize;
    let mut ended = true;
    for desc in chain {
        ended = !desc.has_next();
        if desc.is_write_only() {
            return Err(BadFrame::WriteOnlyDescriptor);
        }
        let end = len + desc.len() as usize;
        if end > buffer.len() {
            return Err(BadFrame::TooLong(end));
        }
        mem.read_slice(&mut buffer[len..end], desc.addr())
            .map_err(|_| outside(&desc))?;
        len = end;
    }
    if !ended {
        return Err(BadFrame::BrokenChain);
    }
    check_chain_len(len)?;
    Ok(len)
}

fn outside(desc: &Descriptor) -> BadFrame {
    BadFrame::OutsideMemory {
        addr: desc.addr().0,
        len: desc.len(),
    }
}

/// Writes `frame` (header + frame) into receive chains: one chain, or with
/// MRG_RXBUF as many as it takes, recording their count in the header's
/// `num_buffers`. With too few buffers nothing is consumed.
pub fn deliver<M>(
    queue: &mut Queue,
    mem: &M,
    frame: &mut [u8],
    mergeable: bool,
    stats: &NetStats,
) -> Delivery
where
    M: GuestMemory,
{
    let start = queue.next_avail();
    // Patched below when the frame spans several chains.
    frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
    let mut used: Vec<(u16, u32)> = Vec::new();
    let mut num_buffers_at: Option<GuestAddress> = None;
    let mut written = 0usize;
    let mut broken = false;
    while written < frame.len() && !broken {
        if !mergeable && !used.is_empty() {
            break;
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // The queue stopped where the driver's posted buffers end.
            let posted = queue.next_avail();
            queue.set_next_avail(start);
            return Delivery::NoBuffers { posted };
        };
        let head = chain.head_index();
        let mut chain_len = 0u32;
        for desc in chain {
            if written == frame.len() {
                break;
            }
            if !desc.is_write_only() {
                broken = true;
                break;
            }
            let n = (desc.len() as usize).min(frame.len() - written);
            if mem
                .write_slice(&frame[written..written + n], desc.addr())
                .is_err()
            {
                broken = true;
                break;
            }
            if written <= NUM_BUFFERS_OFFSET && NUM_BUFFERS_OFFSET + 2 <= written + n {
                num_buffers_at = Some(GuestAddress(
                    desc.addr().0 + (NUM_BUFFERS_OFFSET - written) as u64,
                ));
            }
            written += n;
            chain_len += n as u32;
        }
        used.push((head, chain_len));
        if broken {
            stats.rx_bad_buffer(head);
        }
    }
    let mut complete = written == frame.len() && !broken;
    if complete && used.len() > 1 {
        // A header split across descriptors is unusual enough to drop the
        // frame rather than patch it byte by byte.
        complete = num_buffers_at
            .is_some_and(|addr| mem.write_obj((used.len() as u16).to_le(), addr).is_ok());
    }
    for &(head, len) in &used {
        let len = if complete { len } else { 0 };
        if let Err(e) = queue.add_used(mem, head, len) {
            log::warn!("receive queue: cannot return chain {head}: {e}");
        }
    }
    if complete {
        Delivery::Delivered
    } else {
        Delivery::Dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestMemoryMmap};

    const MEM_SIZE: u64 = 0x10_0000;
    const QUEUE_SIZE: u16 = 16;
    const BUF: u64 = 0x4_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("memory")
    }

    fn readable(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
    }

    fn writable(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            VRING_DESC_F_WRITE as u16,
            0,
        ))
    }

    fn gathered(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<usize, BadFrame> {
        let queue = MockSplitQueue::new(mem, QUEUE_SIZE);
        let chain = queue.build_desc_chain(descs).expect("chain");
        gather(chain, mem, &mut vec![0; MAX_CHAIN_BYTES])
    }

    #[test]
    fn transmit_chains_are_checked() {
        let mem = memory();
        let frame: Vec<u8> = (0..100u8).collect();
        mem.write_slice(&frame, GuestAddress(BUF)).expect("write");
        assert_eq!(
            gathered(&mem, &[readable(BUF, 12), readable(BUF + 12, 88)]),
            Ok(100)
        );
        assert_eq!(
            gathered(&mem, &[readable(BUF, 20)]),
            Err(BadFrame::TooShort(20))
        );
        assert_eq!(
            gathered(&mem, &[readable(BUF, 12), writable(BUF + 12, 88)]),
            Err(BadFrame::WriteOnlyDescriptor)
        );
        assert_eq!(
            gathered(&mem, &[readable(BUF, 12), readable(MEM_SIZE - 8, 64)]),
            Err(BadFrame::OutsideMemory {
                addr: MEM_SIZE - 8,
                len: 64
            })
        );
        let huge = MAX_CHAIN_BYTES as u32;
        assert_eq!(
            gathered(&mem, &[readable(BUF, huge), readable(BUF, 1)]),
            Err(BadFrame::TooLong(MAX_CHAIN_BYTES + 1))
        );
    }

    const TABLE: u64 = 0x8_0000;
    const INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
    const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

    /// Writes `entries` (addr, len, flags, next) as an indirect table at
    /// TABLE and returns the descriptor that refers to it.
    fn indirect(mem: &GuestMemoryMmap, entries: &[(u64, u32, u16, u16)]) -> RawDescriptor {
        for (i, &(addr, len, flags, next)) in entries.iter().enumerate() {
            let entry = SplitDescriptor::new(addr, len, flags, next);
            mem.write_obj(entry, GuestAddress(TABLE + 16 * i as u64))
                .expect("write entry");
        }
        let len = 16 * entries.len() as u32;
        RawDescriptor::from(SplitDescriptor::new(TABLE, len, INDIRECT, 0))
    }

    /// Linux sends a frame in one indirect table when it has more pieces
    /// than free descriptors; a broken table drops the frame.
    #[test]
    fn transmit_chains_in_indirect_tables() {
        let mem = memory();
        let frame: Vec<u8> = (0..100u8).collect();
        mem.write_slice(&frame, GuestAddress(BUF)).expect("write");
        let pieces: Vec<_> = (0..20u16)
            .map(|i| (BUF + 5 * u64::from(i), 5, NEXT, i + 1))
            .collect();
        let mut table = pieces.clone();
        table[19].2 = 0;
        assert_eq!(gathered(&mem, &[indirect(&mem, &table)]), Ok(100));
        // The last piece refers to another table: the chain breaks off
        // after 95 bytes, which would otherwise make a frame.
        table[19] = (TABLE + 0x1000, 16, INDIRECT, 0);
        assert_eq!(
            gathered(&mem, &[indirect(&mem, &table)]),
            Err(BadFrame::BrokenChain)
        );
        // The pieces loop.
        let mut table = pieces;
        table[19].3 = 0;
        assert_eq!(
            gathered(&mem, &[indirect(&mem, &table)]),
            Err(BadFrame::BrokenChain)
        );
    }

    /// Two one-descriptor receive chains of `len` bytes at BUF and BUF+0x1000.
    fn rx_queue(mem: &GuestMemoryMmap, len: u32) -> Queue {
        let queue = MockSplitQueue::new(mem, QUEUE_SIZE);
        queue
            .add_desc_chains(&[writable(BUF, len), writable(BUF + 0x1000, len)], 0)
            .expect("chains");
        queue.create_queue::<Queue>().expect("queue")
    }

    #[test]
    fn a_frame_spans_buffers_only_with_mergeable_rx() {
        let mem = memory();
        let stats = NetStats::default();
        let mut frame = vec![0xabu8; 1000];
        frame[..VNET_HDR_LEN].fill(0);

        let mut queue = rx_queue(&mem, 600);
        assert_eq!(
            deliver(&mut queue, &mem, &mut frame, true, &stats),
            Delivery::Delivered
        );
        let num_buffers: u16 = mem
            .read_obj(GuestAddress(BUF + NUM_BUFFERS_OFFSET as u64))
            .expect("read");
        assert_eq!(num_buffers, 2);
        let mut tail = [0u8; 400];
        mem.read_slice(&mut tail, GuestAddress(BUF + 0x1000))
            .expect("read");
        assert!(tail.iter().all(|&b| b == 0xab));
        assert_eq!(queue.next_used(), 2);

        let mut queue = rx_queue(&mem, 600);
        assert_eq!(
            deliver(&mut queue, &mem, &mut frame, false, &stats),
            Delivery::Dropped
        );
        assert_eq!(queue.next_used(), 1, "the too-small buffer goes back empty");
    }

    /// A frame larger than the buffers posted asks for a notification
    /// at the available index, and retries only once the driver posts more.
    #[test]
    fn too_few_buffers_wait_for_the_next_one_without_retrying() {
        let mem = memory();
        let stats = NetStats::default();
        let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
        mock.add_desc_chains(&[writable(BUF, 100), writable(BUF + 0x1000, 100)], 0)
            .expect("chains");
        let mut queue: Queue = mock.create_queue().expect("queue");
        queue.set_event_idx(true);
        let mut frame = vec![1u8; 1000];
        assert_eq!(
            deliver(&mut queue, &mem, &mut frame, true, &stats),
            Delivery::NoBuffers { posted: 2 }
        );
        assert_eq!(notify_on_more_buffers(&mut queue, &mem, 2), Ok(false));
        let avail_event = mock
            .used_addr()
            .unchecked_add(4 + 8 * u64::from(QUEUE_SIZE));
        let avail_event: u16 = mem.read_obj(avail_event).expect("read");
        assert_eq!(avail_event, 2, "a notification for the third buffer");
        assert_eq!(queue.next_avail(), 0, "the two buffers stay available");

        mock.add_desc_chains(&[writable(BUF + 0x2000, 900)], 2)
            .expect("chain");
        assert_eq!(notify_on_more_buffers(&mut queue, &mem, 2), Ok(true));
        assert_eq!(
            deliver(&mut queue, &mem, &mut frame, true, &stats),
            Delivery::Delivered
        );
    }

    #[test]
    fn without_enough_buffers_nothing_is_consumed() {
        let mem = memory();
        let stats = NetStats::default();
        let mut queue = rx_queue(&mem, 100);
        let mut frame = vec![1u8; 1000];
        assert_eq!(
            deliver(&mut queue, &mem, &mut frame, true, &stats),
            Delivery::NoBuffers { posted: 2 }
        );
        assert_eq!((queue.next_avail(), queue.next_used()), (0, 0));
    }
}
