//! Signal state: the dispositions of signals 1..=64 and the shared pending queue (the
//! process's, `Signals`), and each thread's blocked mask (`mask`, `block_all`, `set_mask`:
//! the thread's image keeps it, see `threads`). The per-thread queue and the alternate stack
//! are the thread's (`threads`).
//!
//! The mask is read through ptrace the moment a process is stopped, and every signal is
//! blocked while the engine works in it (a capture puts the mask back when it lets the
//! process go; a restore sets the image's mask as its very last step), so that no handler
//! runs between injected calls.
//!
//! Capture injects rt_sigaction(sig, NULL, &old) for every signal (there is no /proc or
//! ptrace view of a handler's flags, restorer and mask) and peeks the shared queue with
//! PTRACE_PEEKSIGINFO, which leaves the signals queued in the target. Restore injects
//! rt_sigaction(sig, &act, NULL) and re-queues each pending signal with rt_sigqueueinfo
//! *from inside the restored process*: the kernel lets a process queue a siginfo that claims
//! to come from kill() (si_code 0 or more) only to itself. All signals are blocked during restore, so the
//! queued signals wait until the orchestration installs the real mask.

use anyhow::{Context, Result};
use nix::unistd::Pid;

use crate::inject::{Call, Injector};
use crate::state::State;
use telefork_image::{ProcessImage, SigAction, SigInfo};

/// Every signal but SIGKILL (9) and SIGSTOP (19), which cannot be blocked anyway.
pub(crate) const ALL_SIGNALS_BLOCKED: u64 = !((1 << 8) | (1 << 18));

/// The blocked mask of stopped thread `tid` (bit n-1 = signal n).
pub(crate) fn mask(tid: Pid) -> Result<u64> {
    crate::ptrace::get_sigmask(tid)
}

/// Blocks every signal of stopped thread `tid` while the engine works in it.
pub(crate) fn block_all(tid: Pid) -> Result<()> {
    crate::ptrace::set_sigmask(tid, ALL_SIGNALS_BLOCKED)
}

/// Sets the blocked mask of stopped thread `tid`: its own back after a capture, the image's
/// at the end of a restore.
pub(crate) fn set_mask(tid: Pid, mask: u64) -> Result<()> {
    crate::ptrace::set_sigmask(tid, mask)
}

/// The process's signal state, as one kind of state (`State`): captured by the capture's
/// batch of injected rt_sigaction reads (`capture_calls`) and PTRACE_PEEKSIGINFO.
pub(crate) struct Signals;

impl State for Signals {
    /// The dispositions of signals 1..=64 and the shared pending queue.
    type Image = (Vec<SigAction>, Vec<SigInfo>);
    /// The injector after the capture's batch, and where that batch left the dispositions.
    type Source<'a> = (&'a Injector, ActionsRead);

    fn capture((inj, read): Self::Source<'_>) -> Result<Self::Image> {
        capture_process(inj, read)
    }

    fn restore(inj: &mut Injector, img: &ProcessImage) -> Result<()> {
        restore_process(inj, img)
    }
}

/// Size of the kernel's `struct sigaction` on x86-64: handler, flags, restorer, mask.
const KSIGACTION_LEN: usize = 32;
/// The kernel's sigset_t size (rt_sigaction's last argument).
const SIGSET_LEN: u64 = 8;

fn is_unchangeable(sig: i32) -> bool {
    sig == libc::SIGKILL || sig == libc::SIGSTOP
}

fn default_action() -> SigAction {
    SigAction { handler: 0, flags: 0, restorer: 0, mask: 0 }
}

/// Where the capture's rt_sigaction calls leave the dispositions in the tracee's scratch
/// memory (see `capture_calls`).
pub(crate) struct ActionsRead {
    slots: u64,
}

/// The calls that read the dispositions of signals 1..=64 (rt_sigaction(sig, NULL, &old)),
/// each into its own slot of one scratch array; to be run in the capture's one batch, then
/// `capture_process`.
pub fn capture_calls(inj: &mut Injector) -> Result<(Vec<Call>, ActionsRead)> {
    let slots = inj.alloc_zeroed(64 * KSIGACTION_LEN as u64)?;
    let slot = |sig: i32| slots + (sig as u64 - 1) * KSIGACTION_LEN as u64;
    let calls = (1..=64i32)
        .filter(|s| !is_unchangeable(*s))
        .map(|sig| {
            Call::new(
                libc::SYS_rt_sigaction,
                &[sig as u64, 0, slot(sig), SIGSET_LEN],
                format!("reading the action of signal {sig}: rt_sigaction"),
            )
        })
        .collect();
    Ok((calls, ActionsRead { slots }))
}

