//! Per-thread identity and kernel-side thread state: the alternate signal stack, the rseq
//! registration, the set_tid_address(2) pointer, the robust futex list, the thread's private
//! pending signals, and where glibc caches the thread's tid.
//!
//! Capture reads each from the stopped thread: PTRACE_PEEKSIGINFO (private queue),
//! PTRACE_GET_RSEQ_CONFIGURATION, get_robust_list(2) called from the engine itself, and
//! sigaltstack / prctl(PR_GET_TID_ADDRESS) injected into the thread (the injector must drive
//! that thread). Restore injects the matching setters into the new thread and, when the
//! thread got a different tid, rewrites glibc's cached tid in the restored memory (raise(),
//! pthread_kill() and error-checking mutexes trust that cache, not gettid()).

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;

use crate::inject::{Call, Injector};
use crate::state::State;
use telefork_image::{AltStack, CpuState, ProcessImage, SigInfo, ThreadState};

/// Offset of `tid` in glibc's `struct pthread` (x86-64, glibc 2.36 and neighbours).
const GLIBC_TID_OFFSET: u64 = 0x2d0;
/// How much of the thread's TCB we search for the tid.
const TCB_SCAN_LEN: usize = 0x1000;
/// `struct robust_list_head` size: what set_robust_list insists on.
const ROBUST_LIST_HEAD_LEN: u64 = 24;
const SYS_RSEQ: libc::c_long = 334;

/// One thread's identity and kernel-side state, as one kind of state (`State`). Restored in
/// the thread the injector drives (so far the process's only one): its pending signals now,
/// its setters deferred to the restore's last batch (the credentials'), glibc's cached tid
/// rewritten where the thread got a new one.
pub(crate) struct Thread;

/// What a thread is captured from: the injector driving it after the capture's batch ran
/// its reads (`capture_calls`), and what the engine read of it when it stopped.
pub(crate) struct ThreadLook<'a> {
    pub inj: &'a Injector,
    /// Its blocked mask before the engine blocked everything (`signals::mask`).
    pub sigmask: u64,
    /// Its CPU state (`arch::capture`).
    pub cpu: CpuState,
    pub reads: ThreadReads,
}

impl State for Thread {
    type Image = ThreadState;
    type Source<'a> = ThreadLook<'a>;

    fn capture(from: ThreadLook<'_>) -> Result<ThreadState> {
        capture(from.inj, from.inj.pid(), from.sigmask, from.cpu, from.reads)
    }

    fn restore(inj: &mut Injector, img: &ProcessImage) -> Result<()> {
        let t = img.threads.first().context("image has no thread")?;
        let tid = inj.pid();
        restore_pending(inj, t, tid)?;
        inj.reset_scratch();
        let calls = restore_calls(inj, t)?;
        inj.defer(calls);
        restore_after(inj, t, tid)
    }
}

/// Where the capture's injected reads leave the thread's alternate stack and clear_child_tid
/// pointer in the tracee's scratch memory (see `capture_calls`).
pub(crate) struct ThreadReads {
    altstack: u64,
    tid_address: u64,
}

/// The injected reads of the thread's state (sigaltstack, prctl(PR_GET_TID_ADDRESS)), to be
/// run in the capture's one batch in the thread `capture` captures, then `capture`.
pub fn capture_calls(inj: &mut Injector) -> Result<(Vec<Call>, ThreadReads)> {
    // stack_t: { void *ss_sp; int ss_flags; /* pad */ size_t ss_size; }
    let altstack = inj.alloc_zeroed(24)?;
    let tid_address = inj.alloc_zeroed(8)?;
    let tid = inj.pid();
    let calls = vec![
        Call::new(
            libc::SYS_sigaltstack,
            &[0, altstack],
            format!("reading the alternate signal stack of thread {tid}: sigaltstack"),
        ),
        Call::new(
            libc::SYS_prctl,
            &[libc::PR_GET_TID_ADDRESS as u64, tid_address],
            format!(
                "reading the clear_child_tid address of thread {tid}: prctl(PR_GET_TID_ADDRESS)"
            ),
        ),
    ];
    Ok((calls, ThreadReads { altstack, tid_address }))
}

