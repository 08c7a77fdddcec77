//! Capturing a process, top to bottom.
//!
//! 1. Freeze: PTRACE_SEIZE + PTRACE_INTERRUPT stop the (single) thread where it is; its
//!    signals are blocked so that nothing runs in it while we look.
//! 2. Look from outside: registers and XSAVE area (ptrace), maps, pagemap, stat, status,
//!    fds (/proc).
//! 3. Look from inside: what only the process can tell about itself (signal dispositions, its
//!    alternate stack, its set_tid_address, its brk) is asked by injecting system calls
//!    into it (`inject`), using a scratch page mapped for the purpose and removed after.
//! 4. Write the image front to back: header, process record, then the pages that exist.
//! 5. Hand the finished image to the caller (which makes it durable), and only then kill the
//!    process — or let it run on, exactly as it was, with `leave_running`. On any failure the
//!    process is let go unchanged.

use std::io::Write;

use anyhow::{bail, Context, Result};
use nix::sys::ptrace as nix_ptrace;
use nix::unistd::Pid;
use telefork_image::{Header, ImageWriter, MmFields, ProcessImage};

use crate::arch::native as arch;
use crate::inject::Injector;
use crate::pages::{self, layout, PageRoute};
use crate::state::{Proc, State};
use crate::{attrs, creds, fds, misc, mm, procfs, ptrace, signals, threads, timers};

/// How `dump` captures: what becomes of the process, how stdio is recorded, how the pages
/// travel.
#[derive(Default)]
pub struct DumpOptions<'a> {
    /// Let the process run on after the image is written, instead of killing it.
    pub leave_running: bool,
    /// Record fds 0/1/2 as inherited from whoever restores (telefork's relayed stdio),
    /// whatever they are now.
    pub inherit_stdio: bool,
    /// Page records without CRCs, for a connection that protects or is trusted to carry
    /// every byte intact (see `ImageWriter::without_page_checksums`); never for a file.
    pub skip_page_checksums: bool,
    /// Let the process hand over its own big runs of memory this way (see `pages::send`).
    /// Needs `skip_page_checksums` (the bytes never pass through here).
    pub page_route: Option<PageRoute<'a>>,
    /// A /proc reader started ahead of time (else one is started for this capture).
    pub outside_reader: Option<&'a OutsideReader>,
    /// The process is a fresh fork of one that keeps running (a telefork): fds whose open
    /// file description it shares with the original and whose sharing cannot be kept across
    /// machines yet (pipes, eventfds, timerfds, signalfds) are refused rather than copied,
    /// and file locks (the original's) are not taken.
    pub fork_copy: bool,
    /// Capture a process that has children (or unreaped zombies) on its own. Without this,
    /// such a process is refused, naming them: process trees are not captured yet, and the
    /// restored process would find its children gone (`wait` gives ECHILD).
    pub ignore_children: bool,
}

/// What `dump` captured.
#[derive(Debug, Clone)]
pub struct DumpSummary {
    /// The process's PID.
    pub pid: i32,
    /// How many mappings the image holds.
    pub vmas: usize,
    /// How many fds the image holds.
    pub fds: usize,
    /// Bytes of memory contents in the image.
    pub page_bytes: u64,
}

const SCRATCH_LEN: u64 = 64 << 10;

/// Captures process `pid` into `out`. `commit` receives the writer once the whole image is in
/// it and must make it durable; only if it succeeds is the process killed (or, with
/// `leave_running`, resumed).
///
/// # Errors
/// [`Error::CannotCarry`](crate::Error::CannotCarry) if the process holds state the engine
/// cannot carry, else [`Error::Failed`](crate::Error::Failed) (an error `commit` returned is
/// in its chain); either way the process runs on as it was.
pub fn dump<W: Write + Send>(
    pid: Pid,
    out: W,
    opts: &DumpOptions,
    commit: impl FnOnce(W) -> Result<()>,
) -> std::result::Result<DumpSummary, crate::Error> {
    Ok(dump_process(pid, out, opts, commit)?)
}

