//! Running a system call inside a stopped process: the one place where the engine makes
//! another process act on itself (read its signal dispositions, map memory into it, open its
//! files, set its credentials, …).
//!
//! How: point the thread's instruction pointer at a `syscall` instruction that already exists
//! in its address space, load the number and arguments into registers, and let it run with
//! PTRACE_SYSCALL to the syscall-entry stop and again to the syscall-exit stop, where the
//! result is in rax. Nothing after the `syscall` instruction ever executes, so no breakpoint
//! has to be written and no single-stepping is needed (the original telefork single-stepped,
//! which this kernel refuses), and even a call that unmaps the page holding the instruction
//! returns cleanly to us.
//!
//! Many independent calls at once (`run_batch`): a small runner (arch code, copied into an
//! executable area of the tracee) walks a table of calls, stores each result, stops at the
//! first failure and then stops itself with SIGSTOP — one ptrace round trip for the lot
//! instead of two per call. Calls whose results nothing waits for can be queued (`defer`)
//! to run in front of the next batch: a restore's steps share round trips that way.
//!
//! Arguments that are pointers refer to a *scratch* area inside the tracee, filled through
//! /proc/PID/mem. The caller blocks all signals of the tracee (PTRACE_SETSIGMASK) while
//! injecting, so no signal handler runs in between.

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;

use crate::ptrace::{self, Regs};

/// How many system calls were injected by this process (for `TELEFORK_DEBUG` statistics).
pub static INJECTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// How many times this process let a tracee run and waited for it to stop again (one per
/// single injected call, one per batch round).
pub static ROUND_TRIPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Room the batch runner's code needs.
pub const BATCH_CODE_MAX: usize = 256;

/// What a run of calls did: the results of those that succeeded, in order, and where it
/// stopped — the index of the failing call and its errno — if one failed.
pub type Ran = (Vec<u64>, Option<(usize, i32)>);

/// One system call for `Injector::run_batch`.
#[derive(Clone)]
pub struct Call {
    pub nr: libc::c_long,
    pub args: [u64; 6],
    /// What it does, for the error if it fails.
    pub what: String,
    /// The only result that counts as success (an address a mapping must land at).
    pub expect: Option<u64>,
}

impl Call {
    pub fn new(nr: libc::c_long, args: &[u64], what: impl Into<String>) -> Call {
        let mut a = [0u64; 6];
        a[..args.len().min(6)].copy_from_slice(&args[..args.len().min(6)]);
        Call { nr, args: a, what: what.into(), expect: None }
    }

    /// The same call, failing unless it returns `value`.
    pub fn expecting(self, value: u64) -> Call {
        Call { expect: Some(value), ..self }
    }

    /// An error if `result` is not the one expected.
    fn check(&self, result: u64) -> Result<()> {
        match self.expect {
            Some(want) if want != result => {
                bail!("{}: returned {result:#x} instead of {want:#x}", self.what)
            }
            _ => Ok(()),
        }
    }
}

pub struct Injector {
    pid: Pid,
    /// Where the batch runner's code sits in the tracee, once set up.
    batch_code: Option<u64>,
    /// Address of a `syscall` (0f 05) instruction in the tracee.
    syscall_ip: u64,
    /// Registers the injected calls start from (the tracee's own at attach time).
    base: Regs,
    mem: File,
    scratch: u64,
    scratch_len: u64,
    scratch_used: u64,
    /// Calls queued by `defer`, to run in front of the next batch or call.
    deferred: Vec<Call>,
    /// Scratch memory the deferred calls use: kept when the scratch area is reset.
    scratch_floor: u64,
    /// How many deferred calls have run so far (see `flush_through`).
    deferred_run: usize,
}

