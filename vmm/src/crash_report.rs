//! The report printed when a vCPU dies: exit reason plus the registers a
//! reader needs to find the faulting code.

use std::fmt::Write;

use kvm_bindings::{kvm_regs, kvm_sregs, KVM_EXIT_INTERNAL_ERROR};
use kvm_ioctls::VcpuFd;

/// The multi-line report for vCPU `index` that stopped for `reason`.
pub fn report(index: u32, reason: &str, vcpu: &mut VcpuFd) -> String {
    let mut text = format!("pvstack: vCPU {index} stopped: {reason}\n");
    let run = vcpu.get_kvm_run();
    if run.exit_reason == KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: the exit reason says `internal` is the valid union member.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let count = (internal.ndata as usize).min(internal.data.len());
        let _ = writeln!(
            text,
            "  KVM internal error suberror {} ({}) data {:x?}",
            internal.suberror,
            internal_error_name(internal.suberror),
            &internal.data[..count]
        );
    }
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(regs), Ok(sregs)) => text.push_str(&format_registers(&regs, &sregs)),
        (Err(e), _) | (_, Err(e)) => {
            let _ = writeln!(text, "  (registers unavailable: {e})");
        }
    }
    text
}

/// The KVM_INTERNAL_ERROR_* suberrors of linux/kvm.h.
fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "instruction emulation failed; at CPL0 on PVM every instruction is emulated",
        2 => "exception while delivering an exception",
        3 => "event delivery failed",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

fn format_registers(r: &kvm_regs, s: &kvm_sregs) -> String {
    let mut t = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        t,
        "  RIP {:#018x}  RSP {:#018x}  RFLAGS {:#010x}",
        r.rip, r.rsp, r.rflags
    );
    let _ = writeln!(
        t,
        "  CS  {:#06x} (CPL {})  SS {:#06x}  CR0 {:#x}  CR3 {:#x}  CR4 {:#x}  EFER {:#x}",
        s.cs.selector,
        s.cs.selector & 3,
        s.ss.selector,
        s.cr0,
        s.cr3,
        s.cr4,
        s.efer
    );
    let _ = writeln!(
        t,
        "  RAX {:#018x}  RBX {:#018x}  RCX {:#018x}  RDX {:#018x}",
        r.rax, r.rbx, r.rcx, r.rdx
    );
    let _ = writeln!(
        t,
        "  RSI {:#018x}  RDI {:#018x}  RBP {:#018x}  R8  {:#018x}",
        r.rsi, r.rdi, r.rbp, r.r8
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_rip_rsp_cr3_and_cpl() {
        let regs = kvm_regs {
            rip: 0x20_1234,
            rsp: 0x1f_fff0,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0x0b;
        sregs.cr3 = 0x2000;
        let text = format_registers(&regs, &sregs);
        assert!(text.contains("RIP 0x0000000000201234"));
        assert!(text.contains("RSP 0x00000000001ffff0"));
        assert!(text.contains("CR3 0x2000"));
        assert!(text.contains("(CPL 3)"));
    }
}
