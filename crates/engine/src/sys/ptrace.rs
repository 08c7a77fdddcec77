//! The ptrace requests the engine uses, typed. nix covers the common ones (regs, cont, seize,
//! detach); the few it lacks — regsets of any size, signal masks, queued siginfos, rseq
//! configuration — are written here by hand on top of libc, each with its own `// SAFETY:`.
//!
//! This module owns no state: it is the one door through which the engine reads and writes
//! the kernel-side state of a stopped thread.

use anyhow::{bail, Context, Result};
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

pub use libc::user_regs_struct as Regs;

/// Seizes `pid` and stops it (PTRACE_SEIZE + PTRACE_INTERRUPT), with syscall stops marked.
pub fn seize_and_stop(pid: Pid) -> Result<()> {
    seize_and_stop_with(pid, ptrace::Options::PTRACE_O_TRACESYSGOOD)
}

/// `seize_and_stop` with these ptrace options from the first moment.
pub fn seize_and_stop_with(pid: Pid, options: ptrace::Options) -> Result<()> {
    ptrace::seize(pid, options)
        .with_context(|| format!("cannot attach to process {pid} with ptrace (PTRACE_SEIZE)"))?;
    ptrace::interrupt(pid)
        .with_context(|| format!("cannot stop process {pid} (PTRACE_INTERRUPT)"))?;
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL))
            .with_context(|| format!("waiting for process {pid} to stop"))?
        {
            WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_STOP => return Ok(()),
            // A signal arrived before our interrupt: keep it queued for later by passing it
            // back, and wait again for the interrupt stop.
            WaitStatus::Stopped(_, sig) => {
                ptrace::cont(pid, Some(sig))
                    .with_context(|| format!("resuming process {pid} past {sig:?}"))?;
                ptrace::interrupt(pid).ok();
            }
            WaitStatus::Exited(_, code) => {
                bail!("process {pid} exited (status {code}) while being stopped")
            }
            WaitStatus::Signaled(_, sig, _) => {
                bail!("process {pid} was killed by {sig:?} while being stopped")
            }
            _ => {}
        }
    }
}

pub fn getregs(pid: Pid) -> Result<Regs> {
    ptrace::getregs(pid).with_context(|| format!("PTRACE_GETREGS on thread {pid}"))
}

pub fn setregs(pid: Pid, regs: Regs) -> Result<()> {
    ptrace::setregs(pid, regs).with_context(|| format!("PTRACE_SETREGS on thread {pid}"))
}

/// PTRACE_GETREGSET: returns the regset `note` (e.g. NT_X86_XSTATE), at most `max` bytes.
pub fn get_regset(pid: Pid, note: u32, max: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; max];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: iov describes `buf`, which outlives the call; the kernel writes at most
    // iov_len bytes and shrinks iov_len to what it wrote.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            pid.as_raw(),
            note as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("PTRACE_GETREGSET {note:#x} on thread {pid}"));
    }
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// PTRACE_SETREGSET with the bytes of one regset.
pub fn set_regset(pid: Pid, note: u32, data: &[u8]) -> Result<()> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: the kernel only reads iov_len bytes from `data`, which outlives the call.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            pid.as_raw(),
            note as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("PTRACE_SETREGSET {note:#x} on thread {pid}"));
    }
    Ok(())
}

/// The blocked signal mask of a stopped thread (bit n-1 = signal n).
pub fn get_sigmask(pid: Pid) -> Result<u64> {
    let mut mask = 0u64;
    // SAFETY: PTRACE_GETSIGMASK writes exactly `addr` (= 8) bytes to `data`, a live u64.
    let r = unsafe {
        libc::ptrace(libc::PTRACE_GETSIGMASK, pid.as_raw(), 8usize, &mut mask as *mut u64)
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("PTRACE_GETSIGMASK on thread {pid}"));
    }
    Ok(mask)
}

pub fn set_sigmask(pid: Pid, mask: u64) -> Result<()> {
    // SAFETY: PTRACE_SETSIGMASK reads exactly 8 bytes from `data`, a live u64.
    let r =
        unsafe { libc::ptrace(libc::PTRACE_SETSIGMASK, pid.as_raw(), 8usize, &mask as *const u64) };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("PTRACE_SETSIGMASK on thread {pid}"));
    }
    Ok(())
}

/// All queued siginfos of a thread: its private queue, or with `shared` the process-wide one.
/// They stay queued (PTRACE_PEEKSIGINFO only looks).
pub fn peek_siginfos(pid: Pid, shared: bool) -> Result<Vec<[u8; 128]>> {
    #[repr(C)]
    struct PeekArgs {
        off: u64,
        flags: u32,
        nr: i32,
    }
    const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
    let mut out = Vec::new();
    loop {
        let mut batch = [[0u8; 128]; 32];
        let args = PeekArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: 32,
        };
        // SAFETY: the kernel reads `args` and writes at most args.nr siginfos of 128 bytes
        // into `batch`, which has room for exactly 32.
        let n = unsafe {
            libc::ptrace(
                libc::PTRACE_PEEKSIGINFO,
                pid.as_raw(),
                &args as *const PeekArgs,
                batch.as_mut_ptr(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("PTRACE_PEEKSIGINFO on thread {pid}"));
        }
        out.extend_from_slice(&batch[..n as usize]);
        if n < 32 {
            return Ok(out);
        }
    }
}