fn dump_process<W: Write + Send>(
    pid: Pid,
    out: W,
    opts: &DumpOptions,
    commit: impl FnOnce(W) -> Result<()>,
) -> Result<DumpSummary> {
    let tids = procfs::list_threads(pid)
        .with_context(|| format!("process {pid} does not exist or cannot be read"))?;
    if tids.len() != 1 {
        let refusal = crate::error::Uncarried::Threads { count: tids.len() };
        return Err(anyhow::Error::new(refusal).context(format!("process {pid}")));
    }
    ptrace::seize_and_stop(pid)?;
    // (Stopped, it can make no new child: what is listed now is all there is.)
    if !opts.ignore_children {
        if let Err(e) = refuse_children(pid, &tids) {
            let _ = nix_ptrace::detach(pid, None);
            return Err(e);
        }
    }
    let regs = ptrace::getregs(pid)?;
    let sigmask = match signals::mask(pid) {
        Ok(m) => m,
        Err(e) => {
            let _ = nix_ptrace::detach(pid, None);
            return Err(e);
        }
    };
    let frozen = Frozen { pid, regs, sigmask };
    let result = signals::block_all(pid).and_then(|_| capture_frozen(&frozen, out, opts));
    match result {
        Ok((w, summary)) => {
            if let Err(e) = commit(w) {
                frozen.release();
                return Err(e);
            }
            if opts.leave_running {
                frozen.release();
            } else {
                ptrace::kill_quietly(pid);
            }
            Ok(summary)
        }
        Err(e) => {
            frozen.release();
            Err(e)
        }
    }
}

/// Refuses a process that has children, naming them: captured alone it would lose them.
fn refuse_children(pid: Pid, tids: &[Pid]) -> Result<()> {
    let children = procfs::list_children(pid, tids)?;
    if children.is_empty() {
        return Ok(());
    }
    let pids: Vec<String> = children.iter().map(i32::to_string).collect();
    let what = match children.len() {
        1 => format!("process {pid} has a child process ({})", pids[0]),
        n => format!("process {pid} has {n} child processes ({})", pids.join(", ")),
    };
    let why = "process trees cannot be captured yet; captured alone, it would find them gone \
               after restore (wait() gives ECHILD, files it shares with them are split). \
               Capture it alone anyway only if that is what it expects (`telefork dump \
               --ignore-children`)";
    Err(crate::error::refusal(what, why))
}

/// A stopped process and what it looked like when stopped.
struct Frozen {
    pid: Pid,
    regs: ptrace::Regs,
    sigmask: u64,
}

impl Frozen {
    /// Puts back the registers and mask and lets the process go, as if nothing happened.
    fn release(&self) {
        let _ = ptrace::setregs(self.pid, self.regs);
        let _ = signals::set_mask(self.pid, self.sigmask);
        let _ = nix_ptrace::detach(self.pid, None);
    }
}

