//! `hypercall`: doorbell writes from a hostile guest, each naming a
//! hypercall block the guest filled in. Input: the VM's vCPU count and
//! kind, a guest memory image, then the calls (where the block is, and its
//! 64 bytes: nr, four arguments, status, two results).

use pvstack_protocols::hypercall::nr;

use super::Seed;
use crate::input::{Reader, Writer};

/// Where a call's block goes unless the call says otherwise.
pub const BLOCK: u64 = 0x1000;
/// Bytes of a hypercall block.
pub const BLOCK_LEN: usize = 64;

pub struct Call<'a> {
    /// The doorbell's value: the block's guest address.
    pub addr: u64,
    pub block: &'a [u8],
}

pub struct Input<'a> {
    /// 1 + this % 4 vCPUs.
    pub cpus: u8,
    /// Bit 0: the guest is Linux.
    pub flags: u8,
    pub image: &'a [u8],
    pub calls: Vec<Call<'a>>,
}

impl<'a> Input<'a> {
    pub fn read(r: &mut Reader<'a>) -> Self {
        let cpus = r.u8();
        let flags = r.u8();
        let image = r.sized();
        let mut calls = Vec::new();
        while !r.is_empty() {
            // Odd: the block is at the 64-bit address that follows.
            let addr = if r.u8() % 2 == 1 { r.u64() } else { BLOCK };
            calls.push(Call {
                addr,
                block: r.bytes(BLOCK_LEN),
            });
        }
        Input {
            cpus,
            flags,
            image,
            calls,
        }
    }

    fn write(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.cpus).u8(self.flags).sized(self.image);
        for call in &self.calls {
            if call.addr == BLOCK {
                w.u8(0);
            } else {
                w.u8(1).u64(call.addr);
            }
            w.bytes(call.block);
        }
        w.into_bytes()
    }

    pub fn cpu_count(&self) -> u32 {
        1 + u32::from(self.cpus % 4)
    }

    pub fn linux(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// A block as the guest fills it in: status and results hold junk.
fn block(number: u64, args: [u64; 4]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(BLOCK_LEN);
    raw.extend_from_slice(&number.to_le_bytes());
    for arg in args {
        raw.extend_from_slice(&arg.to_le_bytes());
    }
    raw.extend_from_slice(&[0x5a; 24]);
    raw
}

pub fn seeds() -> Vec<Seed> {
    let mut image = vec![0u8; 0x2000];
    image.extend_from_slice(b"hello from the guest\n");
    let calls = [
        (BLOCK, block(nr::ABI_VERSION, [0; 4])),
        (BLOCK, block(nr::CONSOLE_WRITE, [0x2000, 21, 0, 0])),
        (BLOCK, block(nr::BOOT_INFO, [0x3000, 0x1000, 0, 0])),
        (BLOCK, block(nr::BOOT_INFO, [0x3000, 8, 0, 0])),
        (BLOCK, block(nr::COUNTERS, [0x4000, 1000, 0, 0])),
        (0x5000, block(nr::TIME_NS, [0; 4])),
        (BLOCK, block(nr::CPU_START, [1, 0x20_0000, 0x1f_c000, 7])),
        (BLOCK, block(nr::CPU_START, [1, 0x20_0000, 0x1f_c000, 7])),
        (BLOCK, block(99, [0; 4])),
        (u64::MAX - 16, block(nr::ABI_VERSION, [0; 4])),
        (BLOCK, block(nr::CONSOLE_WRITE, [u64::MAX - 4, 21, 0, 0])),
        (BLOCK, block(nr::EXIT, [0x107, 0, 0, 0])),
    ];
    let each_call = calls
        .iter()
        .map(|(addr, block)| Call { addr: *addr, block })
        .collect();
    let exit_first = vec![
        Call {
            addr: BLOCK,
            block: &calls[11].1,
        },
        Call {
            addr: BLOCK,
            block: &calls[1].1,
        },
    ];
    let seed = |flags: u8, calls: Vec<Call<'_>>| {
        Input {
            cpus: 1,
            flags,
            image: &image,
            calls,
        }
        .write()
    };
    vec![
        ("every-call", seed(0, each_call)),
        ("exit-then-more", seed(1, exit_first)),
    ]
}
