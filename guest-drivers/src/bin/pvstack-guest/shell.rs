//! `shell`: a small interactive shell on the virtio console, for a person
//! at a terminal (or a test through the console server's socket).

use pvstack_guest::args::{parse_number, ArgError, Args};
use pvstack_guest::block::BlockDevice;
use pvstack_guest::checksum::Fnv1a64;
use pvstack_guest::clock::rdtsc;
use pvstack_guest::println;
use pvstack_guest::virtio::blk::{request, status, BlkDevice, BlkOptions, SECTOR_SIZE};
use pvstack_guest::virtio::console::ConsoleDevice;
use pvstack_guest::virtio::mmio::MmioTransport;
use pvstack_guest::virtio::queue::Buffer;
use pvstack_guest::virtio::{device_id, find_device, VirtioError};
use pvstack_protocols::boot::{device_kind, flavour};

use crate::outln;
use crate::term::Term;
use crate::{Env, Outcome};

const PROMPT: &[u8] = b"pvstack> ";
const HELP: &[&str] = &[
    "help                  this list",
    "info                  what the guest knows about its machine",
    "devices               the devices in the boot info",
    "blk read LBA COUNT    hex dump of COUNT (1-8) sectors of disk 0",
    "blk write LBA TEXT    writes TEXT (zero padded) to sector LBA of disk 0",
    "stats                 VM exits and doorbell kicks so far",
    "echo TEXT             prints TEXT",
    "paste-check N         reads N raw bytes, prints their FNV-1a 64",
    "ticks N [MS]          prints N numbered lines, MS milliseconds apart",
    "exit N                ends the VM with exit code N",
];
/// Most sectors `blk read` dumps.
const MAX_READ_SECTORS: u64 = 8;
/// How long `exit` waits for the console to take the last output.
const EXIT_DRAIN_US: u64 = 1_000_000;

struct Shell<'e> {
    env: &'e mut Env,
    term: Term,
    disk: Option<BlkDevice<'static>>,
    /// Sector buffer for `blk` commands, allocated with the disk.
    sectors: &'static mut [u8],
    commands: u64,
    /// The last input byte was a carriage return.
    after_cr: bool,
}

/// `shell [console=N]`: runs until `exit N`.
pub fn run<'a>(env: &mut Env, args: Args<'a>) -> Outcome<'a> {
    args.check(&[&["console"]], 0)?;
    let index = args.number_or("console", 0)?;
    let index = u32::try_from(index).map_err(|_| ArgError::OutOfRange {
        name: "console",
        value: index,
    })?;
    let info = find_device(&env.boot, device_id::CONSOLE, index)?;
    // SAFETY: the window comes from the VMM's boot info, and this is the
    // only transport made for it.
    let transport = unsafe { MmioTransport::new(info.mmio_addr) };
    let device = ConsoleDevice::new(transport, &mut env.memory)?;
    println!("shell: on virtio console {index}");
    let clock = env.clock;
    let mut shell = Shell {
        env,
        term: Term::new(device, clock),
        disk: None,
        sectors: &mut [],
        commands: 0,
        after_cr: false,
    };
    shell.session()
}

