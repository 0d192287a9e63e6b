//! The virtio-net driver (virtio 1.x section 5.1): one receive and one
//! transmit queue, polled. Every buffer is one descriptor of
//! [`BUFFER_SIZE`] bytes holding the 12-byte virtio-net header and one
//! Ethernet frame; no offloads and no mergeable buffers are negotiated,
//! so every frame fits one buffer.
//!
//! Frames are taken with [`NetDevice::receive`] and their buffers handed
//! back with [`NetDevice::recycle`]; frames are sent by filling
//! [`NetDevice::tx_buffer`] and calling [`NetDevice::send`]. Neither is
//! shown to the device until [`NetDevice::flush`], so a burst costs one
//! kick per queue.

use super::mmio::MmioTransport;
use super::queue::{Buffer, QueueLayout, SplitQueue};
use super::{device_id, feature, VirtioError};
use crate::bump::Bump;

/// Network device feature bits.
pub mod net_feature {
    /// `mtu` in the configuration space is valid.
    pub const MTU: u64 = 1 << 3;
    /// `mac` in the configuration space is valid.
    pub const MAC: u64 = 1 << 5;
    /// `status` in the configuration space is valid.
    pub const STATUS: u64 = 1 << 16;
}

/// Bytes of the virtio-net header in front of every frame (VERSION_1).
pub const HEADER_LEN: usize = 12;
/// Bytes of one buffer: header + the largest frame the driver handles.
pub const BUFFER_SIZE: usize = 2048;
/// The largest Ethernet frame (without header) the driver sends or takes.
pub const MAX_FRAME: usize = BUFFER_SIZE - HEADER_LEN;
/// The MTU used when the device does not say (Ethernet's).
pub const DEFAULT_MTU: u16 = 1500;
/// Largest queue the driver asks for.
const QUEUE_SIZE_MAX: u16 = 256;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;

/// Configuration space offsets.
mod config {
    pub const MAC: usize = 0;
    pub const STATUS: usize = 6;
    pub const MTU: usize = 10;
}

/// A ready virtio-net device.
pub struct NetDevice<'a> {
    transport: MmioTransport,
    rx: RxQueue<'a>,
    tx: TxQueue<'a>,
    mac: [u8; 6],
    mtu: u16,
    link_up: bool,
    /// Doorbell writes (QueueNotify) on either queue.
    kicks: u64,
}

/// The receive queue and its buffers.
pub struct RxQueue<'a> {
    queue: SplitQueue<'a>,
    /// `BUFFER_SIZE` bytes per buffer.
    buffers: &'a mut [u8],
    /// Which buffer the chain at each head holds.
    buffer_of_head: &'a mut [u16],
    frames: u64,
}

/// The transmit queue and its buffers, one per descriptor (a chain's
/// head names its buffer).
pub struct TxQueue<'a> {
    queue: SplitQueue<'a>,
    buffers: &'a mut [u8],
    frames: u64,
}

