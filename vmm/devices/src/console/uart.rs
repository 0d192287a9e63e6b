//! The emulated 16550 UART: vm-superio's `Serial`, in one of two places.
//!
//! - For pvstack's own guest, behind an MMIO window of
//!   `device_kind::UART_16550` (register `i` at offset `i`), in a device
//!   slot with the slot's interrupt line ([`create_uart`]): output only,
//!   the baseline the virtio-console is measured against.
//! - For a Linux guest, where a PC has it: I/O ports 0x3f8..0x400 on ISA
//!   interrupt line 4 ([`create_serial_port`]), so `console=ttyS0` works
//!   with Linux's own 8250 driver; input comes from a reader (pvstack's
//!   stdin) through the receive FIFO.
//!
//! Every register access is a trapped exit to the VMM either way.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use log::{debug, info};
use pvstack_logging::warn_limited;
use pvstack_protocols::boot::{device_kind, DeviceInfo};
use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::{BusDevice, SharedDevice};
use crate::context::DeviceContext;
use crate::error::{Error, Result};

/// Registers of the 16550 (THR/RBR, IER, IIR/FCR, LCR, MCR, LSR, MSR, SCR).
pub const REGISTERS: u64 = 8;
/// The first PC serial port (COM1), where Linux looks for ttyS0.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's ISA interrupt line (the IOAPIC pin of the same number).
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt line through an irqfd.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals whoever feeds the receive FIFO that the guest has read it
/// empty, so more input fits.
pub struct InputDrained(EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        warn_limited!("uart: a byte the guest sent was lost (output failed)");
    }
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            warn_limited!("uart: cannot signal the input thread: {e}");
        }
    }
}

/// Where the UART's output goes.
pub type UartOutput = Box<dyn Write + Send>;

/// The UART as the bus sees it.
pub struct Uart16550 {
    serial: Serial<IrqTrigger, InputDrained, UartOutput>,
}

impl Uart16550 {
    /// A UART that interrupts through `irq` and transmits to `out`; the
    /// returned eventfd is signalled whenever the guest empties the
    /// receive FIFO.
    fn new(irq: EventFd, out: UartOutput) -> Result<(Self, EventFd)> {
        let drained = new_eventfd("uart input")?;
        let events = InputDrained(drained.try_clone().map_err(|source| Error::EventFd {
            what: "uart input".into(),
            cause: source,
        })?);
        let serial = Serial::with_events(IrqTrigger(irq), events, out);
        Ok((Uart16550 { serial }, drained))
    }

    /// Room left in the receive FIFO.
    fn input_room(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Puts what fits of `bytes` into the receive FIFO (raising the
    /// receive interrupt if the guest enabled it); returns how many.
    fn receive(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.input_room() == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(count) => count,
            Err(e) => {
                warn_limited!("uart: cannot queue input: {e:?}");
                0
            }
        }
    }
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
            warn_limited!("uart: write of register {register}: {e:?}");
        }
    }
}

/// An emulated UART in a device slot, created and ready to be put on the bus.
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
    let irq = irqfd(ctx.vm, ctx.gsi)?;
    info!(
        "uart{}: emulated 16550 at MMIO {:#x} GSI {}",
        ctx.index, ctx.mmio_base, ctx.gsi
    );
    // Nothing feeds this UART's receive FIFO, so its drain signal goes unread.
    let (device, _drained) = Uart16550::new(irq, out)?;
    Ok(UartDevice {
        device: Arc::new(Mutex::new(device)),
        info: ctx.device_info(device_kind::UART_16550, 0),
    })
}

/// The PC serial port COM1 of a Linux guest, ready to be put on the
/// port-I/O bus at [`COM1_PORT`] for [`REGISTERS`] ports.
pub struct SerialPort {
    device: Arc<Mutex<Uart16550>>,
}

impl SerialPort {
    /// The registers to map at [`COM1_PORT`].
    pub fn bus_device(&self) -> SharedDevice {
        self.device.clone()
    }
}

