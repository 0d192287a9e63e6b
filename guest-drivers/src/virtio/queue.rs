//! The driver side of a split virtqueue (virtio 1.x section 2.7).
//!
//! The descriptor table, available ring and used ring live in memory shared
//! with the device; the free-descriptor list lives beside them in memory
//! only the driver touches, so a device can never corrupt it. The guest
//! polls: the queue asks the device not to interrupt (VRING_AVAIL_F_NO_INTERRUPT,
//! or with EVENT_IDX a used_event that is never reached) and reports, when
//! new chains are published, whether the device wants a notification.

use core::fmt;
use core::ptr;
use core::sync::atomic::{fence, Ordering};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
const DESC_SIZE: usize = 16;
const USED_ELEM_SIZE: usize = 8;

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (otherwise it reads it).
    pub device_writes: bool,
}

/// A chain the device has finished with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Index of the chain's first descriptor (what [`SplitQueue::add`] returned).
    pub head: u16,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// Misuse of the queue, or a device that broke the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The size is 0, not a power of two, or above 32768.
    BadSize(u16),
    /// The memory given is too small or misaligned.
    BadMemory,
    /// A chain needs at least one buffer.
    EmptyChain,
    /// Not enough free descriptors for the chain.
    Full,
    /// The device returned a head that is not an outstanding chain.
    BadUsedHead(u32),
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::BadSize(size) => write!(f, "bad queue size {size}"),
            QueueError::BadMemory => write!(f, "queue memory too small or misaligned"),
            QueueError::EmptyChain => write!(f, "empty descriptor chain"),
            QueueError::Full => write!(f, "no free descriptors"),
            QueueError::BadUsedHead(id) => write!(f, "device returned unknown chain {id}"),
        }
    }
}

/// Byte offsets of a queue's parts within its memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    /// Number of descriptors.
    pub size: u16,
    /// Available ring (the descriptor table is at offset 0).
    pub avail: usize,
    /// Used ring.
    pub used: usize,
    /// Driver-private bookkeeping (two u16 per descriptor).
    pub private: usize,
    /// Bytes of memory the queue needs.
    pub total: usize,
}

impl QueueLayout {
    /// Required alignment of the memory region (that of the descriptor table).
    pub const ALIGN: usize = 16;

    /// The layout of a queue of `size` descriptors.
    pub const fn new(size: u16) -> Self {
        let n = size as usize;
        let avail = n * DESC_SIZE;
        // flags, idx, ring[n], used_event
        let avail_end = avail + 4 + 2 * n + 2;
        let used = avail_end.next_multiple_of(4);
        // flags, idx, ring[n] of (id, len), avail_event
        let used_end = used + 4 + USED_ELEM_SIZE * n + 2;
        let private = used_end.next_multiple_of(2);
        QueueLayout {
            size,
            avail,
            used,
            private,
            total: private + 4 * n,
        }
    }
}

/// The driver side of one split virtqueue.
pub struct SplitQueue<'a> {
    layout: QueueLayout,
    base: *mut u8,
    event_idx: bool,
    /// Next free descriptor; also, for descriptors in a chain, the next
    /// one in the chain (the list is not touched while a chain is out).
    next_free: *mut u16,
    /// Descriptors in the chain that starts at each index; 0 if none.
    chain_len: *mut u16,
    free_head: u16,
    free_count: u16,
    /// Available index including chains added but not yet published.
    avail_idx: u16,
    /// Available index the device has been shown.
    published_idx: u16,
    /// Used index up to which completions have been taken.
    last_used: u16,
    _memory: core::marker::PhantomData<&'a mut [u8]>,
}

