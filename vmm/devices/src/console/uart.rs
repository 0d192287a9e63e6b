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
//!
//! A snapshot or take-over records the registers and the receive FIFO
//! ([`UartState`]) and sets them on the new process's UART, whose driver
//! (Linux's 8250) then finds its settings and pending interrupt as it
//! left them.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use log::{debug, info};
use pvstack_logging::warn_limited;
use pvstack_protocols::boot::{device_kind, DeviceInfo};
use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
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

/// Bytes the 16550's receive FIFO holds.
pub const FIFO_BYTES: usize = 64;

/// Raises the UART's interrupt line through an irqfd. A failure is
/// logged: neither the guest's register access nor a restore can do
/// anything else about it.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> std::result::Result<(), Self::E> {
        if let Err(e) = self.0.write(1) {
            warn_limited!("uart: cannot raise its interrupt: {e}");
        }
        Ok(())
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

/// The UART's registers and receive FIFO, as a snapshot records them
/// (vm-superio's `SerialState`, which has no serde).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// The baud rate divisor (DLL, DLM).
    pub divisor_low: u8,
    pub divisor_high: u8,
    /// IER: which interrupts the driver enabled.
    pub interrupt_enable: u8,
    /// IIR: the interrupt pending, if any (bit 0 clear).
    pub interrupt_identification: u8,
    /// LCR: word length, parity, stop bits, DLAB.
    pub line_control: u8,
    /// LSR: data ready, transmitter empty.
    pub line_status: u8,
    /// MCR: DTR, RTS, OUT2 (which gates the PC's interrupt line), loop.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR, which the driver probes the UART with.
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    pub receive_fifo: Vec<u8>,
}

