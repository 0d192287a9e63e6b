//! The x87/SSE state a vCPU starts with: the power-on control word and
//! MXCSR (all exceptions masked), so the guest may use SSE from its first
//! instruction. The XSAVE components beyond it start in their init state,
//! which KVM gives every new vCPU; a Linux guest enables them itself
//! (XCR0) from what CPUID leaf 0xD says.

use kvm_bindings::kvm_fpu;
use kvm_ioctls::VcpuFd;

use crate::error::{Error, Result};

/// x87 control word at reset: all exceptions masked, 64-bit precision.
const FPU_CONTROL_WORD: u16 = 0x37f;
/// MXCSR at reset: all SIMD exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Loads the reset x87 control word and MXCSR.
pub fn set_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("set the FPU state"))
}
