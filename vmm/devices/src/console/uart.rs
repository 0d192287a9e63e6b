//! The emulated 16550 UART: vm-superio's `Serial` behind an MMIO window
//! of `device_kind::UART_16550` (register `i` at offset `i`). Every
//! register access is a trapped exit to the VMM: the baseline the
//! virtio-console is measured against.

use std::io::Write;
use std::sync::{Arc, Mutex};

use log::{info, warn};
use pvstack_protocols::boot::{device_kind, DeviceInfo};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::{BusDevice, SharedDevice};
use crate::context::DeviceContext;
use crate::error::{Error, Result};

/// Registers of the 16550 (THR/RBR, IER, IIR/FCR, LCR, MCR, LSR, MSR, SCR).
const REGISTERS: u64 = 8;

/// Raises the UART's interrupt line through an irqfd.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the UART's output goes.
pub type UartOutput = Box<dyn Write + Send>;

/// The UART as the bus sees it.
pub struct Uart16550 {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, UartOutput>,
}

impl BusDevice for Uart16550 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // Byte registers: only single-byte accesses inside the eight mean anything.
        if let ([byte], Ok(register @ 0..REGISTERS)) = (data, u8::try_from(offset).map(u64::from)) {
            *byte = self.serial.read(register as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let ([value], Ok(register @ 0..REGISTERS)) = (data, u8::try_from(offset).map(u64::from))
        else {
            return;
        };
        if let Err(e) = self.serial.write(register as u8, *value) {
            warn!("uart: write of register {register}: {e}");
        }
    }
}

/// An emulated UART, created and ready to be put on the bus.
pub struct UartDevice {
    device: Arc<Mutex<Uart16550>>,
    info: DeviceInfo,
}

impl UartDevice {
    /// The register window to map at `info().mmio_addr`.
    pub fn bus_device(&self) -> SharedDevice {
        self.device.clone()
    }

    /// The device's entry in the boot info.
    pub fn info(&self) -> DeviceInfo {
        self.info
    }
}

/// Creates the UART in the slot `ctx` gives, writing what the guest
/// transmits to `out`, with its interrupt wired to the slot's GSI.
pub fn create_uart(ctx: &DeviceContext<'_>, out: UartOutput) -> Result<UartDevice> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
        what: "uart interrupts".into(),
        source,
    })?;
    ctx.vm
        .register_irqfd(&irq, ctx.gsi)
        .map_err(|source| Error::IrqFd {
            gsi: ctx.gsi,
            source,
        })?;
    info!(
        "uart{}: emulated 16550 at MMIO {:#x} GSI {}",
        ctx.index, ctx.mmio_base, ctx.gsi
    );
    let device = Uart16550 {
        serial: Serial::new(IrqTrigger(irq), out),
    };
    Ok(UartDevice {
        device: Arc::new(Mutex::new(device)),
        info: ctx.device_info(device_kind::UART_16550, 0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects what the UART transmits.
    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<u8>>>);

    impl Write for Collect {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_reports_an_empty_holding_register() {
        let out = Collect::default();
        let mut uart = Uart16550 {
            serial: Serial::new(
                IrqTrigger(EventFd::new(EFD_NONBLOCK).unwrap()),
                Box::new(out.clone()),
            ),
        };
        let mut lsr = [0u8];
        uart.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
        for byte in b"hi\n" {
            uart.write(0, &[*byte]);
        }
        // Wider or out-of-window accesses are ignored.
        uart.write(0, b"xy");
        uart.write(8, b"z");
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }
}