/// rseq registration of a thread (PTRACE_GET_RSEQ_CONFIGURATION); None if not registered.
pub fn rseq_config(pid: Pid) -> Result<Option<telefork_image::Rseq>> {
    #[repr(C)]
    #[derive(Default)]
    struct RseqConf {
        rseq_abi_pointer: u64,
        rseq_abi_size: u32,
        signature: u32,
        flags: u32,
        pad: u32,
    }
    let mut conf = RseqConf::default();
    // SAFETY: the kernel writes at most `addr` bytes (the size of RseqConf) into `conf`.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GET_RSEQ_CONFIGURATION,
            pid.as_raw(),
            std::mem::size_of::<RseqConf>(),
            &mut conf as *mut RseqConf,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("PTRACE_GET_RSEQ_CONFIGURATION on thread {pid}"));
    }
    if conf.rseq_abi_pointer == 0 {
        return Ok(None);
    }
    Ok(Some(telefork_image::Rseq {
        abi_pointer: conf.rseq_abi_pointer,
        abi_size: conf.rseq_abi_size,
        flags: conf.flags,
        signature: conf.signature,
    }))
}

/// Whether syscall user dispatch is on in a stopped thread
/// (PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG, Linux 6.1; a kernel without the request reads
/// as off).
pub fn syscall_user_dispatch_on(pid: Pid) -> Result<bool> {
    const PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG: libc::c_uint = 0x4211;
    #[repr(C)]
    #[derive(Default)]
    struct DispatchConfig {
        mode: u64,
        selector: u64,
        offset: u64,
        len: u64,
    }
    let mut conf = DispatchConfig::default();
    // SAFETY: the kernel writes at most `addr` bytes (the size of DispatchConfig) into `conf`.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG,
            pid.as_raw(),
            std::mem::size_of::<DispatchConfig>(),
            &mut conf as *mut DispatchConfig,
        )
    };
    if r < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EIO) || err.raw_os_error() == Some(libc::EINVAL) {
            return Ok(false);
        }
        return Err(err)
            .with_context(|| format!("PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG on thread {pid}"));
    }
    Ok(conf.mode != 0)
}

/// Resumes a stopped tracee until its next syscall stop (entry or exit); any other stop is an
/// error naming what happened (the tracee is left stopped there).
pub fn run_to_syscall_stop(pid: Pid) -> Result<()> {
    // A stop left over from freezing (PTRACE_EVENT_STOP: our interrupt, or the re-trap of a
    // process that was already in a job-control stop when seized) may come first: resume
    // past it. Bounded, so a tracee that keeps stopping is an error, not a hang.
    for _ in 0..8 {
        ptrace::syscall(pid, None).with_context(|| format!("PTRACE_SYSCALL on {pid}"))?;
        match waitpid(pid, Some(WaitPidFlag::__WALL))
            .with_context(|| format!("waiting for {pid}"))?
        {
            WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_STOP => continue,
            other => return syscall_stop_result(pid, other),
        }
    }
    bail!("process {pid} keeps stopping instead of running an injected system call")
}

/// Resumes a stopped tracee until it stops itself with SIGSTOP (the end of a batch of
/// injected calls); the SIGSTOP is suppressed by the next resume.
pub fn run_to_self_stop(pid: Pid) -> Result<()> {
    let mut sig = None;
    for _ in 0..8 {
        ptrace::cont(pid, sig).with_context(|| format!("PTRACE_CONT on {pid}"))?;
        sig = None;
        match waitpid(pid, Some(WaitPidFlag::__WALL))
            .with_context(|| format!("waiting for {pid}"))?
        {
            WaitStatus::Stopped(_, Signal::SIGSTOP) => return Ok(()),
            WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_STOP => continue,
            other => return syscall_stop_result(pid, other),
        }
    }
    bail!("process {pid} keeps stopping instead of running injected system calls")
}

fn syscall_stop_result(pid: Pid, st: WaitStatus) -> Result<()> {
    match st {
        WaitStatus::PtraceSyscall(_) => Ok(()),
        WaitStatus::Stopped(_, sig) => {
            let rip = getregs(pid).map(|r| r.rip).unwrap_or(0);
            bail!("process {pid} stopped with {sig:?} at {rip:#x} while running an injected system call")
        }
        WaitStatus::Exited(_, code) => {
            bail!("process {pid} exited with status {code} during an injected system call")
        }
        WaitStatus::Signaled(_, sig, _) => {
            bail!("process {pid} was killed by {sig:?} during an injected system call")
        }
        other => bail!("unexpected stop of {pid} during an injected system call: {other:?}"),
    }
}

/// Sends SIGKILL and reaps if it is our child; used to never leave a half-made process.
pub fn kill_quietly(pid: Pid) {
    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    let _ = waitpid(pid, Some(WaitPidFlag::__WALL));
}