impl Shell<'_> {
    fn session<'a>(&mut self) -> Outcome<'a> {
        outln!(self.term, "pvstack guest shell; type help")?;
        let mut line = [0u8; 1024];
        loop {
            self.term.raw(PROMPT)?;
            let len = self.read_line(&mut line)?;
            let Ok(text) = core::str::from_utf8(&line[..len]) else {
                outln!(self.term, "error: the line is not UTF-8")?;
                continue;
            };
            self.commands += 1;
            if let Some(code) = self.command(text.trim())? {
                println!(
                    "RESULT shell commands={} lost_lines={} console_kicks={}",
                    self.commands,
                    self.term.lost_total(),
                    self.term.device().kicks()
                );
                self.term.drain(EXIT_DRAIN_US)?;
                self.env.hypercall.exit(code);
            }
        }
    }

    /// Reads one line with echo and backspace; returns its length.
    fn read_line(&mut self, line: &mut [u8]) -> Result<usize, VirtioError> {
        let mut len = 0;
        let mut echo = [0u8; 256];
        let mut echoed = 0;
        loop {
            let byte = self.term.next_byte()?;
            // A "\r\n" from a terminal ends one line, not two.
            let after_cr = core::mem::replace(&mut self.after_cr, byte == b'\r');
            let done = match byte {
                b'\n' if after_cr && len == 0 => false,
                b'\r' | b'\n' => {
                    echo[echoed..echoed + 2].copy_from_slice(b"\r\n");
                    echoed += 2;
                    true
                }
                0x7f | 0x08 if len > 0 => {
                    len -= 1;
                    echo[echoed..echoed + 3].copy_from_slice(b"\x08 \x08");
                    echoed += 3;
                    false
                }
                0x20..=0x7e if len < line.len() => {
                    line[len] = byte;
                    len += 1;
                    echo[echoed] = byte;
                    echoed += 1;
                    false
                }
                _ => false,
            };
            // Echo in batches: when the line ends, when no more input is
            // waiting, or before the echo buffer could overflow.
            if done || self.term.input_waiting() == 0 || echoed + 3 > echo.len() {
                self.term.raw(&echo[..echoed])?;
                echoed = 0;
            }
            if done {
                return Ok(len);
            }
        }
    }

    /// Runs one command line; `Some(code)` for `exit`.
    fn command(&mut self, text: &str) -> Result<Option<u8>, VirtioError> {
        let mut words = text.split_ascii_whitespace();
        let Some(name) = words.next() else {
            return Ok(None);
        };
        match name {
            "help" => {
                for entry in HELP {
                    outln!(self.term, "{entry}")?;
                }
            }
            "info" => self.info()?,
            "devices" => self.devices()?,
            "stats" => self.stats()?,
            "echo" => {
                let rest = text[name.len()..].trim_start();
                outln!(self.term, "{rest}")?;
            }
            "blk" => self.blk(text, &mut words)?,
            "paste-check" => match words.next().map(|n| parse_number("N", n)) {
                Some(Ok(count)) => self.paste_check(count)?,
                _ => outln!(self.term, "usage: paste-check N")?,
            },
            "ticks" => {
                let count = words.next().map(|n| parse_number("N", n));
                let ms = words.next().map_or(Ok(0), |n| parse_number("MS", n));
                match (count, ms) {
                    (Some(Ok(count)), Ok(ms)) => self.ticks(count, ms)?,
                    _ => outln!(self.term, "usage: ticks N [MS]")?,
                }
            }
            "exit" => match words.next().map(|n| parse_number("N", n)) {
                Some(Ok(code)) if code <= 255 => return Ok(Some(code as u8)),
                _ => outln!(self.term, "usage: exit N (0-255)")?,
            },
            other => outln!(self.term, "{other}: unknown command; type help")?,
        }
        Ok(None)
    }

    fn info(&mut self) -> Result<(), VirtioError> {
        let boot = &self.env.boot;
        let kvm = match boot.flavour {
            flavour::VMX => "VMX",
            flavour::SVM => "SVM",
            flavour::PVM => "PVM",
            _ => "unknown",
        };
        let (cpus, mem, tsc, privilege, abi) = (
            boot.cpu_count,
            boot.mem_size >> 20,
            boot.tsc_khz,
            boot.privilege,
            boot.abi_version,
        );
        let cmdline = boot.cmdline().unwrap_or("");
        outln!(self.term, "cpus: {cpus}")?;
        outln!(self.term, "memory: {mem} MiB")?;
        outln!(self.term, "kvm: {kvm}, guest at CPL{privilege}")?;
        outln!(self.term, "tsc: {tsc} kHz")?;
        outln!(self.term, "abi: {:#x}", abi)?;
        outln!(self.term, "cmdline: {cmdline}")
    }

    fn devices(&mut self) -> Result<(), VirtioError> {
        let devices = self.env.boot.devices();
        outln!(self.term, "{} devices", devices.len())?;
        for (slot, device) in devices.iter().enumerate() {
            let kind = match (device.kind, device.subtype) {
                (device_kind::VIRTIO_MMIO, device_id::BLOCK) => "virtio-blk",
                (device_kind::VIRTIO_MMIO, device_id::CONSOLE) => "virtio-console",
                (device_kind::VIRTIO_MMIO, device_id::NET) => "virtio-net",
                (device_kind::VIRTIO_MMIO, _) => "virtio (other)",
                (device_kind::LEGACY_BLOCK, _) => "legacy-blk",
                (device_kind::UART_16550, _) => "uart-16550",
                _ => "unknown",
            };
            outln!(
                self.term,
                "{slot}: {kind} index {} at {:#x} size {:#x} irq {}",
                device.index,
                device.mmio_addr,
                device.mmio_size,
                device.irq
            )?;
        }
        Ok(())
    }

    fn stats(&mut self) -> Result<(), VirtioError> {
        match self.env.hypercall.counters() {
            Ok(c) => outln!(
                self.term,
                "exits {} (hypercall {}, mmio {}, pio {}, other {})",
                c.exits,
                c.hypercall_exits,
                c.mmio_exits,
                c.pio_exits,
                c.other_exits
            )?,
            Err(error) => outln!(self.term, "COUNTERS failed: {error}")?,
        }
        let blk_kicks = self.disk.as_ref().map_or(0, BlkDevice::kicks);
        outln!(
            self.term,
            "kicks: console {} blk {}",
            self.term.device().kicks(),
            blk_kicks
        )
    }

    fn ticks(&mut self, count: u64, ms: u64) -> Result<(), VirtioError> {
        for i in 1..=count {
            outln!(self.term, "tick {i}")?;
            let start = rdtsc();
            while self.env.clock.us_since(start) < ms * 1000 {
                core::hint::spin_loop();
            }
        }
        outln!(self.term, "ticks done")
    }

    fn paste_check(&mut self, count: u64) -> Result<(), VirtioError> {
        let mut hasher = Fnv1a64::new();
        let mut left = count;
        while left > 0 {
            let run = self.term.next_bytes(left.min(4096) as usize)?;
            hasher.update(run);
            left -= run.len() as u64;
        }
        outln!(
            self.term,
            "paste-check bytes={count} fnv={:#018x}",
            hasher.finish()
        )
    }

    fn blk<'w>(
        &mut self,
        text: &str,
        words: &mut impl Iterator<Item = &'w str>,
    ) -> Result<(), VirtioError> {
        let op = words.next();
        let lba = words.next().map(|n| parse_number("LBA", n));
        match (op, lba) {
            (Some("read"), Some(Ok(lba))) => {
                match words.next().map_or(Ok(1), |n| parse_number("COUNT", n)) {
                    Ok(count @ 1..=MAX_READ_SECTORS) => self.blk_read(lba, count),
                    _ => outln!(self.term, "usage: blk read LBA COUNT (1-8)"),
                }
            }
            (Some("write"), Some(Ok(lba))) => {
                // The text is the rest of the line after the LBA, spaces kept.
                let after_lba = text
                    .splitn(4, ' ')
                    .nth(3)
                    .map_or("", |rest| rest.trim_start());
                self.blk_write(lba, after_lba.as_bytes())
            }
            _ => outln!(self.term, "usage: blk read LBA COUNT | blk write LBA TEXT"),
        }
    }

    /// Opens disk 0 on first use.
    fn disk(&mut self) -> Result<bool, VirtioError> {
        if self.disk.is_some() {
            return Ok(true);
        }
        let Ok(info) = find_device(&self.env.boot, device_id::BLOCK, 0) else {
            outln!(self.term, "no virtio disk (start pvstack with --blk)")?;
            return Ok(false);
        };
        let options = BlkOptions {
            queues: 1,
            queue_size: 16,
            event_idx: true,
        };
        // SAFETY: the window comes from the VMM's boot info, and this is
        // the only transport made for it.
        let transport = unsafe { MmioTransport::new(info.mmio_addr) };
        let disk = BlkDevice::new(transport, &options, &mut self.env.memory)?;
        let bytes = (MAX_READ_SECTORS * SECTOR_SIZE) as usize;
        self.sectors = self
            .env
            .memory
            .alloc(bytes, 4096)
            .ok_or(VirtioError::OutOfMemory)?;
        self.disk = Some(disk);
        Ok(true)
    }

    /// Runs one request on disk 0 with `len` bytes of the sector buffer.
    fn disk_request(&mut self, kind: u32, lba: u64, len: usize) -> Result<u8, VirtioError> {
        let Some(disk) = self.disk.as_mut() else {
            return Ok(status::IOERR);
        };
        let data = Buffer {
            addr: self.sectors.as_ptr() as u64,
            len: len as u32,
            device_writes: kind == request::IN,
        };
        // SAFETY: the sector buffer is used by nothing else while the
        // request runs, and `run` waits for it to finish.
        unsafe { disk.run(0, kind, lba, Some(data)) }
    }

    fn blk_read(&mut self, lba: u64, count: u64) -> Result<(), VirtioError> {
        if !self.disk()? {
            return Ok(());
        }
        let len = (count * SECTOR_SIZE) as usize;
        let result = self.disk_request(request::IN, lba, len)?;
        if result != status::OK {
            return outln!(self.term, "blk read: status {result}");
        }
        for offset in (0..len).step_by(16) {
            let row = &self.sectors[offset..offset + 16];
            let mut hex = [0u8; 48];
            let mut ascii = [0u8; 16];
            for (i, &byte) in row.iter().enumerate() {
                let digits = b"0123456789abcdef";
                hex[i * 3] = digits[usize::from(byte >> 4)];
                hex[i * 3 + 1] = digits[usize::from(byte & 15)];
                hex[i * 3 + 2] = b' ';
                ascii[i] = if (0x20..0x7f).contains(&byte) {
                    byte
                } else {
                    b'.'
                };
            }
            // Both are ASCII by construction.
            let hex = core::str::from_utf8(&hex).unwrap_or("");
            let ascii = core::str::from_utf8(&ascii).unwrap_or("");
            let at = lba * SECTOR_SIZE + offset as u64;
            outln!(self.term, "{at:08x}: {hex}|{ascii}|")?;
        }
        Ok(())
    }

    fn blk_write(&mut self, lba: u64, text: &[u8]) -> Result<(), VirtioError> {
        if !self.disk()? {
            return Ok(());
        }
        let sector = SECTOR_SIZE as usize;
        let len = text.len().min(sector);
        self.sectors[..sector].fill(0);
        self.sectors[..len].copy_from_slice(&text[..len]);
        let result = self.disk_request(request::OUT, lba, sector)?;
        if result == status::OK {
            outln!(self.term, "wrote {len} bytes to sector {lba}")
        } else {
            outln!(self.term, "blk write: status {result}")
        }
    }
}