/// Captures one stopped thread, whose injected reads (`capture_calls`) have run. `sigmask` is
/// its blocked mask as it was before the engine blocked everything; `cpu` its CPU state
/// (already captured).
fn capture(
    inj: &Injector,
    tid: Pid,
    sigmask: u64,
    cpu: CpuState,
    reads: ThreadReads,
) -> Result<ThreadState> {
    if inj.pid() != tid {
        bail!("internal error: capturing thread {tid} with an injector driving {}", inj.pid());
    }
    let pending = crate::ptrace::peek_siginfos(tid, false)
        .with_context(|| format!("reading the pending signals of thread {tid}"))?
        .into_iter()
        .map(|s| SigInfo(s.to_vec()))
        .collect();

    let mut b = [0u8; 24];
    inj.read_mem(reads.altstack, &mut b)?;
    let altstack = AltStack {
        sp: u64::from_ne_bytes(b[0..8].try_into().expect("8 bytes")),
        flags: i32::from_ne_bytes(b[8..12].try_into().expect("4 bytes")),
        size: u64::from_ne_bytes(b[16..24].try_into().expect("8 bytes")),
    };

    let rseq = crate::ptrace::rseq_config(tid)?;

    let mut b = [0u8; 8];
    inj.read_mem(reads.tid_address, &mut b)?;
    let clear_child_tid = u64::from_ne_bytes(b);

    let (robust_list, robust_list_len) = crate::sys::get_robust_list(tid)?;

    let tid_cache_addr = match &cpu {
        CpuState::X86_64(c) => match c.gpregs.get(crate::arch::native::regs::FS_BASE) {
            Some(&fs_base) if fs_base != 0 => {
                find_tid_cache(inj, fs_base, tid.as_raw()).map(|off| fs_base + off)
            }
            _ => None,
        },
    };

    Ok(ThreadState {
        tid: tid.as_raw(),
        cpu,
        sigmask,
        pending,
        altstack,
        rseq,
        clear_child_tid,
        robust_list,
        robust_list_len,
        tid_cache_addr,
    })
}

/// Finds where glibc caches the thread's tid, as an offset from fs_base.
///
/// On x86-64 fs_base points at the thread's TCB, which glibc places at the start of its
/// `struct pthread`; the cached tid is the `tid` field of that struct. Its offset is not
/// ABI, so rather than trust one constant we read the first 0x1000 bytes after fs_base
/// (the struct is ~0x900 bytes) and look for 4-byte-aligned i32s equal to the tid:
///   - a match at 0x2d0, glibc 2.36's offset, is taken (the layout we know);
///   - otherwise a match is taken only if it is the *only* one: with a small tid (say, 2 in
///     a fresh pid namespace) other fields may hold the same number by chance, and writing a
///     new tid into the wrong word would silently corrupt the restored process.
///
/// No match (a non-glibc or static runtime without a tid cache): None, nothing is rewritten.
fn find_tid_cache(inj: &Injector, fs_base: u64, tid: i32) -> Option<u64> {
    let buf = read_prefix(inj, fs_base, TCB_SCAN_LEN);
    let matches: Vec<u64> = buf
        .chunks_exact(4)
        .enumerate()
        .filter(|(_, w)| i32::from_ne_bytes([w[0], w[1], w[2], w[3]]) == tid)
        .map(|(i, _)| i as u64 * 4)
        .collect();
    if matches.contains(&GLIBC_TID_OFFSET) {
        Some(GLIBC_TID_OFFSET)
    } else if matches.len() == 1 {
        Some(matches[0])
    } else {
        None
    }
}

/// Reads up to `len` bytes at `addr`, page by page, stopping at the first unreadable page
/// (the TCB may sit near the end of its mapping).
fn read_prefix(inj: &Injector, addr: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut cur = addr;
    while out.len() < len {
        let to_page_end = (4096 - (cur % 4096)) as usize;
        let n = to_page_end.min(len - out.len());
        let mut chunk = vec![0u8; n];
        if inj.read_mem(cur, &mut chunk).is_err() {
            break;
        }
        out.extend_from_slice(&chunk);
        cur += n as u64;
    }
    out
}