fn capture_frozen<W: Write + Send>(
    f: &Frozen,
    out: W,
    opts: &DumpOptions,
) -> Result<(W, DumpSummary)> {
    let pid = f.pid;
    let mut tl = crate::timeline::Timeline::new();
    // Tracer and tracee on one CPU while calls are injected (see `pin`); the page transfer
    // below wants both CPUs again.
    let pin = crate::pin::CpuPin::with_tracee(pid.as_raw());

    // Look from outside (/proc) and from inside (injected calls): the reader thread starts on
    // /proc at once, on the other CPU, while this thread reads the maps and injects its calls
    // (see `OutsideLook`); then this thread takes what of the outside look is left.
    let started_here;
    let reader = match opts.outside_reader {
        Some(r) => r,
        None => {
            started_here = OutsideReader::start()?;
            &started_here
        }
    };
    let (maps_tx, maps_rx) = std::sync::mpsc::sync_channel(1);
    let look = std::sync::Arc::new(OutsideLook::new(pid, opts));
    // (However this ends, the reader begins nothing more of it afterwards.)
    let _finished = look.finish_on_drop();
    let reader_done = reader.read(&look, maps_rx, pin.others());
    let maps = procfs::read_maps(pid)?;
    let _ = maps_tx.send(maps.clone());
    let cpu = arch::capture(pid, &f.regs)?;
    tl.mark("maps, cpu");
    let syscall_ip = find_syscall_insn(pid, &maps)?;
    let mut inj = Injector::new(pid, syscall_ip)?;
    let inside = look_from_inside(&mut inj, f, cpu)?;
    crate::timeline::stamp("injected calls done");
    // What the reader has not begun yet (all of it if it never started), here.
    look.run(Some(&maps), OutsideLook::LAST_FIRST);
    match reader_done {
        // (Its end. An error: it stopped without saying so — a part it had begun is missing,
        // which `take` reports.)
        Ok(done) => {
            let _ = done.recv();
        }
        Err(_) => tl.note(
            "the /proc reader thread is gone: all of /proc read by the capture's thread".into(),
        ),
    }
    let (comm, creds, misc, mm, mut outside_attrs) = look.proc_files.take()?;
    // (Its status may have been read while it was pinned next to us: the pin knows better.)
    if let Some(had) = pin.tracee_cpus() {
        outside_attrs.cpus = attrs::restricted_cpus(Some(&had))?;
    }
    let mm = MmFields { brk: inside.brk, ..mm };
    let (fds, locks) = look.fds.take()?;
    let vmas = match look.vmas.take() {
        // The scratch area merged with a neighbour while smaps was read: again, now that it
        // is gone (the mappings are the process's own again, those of `maps`).
        Err(e) if e.downcast_ref::<layout::MappingsChanged>().is_some() => {
            layout::capture(pid, &maps)?
        }
        other => other?,
    };
    tl.mark("from inside and outside");
    let image = ProcessImage {
        pid: pid.as_raw(),
        comm,
        creds,
        misc,
        mm,
        vmas,
        threads: vec![inside.thread],
        sigactions: inside.sigactions,
        shared_pending: inside.shared_pending,
        fds,
        timers: inside.timers,
        attrs: outside_attrs.into_attrs(inside.attrs),
        locks,
    };
    let header = Header {
        arch: arch::ARCH,
        page_size: pages::PAGE,
        kernel_release: crate::sys::kernel_release(),
        xfeatures: arch::xfeatures(&image.threads[0].cpu),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        hostname: nix::sys::utsname::uname()
            .map(|u| u.nodename().to_string_lossy().into_owned())
            .unwrap_or_default(),
    };

    pin.release();
    let mut w = ImageWriter::new(out, &header).context("writing the image header")?;
    if opts.skip_page_checksums {
        w = w.without_page_checksums();
    }
    w.write_process(&image).context("writing the process record")?;
    // On its way now: a restorer at the other end of a connection creates the mappings and
    // sets up everything else while we read the pages.
    w.flush().context("sending the process record")?;
    let route =
        opts.page_route.as_ref().filter(|_| opts.skip_page_checksums).map(|r| (&mut inj, r));
    let page_bytes = pages::send(pid, &image.vmas, &mut w, route)?;
    tl.mark("pages");
    let out = w.finish().context("finishing the image")?;
    tl.mark("sent");
    tl.report("capture");
    let summary =
        DumpSummary { pid: pid.as_raw(), vmas: image.vmas.len(), fds: image.fds.len(), page_bytes };
    Ok((out, summary))
}

/// A thread that reads a stopped process's /proc files (`OutsideLook`) while the capture
/// reads its maps and injects its calls. Started ahead of time where a capture is expected:
/// starting a thread in a freshly forked daemon session took 0.1-0.5 ms on the machines
/// measured, as long as the reading itself.
/// Dropping it ends the thread's loop; the thread is not joined (waiting for an idle thread
/// to be scheduled just to end cost a busy session 0.1-0.3 ms before it could relay).
pub struct OutsideReader {
    jobs: std::sync::mpsc::Sender<OutsideJob>,
    /// Its thread ID, once it runs (0 before: nobody waits for it to start).
    tid: std::sync::Arc<std::sync::atomic::AtomicI32>,
}

