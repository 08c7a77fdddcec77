//! x86-64 CPU state: general registers (`regs`) and the XSAVE area (`xstate`), captured
//! together into a [`CpuState`] and set back together on restore.

pub mod regs;
pub mod xstate;

use anyhow::{bail, Result};
use nix::unistd::Pid;
use telefork_image::{Arch, CpuState, X86_64Cpu};

pub const ARCH: Arch = Arch::X86_64;

/// Captures the CPU state of a stopped thread, given the registers read when it stopped.
pub fn capture(tid: Pid, regs: &crate::ptrace::Regs) -> Result<CpuState> {
    Ok(CpuState::X86_64(X86_64Cpu { gpregs: regs::to_words(&regs::for_resume(regs)), xsave: xstate::capture(tid)? }))
}

/// Sets the full CPU state of a stopped thread (the last thing restore does to it).
pub fn restore(tid: Pid, cpu: &CpuState) -> Result<()> {
    let CpuState::X86_64(c) = cpu;
    let r = regs::from_words(&c.gpregs)?;
    xstate::restore(tid, &c.xsave)?;
    crate::ptrace::setregs(tid, r)
}

/// XSAVE feature bits used by a captured state (for the image header).
pub fn xfeatures(cpu: &CpuState) -> u64 {
    let CpuState::X86_64(c) = cpu;
    xstate::used_features(&c.xsave)
}

/// Refuses an image whose CPU state needs features this CPU does not enable.
pub fn check_cpu(image_xfeatures: u64) -> Result<()> {
    let missing = image_xfeatures & !xstate::local_xcr0();
    if missing != 0 {
        bail!(
            "this CPU lacks features the image's CPU state uses: {} (image needs XCR0 bits {image_xfeatures:#x}, this CPU has {:#x})",
            xstate::feature_names(missing).join(", "),
            xstate::local_xcr0()
        );
    }
    Ok(())
}

// A `syscall` instruction at a known address of this program. The restore stub is a fork of
// this program, so it has the instruction at the same address: the first system calls
// injected into the stub run from here (see `inject`).
std::arch::global_asm!(
    ".pushsection .text.telefork_syscall_insn,\"ax\",@progbits",
    ".globl telefork_syscall_insn",
    ".type telefork_syscall_insn,@function",
    "telefork_syscall_insn:",
    "syscall",
    "ud2",
    ".popsection",
);

extern "C" {
    fn telefork_syscall_insn();
}

/// Address of a `syscall` instruction in this program (and in any fork of it).
pub fn own_syscall_insn() -> u64 {
    telefork_syscall_insn as *const () as usize as u64
}

/// The bytes of a `syscall` instruction.
pub const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];

#[cfg(test)]
mod tests {
    #[test]
    fn a_feature_this_cpu_lacks_is_named() {
        let local = super::xstate::local_xcr0();
        super::check_cpu(local).unwrap();
        // Find a bit this CPU does not enable (AMX tile data is bit 18; fall back to 63).
        let missing = [18u32, 17, 63].into_iter().find(|b| local & (1 << b) == 0).unwrap();
        let err = super::check_cpu(local | (1 << missing)).unwrap_err().to_string();
        assert!(err.contains("lacks"), "{err}");
        let name = super::xstate::feature_names(1 << missing)[0].clone();
        assert!(err.contains(&name), "{err} should name {name}");
    }
}
