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
    Ok(CpuState::X86_64(X86_64Cpu {
        gpregs: regs::to_words(&regs::for_resume(regs)),
        xsave: xstate::capture(tid)?,
    }))
}

/// Sets the full CPU state of a stopped thread (the last thing restore does to it).
pub fn restore(tid: Pid, cpu: &CpuState) -> Result<()> {
    let CpuState::X86_64(c) = cpu;
    let r = regs::from_words(&c.gpregs)?;
    xstate::restore(tid, &c.xsave)?;
    crate::ptrace::setregs(tid, r)
}

/// XSAVE feature bits used by a captured state (for the image header).
/// Asks the CPU, once, what this process will want to know (see `crate::learn_cpu`).
pub fn learn_cpu() {
    let _ = xstate::local_xcr0();
    // (std's own feature cache, which crc32fast and others consult.)
    let _ = std::arch::is_x86_feature_detected!("avx2");
}

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

/// Machine code for a fork of a stub template (see `restore::StubTemplate`), which runs it
/// from right after the `syscall` that made it until the restorer takes it under ptrace:
/// ask for SIGKILL when its parent dies, exit (status 125) if that parent — the process
/// `parent` — is gone already, else wait in pause() (all its signals are blocked: only the
/// restorer's PTRACE_INTERRUPT, SIGKILL or SIGSTOP ends the wait; it never spins on a CPU
/// the restorer needs). Position-independent, 52 bytes.
pub fn fork_child_code(parent: u32) -> Vec<u8> {
    let mut c = Vec::with_capacity(52);
    c.extend([0xb8, 0x9d, 0x00, 0x00, 0x00]); // mov eax, 157 (prctl)
    c.extend([0xbf, 0x01, 0x00, 0x00, 0x00]); // mov edi, 1 (PR_SET_PDEATHSIG)
    c.extend([0xbe, 0x09, 0x00, 0x00, 0x00]); // mov esi, 9 (SIGKILL)
    c.extend(SYSCALL_INSN);
    c.extend([0xb8, 0x6e, 0x00, 0x00, 0x00]); // mov eax, 110 (getppid)
    c.extend(SYSCALL_INSN);
    c.push(0x3d); // cmp eax, parent
    c.extend(parent.to_le_bytes());
    c.extend([0x75, 0x09]); // jne +9 (to the exit)
    c.extend([0xb8, 0x22, 0x00, 0x00, 0x00]); // mov eax, 34 (pause)
    c.extend(SYSCALL_INSN);
    c.extend([0xeb, 0xf7]); // jmp -9 (pause again)
    c.extend([0xbf, 0x7d, 0x00, 0x00, 0x00]); // mov edi, 125
    c.extend([0xb8, 0x3c, 0x00, 0x00, 0x00]); // mov eax, 60 (exit)
    c.extend(SYSCALL_INSN);
    c
}

// The batch runner: position-independent code copied into the stopped process to run a
// table of system calls in one go (one ptrace round trip instead of two per call).
//   r12 = table of entries {nr, a0..a5, result} (64 bytes each), r13 = entry count,
//   r14 = pid, r15 = tid.
// It runs the entries in order, stores each result, stops at the first error, and then
// sends itself SIGSTOP (tgkill), which the tracer sees as a signal-delivery stop and
// suppresses. SIGSTOP is used because it can be neither blocked nor handled: a trap
// instruction would raise a *forced* signal, which the kernel unblocks and resets to its
// default action when blocked — clobbering the process's own SIGTRAP/SIGILL handler.
std::arch::global_asm!(
    ".pushsection .text.telefork_batch,\"ax\",@progbits",
    ".globl telefork_batch_start",
    ".globl telefork_batch_end",
    "telefork_batch_start:",
    "2:",
    "test r13, r13",
    "jz 3f",
    "mov rax, qword ptr [r12]",
    "mov rdi, qword ptr [r12 + 8]",
    "mov rsi, qword ptr [r12 + 16]",
    "mov rdx, qword ptr [r12 + 24]",
    "mov r10, qword ptr [r12 + 32]",
    "mov r8, qword ptr [r12 + 40]",
    "mov r9, qword ptr [r12 + 48]",
    "syscall",
    "mov qword ptr [r12 + 56], rax",
    "cmp rax, -4095",
    "jae 3f",
    "add r12, 64",
    "dec r13",
    "jmp 2b",
    "3:",
    "mov eax, 234", // tgkill
    "mov rdi, r14",
    "mov rsi, r15",
    "mov edx, 19", // SIGSTOP
    "syscall",
    "ud2",
    "telefork_batch_end:",
    ".popsection",
);

extern "C" {
    static telefork_batch_start: u8;
    static telefork_batch_end: u8;
}

/// The machine code of the batch runner.
pub fn batch_runner_code() -> &'static [u8] {
    // SAFETY: both symbols are labels in our own read-only text section, `end` after
    // `start` (same section, assembled in order); the bytes between them are the code above.
    unsafe {
        let start = std::ptr::addr_of!(telefork_batch_start);
        let end = std::ptr::addr_of!(telefork_batch_end);
        std::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// Registers that start the batch runner at `code` over `count` entries at `table`.
pub fn batch_regs(
    base: &crate::ptrace::Regs,
    code: u64,
    table: u64,
    count: u64,
    pid: i32,
    tid: i32,
) -> crate::ptrace::Regs {
    let mut r = *base;
    r.rip = code;
    r.orig_rax = u64::MAX;
    r.r12 = table;
    r.r13 = count;
    r.r14 = pid as u64;
    r.r15 = tid as u64;
    r
}

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