struct OutsideJob {
    look: std::sync::Arc<OutsideLook>,
    /// The mappings, once the capture has read them.
    maps: std::sync::mpsc::Receiver<Vec<procfs::MapsEntry>>,
    /// CPUs to move to first (when they could not be set from outside).
    cpus: Option<nix::sched::CpuSet>,
    done: std::sync::mpsc::SyncSender<()>,
}

impl OutsideReader {
    /// Starts the thread.
    ///
    /// # Errors
    /// If the thread cannot be started.
    pub fn start() -> std::result::Result<OutsideReader, crate::Error> {
        // (What every capture compares against, read once now rather than during one.)
        crate::attrs::warm_up();
        let (jobs, next_job) = std::sync::mpsc::channel::<OutsideJob>();
        let tid = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
        let its_tid = tid.clone();
        std::thread::Builder::new()
            .name("proc-reader".into())
            .spawn(move || {
                its_tid.store(nix::unistd::gettid().as_raw(), std::sync::atomic::Ordering::SeqCst);
                for job in next_job {
                    if let Some(cpus) = &job.cpus {
                        crate::pin::set_affinity(0, cpus);
                    }
                    // /proc files first (no maps needed), then the mappings (by then read).
                    job.look.run(None, OutsideLook::PROC_FILES_FIRST);
                    let maps = job.maps.recv().ok();
                    job.look.run(maps.as_deref(), OutsideLook::PROC_FILES_FIRST);
                    let _ = job.done.send(());
                }
            })
            .context("starting the thread that reads /proc")?;
        Ok(OutsideReader { jobs, tid })
    }

    /// Has the thread work on `look` on the CPUs `cpus`, taking the mappings from `maps`;
    /// the channel returned says when it has stopped.
    fn read(
        &self,
        look: &std::sync::Arc<OutsideLook>,
        maps: std::sync::mpsc::Receiver<Vec<procfs::MapsEntry>>,
        cpus: Option<nix::sched::CpuSet>,
    ) -> Result<std::sync::mpsc::Receiver<()>> {
        // (Set while it sleeps, it wakes up there: no migration.)
        let tid = self.tid.load(std::sync::atomic::Ordering::SeqCst);
        let cpus = cpus.filter(|cpus| tid == 0 || !crate::pin::set_affinity(tid, cpus));
        let (done, stopped) = std::sync::mpsc::sync_channel(1);
        let job = OutsideJob { look: look.clone(), maps, cpus, done };
        self.jobs.send(job).map_err(|_| anyhow::anyhow!("the thread reading /proc is gone"))?;
        Ok(stopped)
    }
}

/// What /proc tells about a stopped process, in three parts that two threads share: each
/// part is taken by whichever thread comes to it first (the reader from the front, the
/// capture's thread from the back once its injected calls are done), so neither waits
/// while the other has work left, whatever the machine's load.
struct OutsideLook {
    pid: Pid,
    inherit_stdio: bool,
    leave_running: bool,
    fork_copy: bool,
    /// Bit per part: taken by a thread.
    taken: std::sync::atomic::AtomicU8,
    proc_files: Part<ProcFiles>,
    vmas: Part<Vec<telefork_image::Vma>>,
    fds: Part<(Vec<telefork_image::Fd>, Vec<telefork_image::FileLock>)>,
}

/// One part's result, once a thread has made it.
struct Part<T>(std::sync::Mutex<Option<Result<T>>>);

impl<T> Default for Part<T> {
    fn default() -> Self {
        Part(std::sync::Mutex::new(None))
    }
}

impl<T> Part<T> {
    fn put(&self, r: Result<T>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    fn take(&self) -> Result<T> {
        let made = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        made.context("a part of the look at /proc was not made: the thread reading it stopped")?
    }
}

impl OutsideLook {
    const PROC_FILES: u8 = 0;
    const VMAS: u8 = 1;
    const FDS: u8 = 2;
    /// The reader's order: stat, status and the rest need no maps, smaps (the longest) next.
    const PROC_FILES_FIRST: [u8; 3] = [Self::PROC_FILES, Self::VMAS, Self::FDS];
    /// The capture thread's order, from the other end.
    const LAST_FIRST: [u8; 3] = [Self::FDS, Self::VMAS, Self::PROC_FILES];

