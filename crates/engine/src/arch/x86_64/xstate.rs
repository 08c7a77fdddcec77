//! The extended CPU state: x87, MXCSR, SSE, AVX, AVX-512 (zmm0–31, k0–7), PKRU, … as the
//! XSAVE area the kernel gives with PTRACE_GETREGSET NT_X86_XSTATE (standard, non-compacted
//! format). Restoring only the general registers silently breaks floating-point code (the
//! original telefork's bug), so this travels whole.
//!
//! The image header records which feature bits the state uses (XSTATE_BV); restore refuses a
//! CPU that does not enable them, naming the missing features.

use anyhow::{bail, Result};
use nix::unistd::Pid;

const NT_X86_XSTATE: u32 = 0x202;
/// Larger than any XSAVE area of today's CPUs (AMX is ~11 KiB).
const MAX_XSAVE: usize = 64 << 10;
/// XSTATE_BV sits at the start of the XSAVE header, after the 512-byte legacy area.
const XSTATE_BV_OFFSET: usize = 512;

pub fn capture(tid: Pid) -> Result<Vec<u8>> {
    crate::ptrace::get_regset(tid, NT_X86_XSTATE, MAX_XSAVE)
}

pub fn restore(tid: Pid, xsave: &[u8]) -> Result<()> {
    let local = crate::ptrace::get_regset(tid, NT_X86_XSTATE, MAX_XSAVE)?;
    if local.len() != xsave.len() {
        bail!(
            "the image's XSAVE area is {} bytes, this CPU's is {} bytes: restoring onto a different CPU model is not supported yet",
            xsave.len(),
            local.len()
        );
    }
    crate::ptrace::set_regset(tid, NT_X86_XSTATE, xsave)
}

/// XSTATE_BV of a saved area: the components that hold state.
pub fn used_features(xsave: &[u8]) -> u64 {
    xsave
        .get(XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .unwrap_or(0)
}

/// XCR0 of this CPU: the state components the OS enabled. Asked once per process (CPUID
/// and XGETBV trap to the hypervisor in a VM: ~4 µs each here).
pub fn local_xcr0() -> u64 {
    static XCR0: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: xgetbv(0) only reads XCR0; it is valid whenever CPUID reports OSXSAVE, which
    // every x86-64 CPU that runs Linux ≥ 3.x with XSAVE has; we check the bit first.
    *XCR0.get_or_init(|| unsafe {
        let cpuid = std::arch::x86_64::__cpuid(1);
        if cpuid.ecx & (1 << 27) == 0 {
            return 0x3; // no OSXSAVE: x87 and SSE only
        }
        xgetbv0()
    })
}

/// # Safety
/// The CPU must support XSAVE with OSXSAVE enabled (the caller checks CPUID first).
// SAFETY: see above; the only caller checks CPUID.1:ECX.OSXSAVE before calling.
#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    std::arch::x86_64::_xgetbv(0)
}

pub fn feature_names(bits: u64) -> Vec<String> {
    const NAMES: [(u32, &str); 12] = [
        (0, "x87"),
        (1, "SSE"),
        (2, "AVX"),
        (3, "MPX bound registers"),
        (4, "MPX bound config"),
        (5, "AVX-512 opmask (k0-7)"),
        (6, "AVX-512 upper zmm0-15"),
        (7, "AVX-512 zmm16-31"),
        (9, "PKRU"),
        (11, "CET user"),
        (17, "AMX tile config"),
        (18, "AMX tile data"),
    ];
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| {
            NAMES
                .iter()
                .find(|(n, _)| *n == b)
                .map(|(_, s)| s.to_string())
                .unwrap_or(format!("XSAVE component {b}"))
        })
        .collect()
}
