//! General-purpose registers: `struct user_regs_struct` (PTRACE_GETREGS/SETREGS), stored in
//! the image as its 27 words in kernel order, fs_base and gs_base included.
//!
//! A thread stopped inside a system call (sleeping in nanosleep, blocked in read) is captured
//! as if it were about to issue that call again: the restored process has no kernel-side
//! syscall in progress, so it simply re-executes the `syscall` instruction (CRIU does the
//! same). Calls that would use a kernel "restart block" (nanosleep, poll with a timeout) are
//! re-issued with their original arguments, i.e. a sleep starts over rather than failing
//! with EINTR, which programs handle worse.

use anyhow::{bail, Result};

use crate::ptrace::Regs;

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// Index of fs_base in the word list (glibc's thread pointer).
pub const FS_BASE: usize = 21;

/// The registers with which the thread should resume in a new process.
pub fn for_resume(r: &Regs) -> Regs {
    let mut r = *r;
    if (r.orig_rax as i64) >= 0 {
        match -(r.rax as i64) {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK => {
                r.rax = r.orig_rax;
                r.rip -= 2; // back onto the 2-byte `syscall` instruction
            }
            _ => {}
        }
    }
    r.orig_rax = u64::MAX;
    r
}

pub fn to_words(r: &Regs) -> Vec<u64> {
    vec![
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

pub fn from_words(w: &[u64]) -> Result<Regs> {
    if w.len() != 27 {
        bail!("image has {} general registers, x86-64 has 27", w.len());
    }
    Ok(Regs {
        r15: w[0],
        r14: w[1],
        r13: w[2],
        r12: w[3],
        rbp: w[4],
        rbx: w[5],
        r11: w[6],
        r10: w[7],
        r9: w[8],
        r8: w[9],
        rax: w[10],
        rcx: w[11],
        rdx: w[12],
        rsi: w[13],
        rdi: w[14],
        orig_rax: w[15],
        rip: w[16],
        cs: w[17],
        eflags: w[18],
        rsp: w[19],
        ss: w[20],
        fs_base: w[21],
        gs_base: w[22],
        ds: w[23],
        es: w[24],
        fs: w[25],
        gs: w[26],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_restart() {
        let w: Vec<u64> = (1..=27).collect();
        let r = from_words(&w).unwrap();
        assert_eq!(to_words(&r), w);
        assert!(from_words(&w[..26]).is_err());
        let mut r = from_words(&w).unwrap();
        r.orig_rax = 35; // nanosleep
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        r.rip = 0x1002;
        let f = for_resume(&r);
        assert_eq!((f.rax, f.rip, f.orig_rax), (35, 0x1000, u64::MAX));
        r.rax = (-4i64) as u64; // -EINTR is a real result: left alone
        let f = for_resume(&r);
        assert_eq!((f.rax, f.rip), ((-4i64) as u64, 0x1002));
    }
}