impl<'a> SplitQueue<'a> {
    /// A queue of `size` descriptors in `memory` (zeroed, at least
    /// `QueueLayout::new(size).total` bytes, aligned to `QueueLayout::ALIGN`).
    /// `event_idx`: whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub fn new(memory: &'a mut [u8], size: u16, event_idx: bool) -> Result<Self, QueueError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(QueueError::BadSize(size));
        }
        let layout = QueueLayout::new(size);
        if memory.len() < layout.total || memory.as_ptr() as usize % QueueLayout::ALIGN != 0 {
            return Err(QueueError::BadMemory);
        }
        let base = memory.as_mut_ptr();
        let mut queue = SplitQueue {
            layout,
            base,
            event_idx,
            // SAFETY: within `memory` (its length was checked above); the
            // private area is 2-byte aligned.
            next_free: unsafe { base.add(layout.private) }.cast(),
            // SAFETY: as above; the chain lengths follow the free list.
            chain_len: unsafe { base.add(layout.private + 2 * size as usize) }.cast(),
            free_head: 0,
            free_count: size,
            avail_idx: 0,
            published_idx: 0,
            last_used: 0,
            _memory: core::marker::PhantomData,
        };
        for i in 0..size {
            queue.set_next_free(i, i.wrapping_add(1));
            queue.set_chain_len(i, 0);
        }
        queue.write_u16(layout.avail, AVAIL_F_NO_INTERRUPT);
        queue.suppress_used_event();
        Ok(queue)
    }

    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// Descriptors not in any outstanding chain.
    pub fn free_descriptors(&self) -> u16 {
        self.free_count
    }

    /// Guest physical address of the descriptor table (QueueDesc).
    pub fn desc_addr(&self) -> u64 {
        self.base as u64
    }

    /// Guest physical address of the available ring (QueueDriver).
    pub fn avail_addr(&self) -> u64 {
        self.base as u64 + self.layout.avail as u64
    }

    /// Guest physical address of the used ring (QueueDevice).
    pub fn used_addr(&self) -> u64 {
        self.base as u64 + self.layout.used as u64
    }

    /// The head index the next [`add`](Self::add) will return, if any
    /// descriptor is free.
    pub fn next_head(&self) -> Option<u16> {
        (self.free_count > 0).then_some(self.free_head)
    }

    /// Puts a chain of `buffers` on the available ring (not yet visible to
    /// the device: see [`publish`](Self::publish)); returns its head.
    pub fn add(&mut self, buffers: &[Buffer]) -> Result<u16, QueueError> {
        if buffers.is_empty() {
            return Err(QueueError::EmptyChain);
        }
        if buffers.len() > self.free_count as usize {
            return Err(QueueError::Full);
        }
        let head = self.free_head;
        let mut index = head;
        for (i, buffer) in buffers.iter().enumerate() {
            let next = self.next_free(index);
            let last = i + 1 == buffers.len();
            let mut flags = if buffer.device_writes {
                DESC_F_WRITE
            } else {
                0
            };
            if !last {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(
                index,
                buffer.addr,
                buffer.len,
                flags,
                if last { 0 } else { next },
            );
            if last {
                self.free_head = next;
            }
            index = next;
        }
        self.free_count -= buffers.len() as u16;
        self.set_chain_len(head, buffers.len() as u16);
        let slot = self.layout.avail + 4 + 2 * (self.avail_idx % self.size()) as usize;
        self.write_u16(slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(head)
    }

    /// Makes the chain starting at `head` loop back to its own head (its
    /// last descriptor gets NEXT pointing at `head`): a malformed chain for
    /// fault-injection workloads. Call before [`publish`](Self::publish).
    /// Does nothing if `head` is not an outstanding chain.
    pub fn loop_chain_back(&mut self, head: u16) {
        if head >= self.size() || self.chain_len(head) == 0 {
            return;
        }
        let mut last = head;
        for _ in 1..self.chain_len(head) {
            last = self.next_free(last);
        }
        let desc = self.layout_desc(last);
        let flags = self.read_u16(desc + 12);
        self.write_u16(desc + 12, flags | DESC_F_NEXT);
        self.write_u16(desc + 14, head);
    }

    /// Shows the device every chain added so far. Returns whether the
    /// device asked to be notified (kicked) about them.
    pub fn publish(&mut self) -> bool {
        if self.avail_idx == self.published_idx {
            return false;
        }
        self.suppress_used_event();
        // The ring entries and descriptors must be visible before the index.
        fence(Ordering::Release);
        self.write_u16(self.layout.avail + 2, self.avail_idx);
        // The index store must be visible before we read the device's
        // notification suppression (a store-load order: needs a full fence),
        // or a device going idle in between could miss the chains.
        fence(Ordering::SeqCst);
        let (old, new) = (self.published_idx, self.avail_idx);
        self.published_idx = new;
        if self.event_idx {
            let avail_event =
                self.read_u16(self.layout.used + 4 + USED_ELEM_SIZE * self.size() as usize);
            need_event(avail_event, new, old)
        } else {
            self.read_u16(self.layout.used) & USED_F_NO_NOTIFY == 0
        }
    }

    /// Takes the next chain the device has finished with, if any, and
    /// returns its descriptors to the free list.
    pub fn pop_used(&mut self) -> Result<Option<Used>, QueueError> {
        let used_idx = self.read_u16(self.layout.used + 2);
        if used_idx == self.last_used {
            return Ok(None);
        }
        // Read the element (and the buffers it covers) only after the index.
        fence(Ordering::Acquire);
        let elem = self.layout.used + 4 + USED_ELEM_SIZE * (self.last_used % self.size()) as usize;
        let id = self.read_u32(elem);
        let len = self.read_u32(elem + 4);
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| h < self.size() && self.chain_len(h) != 0)
            .ok_or(QueueError::BadUsedHead(id))?;
        let count = self.chain_len(head);
        let mut last = head;
        for _ in 1..count {
            last = self.next_free(last);
        }
        self.set_next_free(last, self.free_head);
        self.free_head = head;
        self.free_count += count;
        self.set_chain_len(head, 0);
        Ok(Some(Used { head, len }))
    }

    /// With EVENT_IDX, sets used_event just behind the completions already
    /// taken, so the device never finds a reason to interrupt (the guest
    /// polls); without it, VRING_AVAIL_F_NO_INTERRUPT does that job.
    fn suppress_used_event(&mut self) {
        if self.event_idx {
            let used_event = self.layout.avail + 4 + 2 * self.size() as usize;
            self.write_u16(used_event, self.last_used.wrapping_sub(1));
        }
    }

    fn layout_desc(&self, index: u16) -> usize {
        index as usize * DESC_SIZE
    }

    fn write_desc(&mut self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = self.layout_desc(index);
        // SAFETY: desc < size * 16 lies in the descriptor table, 16-byte aligned.
        unsafe {
            ptr::write_volatile(self.base.add(desc).cast::<u64>(), addr);
            ptr::write_volatile(self.base.add(desc + 8).cast::<u32>(), len);
        }
        self.write_u16(desc + 12, flags);
        self.write_u16(desc + 14, next);
    }

    fn next_free(&self, index: u16) -> u16 {
        // SAFETY: index < size: inside the private area (`new` checked its size).
        unsafe { *self.next_free.add(index as usize) }
    }

    fn set_next_free(&mut self, index: u16, next: u16) {
        // SAFETY: as in `next_free`.
        unsafe { *self.next_free.add(index as usize) = next }
    }

    fn chain_len(&self, head: u16) -> u16 {
        // SAFETY: head < size: inside the private area.
        unsafe { *self.chain_len.add(head as usize) }
    }

    fn set_chain_len(&mut self, head: u16, len: u16) {
        // SAFETY: as in `chain_len`.
        unsafe { *self.chain_len.add(head as usize) = len }
    }

    // Shared-memory accessors: volatile, because the device reads and
    // writes the same bytes behind the compiler's back. Offsets come from
    // the layout and are naturally aligned.
    fn read_u16(&self, offset: usize) -> u16 {
        // SAFETY: offset < layout.total, 2-byte aligned.
        unsafe { ptr::read_volatile(self.base.add(offset).cast::<u16>()) }
    }

    fn write_u16(&mut self, offset: usize, value: u16) {
        // SAFETY: as in `read_u16`.
        unsafe { ptr::write_volatile(self.base.add(offset).cast::<u16>(), value) }
    }

    fn read_u32(&self, offset: usize) -> u32 {
        // SAFETY: offset < layout.total, 4-byte aligned (used ring elements).
        unsafe { ptr::read_volatile(self.base.add(offset).cast::<u32>()) }
    }
}