    /// Marks every part taken when dropped, so that a thread that comes to one later (the
    /// reader, after a capture that failed or ended without it) leaves it alone.
    fn finish_on_drop(&self) -> impl Drop + '_ {
        struct Finish<'a>(&'a OutsideLook);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.taken.fetch_or(u8::MAX, std::sync::atomic::Ordering::SeqCst);
            }
        }
        Finish(self)
    }

    fn new(pid: Pid, opts: &DumpOptions) -> OutsideLook {
        OutsideLook {
            pid,
            inherit_stdio: opts.inherit_stdio,
            leave_running: opts.leave_running,
            fork_copy: opts.fork_copy,
            taken: std::sync::atomic::AtomicU8::new(0),
            proc_files: Part::default(),
            vmas: Part::default(),
            fds: Part::default(),
        }
    }

    /// Makes every part in `order` no thread has taken yet, stopping before the mappings'
    /// part without `maps` (the parts from there on are for later, or for the other thread).
    fn run(&self, maps: Option<&[procfs::MapsEntry]>, order: [u8; 3]) {
        for part in order {
            if part == Self::VMAS && maps.is_none() {
                return;
            }
            let bit = 1 << part;
            if self.taken.fetch_or(bit, std::sync::atomic::Ordering::SeqCst) & bit != 0 {
                continue;
            }
            let what = match (part, maps) {
                (Self::PROC_FILES, _) => {
                    self.proc_files.put(read_proc_files(self.pid));
                    "/proc files read"
                }
                (Self::VMAS, Some(maps)) => {
                    self.vmas.put(layout::capture(self.pid, maps));
                    "mappings read"
                }
                _ => {
                    let from = fds::FdsLook {
                        pid: self.pid,
                        inherit_stdio: self.inherit_stdio,
                        leave_locks: self.leave_running || self.fork_copy,
                        fork_copy: self.fork_copy,
                    };
                    self.fds.put(fds::Fds::capture(from));
                    "fds read"
                }
            };
            crate::timeline::stamp(what);
        }
    }
}

/// comm, credentials, the small per-process state, the mm fields (but the break), and the
/// attributes read from outside.
type ProcFiles =
    (String, telefork_image::Creds, telefork_image::Misc, MmFields, attrs::OutsideAttrs);

/// What /proc/PID/stat and status tell (each read once, for all that is in them), with a
/// few more files.
fn read_proc_files(pid: Pid) -> Result<ProcFiles> {
    let stat = procfs::read_stat(pid)?;
    let status = procfs::read_status(pid)?;
    let from = Proc { pid, stat: &stat, status: &status };
    let creds = creds::Credentials::capture(from)?;
    let (misc, comm) = misc::MiscState::capture(from)?;
    let mm = mm::Mm::capture(from)?;
    let outside = attrs::OutsideAttrs::capture(pid, &stat, &status)?;
    Ok((comm, creds, misc, mm, outside))
}

/// What the capture asked the process itself.
struct Inside {
    brk: u64,
    sigactions: Vec<telefork_image::SigAction>,
    shared_pending: Vec<telefork_image::SigInfo>,
    thread: telefork_image::ThreadState,
    timers: telefork_image::Timers,
    attrs: telefork_image::Attrs,
}

