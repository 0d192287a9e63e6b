//! `net_frame`: pvstack-net's frame engine between a hostile driver's
//! queues and a peer link. Input: flags, the receive and transmit queues'
//! rings, the frames the peer sends, then a guest memory image.

use super::rings::{Image, Rings, INDIRECT, NEXT, WRITE};
use super::Seed;
use crate::input::{Reader, Writer};

/// Guest memory size.
pub const MEMORY: usize = 128 << 10;
/// Largest queue the device offers.
pub const MAX_QUEUE: u16 = 256;

pub struct Input<'a> {
    /// Bit 0: MRG_RXBUF negotiated; bit 1: EVENT_IDX.
    pub flags: u8,
    pub rx: Rings,
    pub tx: Rings,
    /// Frames from the peer (bare Ethernet frames: the peer link carries
    /// no virtio-net header).
    pub frames: Vec<&'a [u8]>,
    pub image: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn read(r: &mut Reader<'a>) -> Self {
        let flags = r.u8();
        let rx = Rings::read(r);
        let tx = Rings::read(r);
        let count = r.u8() % 5;
        let frames = (0..count).map(|_| r.sized()).collect();
        Input {
            flags,
            rx,
            tx,
            frames,
            image: r.rest(),
        }
    }

    fn write(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.flags);
        self.rx.write(&mut w);
        self.tx.write(&mut w);
        w.u8(self.frames.len() as u8);
        for frame in &self.frames {
            w.sized(frame);
        }
        w.bytes(self.image);
        w.into_bytes()
    }

    pub fn mergeable(&self) -> bool {
        self.flags & 1 != 0
    }

    pub fn event_idx(&self) -> bool {
        self.flags & 2 != 0
    }
}

const RX: Rings = Rings {
    size_log2: 3,
    desc: 0x0,
    avail: 0x100,
    used: 0x200,
};
const TX: Rings = Rings {
    size_log2: 3,
    desc: 0x400,
    avail: 0x500,
    used: 0x600,
};
const TABLE: u64 = 0x700;
const TX_DATA: u64 = 0x800;
const RX_DATA: u64 = 0x1000;

/// An Ethernet frame of `len` bytes: broadcast, from 52:54:00:12:34:56,
/// IPv4, and a payload pattern.
fn ethernet(len: usize) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x08, 0x00]);
    frame.extend((0..len - 14).map(|i| i as u8));
    frame
}

pub fn seeds() -> Vec<Seed> {
    let rx_table = RX.desc.into();
    let tx_table = TX.desc.into();
    let frame = ethernet(60);
    // Transmit header + frame as two descriptors; two receive buffers.
    let mut simple = Image::default();
    simple
        .put(TX_DATA + 12, &frame)
        .desc(tx_table, 0, TX_DATA, 12, NEXT, 1)
        .desc(tx_table, 1, TX_DATA + 12, 60, 0, 0)
        .avail(TX.avail.into(), &[0])
        .desc(rx_table, 0, RX_DATA, 1526, WRITE, 0)
        .desc(rx_table, 1, RX_DATA + 0x800, 1526, WRITE, 0)
        .avail(RX.avail.into(), &[0, 1]);
    // A transmit chain in an indirect table, one with a device-writable
    // descriptor, and small receive buffers a frame spans with MRG_RXBUF.
    let mut spanning = Image::default();
    spanning
        .put(TX_DATA + 12, &frame)
        .desc(tx_table, 2, TABLE, 32, INDIRECT, 0)
        .desc(TABLE, 0, TX_DATA, 12, NEXT, 1)
        .desc(TABLE, 1, TX_DATA + 12, 60, 0, 0)
        .desc(tx_table, 3, TX_DATA, 72, WRITE, 0)
        .avail(TX.avail.into(), &[2, 3]);
    for i in 0..4u16 {
        spanning.desc(rx_table, i, RX_DATA + 0x100 * u64::from(i), 40, WRITE, 0);
    }
    spanning.avail(RX.avail.into(), &[0, 1, 2, 3]);
    let seed = |flags: u8, frames: Vec<&[u8]>, image: &Image| {
        Input {
            flags,
            rx: RX,
            tx: TX,
            frames,
            image: &image.bytes,
        }
        .write()
    };
    vec![
        ("one-frame-each-way", seed(0, vec![&frame], &simple)),
        (
            "mergeable-and-indirect",
            seed(1, vec![&frame, &frame[..20]], &spanning),
        ),
        (
            "no-mergeable-small-buffers",
            seed(2, vec![&frame], &spanning),
        ),
    ]
}