/// Whether moving an index from `old` to `new` passes `event` (virtio 1.x
/// section 2.7.10: `vring_need_event`).
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// Zeroed memory aligned for a queue.
    fn memory(size: u16) -> Vec<u128> {
        std::vec![0u128; QueueLayout::new(size).total.div_ceil(16)]
    }

    fn bytes(mem: &mut [u128]) -> &mut [u8] {
        // SAFETY: u128 memory reinterpreted as bytes, same length in bytes.
        unsafe { core::slice::from_raw_parts_mut(mem.as_mut_ptr().cast(), mem.len() * 16) }
    }

    /// A descriptor as the device reads it: (addr, len, flags, next).
    type Desc = (u64, u32, u16, u16);

    /// The device side, reading and writing the rings through the
    /// addresses the driver would program into the transport. Every
    /// pointer is into the queue memory the test owns, which outlives the
    /// device; every index is reduced modulo the queue size or checked
    /// against it before it is used.
    struct Device {
        desc: *mut u8,
        avail: *mut u16,
        used: *mut u8,
        size: u16,
        next_avail: u16,
        used_idx: u16,
    }

    impl Device {
        fn new(queue: &SplitQueue<'_>) -> Self {
            Device {
                desc: queue.desc_addr() as *mut u8,
                avail: queue.avail_addr() as *mut u16,
                used: queue.used_addr() as *mut u8,
                size: queue.size(),
                next_avail: 0,
                used_idx: 0,
            }
        }

        fn avail_flags(&self) -> u16 {
            // SAFETY: the available ring's flags, in the queue memory.
            unsafe { self.avail.read_volatile() }
        }

        fn used_event(&self) -> u16 {
            // SAFETY: used_event follows the ring's `size` entries, in the queue memory.
            unsafe { self.avail.add(2 + self.size as usize).read_volatile() }
        }

        /// The next published chain as (head, descriptors).
        fn pop_avail(&mut self) -> Option<(u16, Vec<Desc>)> {
            // SAFETY: the available ring's idx, in the queue memory.
            let idx = unsafe { self.avail.add(1).read_volatile() };
            if idx == self.next_avail {
                return None;
            }
            // SAFETY: an entry of the ring (index reduced modulo its size).
            let head = unsafe {
                self.avail
                    .add(2 + (self.next_avail % self.size) as usize)
                    .read_volatile()
            };
            self.next_avail = self.next_avail.wrapping_add(1);
            let mut chain = Vec::new();
            let mut i = head;
            loop {
                assert!(i < self.size, "descriptor index {i} out of the table");
                // SAFETY: descriptor `i` of the table (`i` checked above).
                let d = unsafe { self.desc.add(16 * i as usize) };
                // SAFETY: the fields of that 16-byte, 16-byte aligned descriptor.
                let entry = unsafe {
                    (
                        d.cast::<u64>().read_volatile(),
                        d.add(8).cast::<u32>().read_volatile(),
                        d.add(12).cast::<u16>().read_volatile(),
                        d.add(14).cast::<u16>().read_volatile(),
                    )
                };
                chain.push(entry);
                if entry.2 & DESC_F_NEXT == 0 || chain.len() > self.size as usize {
                    break;
                }
                i = entry.3;
            }
            Some((head, chain))
        }

        fn push_used(&mut self, id: u32, len: u32) {
            // SAFETY: a used ring element (index reduced modulo the size)
            // and the used ring's idx, in the queue memory.
            unsafe {
                let elem = self.used.add(4 + 8 * (self.used_idx % self.size) as usize);
                elem.cast::<u32>().write_volatile(id);
                elem.add(4).cast::<u32>().write_volatile(len);
                self.used_idx = self.used_idx.wrapping_add(1);
                self.used.add(2).cast::<u16>().write_volatile(self.used_idx);
            }
        }

        fn set_used_flags(&mut self, flags: u16) {
            // SAFETY: the used ring's flags, in the queue memory.
            unsafe { self.used.cast::<u16>().write_volatile(flags) }
        }

        fn set_avail_event(&mut self, event: u16) {
            // SAFETY: avail_event follows the used ring's `size` elements.
            unsafe {
                self.used
                    .add(4 + 8 * self.size as usize)
                    .cast::<u16>()
                    .write_volatile(event)
            }
        }
    }

    fn buf(addr: u64, len: u32, device_writes: bool) -> Buffer {
        Buffer {
            addr,
            len,
            device_writes,
        }
    }

    #[test]
    fn layout_follows_the_spec_alignments() {
        let layout = QueueLayout::new(8);
        assert_eq!(layout.avail, 128);
        assert_eq!(layout.used, 152); // 128 + 22 rounded up to 4
        assert_eq!(layout.private, 152 + 4 + 64 + 2);
        assert_eq!(layout.total, layout.private + 32);
    }

    #[test]
    fn rejects_bad_sizes_and_memory() {
        let mut mem = memory(8);
        assert_eq!(
            SplitQueue::new(bytes(&mut mem), 6, false).err(),
            Some(QueueError::BadSize(6))
        );
        assert_eq!(
            SplitQueue::new(bytes(&mut mem), 0, false).err(),
            Some(QueueError::BadSize(0))
        );
        assert_eq!(
            SplitQueue::new(bytes(&mut mem), 16, false).err(),
            Some(QueueError::BadMemory)
        );
        assert_eq!(
            SplitQueue::new(&mut bytes(&mut mem)[1..], 4, false).err(),
            Some(QueueError::BadMemory)
        );
    }

    #[test]
    fn chains_reach_the_device_and_come_back() {
        let mut mem = memory(8);
        let mut queue = SplitQueue::new(bytes(&mut mem), 8, false).expect("valid queue");
        let mut device = Device::new(&queue);
        assert_eq!(device.avail_flags(), AVAIL_F_NO_INTERRUPT);

        let a = queue
            .add(&[
                buf(0x1000, 16, false),
                buf(0x2000, 512, true),
                buf(0x3000, 1, true),
            ])
            .expect("room");
        let b = queue
            .add(&[buf(0x4000, 16, false), buf(0x5000, 1, true)])
            .expect("room");
        assert_eq!(queue.free_descriptors(), 3);
        // Nothing is visible before publishing.
        assert!(device.pop_avail().is_none());
        assert!(queue.publish());
        assert!(!queue.publish(), "nothing new to publish");

        let (head, chain) = device.pop_avail().expect("first chain");
        assert_eq!(head, a);
        assert_eq!(
            chain
                .iter()
                .map(|d| (d.0, d.1, d.2 & !DESC_F_NEXT))
                .collect::<Vec<_>>(),
            [
                (0x1000, 16, 0),
                (0x2000, 512, DESC_F_WRITE),
                (0x3000, 1, DESC_F_WRITE)
            ]
        );
        assert_eq!(
            chain.iter().map(|d| d.2 & DESC_F_NEXT).collect::<Vec<_>>(),
            [1, 1, 0]
        );
        let (head_b, chain_b) = device.pop_avail().expect("second chain");
        assert_eq!((head_b, chain_b.len()), (b, 2));

        assert_eq!(queue.pop_used(), Ok(None));
        device.push_used(u32::from(b), 1);
        device.push_used(u32::from(a), 513);
        assert_eq!(queue.pop_used(), Ok(Some(Used { head: b, len: 1 })));
        assert_eq!(queue.pop_used(), Ok(Some(Used { head: a, len: 513 })));
        assert_eq!(queue.pop_used(), Ok(None));
        assert_eq!(queue.free_descriptors(), 8);
    }

    #[test]
    fn descriptors_are_recycled_across_ring_wraps() {
        let mut mem = memory(4);
        let mut queue = SplitQueue::new(bytes(&mut mem), 4, false).expect("valid queue");
        let mut device = Device::new(&queue);
        for round in 0..100u32 {
            let h1 = queue
                .add(&[buf(1, 1, false), buf(2, 2, true)])
                .expect("room");
            let h2 = queue
                .add(&[buf(3, 3, false), buf(4, 4, true)])
                .expect("room");
            assert_eq!(queue.add(&[buf(5, 5, false)]), Err(QueueError::Full));
            queue.publish();
            let (d1, c1) = device.pop_avail().expect("chain");
            let (d2, _) = device.pop_avail().expect("chain");
            assert_eq!((d1, d2, c1[1].0), (h1, h2, 2));
            device.push_used(u32::from(d2), round);
            device.push_used(u32::from(d1), round);
            assert_eq!(queue.pop_used().expect("valid").map(|u| u.head), Some(h2));
            assert_eq!(queue.pop_used().expect("valid").map(|u| u.head), Some(h1));
            assert_eq!(queue.free_descriptors(), 4);
        }
    }

    #[test]
    fn unknown_used_heads_are_refused() {
        let mut mem = memory(4);
        let mut queue = SplitQueue::new(bytes(&mut mem), 4, false).expect("valid queue");
        let mut device = Device::new(&queue);
        queue
            .add(&[buf(1, 1, false), buf(2, 2, true)])
            .expect("room");
        queue.publish();
        device.push_used(1, 0); // descriptor 1 is inside the chain, not its head
        assert_eq!(queue.pop_used(), Err(QueueError::BadUsedHead(1)));
        device.push_used(99, 0);
        assert_eq!(queue.pop_used(), Err(QueueError::BadUsedHead(99)));
    }

    #[test]
    fn notification_follows_no_notify_flag() {
        let mut mem = memory(4);
        let mut queue = SplitQueue::new(bytes(&mut mem), 4, false).expect("valid queue");
        let mut device = Device::new(&queue);
        device.set_used_flags(USED_F_NO_NOTIFY);
        queue.add(&[buf(1, 1, true)]).expect("room");
        assert!(!queue.publish());
        device.set_used_flags(0);
        queue.add(&[buf(1, 1, true)]).expect("room");
        assert!(queue.publish());
    }

    #[test]
    fn notification_follows_avail_event_with_event_idx() {
        let mut mem = memory(8);
        let mut queue = SplitQueue::new(bytes(&mut mem), 8, true).expect("valid queue");
        let mut device = Device::new(&queue);
        // The device wants a kick once avail index 0 is passed.
        device.set_avail_event(0);
        queue.add(&[buf(1, 1, true)]).expect("room");
        assert!(queue.publish()); // 0 -> 1 passes 0
        queue.add(&[buf(1, 1, true)]).expect("room");
        assert!(!queue.publish()); // 1 -> 2 does not pass 0
        device.set_avail_event(3);
        queue.add(&[buf(1, 1, true)]).expect("room");
        queue.add(&[buf(1, 1, true)]).expect("room");
        assert!(queue.publish()); // 2 -> 4 passes 3
                                  // The driver never asks for an interrupt: used_event stays behind.
        device.push_used(0, 0);
        queue.pop_used().expect("valid");
        queue.add(&[buf(1, 1, true)]).expect("room");
        queue.publish();
        assert_eq!(device.used_event(), 0);
        assert!(!need_event(device.used_event(), 5, 1));
    }

    #[test]
    fn need_event_handles_wrap() {
        assert!(need_event(0xffff, 0x0001, 0xfffe));
        assert!(!need_event(0x0001, 0x0001, 0x0000)); // event 1 not passed by 0 -> 1
        assert!(need_event(0x0000, 0x0001, 0x0000));
    }

    #[test]
    fn loop_chain_back_points_the_last_descriptor_at_the_head() {
        let mut mem = memory(4);
        let mut queue = SplitQueue::new(bytes(&mut mem), 4, false).expect("valid queue");
        let mut device = Device::new(&queue);
        let head = queue
            .add(&[buf(1, 16, false), buf(2, 1, true)])
            .expect("room");
        queue.loop_chain_back(head);
        queue.publish();
        let (_, chain) = device.pop_avail().expect("chain");
        assert!(chain.len() > 4, "the device sees an endless chain");
        assert_eq!(chain[1].2 & DESC_F_NEXT, DESC_F_NEXT);
        assert_eq!(chain[1].3, head);
        // The driver still frees exactly the two descriptors it used.
        device.push_used(u32::from(head), 0);
        queue.pop_used().expect("valid");
        assert_eq!(queue.free_descriptors(), 4);
    }
}
