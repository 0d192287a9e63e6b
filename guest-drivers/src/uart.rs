//! A polling driver for the emulated 16550 UART (`device_kind::UART_16550`:
//! register `i` at offset `i` of an MMIO window). Every register access
//! traps to the VMM; the driver fills the 16-byte transmit FIFO each time
//! the line status register shows it empty, as a FIFO-aware 8250 driver does.

use core::ptr;

const THR: usize = 0;
const RBR: usize = 0;
const LSR: usize = 5;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
/// Bytes the transmit FIFO of a 16550 holds.
pub const FIFO_SIZE: usize = 16;

/// One 16550 register window.
pub struct Uart {
    base: usize,
}

impl Uart {
    /// The UART whose registers start at `base`.
    ///
    /// # Safety
    /// `base` must be a UART_16550 window from the boot info's device
    /// list, used by no other driver.
    pub unsafe fn new(base: u64) -> Self {
        Uart {
            base: base as usize,
        }
    }

    /// Transmits `bytes`, waiting for the FIFO to empty before each
    /// [`FIFO_SIZE`] bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(FIFO_SIZE) {
            while self.read_reg(LSR) & LSR_THR_EMPTY == 0 {
                core::hint::spin_loop();
            }
            for &byte in chunk {
                self.write_reg(THR, byte);
            }
        }
    }

    /// A received byte, if one is waiting.
    pub fn read_byte(&mut self) -> Option<u8> {
        (self.read_reg(LSR) & LSR_DATA_READY != 0).then(|| self.read_reg(RBR))
    }

    fn read_reg(&self, offset: usize) -> u8 {
        // SAFETY: a byte register inside this UART's window (`new`'s contract).
        unsafe { ptr::read_volatile((self.base + offset) as *const u8) }
    }

    fn write_reg(&mut self, offset: usize, value: u8) {
        // SAFETY: as in `read_reg`.
        unsafe { ptr::write_volatile((self.base + offset) as *mut u8, value) }
    }
}