/// Creates COM1 with its interrupt on ISA line [`COM1_IRQ`] (the IOAPIC
/// pin of that number), transmitting to `out`. What `input` yields is
/// fed to the receive FIFO by a thread, as fast as the guest reads it;
/// the thread ends at the input's end.
pub fn create_serial_port(
    vm: &VmFd,
    out: UartOutput,
    input: Option<Box<dyn Read + Send>>,
) -> Result<SerialPort> {
    let irq = irqfd(vm, COM1_IRQ)?;
    let (device, drained) = Uart16550::new(irq, out)?;
    let device = Arc::new(Mutex::new(device));
    if let Some(input) = input {
        let feeder = device.clone();
        std::thread::Builder::new()
            .name("uart-input".into())
            .spawn(move || feed_input(&feeder, &drained, input))
            .map_err(|source| Error::Thread {
                what: "uart input".into(),
                cause: source,
            })?;
    }
    info!("uart: emulated 16550 at I/O port {COM1_PORT:#x} IRQ {COM1_IRQ} (ttyS0)");
    Ok(SerialPort { device })
}

/// Moves bytes from `input` into the UART's receive FIFO, waiting on
/// `drained` whenever the FIFO is full, until `input` ends or fails.
fn feed_input(uart: &Mutex<Uart16550>, drained: &EventFd, mut input: Box<dyn Read + Send>) {
    let mut buffer = [0u8; 256];
    loop {
        let count = match input.read(&mut buffer) {
            Ok(0) => {
                debug!("uart: input ended");
                return;
            }
            Ok(count) => count,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn_limited!("uart: cannot read input: {e}");
                return;
            }
        };
        let mut pending = &buffer[..count];
        while !pending.is_empty() {
            let queued = lock(uart).receive(pending);
            pending = &pending[queued..];
            if !pending.is_empty() && !wait_for_room(drained) {
                return;
            }
        }
    }
}

/// Blocks until the guest has emptied the receive FIFO; `false` if the
/// eventfd fails.
fn wait_for_room(drained: &EventFd) -> bool {
    let mut poll = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(drained),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd; the result is checked.
        let ready = unsafe { libc::poll(&mut poll, 1, -1) };
        if ready > 0 {
            // Non-blocking; a lost race only means another round.
            let _ = drained.read();
            return true;
        }
        let error = std::io::Error::last_os_error();
        if ready < 0 && error.kind() != std::io::ErrorKind::Interrupted {
            warn_limited!("uart: cannot wait for the guest to read input: {error}");
            return false;
        }
    }
}

fn lock(uart: &Mutex<Uart16550>) -> std::sync::MutexGuard<'_, Uart16550> {
    uart.lock().unwrap_or_else(|p| p.into_inner())
}

fn new_eventfd(what: &str) -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
        what: what.into(),
        cause: source,
    })
}

/// An eventfd that raises interrupt line `gsi`.
fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd> {
    let irq = new_eventfd("uart interrupts")?;
    vm.register_irqfd(&irq, gsi)
        .map_err(|source| Error::IrqFd { gsi, cause: source })?;
    Ok(irq)
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

    const THR: u64 = 0;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY: u8 = 0x20;

    fn uart(out: &Collect) -> (Uart16550, EventFd) {
        Uart16550::new(EventFd::new(EFD_NONBLOCK).unwrap(), Box::new(out.clone())).unwrap()
    }

    fn read_register(uart: &mut Uart16550, register: u64) -> u8 {
        let mut byte = [0u8];
        uart.read(register, &mut byte);
        byte[0]
    }

    #[test]
    fn transmits_bytes_and_reports_an_empty_holding_register() {
        let out = Collect::default();
        let (mut uart, _) = uart(&out);
        assert_ne!(read_register(&mut uart, LSR) & LSR_THR_EMPTY, 0);
        for byte in b"hi\n" {
            uart.write(THR, &[*byte]);
        }
        // Wider or out-of-window accesses are ignored.
        uart.write(THR, b"xy");
        uart.write(8, b"z");
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_larger_than_the_fifo_reaches_the_guest_in_order() {
        let (uart, drained) = uart(&Collect::default());
        let uart = Arc::new(Mutex::new(uart));
        let input: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let feeder = {
            let uart = uart.clone();
            let input = input.clone();
            std::thread::spawn(move || {
                feed_input(&uart, &drained, Box::new(std::io::Cursor::new(input)))
            })
        };
        // The "guest": polls LSR and reads RBR, as a driver without interrupts would.
        let mut received = Vec::new();
        while received.len() < input.len() {
            let mut uart = lock(&uart);
            if read_register(&mut uart, LSR) & LSR_DATA_READY != 0 {
                received.push(read_register(&mut uart, THR));
            }
        }
        feeder.join().unwrap();
        assert_eq!(received, input);
        assert_eq!(read_register(&mut lock(&uart), LSR) & LSR_DATA_READY, 0);
    }
}