impl From<SerialState> for UartState {
    fn from(s: SerialState) -> UartState {
        UartState {
            divisor_low: s.baud_divisor_low,
            divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            receive_fifo: s.in_buffer,
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(s: &UartState) -> SerialState {
        SerialState {
            baud_divisor_low: s.divisor_low,
            baud_divisor_high: s.divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.receive_fifo.clone(),
        }
    }
}

type Serial16550 = Serial<IrqTrigger, InputDrained, UartOutput>;

/// The UART as the bus sees it.
pub struct Uart16550 {
    serial: Serial16550,
    /// What the serial's interrupt and drain events are clones of, for a
    /// restore to build it again (vm-superio sets a state only on a new
    /// `Serial`).
    irq: EventFd,
    drained: EventFd,
}

/// A UART shared between its bus and whoever saves or restores it.
pub type SharedUart = Arc<Mutex<Uart16550>>;

impl Uart16550 {
    /// A UART that interrupts through `irq` and transmits to `out`; the
    /// returned eventfd is signalled whenever the guest empties the
    /// receive FIFO.
    fn new(irq: EventFd, out: UartOutput) -> Result<(Self, EventFd)> {
        let drained = new_eventfd("uart input")?;
        let serial = Serial::with_events(
            IrqTrigger(clone_eventfd(&irq)?),
            InputDrained(clone_eventfd(&drained)?),
            out,
        );
        let uart = Uart16550 {
            serial,
            irq,
            drained: clone_eventfd(&drained)?,
        };
        Ok((uart, drained))
    }

    /// Its registers and receive FIFO.
    pub fn save_state(&self) -> UartState {
        self.serial.state().into()
    }

    /// Puts the UART in `state`, keeping its output, interrupt and input
    /// feeder; raises the interrupt if `state` has one pending that the
    /// guest enabled (it may have been in flight when the state was
    /// taken; a spurious one costs the driver a look at IIR). A FIFO
    /// longer than the 16550's is refused and changes nothing.
    pub fn restore_state(&mut self, state: &UartState) -> Result<()> {
        if state.receive_fifo.len() > FIFO_BYTES {
            return Err(Error::Restore {
                device: "uart".into(),
                reason: format!(
                    "the saved receive FIFO holds {} bytes, a 16550's {FIFO_BYTES}",
                    state.receive_fifo.len()
                ),
            });
        }
        let trigger = IrqTrigger(clone_eventfd(&self.irq)?);
        let events = InputDrained(clone_eventfd(&self.drained)?);
        // vm-superio takes the output by value: a stand-in holds the
        // place while it moves to the restored serial.
        let stand_in = Serial::with_events(
            IrqTrigger(clone_eventfd(&self.irq)?),
            InputDrained(clone_eventfd(&self.drained)?),
            Box::new(std::io::sink()) as UartOutput,
        );
        let out = std::mem::replace(&mut self.serial, stand_in).into_writer();
        self.serial = match Serial::from_state(&state.into(), trigger, events, out) {
            Ok(serial) => serial,
            // The FIFO's length was checked and raising the interrupt
            // cannot fail (IrqTrigger logs instead).
            Err(e) => unreachable!("vm-superio refused a checked state: {e:?}"),
        };
        Ok(())
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
    device: SharedUart,
    info: DeviceInfo,
}

impl UartDevice {
    /// The register window to map at `info().mmio_addr`.
    pub fn bus_device(&self) -> SharedDevice {
        self.device.clone()
    }

    /// The UART, to save or restore its state.
    pub fn uart(&self) -> SharedUart {
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
    device: SharedUart,
}

impl SerialPort {
    /// The registers to map at [`COM1_PORT`].
    pub fn bus_device(&self) -> SharedDevice {
        self.device.clone()
    }

    /// The UART, to save or restore its state.
    pub fn uart(&self) -> SharedUart {
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

fn clone_eventfd(fd: &EventFd) -> Result<EventFd> {
    fd.try_clone().map_err(|source| Error::EventFd {
        what: "uart".into(),
        cause: source,
    })
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
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY: u8 = 0x20;
    const LCR_DLAB: u8 = 0x80;
    const IER_RDI: u8 = 0x01;
    const IER_THRI: u8 = 0x02;
    const IIR_NO_INTERRUPT: u8 = 0x01;

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

    /// Sets what Linux's 8250 driver sets: 115200 baud (divisor 1), 8n1,
    /// DTR, RTS and OUT2, a scratch value, both interrupts enabled; then
    /// receives `input`.
    fn configure_as_linux_does(uart: &mut Uart16550, input: &[u8]) {
        uart.write(LCR, &[LCR_DLAB]);
        uart.write(0, &[1]);
        uart.write(1, &[0]);
        uart.write(LCR, &[0x03]);
        uart.write(MCR, &[0x0b]);
        uart.write(SCR, &[0x5a]);
        uart.write(IER, &[IER_RDI | IER_THRI]);
        assert_eq!(uart.receive(input), input.len());
    }

    #[test]
    fn the_state_round_trips_onto_another_uart() {
        let (mut old, _) = uart(&Collect::default());
        configure_as_linux_does(&mut old, b"ls\n");
        let saved = old.save_state();
        assert_eq!(
            (saved.divisor_low, saved.divisor_high, saved.line_control),
            (1, 0, 0x03)
        );
        assert_eq!(
            (saved.modem_control, saved.scratch, saved.interrupt_enable),
            (0x0b, 0x5a, IER_RDI | IER_THRI)
        );
        assert_eq!(saved.receive_fifo, b"ls\n");
        // Through JSON, as state.json holds it.
        let saved: UartState =
            serde_json::from_slice(&serde_json::to_vec(&saved).unwrap()).unwrap();

        let out = Collect::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let (mut new, _) = Uart16550::new(irq.try_clone().unwrap(), Box::new(out.clone())).unwrap();
        new.restore_state(&saved).unwrap();
        assert_eq!(new.save_state(), saved);
        // The pending interrupt is raised again.
        assert!(irq.read().unwrap() >= 1);
        assert_eq!(read_register(&mut new, IIR) & IIR_NO_INTERRUPT, 0);
        assert_eq!(read_register(&mut new, SCR), 0x5a);
        assert_eq!(read_register(&mut new, LCR), 0x03);
        new.write(LCR, &[LCR_DLAB | 0x03]);
        assert_eq!(read_register(&mut new, 0), 1);
        new.write(LCR, &[0x03]);
        // The guest reads what was in the FIFO, then the UART is empty.
        let received: Vec<u8> = (0..3).map(|_| read_register(&mut new, THR)).collect();
        assert_eq!(received, b"ls\n");
        assert_eq!(read_register(&mut new, LSR) & LSR_DATA_READY, 0);
        // Output still goes where the UART's did before the restore.
        new.write(THR, b"!");
        assert_eq!(&*out.0.lock().unwrap(), b"!");
    }

    #[test]
    fn a_restored_uart_without_enabled_interrupts_raises_none() {
        let (old, _) = uart(&Collect::default());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let (mut new, _) =
            Uart16550::new(irq.try_clone().unwrap(), Box::new(Collect::default())).unwrap();
        new.restore_state(&old.save_state()).unwrap();
        assert!(irq.read().is_err(), "no interrupt was raised");
    }

    #[test]
    fn a_fifo_longer_than_the_16550s_is_refused_and_changes_nothing() {
        let (mut old, _) = uart(&Collect::default());
        configure_as_linux_does(&mut old, b"x");
        let mut bad = old.save_state();
        bad.receive_fifo = vec![b'y'; FIFO_BYTES + 1];
        let out = Collect::default();
        let (mut new, _) = uart(&out);
        let before = new.save_state();
        let err = new.restore_state(&bad).unwrap_err().to_string();
        assert!(err.contains("65 bytes"), "{err}");
        assert_eq!(new.save_state(), before);
        new.write(THR, b"z");
        assert_eq!(&*out.0.lock().unwrap(), b"z");
    }
}