/// What only the process itself can tell (injected calls into a scratch area mapped for
/// the while): its break, signal dispositions and pending signals, thread state, timers and
/// attributes.
fn look_from_inside(
    inj: &mut Injector,
    f: &Frozen,
    cpu: telefork_image::CpuState,
) -> Result<Inside> {
    let pid = f.pid;
    // Scratch memory, executable if the system allows, so the batch runner can live in its
    // first page (else every call is injected on its own).
    let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let (scratch, executable) = match inj.syscall_raw(
        libc::SYS_mmap,
        &[0, SCRATCH_LEN, rw | libc::PROT_EXEC as u64, anon, u64::MAX, 0],
    )? {
        a if a > 0 => (a as u64, true),
        _ => (
            inj.syscall(
                libc::SYS_mmap,
                &[0, SCRATCH_LEN, rw, anon, u64::MAX, 0],
                "mapping scratch memory in the target",
            )?,
            false,
        ),
    };
    if executable {
        inj.set_batch_code_area(scratch)?;
        inj.set_scratch(scratch + pages::PAGE, SCRATCH_LEN - pages::PAGE);
    } else {
        inj.set_scratch(scratch, SCRATCH_LEN);
    }
    // One batch: the break, the 62 dispositions, the alternate stack, the clear_child_tid
    // pointer (their results in the scratch area, read after).
    let inside = (|| -> Result<_> {
        inj.reset_scratch();
        let (mut calls, actions) = signals::capture_calls(inj)?;
        let (thread_calls, thread_reads) = threads::capture_calls(inj)?;
        calls.extend(thread_calls);
        let brk_at = calls.len();
        calls.push(mm::brk_call());
        let timers_at = calls.len();
        let (timer_calls, timer_reads) = timers::capture_calls(inj, pid)?;
        calls.extend(timer_calls);
        // (The attributes' calls last: those an older kernel lacks are at the very end.)
        let attrs_at = calls.len();
        let (attr_calls, attr_reads) = attrs::capture_calls(inj)?;
        calls.extend(attr_calls);
        let mut results = match inj.batch_until_failure(&calls)? {
            (results, None) => results,
            (mut results, Some((i, libc::EINVAL)))
                if i >= attrs_at && attrs::optional_call(i - attrs_at) =>
            {
                // A getter this kernel lacks: never set. The rest one by one, the same way.
                results.push(0);
                for c in &calls[i + 1..] {
                    let r = inj.syscall_raw(c.nr, &c.args)?;
                    results.push(if r == -(libc::EINVAL as i64) { 0 } else { r as u64 });
                }
                results
            }
            (_, Some((i, errno))) => {
                bail!("{}: {}", calls[i].what, std::io::Error::from_raw_os_error(errno))
            }
        };
        let brk = *results.get(brk_at).context("internal error: no result of brk(0)")?;
        let (sigactions, shared_pending) = signals::Signals::capture((inj, actions))?;
        let look = threads::ThreadLook { inj, sigmask: f.sigmask, cpu, reads: thread_reads };
        let thread = threads::Thread::capture(look)?;
        let attr_results = results.split_off(attrs_at);
        let look = timers::TimerLook { inj, results: &results[timers_at..], reads: timer_reads };
        let timers = timers::TimerState::capture(look)?;
        let look = attrs::AttrLook { pid, inj, results: &attr_results, reads: attr_reads };
        let attrs = attrs::AttrState::capture(look)?;
        Ok(Inside { brk, sigactions, shared_pending, thread, timers, attrs })
    })();
    inj.syscall(
        libc::SYS_munmap,
        &[scratch, SCRATCH_LEN],
        "unmapping scratch memory in the target",
    )?;
    ptrace::setregs(pid, f.regs)?;
    inside
}

/// Finds a `syscall` instruction the target can run: in its `[vdso]` (always there, never
/// written), else in any executable mapping.
fn find_syscall_insn(pid: Pid, maps: &[procfs::MapsEntry]) -> Result<u64> {
    let mem = procfs::open_mem(pid, false)?;
    let mut candidates: Vec<&procfs::MapsEntry> =
        maps.iter().filter(|m| m.name == "[vdso]").collect();
    candidates.extend(
        maps.iter().filter(|m| m.exec && m.read && m.name != "[vdso]" && m.name != "[vsyscall]"),
    );
    for m in candidates {
        let len = (m.end - m.start).min(1 << 20) as usize;
        let mut buf = vec![0u8; len];
        use std::os::unix::fs::FileExt;
        if mem.read_exact_at(&mut buf, m.start).is_err() {
            continue;
        }
        if let Some(i) = buf.windows(2).position(|w| w == arch::SYSCALL_INSN) {
            return Ok(m.start + i as u64);
        }
    }
    bail!("no syscall instruction found in process {pid}'s executable mappings")
}