impl<'a> NetDevice<'a> {
    /// Negotiates features (MAC, MTU, STATUS and EVENT_IDX if offered),
    /// sets up both queues with every receive buffer posted, and starts
    /// the device.
    pub fn new(transport: MmioTransport, memory: &mut Bump<'a>) -> Result<Self, VirtioError> {
        let found = transport.device_id()?;
        if found != device_id::NET {
            return Err(VirtioError::WrongDevice {
                expected: device_id::NET,
                found,
            });
        }
        let wanted =
            net_feature::MAC | net_feature::MTU | net_feature::STATUS | feature::RING_EVENT_IDX;
        let features = transport.negotiate(wanted)?;
        let event_idx = features & feature::RING_EVENT_IDX != 0;
        let mut queue = |index: u16| -> Result<(SplitQueue<'a>, &'a mut [u8]), VirtioError> {
            let max = transport.queue_max_size(index)?.min(QUEUE_SIZE_MAX);
            // The largest power of two within the device's maximum.
            let size = 1u16 << (15 - max.leading_zeros());
            let layout = QueueLayout::new(size);
            let ring = memory
                .alloc(layout.total, QueueLayout::ALIGN)
                .ok_or(VirtioError::OutOfMemory)?;
            let queue = SplitQueue::new(ring, size, event_idx)?;
            transport.enable_queue(index, &queue);
            let buffers = memory
                .alloc(usize::from(size) * BUFFER_SIZE, 64)
                .ok_or(VirtioError::OutOfMemory)?;
            Ok((queue, buffers))
        };
        let (rx_queue, rx_buffers) = queue(RX_QUEUE)?;
        let (tx_queue, tx_buffers) = queue(TX_QUEUE)?;
        let buffer_of_head = memory
            .alloc_slice(usize::from(rx_queue.size()), 0u16)
            .ok_or(VirtioError::OutOfMemory)?;
        let mac = if features & net_feature::MAC != 0 {
            core::array::from_fn(|i| transport.config_u8(config::MAC + i))
        } else {
            // Locally administered, for a device that has no address.
            [0x02, 0, 0, 0, 0, 1]
        };
        let mtu = if features & net_feature::MTU != 0 {
            transport.config_u16(config::MTU)
        } else {
            DEFAULT_MTU
        };
        let link_up =
            features & net_feature::STATUS == 0 || transport.config_u16(config::STATUS) & 1 != 0;
        let mut device = NetDevice {
            transport,
            rx: RxQueue {
                queue: rx_queue,
                buffers: rx_buffers,
                buffer_of_head,
                frames: 0,
            },
            tx: TxQueue {
                queue: tx_queue,
                buffers: tx_buffers,
                frames: 0,
            },
            mac,
            mtu: mtu.min((MAX_FRAME - 14) as u16),
            link_up,
            kicks: 0,
        };
        for buffer in 0..device.rx.queue.size() {
            device.rx.post(buffer)?;
        }
        device.transport.driver_ok();
        device.flush();
        Ok(device)
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The MTU (the device's, capped to what one buffer holds).
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Whether the device reported the link up (or has no status).
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// Frames received and sent, and doorbell writes, so far.
    pub fn counters(&self) -> NetCounters {
        NetCounters {
            rx_frames: self.rx.frames,
            tx_frames: self.tx.frames,
            kicks: self.kicks,
        }
    }

    /// Whether the transmit queue has a free buffer (taking back those the
    /// device has sent).
    pub fn can_send(&mut self) -> Result<bool, VirtioError> {
        Ok(self.tx.buffer()?.is_some())
    }

    /// Both queues, to receive and send at once.
    pub fn queues(&mut self) -> (&mut RxQueue<'a>, &mut TxQueue<'a>) {
        (&mut self.rx, &mut self.tx)
    }

    /// Shows the device the frames queued and buffers recycled since the
    /// last flush, kicking each queue whose device asked for it.
    pub fn flush(&mut self) {
        if self.tx.queue.publish() {
            self.transport.notify(TX_QUEUE);
            self.kicks += 1;
        }
        if self.rx.queue.publish() {
            self.transport.notify(RX_QUEUE);
            self.kicks += 1;
        }
    }
}

/// Frame and kick counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub kicks: u64,
}

impl RxQueue<'_> {
    fn post(&mut self, buffer: u16) -> Result<(), VirtioError> {
        let addr = self.buffers.as_ptr() as u64 + u64::from(buffer) * BUFFER_SIZE as u64;
        let head = self.queue.add(&[Buffer {
            addr,
            len: BUFFER_SIZE as u32,
            device_writes: true,
        }])?;
        self.buffer_of_head[usize::from(head)] = buffer;
        Ok(())
    }

    /// The next received frame, as (buffer, frame length); hand the
    /// buffer back with [`recycle`](Self::recycle) once read.
    pub fn receive(&mut self) -> Result<Option<(u16, usize)>, VirtioError> {
        loop {
            let Some(used) = self.queue.pop_used()? else {
                return Ok(None);
            };
            let buffer = self.buffer_of_head[usize::from(used.head)];
            let len = (used.len as usize).min(BUFFER_SIZE);
            if len > HEADER_LEN {
                self.frames += 1;
                return Ok(Some((buffer, len - HEADER_LEN)));
            }
            // An empty completion (a frame the device dropped): reuse it.
            self.post(buffer)?;
        }
    }

    /// The frame in buffer `buffer`.
    pub fn frame(&self, buffer: u16, len: usize) -> &[u8] {
        let start = usize::from(buffer) * BUFFER_SIZE + HEADER_LEN;
        &self.buffers[start..start + len.min(MAX_FRAME)]
    }

    /// Posts buffer `buffer` again (shown to the device at the next
    /// [`NetDevice::flush`]).
    pub fn recycle(&mut self, buffer: u16) -> Result<(), VirtioError> {
        self.post(buffer)
    }
}

impl TxQueue<'_> {
    /// Takes back buffers the device has sent; returns the buffer the
    /// next frame goes into (its frame part, `MAX_FRAME` bytes), or
    /// `None` while every descriptor is in flight.
    pub fn buffer(&mut self) -> Result<Option<&mut [u8]>, VirtioError> {
        while self.queue.pop_used()?.is_some() {}
        let Some(head) = self.queue.next_head() else {
            return Ok(None);
        };
        let start = usize::from(head) * BUFFER_SIZE;
        let buffer = &mut self.buffers[start..start + BUFFER_SIZE];
        buffer[..HEADER_LEN].fill(0);
        Ok(Some(&mut buffer[HEADER_LEN..]))
    }

    /// Queues the `len`-byte frame written into the buffer
    /// [`buffer`](Self::buffer) returned (shown to the device at the next
    /// [`NetDevice::flush`]).
    pub fn send(&mut self, len: usize) -> Result<(), VirtioError> {
        let head = self
            .queue
            .next_head()
            .ok_or(VirtioError::Queue(super::queue::QueueError::Full))?;
        let addr = self.buffers.as_ptr() as u64 + u64::from(head) * BUFFER_SIZE as u64;
        self.queue.add(&[Buffer {
            addr,
            len: (HEADER_LEN + len.min(MAX_FRAME)) as u32,
            device_writes: false,
        }])?;
        self.frames += 1;
        Ok(())
    }
}
