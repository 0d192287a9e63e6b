//! The one piece of firmware a Linux guest gets: the x86 reset vector.
//!
//! On a hardware-reduced ACPI machine without EFI, Linux's default reboot
//! method is EFI, which falls through to "BIOS": it drops to real mode and
//! jumps to F000:FFF0, where a PC's firmware restarts the machine. pvstack
//! has no BIOS, so it puts a stub there that does what the firmware's
//! reset would: it writes the ACPI reset register, which ends the VM as a
//! reset (exit status 1, see `pvstack_devices::legacy::power`).
//! `reboot=a`, `reboot=k` and `reboot=t` reach the reset register, the
//! i8042 and a triple fault without it.

use pvstack_devices::legacy::power::{RESET_PORT, RESET_VALUE};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::memory::GuestMemory;

/// Where a real-mode CPU starts: F000:FFF0.
pub const RESET_VECTOR: u64 = 0xf_fff0;

/// Real-mode code: `mov al, RESET_VALUE; mov dx, RESET_PORT; out dx, al;`
/// then `hlt` in a loop, should the write not end the VM.
pub fn stub() -> [u8; 9] {
    let [port_low, port_high] = RESET_PORT.to_le_bytes();
    [
        0xb0,
        RESET_VALUE, // mov al, imm8
        0xba,
        port_low,
        port_high, // mov dx, imm16
        0xee,      // out dx, al
        0xf4,      // hlt
        0xeb,
        0xfd, // jmp short to the hlt
    ]
}

/// Writes the stub at [`RESET_VECTOR`].
pub fn write(mem: &GuestMemory) -> Result<()> {
    mem.write_slice(&stub(), GuestAddress(RESET_VECTOR))
        .map_err(Error::guest_write("the reset vector"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_writes_the_reset_register_and_fits_below_1_mib() {
        let code = stub();
        assert_eq!(&code[..2], &[0xb0, RESET_VALUE]);
        assert_eq!(u16::from_le_bytes([code[3], code[4]]), RESET_PORT);
        assert_eq!(code[5], 0xee);
        // The jump lands on the hlt: offset 9 - 3 = 6.
        assert_eq!(code.len() as i64 + i64::from(code[8] as i8), 6);
        assert!(RESET_VECTOR + code.len() as u64 <= 0x10_0000);
        let mem = crate::memory::create(16 << 20).unwrap();
        write(&mem).unwrap();
        let mut back = [0u8; 9];
        mem.read_slice(&mut back, GuestAddress(RESET_VECTOR))
            .unwrap();
        assert_eq!(back, code);
    }
}