/// Dispositions of signals 1..=64 (from the slots `capture_calls`' batch filled) and the
/// process-wide pending queue.
fn capture_process(inj: &Injector, read: ActionsRead) -> Result<(Vec<SigAction>, Vec<SigInfo>)> {
    let mut all = vec![0u8; 64 * KSIGACTION_LEN];
    inj.read_mem(read.slots, &mut all)?;
    let mut actions = Vec::with_capacity(64);
    for sig in 1..=64i32 {
        if is_unchangeable(sig) {
            actions.push(default_action());
            continue;
        }
        let b = &all[(sig as usize - 1) * KSIGACTION_LEN..sig as usize * KSIGACTION_LEN];
        let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        actions.push(SigAction { handler: w(0), flags: w(1), restorer: w(2), mask: w(3) });
    }
    let pending = crate::ptrace::peek_siginfos(inj.pid(), true)
        .context("reading the process-wide pending signals")?
        .into_iter()
        .map(|s| SigInfo(s.to_vec()))
        .collect();
    Ok((actions, pending))
}

/// Restores dispositions and queues the shared pending signals (all signals blocked).
fn restore_process(inj: &mut Injector, img: &ProcessImage) -> Result<()> {
    inj.reset_scratch();
    if img.sigactions.len() > 64 {
        anyhow::bail!("image has {} signal actions, at most 64 expected", img.sigactions.len());
    }
    // All actions staged side by side, then set in one batch.
    let mut all = vec![0u8; img.sigactions.len() * KSIGACTION_LEN];
    for (i, a) in img.sigactions.iter().enumerate() {
        for (j, w) in [a.handler, a.flags, a.restorer, a.mask].iter().enumerate() {
            let off = i * KSIGACTION_LEN + j * 8;
            all[off..off + 8].copy_from_slice(&w.to_ne_bytes());
        }
    }
    let acts = inj.stage(&all)?;
    let calls: Vec<Call> = img
        .sigactions
        .iter()
        .enumerate()
        .filter(|(i, _)| !is_unchangeable(*i as i32 + 1))
        .map(|(i, a)| {
            let sig = i as i32 + 1;
            Call::new(
                libc::SYS_rt_sigaction,
                &[sig as u64, acts + (i * KSIGACTION_LEN) as u64, 0, SIGSET_LEN],
                format!(
                    "restoring the action of signal {sig} (handler {:#x}): rt_sigaction",
                    a.handler
                ),
            )
        })
        .collect();
    // (Nothing waits for them: they run with the next batch, or before the first
    // rt_sigqueueinfo below.)
    inj.defer(calls);

    let pid = inj.pid().as_raw();
    let info = inj.alloc_zeroed(128)?;
    for si in &img.shared_pending {
        let sig = siginfo_signo(si)?;
        inj.write_mem(info, &si.0)?;
        inj.syscall(
            libc::SYS_rt_sigqueueinfo,
            &[pid as u64, sig as u64, info],
            format!("re-queueing pending signal {sig}: rt_sigqueueinfo"),
        )?;
    }
    Ok(())
}

/// The signal number of a raw siginfo (its first int), checked.
pub fn siginfo_signo(si: &SigInfo) -> Result<i32> {
    if si.0.len() != 128 {
        anyhow::bail!("a pending signal's siginfo has {} bytes, 128 expected", si.0.len());
    }
    let sig = i32::from_ne_bytes(si.0[..4].try_into().expect("4 bytes"));
    if !(1..=64).contains(&sig) {
        anyhow::bail!("a pending signal has invalid number {sig}");
    }
    Ok(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signo() {
        let mut b = vec![0u8; 128];
        b[0] = 10;
        assert_eq!(siginfo_signo(&SigInfo(b.clone())).unwrap(), 10);
        b[0] = 65;
        assert!(siginfo_signo(&SigInfo(b)).is_err());
        assert!(siginfo_signo(&SigInfo(vec![1; 12])).is_err());
    }
}