/// The system calls that restore everything of `t` but the CPU state, the blocked mask and
/// the pending signals (`restore_pending`), in the thread the injector drives; to be run in
/// one batch (their memory is staged in the scratch area), then `restore_after`.
fn restore_calls(inj: &mut Injector, t: &ThreadState) -> Result<Vec<Call>> {
    let tid = t.tid;
    let mut calls = Vec::new();

    // Alternate stack. SS_ONSTACK is a report (the thread was running on it), not a setting.
    let flags = t.altstack.flags & !libc::SS_ONSTACK;
    let mut ss = [0u8; 24];
    ss[0..8].copy_from_slice(&t.altstack.sp.to_ne_bytes());
    ss[8..12].copy_from_slice(&flags.to_ne_bytes());
    ss[16..24].copy_from_slice(&t.altstack.size.to_ne_bytes());
    let ssp = inj.stage(&ss)?;
    calls.push(Call::new(
        libc::SYS_sigaltstack,
        &[ssp, 0],
        format!(
            "restoring the alternate signal stack ({:#x}, {} bytes) of thread {tid}",
            t.altstack.sp, t.altstack.size
        ),
    ));

    // The rseq area. The thread has none registered here: the stub's inherited one is
    // dropped when it is emptied, and threads the restore creates with a raw clone never
    // register one (a registration found anyway fails the batch: EBUSY, named).
    if let Some(w) = t.rseq.as_ref() {
        calls.push(Call::new(
            SYS_RSEQ,
            &[w.abi_pointer, w.abi_size as u64, 0, w.signature as u64],
            format!(
                "restoring the rseq registration of thread {tid}: rseq({:#x}, {}, 0, {:#x})",
                w.abi_pointer, w.abi_size, w.signature
            ),
        ));
    }

    calls.push(Call::new(
        libc::SYS_set_tid_address,
        &[t.clear_child_tid],
        format!("restoring the clear_child_tid address of thread {tid}: set_tid_address"),
    ));
    let len = if t.robust_list_len == 0 { ROBUST_LIST_HEAD_LEN } else { t.robust_list_len };
    calls.push(Call::new(
        libc::SYS_set_robust_list,
        &[t.robust_list, len],
        format!("restoring the robust futex list of thread {tid}: set_robust_list"),
    ));
    Ok(calls)
}

/// Queues the signals pending for thread `t` again (they stay blocked until the process is
/// let go), in batches of 256, each siginfo staged on its own.
fn restore_pending(inj: &mut Injector, t: &ThreadState, new_tid: Pid) -> Result<()> {
    for chunk in t.pending.chunks(256) {
        inj.reset_scratch();
        let mut calls = Vec::with_capacity(chunk.len());
        for si in chunk {
            let sig = crate::signals::siginfo_signo(si)?;
            let info = inj.stage(&si.0)?;
            calls.push(Call::new(
                libc::SYS_rt_tgsigqueueinfo,
                &[new_tid.as_raw() as u64, new_tid.as_raw() as u64, sig as u64, info],
                format!("re-queueing signal {sig} pending for thread {}: rt_tgsigqueueinfo", t.tid),
            ));
        }
        inj.run_batch(&calls)?;
    }
    Ok(())
}

/// Glibc's cached tid, rewritten in the restored memory where the thread got a new one
/// (through /proc/PID/mem: independent of the batch of `restore_calls`).
fn restore_after(inj: &mut Injector, t: &ThreadState, new_tid: Pid) -> Result<()> {
    if new_tid.as_raw() != t.tid {
        if let Some(addr) = t.tid_cache_addr {
            inj.write_mem(addr, &new_tid.as_raw().to_ne_bytes()).with_context(|| {
                format!("rewriting glibc's cached tid of thread {} (now {new_tid})", t.tid)
            })?;
        }
    }
    Ok(())
}