impl Injector {
    /// Takes over a ptrace-stopped thread `pid` that has a `syscall` instruction at
    /// `syscall_ip`.
    pub fn new(pid: Pid, syscall_ip: u64) -> Result<Self> {
        let base = ptrace::getregs(pid)?;
        let mem = crate::procfs::open_mem(pid, true)?;
        Ok(Injector {
            pid,
            batch_code: None,
            syscall_ip,
            base,
            mem,
            scratch: 0,
            scratch_len: 0,
            scratch_used: 0,
            deferred: Vec::new(),
            scratch_floor: 0,
            deferred_run: 0,
        })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    pub fn set_syscall_ip(&mut self, ip: u64) {
        self.syscall_ip = ip;
    }

    /// Runs one system call in the tracee and returns the raw result (negative errno on
    /// failure). Deferred calls run first.
    pub fn syscall_raw(&mut self, nr: libc::c_long, args: &[u64]) -> Result<i64> {
        self.flush()?;
        self.single(nr, args)
    }

    /// One system call through the syscall-entry and -exit stops.
    fn single(&mut self, nr: libc::c_long, args: &[u64]) -> Result<i64> {
        INJECTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ROUND_TRIPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        debug_assert!(args.len() <= 6);
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        let mut r = self.base;
        r.rip = self.syscall_ip;
        r.rax = nr as u64;
        // No syscall in progress: the kernel must not try to restart anything.
        r.orig_rax = u64::MAX;
        r.rdi = a[0];
        r.rsi = a[1];
        r.rdx = a[2];
        r.r10 = a[3];
        r.r8 = a[4];
        r.r9 = a[5];
        ptrace::setregs(self.pid, r)?;
        ptrace::run_to_syscall_stop(self.pid)?; // entry
        ptrace::run_to_syscall_stop(self.pid)?; // exit
        Ok(ptrace::getregs(self.pid)?.rax as i64)
    }

    /// Runs one system call; a failure becomes an error that says `what` failed and why.
    pub fn syscall(
        &mut self,
        nr: libc::c_long,
        args: &[u64],
        what: impl std::fmt::Display,
    ) -> Result<u64> {
        let ret = self.syscall_raw(nr, args)?;
        if (-4095..0).contains(&ret) {
            let err = std::io::Error::from_raw_os_error(-ret as i32);
            bail!("{what}: {err}");
        }
        Ok(ret as u64)
    }

    /// Where the batch runner's code lives in the tracee (see `run_batch`): an executable
    /// area of at least `BATCH_CODE_MAX` bytes the caller mapped for us.
    pub fn set_batch_code_area(&mut self, addr: u64) -> Result<()> {
        let code = crate::arch::native::batch_runner_code();
        if code.len() > BATCH_CODE_MAX {
            bail!("internal error: batch runner of {} bytes", code.len());
        }
        self.write_mem(addr, code)?;
        self.batch_code = Some(addr);
        Ok(())
    }

    /// Queues `calls` to run in front of the next batch (or single call): for calls whose
    /// results nothing waits for, which then cost no round trip of their own. The scratch
    /// memory staged for them so far stays theirs until they ran (`reset_scratch` keeps it).
    /// A failure (or a result other than the one expected) is an error of whatever runs them,
    /// naming the deferred call.
    pub fn defer(&mut self, calls: Vec<Call>) {
        if calls.is_empty() {
            return;
        }
        self.deferred.extend(calls);
        self.scratch_floor = self.scratch_used;
    }

    /// Runs the deferred calls now, if any.
    pub fn flush(&mut self) -> Result<()> {
        self.try_batch(&[]).map(|_| ())
    }

    /// A mark that `flush_through` takes: the calls deferred up to now.
    pub fn deferred_mark(&self) -> usize {
        self.deferred_run + self.deferred.len()
    }

    /// Makes sure the calls deferred before `mark` have run (flushing if they have not).
    pub fn flush_through(&mut self, mark: usize) -> Result<()> {
        if self.deferred_run < mark {
            self.flush()?;
        }
        Ok(())
    }

    /// Like `run_batch`, but a failing call is not an error: `Ok(Err((index, errno)))` says
    /// which call failed and why (the calls before it ran, the ones after did not). Deferred
    /// calls run first; their failures are errors.
    pub fn try_batch(
        &mut self,
        calls: &[Call],
    ) -> Result<std::result::Result<Vec<u64>, (usize, i32)>> {
        Ok(match self.batch_until_failure(calls)? {
            (results, None) => Ok(results),
            (_, Some(failed)) => Err(failed),
        })
    }

    /// Like `try_batch`, but also gives the results of the calls that ran before a failure.
    pub fn batch_until_failure(&mut self, calls: &[Call]) -> Result<Ran> {
        let deferred = std::mem::take(&mut self.deferred);
        let queued = deferred.len();
        let all: Vec<&Call> = deferred.iter().chain(calls).collect();
        let ran = self.run_in_order(&all);
        // (Whatever happened, the deferred calls are gone: run, or failed with an error.)
        self.deferred_run += queued;
        self.scratch_floor = 0;
        let (results, failed) = ran?;
        // Every call that ran is checked, also those before a failure.
        for (c, r) in all.iter().zip(&results) {
            c.check(*r)?;
        }
        match failed {
            Some((i, errno)) if i < queued => {
                bail!("{}: {}", all[i].what, std::io::Error::from_raw_os_error(errno))
            }
            failed => Ok((results[queued..].to_vec(), failed.map(|(i, e)| (i - queued, e)))),
        }
    }

    /// Runs `calls` in order (in batches of the runner where it is set up, else one by one),
    /// stopping at the first failure: the results of the calls that succeeded, and the
    /// failure (index, errno), if any.
    fn run_in_order(&mut self, calls: &[&Call]) -> Result<Ran> {
        let mut results = Vec::with_capacity(calls.len());
        if self.batch_code.is_none() {
            for (i, c) in calls.iter().enumerate() {
                let r = self.single(c.nr, &c.args)?;
                if (-4095..0).contains(&r) {
                    return Ok((results, Some((i, -r as i32))));
                }
                results.push(r as u64);
            }
            return Ok((results, None));
        }
        for (k, chunk) in calls.chunks(256).enumerate() {
            let (done, failed) = self.batch_round(chunk)?;
            results.extend(done);
            if let Some((i, errno)) = failed {
                return Ok((results, Some((k * 256 + i, errno))));
            }
        }
        Ok((results, None))
    }

    /// Runs `calls` in order inside the tracee with one ptrace round trip, stopping at the
    /// first failure, which becomes an error naming that call. Falls back to one call at a
    /// time where no batch code area was set up.
    pub fn run_batch(&mut self, calls: &[Call]) -> Result<Vec<u64>> {
        match self.try_batch(calls)? {
            Ok(results) => Ok(results),
            Err((i, errno)) => {
                bail!("{}: {}", calls[i].what, std::io::Error::from_raw_os_error(errno))
            }
        }
    }

    /// One round of the batch runner over at most 256 calls.
    fn batch_round(&mut self, chunk: &[&Call]) -> Result<Ran> {
        let code = self.batch_code.context("internal error: no batch code area")?;
        let mut table = Vec::with_capacity(chunk.len() * 64);
        for c in chunk {
            table.extend_from_slice(&(c.nr as u64).to_ne_bytes());
            for a in c.args {
                table.extend_from_slice(&a.to_ne_bytes());
            }
            table.extend_from_slice(&u64::MAX.to_ne_bytes()); // "not run"
        }
        let mark = self.scratch_used;
        let table_addr = self.stage(&table)?;
        INJECTED.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        ROUND_TRIPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = self.pid.as_raw();
        let regs = crate::arch::native::batch_regs(
            &self.base,
            code,
            table_addr,
            chunk.len() as u64,
            pid,
            pid,
        );
        ptrace::setregs(self.pid, regs)?;
        ptrace::run_to_self_stop(self.pid)?;
        let mut out = vec![0u8; table.len()];
        self.read_mem(table_addr, &mut out)?;
        self.scratch_used = mark;
        let mut results = Vec::with_capacity(chunk.len());
        for i in 0..chunk.len() {
            let off = i * 64 + 56;
            let ret = i64::from_ne_bytes(out[off..off + 8].try_into().unwrap_or([0; 8]));
            if (-4095..0).contains(&ret) {
                return Ok((results, Some((i, -ret as i32))));
            }
            results.push(ret as u64);
        }
        Ok((results, None))
    }

    pub fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.mem.read_exact_at(buf, addr).with_context(|| {
            format!("reading {} bytes at {addr:#x} of process {}", buf.len(), self.pid)
        })
    }

    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.mem.write_all_at(data, addr).with_context(|| {
            format!("writing {} bytes at {addr:#x} of process {}", data.len(), self.pid)
        })
    }

    /// The file handle on /proc/PID/mem (for bulk page transfer).
    pub fn mem_file(&self) -> &File {
        &self.mem
    }

    /// Declares `[addr, addr + len)` of the tracee as writable scratch memory.
    pub fn set_scratch(&mut self, addr: u64, len: u64) {
        self.scratch = addr;
        self.scratch_len = len;
        self.scratch_used = 0;
    }

    /// Forgets what was staged, making the scratch area available again (but what deferred
    /// calls still need).
    pub fn reset_scratch(&mut self) {
        self.scratch_used = self.scratch_floor;
    }

    /// Where the next staged bytes would go, for `reset_scratch_to`.
    pub fn scratch_mark(&self) -> u64 {
        self.scratch_used
    }

    /// Forgets what was staged since `mark` (a `scratch_mark`), keeping what came before.
    pub fn reset_scratch_to(&mut self, mark: u64) {
        self.scratch_used = mark.max(self.scratch_floor).min(self.scratch_used);
    }

    /// Copies `data` into the scratch area and returns its address in the tracee.
    pub fn stage(&mut self, data: &[u8]) -> Result<u64> {
        let addr = self.alloc(data.len() as u64)?;
        self.write_mem(addr, data)?;
        Ok(addr)
    }

    /// Stages a NUL-terminated copy of `s`.
    pub fn stage_cstr(&mut self, s: &str) -> Result<u64> {
        if s.as_bytes().contains(&0) {
            bail!("path {s:?} contains a NUL byte");
        }
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.stage(&v)
    }

    /// Bytes of scratch not staged yet.
    pub fn scratch_left(&self) -> u64 {
        self.scratch_len.saturating_sub(self.scratch_used)
    }

    /// How many calls are deferred (see `defer`).
    pub fn deferred_len(&self) -> usize {
        self.deferred.len()
    }

    /// Reserves `len` zeroed bytes of scratch (for a system call to write into).
    pub fn alloc_zeroed(&mut self, len: u64) -> Result<u64> {
        self.stage(&vec![0u8; len as usize])
    }

    fn alloc(&mut self, len: u64) -> Result<u64> {
        if self.scratch_len == 0 {
            bail!("internal error: no scratch memory set up in process {}", self.pid);
        }
        let start = (self.scratch_used + 15) & !15;
        if start + len > self.scratch_len {
            bail!(
                "internal error: scratch memory of process {} exhausted ({len} bytes wanted)",
                self.pid
            );
        }
        self.scratch_used = start + len;
        Ok(self.scratch + start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kills the traced child however the test ends.
    struct Killed(Pid);

    impl Drop for Killed {
        fn drop(&mut self) {
            ptrace::kill_quietly(self.0);
        }
    }

    /// A stopped child of ours under ptrace, with a control area for the batch runner.
    fn traced_child() -> (Injector, Killed) {
        // SAFETY: the child makes only raw system calls before it stops (the test harness
        // has other threads).
        let r = unsafe { libc::fork() };
        assert!(r >= 0, "fork");
        if r == 0 {
            // SAFETY: plain system calls without memory arguments.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                libc::raise(libc::SIGSTOP);
                libc::_exit(0);
            }
        }
        let pid = Pid::from_raw(r);
        nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::__WALL)).unwrap();
        nix::sys::ptrace::setoptions(
            pid,
            nix::sys::ptrace::Options::PTRACE_O_TRACESYSGOOD
                | nix::sys::ptrace::Options::PTRACE_O_EXITKILL,
        )
        .unwrap();
        let maps = crate::procfs::read_maps(pid).unwrap();
        let vdso = maps.iter().find(|m| m.name == "[vdso]").expect("a [vdso]");
        let mut code = vec![0u8; (vdso.end - vdso.start) as usize];
        std::fs::File::open(format!("/proc/{pid}/mem"))
            .unwrap()
            .read_exact_at(&mut code, vdso.start)
            .unwrap();
        let ip = vdso.start
            + code.windows(2).position(|w| w == crate::arch::native::SYSCALL_INSN).unwrap() as u64;
        let mut inj = Injector::new(pid, ip).unwrap();
        let rwx = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let area = inj
            .syscall(
                libc::SYS_mmap,
                &[0, 1 << 16, rwx, (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64, u64::MAX, 0],
                "mmap",
            )
            .unwrap();
        inj.set_batch_code_area(area).unwrap();
        inj.set_scratch(area + 4096, (1 << 16) - 4096);
        (inj, Killed(pid))
    }

    /// Deferred calls run in front of the next batch, in order, keep their staged memory
    /// across a scratch reset, and fail (or return the unexpected) in the error of whatever
    /// runs them, by their own name.
    #[test]
    fn deferred_calls_run_with_the_next_batch() {
        let (mut inj, child_guard) = traced_child();
        let pid = child_guard.0;
        let me = nix::unistd::getpid().as_raw() as u64;
        let child = pid.as_raw() as u64;

        // Its name set by a deferred call whose argument is staged, then the scratch reset
        // and reused before the flush: the name must still be the one staged.
        let name = inj.stage(b"deferred\0").unwrap();
        inj.defer(vec![
            Call::new(libc::SYS_prctl, &[libc::PR_SET_NAME as u64, name], "naming it").expecting(0)
        ]);
        inj.reset_scratch();
        let other = inj.stage(b"clobbered\0").unwrap();
        assert_ne!(other, name, "the deferred call's memory was handed out again");
        let rounds = ROUND_TRIPS.load(std::sync::atomic::Ordering::Relaxed);
        let got = inj
            .run_batch(&[
                Call::new(libc::SYS_getppid, &[], "getppid"),
                Call::new(libc::SYS_getpid, &[], "getpid"),
            ])
            .unwrap();
        assert_eq!(got, vec![me, child], "results of the batch's own calls only");
        assert_eq!(
            ROUND_TRIPS.load(std::sync::atomic::Ordering::Relaxed),
            rounds + 1,
            "one round trip for deferred and own calls"
        );
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert_eq!(comm.trim(), "deferred");

        // Nothing deferred: flushing costs nothing.
        let rounds = ROUND_TRIPS.load(std::sync::atomic::Ordering::Relaxed);
        inj.flush().unwrap();
        assert_eq!(ROUND_TRIPS.load(std::sync::atomic::Ordering::Relaxed), rounds);

        // A failing deferred call is the error of the batch that ran it, by its name; the
        // batch's own calls did not run.
        inj.defer(vec![Call::new(libc::SYS_close, &[9999], "closing fd 9999")]);
        let e =
            inj.try_batch(&[Call::new(libc::SYS_getpid, &[], "getpid")]).unwrap_err().to_string();
        assert!(e.contains("closing fd 9999") && e.contains("Bad file descriptor"), "{e}");

        // An unexpected result is an error too, also before a single call.
        inj.defer(vec![Call::new(libc::SYS_getpid, &[], "asking its pid").expecting(child + 1)]);
        let e = inj.syscall(libc::SYS_getppid, &[], "getppid").unwrap_err().to_string();
        assert!(e.contains("asking its pid") && e.contains("instead of"), "{e}");

        // A deferred call's result is checked also when the batch's own call then fails.
        inj.defer(vec![
            Call::new(libc::SYS_getpid, &[], "asking its pid again").expecting(child + 1)
        ]);
        let e = inj
            .try_batch(&[Call::new(libc::SYS_close, &[9999], "closing fd 9999")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("asking its pid again"), "{e}");
        // The batch's own failure, after deferred calls that went well, is its to handle.
        inj.defer(vec![Call::new(libc::SYS_getpid, &[], "getpid").expecting(child)]);
        let r = inj
            .try_batch(&[
                Call::new(libc::SYS_getpid, &[], "getpid"),
                Call::new(libc::SYS_close, &[9999], "closing fd 9999"),
            ])
            .unwrap();
        assert_eq!(r, Err((1, libc::EBADF)));

        // A mark is flushed through once, then costs nothing.
        inj.defer(vec![Call::new(libc::SYS_getpid, &[], "getpid").expecting(child)]);
        let mark = inj.deferred_mark();
        inj.flush_through(mark).unwrap();
        let rounds = ROUND_TRIPS.load(std::sync::atomic::Ordering::Relaxed);
        inj.flush_through(mark).unwrap();
        assert_eq!(ROUND_TRIPS.load(std::sync::atomic::Ordering::Relaxed), rounds);
    }
}
