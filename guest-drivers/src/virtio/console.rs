//! The virtio-console driver (one port, no MULTIPORT): receiveq 0 and
//! transmitq 1 on the shared split queue. The guest polls: reading and
//! reclaiming look at the used rings in shared memory only, so an idle
//! console costs no exits; a kick goes out only when the device asks.
//!
//! Each descriptor owns one fixed slot of [`SLOT_SIZE`] bytes (chains are
//! one descriptor long, so a chain's head is its slot's index).

use super::mmio::MmioTransport;
use super::queue::{Buffer, QueueLayout, SplitQueue};
use super::{device_id, VirtioError};
use crate::bump::Bump;

/// Bytes per receive or transmit buffer.
pub const SLOT_SIZE: usize = 4096;
/// Descriptors per queue the driver asks for (capped by the device).
pub const QUEUE_SIZE: u16 = 64;
const RX: u16 = 0;
const TX: u16 = 1;

/// A receive buffer the device filled, partly read.
#[derive(Clone, Copy)]
struct Filled {
    head: u16,
    len: usize,
    read: usize,
}

/// A virtio console.
pub struct ConsoleDevice<'a> {
    transport: MmioTransport,
    rx: SplitQueue<'a>,
    tx: SplitQueue<'a>,
    rx_slots: &'a mut [u8],
    tx_slots: &'a mut [u8],
    /// The receive buffer being read.
    filled: Option<Filled>,
    kicks: u64,
}

fn new_queue<'a>(
    transport: &MmioTransport,
    index: u16,
    memory: &mut Bump<'a>,
) -> Result<SplitQueue<'a>, VirtioError> {
    let size = QUEUE_SIZE.min(transport.queue_max_size(index)?);
    // Split queues must be a power of two in size.
    let size = 1u16 << (15 - size.leading_zeros());
    let ring = memory
        .alloc(QueueLayout::new(size).total, QueueLayout::ALIGN)
        .ok_or(VirtioError::OutOfMemory)?;
    let queue = SplitQueue::new(ring, size, false)?;
    transport.enable_queue(index, &queue);
    Ok(queue)
}

impl<'a> ConsoleDevice<'a> {
    /// Initialises the console behind `transport`, with rings and buffers
    /// from `memory`, and posts every receive buffer.
    pub fn new(transport: MmioTransport, memory: &mut Bump<'a>) -> Result<Self, VirtioError> {
        let found = transport.device_id()?;
        if found != device_id::CONSOLE {
            return Err(VirtioError::WrongDevice {
                expected: device_id::CONSOLE,
                found,
            });
        }
        transport.negotiate(0)?;
        let setup = |memory: &mut Bump<'a>| -> Result<_, VirtioError> {
            let rx = new_queue(&transport, RX, memory)?;
            let tx = new_queue(&transport, TX, memory)?;
            let mut slots = |count: u16| {
                memory
                    .alloc(SLOT_SIZE * usize::from(count), SLOT_SIZE)
                    .ok_or(VirtioError::OutOfMemory)
            };
            let rx_slots = slots(rx.size())?;
            let tx_slots = slots(tx.size())?;
            Ok((rx, tx, rx_slots, tx_slots))
        };
        let (rx, tx, rx_slots, tx_slots) = match setup(memory) {
            Ok(parts) => parts,
            Err(error) => {
                transport.fail();
                return Err(error);
            }
        };
        let mut device = ConsoleDevice {
            transport,
            rx,
            tx,
            rx_slots,
            tx_slots,
            filled: None,
            kicks: 0,
        };
        for _ in 0..device.rx.size() {
            device.post_rx()?;
        }
        device.transport.driver_ok();
        device.publish(RX);
        Ok(device)
    }

    /// Doorbell kicks so far.
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// Bytes the transmit queue accepts right now without waiting.
    pub fn tx_room(&mut self) -> Result<usize, VirtioError> {
        self.reclaim_tx()?;
        Ok(usize::from(self.tx.free_descriptors()) * SLOT_SIZE)
    }

    /// Queues as much of `bytes` as there is room for and tells the
    /// device; returns how many bytes were taken (0 if the ring is full).
    pub fn write(&mut self, bytes: &[u8]) -> Result<usize, VirtioError> {
        self.reclaim_tx()?;
        let mut taken = 0;
        while taken < bytes.len() {
            let Some(head) = self.tx.next_head() else {
                break;
            };
            let chunk = &bytes[taken..bytes.len().min(taken + SLOT_SIZE)];
            let slot = &mut self.tx_slots[usize::from(head) * SLOT_SIZE..][..chunk.len()];
            slot.copy_from_slice(chunk);
            self.tx.add(&[Buffer {
                addr: slot.as_ptr() as u64,
                len: chunk.len() as u32,
                device_writes: false,
            }])?;
            taken += chunk.len();
        }
        if taken > 0 {
            self.publish(TX);
        }
        Ok(taken)
    }

    /// Whether the device has consumed everything written so far.
    pub fn tx_idle(&mut self) -> Result<bool, VirtioError> {
        self.reclaim_tx()?;
        Ok(self.tx.free_descriptors() == self.tx.size())
    }

    /// Copies received input into `buf`; returns the byte count (0 when
    /// nothing is waiting). Never waits.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, VirtioError> {
        let mut copied = 0;
        while copied < buf.len() {
            let mut filled = match self.filled {
                Some(filled) => filled,
                None => match self.rx.pop_used()? {
                    Some(used) => Filled {
                        head: used.head,
                        len: (used.len as usize).min(SLOT_SIZE),
                        read: 0,
                    },
                    None => break,
                },
            };
            let slot = &self.rx_slots[usize::from(filled.head) * SLOT_SIZE..][..filled.len];
            let n = (filled.len - filled.read).min(buf.len() - copied);
            buf[copied..copied + n].copy_from_slice(&slot[filled.read..filled.read + n]);
            copied += n;
            filled.read += n;
            if filled.read == filled.len {
                self.filled = None;
                self.post_rx()?;
                self.publish(RX);
            } else {
                self.filled = Some(filled);
            }
        }
        Ok(copied)
    }

    /// Posts the free receive slot (the one `add` will use next) as a buffer.
    fn post_rx(&mut self) -> Result<(), VirtioError> {
        let Some(head) = self.rx.next_head() else {
            return Ok(());
        };
        let slot = &mut self.rx_slots[usize::from(head) * SLOT_SIZE..][..SLOT_SIZE];
        self.rx.add(&[Buffer {
            addr: slot.as_mut_ptr() as u64,
            len: SLOT_SIZE as u32,
            device_writes: true,
        }])?;
        Ok(())
    }

    fn reclaim_tx(&mut self) -> Result<(), VirtioError> {
        while self.tx.pop_used()?.is_some() {}
        Ok(())
    }

    fn publish(&mut self, index: u16) {
        let queue = if index == RX {
            &mut self.rx
        } else {
            &mut self.tx
        };
        if queue.publish() {
            self.transport.notify(index);
            self.kicks += 1;
        }
    }
}
