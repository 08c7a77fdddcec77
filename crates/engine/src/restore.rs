//! Restoring a process, top to bottom.
//!
//! 1. Check the image against this machine before anything is created: architecture, page
//!    size, CPU features, kernel build (for the vDSO), nothing its owner could not have had
//!    (`bounds`), every mapped file still the same.
//! 2. Make the new process (a `Stub`, made ahead of time — while the image is on its way, or
//!    while the last restored process runs — or now): a fork of this command (clone3, with
//!    the image's PID when that PID is free), or of a `StubTemplate`, which stops under our
//!    ptrace at once. It never runs a line of its own code again: from
//!    here on we drive it by injecting system calls (`inject`), mostly in batches.
//! 3. Empty it: a small control area (a `syscall` instruction, the batch runner and scratch
//!    memory) is mapped where the image has nothing, the kernel's `[vdso]`/`[vvar]` pages are set
//!    aside, and every other mapping of the fork is unmapped.
//! 4. Shape it: the `[vdso]`/`[vvar]` pages moved to the image's addresses, the image's mappings
//!    created; mm fields, cwd/umask/limits, fds and signal actions set while the pages are
//!    still coming; the pages placed (a big process's through its userfaultfd where it can be had),
//!    protections set; thread state and credentials last, in one batch. Calls whose results
//!    nothing waits for (moves, mappings, mm fields, signal actions, protections) are
//!    deferred to run with the next batch: a small restore takes 6 ptrace round trips.
//! 5. Let it go: the control area is unmapped (the last injected call), the registers, XSAVE
//!    area and blocked mask are set, and ptrace detaches. The process continues where it was
//!    captured.
//!
//! Any failure before step 5 kills the half-made process (PTRACE_O_EXITKILL covers our own
//! death too): nothing half-restored ever runs.

use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::{bail, Context, Result};
use nix::sys::ptrace as nix_ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use telefork_image::{Header, ImageReader, ProcessImage, SpecialMap, Vma, VmaKind};

use crate::arch::native as arch;
use crate::inject::{Call, Injector};
use crate::pages::{self, layout, Placement, Placer, PAGE};
use crate::pin::CpuPin;
use crate::state::State;
use crate::timeline::Timeline;
use crate::{attrs, bounds, creds, fds, locks, misc, mm, procfs, ptrace, signals, threads, timers};

/// How `restore` rebuilds a process: whose rights bound it, where its stdio and pages come
/// from.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions<'a> {
    /// Fds to become the restored process's 0/1/2 where the image says "inherited"; by
    /// default the caller's own 0/1/2.
    pub stdio: Option<[BorrowedFd<'a>; 3]>,
    /// Who the image belongs to, (uid, gid): the owner of the image file, or the user an
    /// authenticated sender vouched for. The restore never grants more than this user could
    /// have had here (`bounds`). `None`: the restorer's own rights bound it — so a root
    /// restorer trusts the image as it is (`telefork restore --trust-image`).
    pub expect_owner: Option<(u32, u32)>,
    /// The groups the owner has on this machine; by default looked up from its name.
    pub allowed_groups: Option<Vec<u32>>,
    /// Accept page records without CRCs: the image arrives on a connection that
    /// authenticates every byte (TLS) or is trusted by configuration.
    pub skip_page_checksums: bool,
    /// The image arrives unbuffered on this socket with a page index (the plain transport):
    /// the new process receives its pages from it itself (`Placement::SelfReceive`). Needs
    /// `skip_page_checksums`.
    pub pages_socket: Option<pages::PagesSocket<'a>>,
    /// Put the process into the cgroups it was in at capture (a restore on the machine it
    /// was captured on), refusing the restore where one does not exist; else it stays in the
    /// restorer's (see `cgroups`).
    pub join_cgroups: bool,
    /// The restored process gets this parent-death signal, set after its credentials (a
    /// change of credentials clears it): a daemon's session has its process die with it, so
    /// that a killed session never leaves a process nobody can wait for. None: none, as a
    /// process started by `restore` (which must outlive a `restore --detach`).
    pub parent_death_signal: Option<i32>,
}

/// The process `restore` made, running.
#[derive(Debug, Clone)]
pub struct Restored {
    /// PID of the restored process (a child of the calling process).
    pub pid: Pid,
    /// Whether it got the PID it had at capture.
    pub same_pid: bool,
    /// How its pages were placed: how many, through the userfaultfd, in huge pages, or
    /// received by the process itself (`RestoreOptions::pages_socket`).
    pub pages: pages::Placed,
}

/// Size of the control area: one page of code, the rest scratch.
const CONTROL_LEN: u64 = 128 << 10;

/// Distance kept between the control/parking areas and the image's mappings (stack guard
/// gaps).
const GUARD_GAP: u64 = 1 << 20;

/// Restores the image read from `input` into a new process, a child of the caller, and lets
/// it run.
///
/// # Errors
/// [`Error::CannotCarry`](crate::Error::CannotCarry) if the image holds state this machine
/// cannot give back, else [`Error::Failed`](crate::Error::Failed) (an image that asks for
/// more than its owner could have had: [`Error::beyond_owner`](crate::Error::beyond_owner)).
/// Nothing half-restored is left running.
pub fn restore<R: Read + Send>(
    input: R,
    opts: &RestoreOptions,
) -> std::result::Result<Restored, crate::Error> {
    restore_into(None, input, opts)
}

/// Restores the image from `input` into `stub` if one was made ahead of time, else into a new
/// one. A prepared stub whose control area happens to lie where the image has memory is set
/// aside for a new one.
///
/// # Errors
/// As [`restore`].
pub fn restore_into<R: Read + Send>(
    stub: Option<Stub>,
    input: R,
    opts: &RestoreOptions,
) -> std::result::Result<Restored, crate::Error> {
    Ok(restore_image(stub, input, opts)?)
}

fn restore_image<R: Read + Send>(
    stub: Option<Stub>,
    input: R,
    opts: &RestoreOptions,
) -> Result<Restored> {
    let (mut reader, header) = ImageReader::new(input)?;
    crate::timeline::stamp("restore header read");
    if opts.skip_page_checksums {
        reader.skip_page_checksums();
    }
    check_header(&header)?;
    let img = reader.process()?;
    check_layout(&img, &header)?;
    check_owner(&img, opts)?;
    check_files(&img)?;
    crate::timeline::stamp("restore record read");

    let mut tl = Timeline::new();
    let mut stub = match stub {
        Some(s) if !s.collides_with(&img.vmas) => {
            tl.note("into a stub prepared ahead of time".to_string());
            s
        }
        other => {
            drop(other); // (a prepared stub in the way: gone before its replacement is made)
            let s = Stub::spawn(img.pid, opts.stdio, &img.vmas)?;
            tl.mark("spawn and empty the stub");
            s
        }
    };
    let r = shape(&mut stub, &img, &mut reader, opts, &mut tl);
    let restored = r.map(|pages| {
        stub.done = true; // it runs on its own now
        Restored { pid: stub.pid, same_pid: stub.same_pid, pages }
    });
    drop(stub); // (kills it unless done)
    tl.report("restore");
    restored
}

/// A process ready to become an image's process: forked from us, stopped under our ptrace,
/// emptied down to a control area (a `syscall` instruction, the batch runner, scratch
/// memory) and the kernel's special pages set aside in a parking area. Making one takes
/// about half of a small restore, so a destination makes it ahead of time: while the image is
/// on its way, or while the last process it restored runs.
/// Dropped unused, the process is killed.
pub struct Stub {
    pid: Pid,
    same_pid: bool,
    inj: Injector,
    control: u64,
    /// Where the kernel's `[vdso]`/`[vvar]` pages wait: (kind, address, length).
    parked: Vec<(SpecialMap, u64, u64)>,
    parking: (u64, u64),
    /// Restored and let go: not to be killed.
    done: bool,
}

impl Stub {
    /// A stub for an image not seen yet (so with a PID of its own, as a forked child has).
    /// `stdio` becomes its 0/1/2 where the image says "inherited".
    ///
    /// # Errors
    /// If the process cannot be made (nothing is left behind).
    pub fn prepare(stdio: Option<[BorrowedFd<'_>; 3]>) -> std::result::Result<Stub, crate::Error> {
        Ok(Stub::spawn(0, stdio, &[])?)
    }

    /// Forks and empties a stub whose control and parking areas avoid `vmas`, with PID
    /// `want_pid` if that is free (and not 0).
    fn spawn(want_pid: i32, stdio: Option<[BorrowedFd<'_>; 3]>, vmas: &[Vma]) -> Result<Stub> {
        // (Pinned with the stub while we empty it, see `pin`; dropping the pin unpins us.)
        let _pin = CpuPin::here();
        let (pid, same_pid) = spawn_stub(want_pid, stdio)?;
        match empty(pid, same_pid, vmas) {
            Ok(stub) => Ok(stub),
            Err(e) => {
                ptrace::kill_quietly(pid);
                Err(e)
            }
        }
    }

    /// A stub forked from `template`, with `stdio` (fds of this process) as its fds 0, 1, 2.
    /// The fork is made a child of ours (CLONE_PARENT) and taken under our ptrace at once.
    ///
    /// # Errors
    /// If the fork fails (nothing is left behind; the template may be unusable after).
    pub fn fork_from(
        template: &mut StubTemplate,
        stdio: [BorrowedFd<'_>; 3],
    ) -> std::result::Result<Stub, crate::Error> {
        Ok(Stub::fork_template(template, stdio)?)
    }

    fn fork_template(template: &mut StubTemplate, stdio: [BorrowedFd<'_>; 3]) -> Result<Stub> {
        let t = &mut template.stub;
        let _pin = CpuPin::here();
        crate::pin::move_here(t.pid.as_raw());
        let child = t.inj.syscall(
            libc::SYS_clone,
            &[libc::CLONE_PARENT as u64, 0, 0, 0, 0],
            "forking the stub template: clone",
        )?;
        let pid = Pid::from_raw(child as i32);
        let made = (|| -> Result<Stub> {
            // (Killed with us from the first moment: EXITKILL with the seize.)
            ptrace::seize_and_stop_with(pid, nix_ptrace::Options::PTRACE_O_TRACESYSGOOD | nix_ptrace::Options::PTRACE_O_EXITKILL)
                .context("taking the forked stub under ptrace (it exits with status 125 if its restorer is gone)")?;
            let mut inj = Injector::new(pid, t.control)?;
            inj.set_batch_code_area(t.control + 64)?;
            inj.set_scratch(t.control + PAGE, CONTROL_LEN - PAGE);
            // Its stdio taken from us (pidfd_getfd: it has no fds, so the numbers are known:
            // the pidfd is 0, the fds taken 1, 2, 3), the pidfd replaced by stdin.
            let me = nix::unistd::getpid().as_raw() as u64;
            let [stdin, stdout, stderr] = stdio.map(|fd| fd.as_raw_fd() as u64);
            let calls = [
                Call::new(
                    libc::SYS_pidfd_open,
                    &[me, 0],
                    "opening a pidfd of the restorer: pidfd_open",
                ),
                Call::new(
                    libc::SYS_pidfd_getfd,
                    &[0, stdout, 0],
                    "taking stdout from the restorer: pidfd_getfd",
                ),
                Call::new(
                    libc::SYS_pidfd_getfd,
                    &[0, stderr, 0],
                    "taking stderr from the restorer: pidfd_getfd",
                ),
                Call::new(
                    libc::SYS_pidfd_getfd,
                    &[0, stdin, 0],
                    "taking stdin from the restorer: pidfd_getfd",
                ),
                Call::new(libc::SYS_dup3, &[3, 0, 0], "making it fd 0: dup3"),
                Call::new(libc::SYS_close, &[3], "closing the spare copy"),
                // (Their close-on-exec flags are set from the image by `fds::restore`.)
            ];
            let got = inj.run_batch(&calls)?;
            if got[..4] != [0, 1, 2, 3] {
                bail!("the forked stub's fds came out as {:?}, not 0-3", &got[..4]);
            }
            Ok(Stub {
                pid,
                same_pid: false,
                inj,
                control: t.control,
                parked: t.parked.clone(),
                parking: t.parking,
                done: false,
            })
        })();
        if made.is_err() {
            ptrace::kill_quietly(pid);
        }
        made
    }

    /// Whether the control or parking area lies where `vmas` need room.
    fn collides_with(&self, vmas: &[Vma]) -> bool {
        let ours = [(self.control, self.control + CONTROL_LEN), self.parking];
        vmas.iter().any(|v| ours.iter().any(|&area| !clear_of(area, (v.start, v.end))))
    }
}

/// A stub kept to fork further stubs from (`Stub::fork_from`): emptied once and without
/// fds, so that a fork of it has nothing to unmap and nothing of the restorer's to close —
/// ~0.1 ms instead of ~0.5-0.8 ms for a stub forked from a destination session and emptied.
/// Stopped under the ptrace of the thread that made it (only that thread may use it) until
/// dropped, when it is killed.
pub struct StubTemplate {
    stub: Stub,
}

impl StubTemplate {
    /// Makes the template (a stub emptied once, without fds).
    ///
    /// # Errors
    /// If the process cannot be made (nothing is left behind).
    pub fn new() -> std::result::Result<StubTemplate, crate::Error> {
        Ok(StubTemplate::make()?)
    }

    fn make() -> Result<StubTemplate> {
        let mut stub = Stub::spawn(0, None, &[])?;
        let code = arch::fork_child_code(nix::unistd::getpid().as_raw() as u32);
        stub.inj.write_mem(stub.control + arch::SYSCALL_INSN.len() as u64, &code)?;
        stub.inj.syscall(
            libc::SYS_close_range,
            &[0, u32::MAX as u64, 0],
            "closing the stub template's fds: close_range(0, ~0)",
        )?;
        Ok(StubTemplate { stub })
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        if !self.done {
            ptrace::kill_quietly(self.pid);
        }
    }
}

/// The image must ask for nothing its owner could not have had (`bounds`).
fn check_owner(img: &ProcessImage, opts: &RestoreOptions) -> Result<()> {
    let owner = match (opts.expect_owner, &opts.allowed_groups) {
        (Some((uid, gid)), Some(groups)) => bounds::Owner { uid, gid, groups: groups.clone() },
        (Some((uid, gid)), None) => bounds::Owner::of(uid, gid),
        (None, groups) => {
            let mut o = bounds::Owner::restorer();
            if let Some(g) = groups {
                o.groups.clone_from(g);
            }
            o
        }
    };
    bounds::check_image_within_owner(img, &owner)
}

fn check_header(h: &Header) -> Result<()> {
    if h.arch != arch::ARCH {
        bail!("image is for {:?}, this machine is {:?}", h.arch, arch::ARCH);
    }
    if h.page_size != PAGE {
        bail!("image uses {}-byte pages, this machine {PAGE}", h.page_size);
    }
    arch::check_cpu(h.xfeatures)
}

fn check_layout(img: &ProcessImage, h: &Header) -> Result<()> {
    if img.threads.len() != 1 {
        let what = format!("image has {} threads", img.threads.len());
        return Err(crate::error::refusal(
            what,
            "only single-threaded images can be restored so far",
        ));
    }
    layout::validate(&img.vmas)?;
    let has_vdso = img.vmas.iter().any(|v| matches!(v.kind, VmaKind::Special(SpecialMap::Vdso)));
    let here = crate::sys::kernel_release();
    if has_vdso && h.kernel_release != here {
        let what =
            format!("image was made on kernel {} and this is kernel {here}", h.kernel_release);
        let why =
            "its [vdso] cannot be reused (relocating the vDSO across kernels is not supported yet)";
        return Err(crate::error::refusal(what, why));
    }
    Ok(())
}

/// Every mapped file and the executable must be the same file as at capture, looked at as
/// the image's process will reach them (its filesystem ids and groups, `bounds`): what
/// root alone could see is none of the image's business.
fn check_files(img: &ProcessImage) -> Result<()> {
    bounds::with_files_reached_as(&img.creds, || {
        for v in &img.vmas {
            if let VmaKind::File(id) = &v.kind {
                layout::check_file(id, "mapped file")?;
            }
        }
        if let Some(id) = &img.mm.exe_id {
            layout::check_file(id, "executable")?;
        }
        Ok(())
    })
}

/// How long a restore waits for its PID to be freed by a zombie holding it: the dumped
/// process's own, until its parent (or, orphaned, init — 1–2 s late on some machines) reaps it.
const ZOMBIE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Waits (at most `ZOMBIE_WAIT`) while PID `pid` is held by a zombie; returns at once if it
/// is free or held by a live process, which will not give it up.
fn wait_while_zombie(pid: i32) {
    if pid <= 0 {
        return;
    }
    let deadline = std::time::Instant::now() + ZOMBIE_WAIT;
    while crate::sys::procfs::read_stat(Pid::from_raw(pid)).is_ok_and(|s| s.state() == Some('Z'))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Forks this command into a child that stops under our ptrace before running anything else.
/// With the image's PID if free (clone3 set_tid needs CAP_CHECKPOINT_RESTORE), else any.
fn spawn_stub(want_pid: i32, stdio: Option<[BorrowedFd<'_>; 3]>) -> Result<(Pid, bool)> {
    wait_while_zombie(want_pid);
    let (r, same) =
        crate::sys::fork::fork_stopped_child(want_pid, stdio.map(|s| s.map(|fd| fd.as_raw_fd())))
            .context("creating the process to restore into (clone3)")?;
    let pid = Pid::from_raw(r);
    match waitpid(pid, Some(WaitPidFlag::__WALL)) {
        Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => {}
        Ok(WaitStatus::Exited(_, code)) => {
            let why = match code {
                124 => "closing the restorer's fds (close_range, Linux 5.9+) failed",
                125 => "its restorer went away",
                126 => "giving it its stdio (dup2) failed",
                _ => "it exited",
            };
            bail!("the process to restore into ended before it stopped: {why} (status {code})");
        }
        other => {
            ptrace::kill_quietly(pid);
            bail!("the process to restore into did not stop as expected: {other:?}");
        }
    }
    let opts = nix_ptrace::Options::PTRACE_O_TRACESYSGOOD | nix_ptrace::Options::PTRACE_O_EXITKILL;
    if let Err(e) = nix_ptrace::setoptions(pid, opts) {
        ptrace::kill_quietly(pid);
        return Err(e).context("PTRACE_SETOPTIONS on the process to restore into");
    }
    Ok((pid, same))
}

/// Step 3: empties a freshly spawned stub (see `Stub`), keeping clear of `vmas`. (On an
/// error the caller kills the process.)
fn empty(pid: Pid, same_pid: bool, vmas: &[Vma]) -> Result<Stub> {
    signals::block_all(pid)?;
    let mut inj = Injector::new(pid, arch::own_syscall_insn())?;

    let stub_maps = procfs::read_maps(pid)?;
    let specials = stub_specials(&stub_maps);
    let special_total: u64 = specials.iter().map(|(_, s, e)| e - s).sum();
    let control = free_area(vmas, &stub_maps, &[], CONTROL_LEN)?;
    let parking =
        free_area(vmas, &stub_maps, &[(control, control + CONTROL_LEN)], special_total.max(PAGE))?;
    inj.syscall(
        libc::SYS_mmap,
        &[
            control,
            CONTROL_LEN,
            (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
            u64::MAX,
            0,
        ],
        "mapping the control area",
    )?;
    inj.write_mem(control, &arch::SYSCALL_INSN)?;
    inj.set_syscall_ip(control);
    inj.set_batch_code_area(control + 64)?;
    inj.set_scratch(control + PAGE, CONTROL_LEN - PAGE);

    // One batch: the inherited rseq registration dropped (its area is about to vanish, and
    // the kernel writes into it on every return to user mode), the kernel's special pages
    // parked, everything else of the fork unmapped.
    let mut calls = Vec::new();
    if let Some(r) = ptrace::rseq_config(pid)? {
        const RSEQ_FLAG_UNREGISTER: u64 = 1;
        calls.push(Call::new(
            libc::SYS_rseq,
            &[r.abi_pointer, r.abi_size as u64, RSEQ_FLAG_UNREGISTER, r.signature as u64],
            "unregistering the inherited rseq area",
        ));
    }
    let mut parked = Vec::new();
    let mut at = parking;
    for (kind, s, e) in &specials {
        calls.push(move_call(*s, e - s, at, format!("parking the kernel's {kind:?} at {at:#x}")));
        parked.push((*kind, at, e - s));
        at += e - s;
    }
    // Everything but the control and parking areas, in as few calls as there are gaps
    // between them (munmap takes holes and many mappings in one range).
    const TASK_SIZE: u64 = 0x7fff_ffff_f000;
    let parking_end = at.max(parking + PAGE);
    let mut keep = [(control, control + CONTROL_LEN), (parking, parking_end)];
    keep.sort_unstable();
    let mut from = 0u64;
    for (s, e) in keep.into_iter().chain([(TASK_SIZE, TASK_SIZE)]) {
        if s > from {
            calls.push(Call::new(
                libc::SYS_munmap,
                &[from, s - from],
                format!("unmapping {from:#x}-{s:#x} of the fork"),
            ));
        }
        from = from.max(e);
    }
    // (Anything left would make create_mappings' MAP_FIXED_NOREPLACE fail, loudly.)
    inj.run_batch(&calls)?;
    Ok(Stub { pid, same_pid, inj, control, parked, parking: (parking, parking_end), done: false })
}

/// Steps 4 and 5: turns an emptied stub into the image's process and lets it go.
fn shape<R: Read + Send>(
    stub: &mut Stub,
    img: &ProcessImage,
    reader: &mut ImageReader<R>,
    opts: &RestoreOptions,
    tl: &mut Timeline,
) -> Result<pages::Placed> {
    let pages_socket = opts.pages_socket.as_ref();
    let (pid, control) = (stub.pid, stub.control);
    // Tracer and stub on one CPU while the stub is rebuilt (see `pin`): the CPU this thread
    // runs on now (a prepared stub was made wherever we ran then). The stub gets our
    // original CPU set back at the end.
    let cpus = CpuPin::here();
    crate::pin::move_here(pid.as_raw());
    let inj = &mut stub.inj;
    let parked = &stub.parked;
    // 4. Shape it. The kernel's special pages to the image's addresses.
    let mut moves = Vec::new();
    for (kind, at, len) in parked {
        match img.vmas.iter().find(|v| v.kind == VmaKind::Special(*kind)) {
            Some(v) if v.end - v.start == *len => {
                if *at != v.start {
                    moves.push(move_call(
                        *at,
                        *len,
                        v.start,
                        format!("moving the kernel's {kind:?} to {:#x}", v.start),
                    ));
                }
            }
            Some(v) => {
                let what = format!(
                    "the image's {kind:?} is {} bytes, this kernel's is {len}",
                    v.end - v.start
                );
                return Err(crate::error::refusal(what, "not the same kernel build"));
            }
            None => moves.push(Call::new(
                libc::SYS_munmap,
                &[*at, *len],
                "unmapping an unused kernel special mapping",
            )),
        }
    }
    // (Deferred, as is what follows up to the files' opening: they share its round trip.)
    inj.defer(moves);
    for v in &img.vmas {
        if let VmaKind::Special(k) = v.kind {
            if k != SpecialMap::Vsyscall && !parked.iter().any(|(pk, _, _)| *pk == k) {
                let what = format!("the image uses {k:?}");
                return Err(crate::error::refusal(what, "this kernel does not provide it"));
            }
        }
    }
    tl.mark("kernel pages");
    // Every file the image names (mapped files, the executable, the cwd, fds) is opened as
    // the image's owner, not as the restorer: an image must not reach a file its owner could
    // not. (The full identity is set last, `creds::restore`; these are its file-access parts.)
    act_as_owner_for_files(inj, &img.creds)?;
    layout::create(inj, &img.vmas)?;
    let mapped = inj.deferred_mark();
    let placer = Placer::open(inj, &img.vmas)?;
    tl.mark("mappings");
    // What needs only the process record, done while the pages are still on their way (none
    // of it touches the image's memory).
    mm::Mm::restore(inj, img)?;
    misc::MiscState::restore(inj, img)?;
    fds::Fds::restore(inj, img)?;
    locks::restore(inj, img)?;
    signals::Signals::restore(inj, img)?;
    tl.mark("mm, misc, fds, signals");
    // A big transfer wants both CPUs (a reader thread verifies records while we and a helper
    // place them).
    let big = pages::is_big(&img.vmas);
    cpus.widen(big);
    // (A process that may receive a big image's pages itself does the copy off the wire: it
    // runs on any CPU meanwhile, and next to us again after.)
    let process_widened = big && pages_socket.is_some();
    if process_widened {
        cpus.let_run_anywhere(pid.as_raw());
    }
    inj.flush_through(mapped)?; // (the mappings exist before their pages are written)
    let how = match pages_socket {
        Some(socket) => Placement::SelfReceive(socket),
        None => Placement::Write,
    };
    let filled = pages::place(inj, &img.vmas, big, reader, placer, how);
    cpus.widen(false);
    if process_widened {
        crate::pin::move_here(pid.as_raw());
    }
    let placed = filled?;
    // (Pages the process received itself count as placed through userfaultfd where it was
    // their memory that the userfaultfd populated.)
    tl.note(format!(
        "{} of {} page bytes placed through userfaultfd",
        placed.by_uffd, placed.bytes
    ));
    if placed.in_huge_pages > 0 {
        tl.note(format!("{} page bytes in huge pages", placed.in_huge_pages));
    }
    tl.mark("pages");
    // After the pages: the protections (a read-only page is filled first), the thread's
    // rseq area (the kernel writes into it) and the credentials, last, in one batch with
    // the rest.
    layout::finish(inj, &img.vmas);
    let thread = &img.threads[0];
    threads::Thread::restore(inj, img)?;
    // Timers armed and attributes set in the last batch, before the credentials drop the
    // privilege some of them need.
    timers::TimerState::restore(inj, img)?;
    attrs::AttrState::restore(inj, img)?;
    if opts.join_cgroups {
        let owner = opts.expect_owner.map(|(uid, _)| uid);
        crate::cgroups::join(pid, &img.attrs.cgroups, owner)?;
    }
    // The parent-death signal the stub set for itself (an image never has one: it is not
    // captured, and a restored process must outlive a `restore --detach`).
    let mut last = vec![Call::new(
        libc::SYS_prctl,
        &[libc::PR_SET_PDEATHSIG as u64, 0, 0, 0, 0],
        "clearing the parent-death signal",
    )];
    // The CPU set the stub inherited while pinned next to us: the restorer's own, as a
    // process it started would have had.
    let image_cpus = match &img.attrs.cpus {
        Some(list) => attrs::cpu_set_bytes(list)?,
        None => None,
    };
    if let Some(set) = image_cpus.or_else(|| cpus.original_bytes()) {
        let addr = inj.stage(&set)?;
        last.push(Call::new(
            libc::SYS_sched_setaffinity,
            &[0, set.len() as u64, addr],
            "giving the process its CPU set",
        ));
    }
    // (They run with the credentials' batch, before the restorer's privilege is gone.)
    inj.defer(last);
    creds::Credentials::restore(inj, img)?;
    if let Some(sig) = opts.parent_death_signal {
        inj.syscall(
            libc::SYS_prctl,
            &[libc::PR_SET_PDEATHSIG as u64, sig as u64, 0, 0, 0],
            "setting the parent-death signal",
        )?;
    }
    tl.mark("protections, thread, creds");

    // 5. Let it go. The munmap of the control area is the last injected call: it returns to
    // the syscall-exit stop, where the image's registers replace ours.
    inj.syscall(libc::SYS_munmap, &[control, CONTROL_LEN], "unmapping the control area")?;
    arch::restore(pid, &thread.cpu)?;
    signals::set_mask(pid, thread.sigmask)?;
    nix_ptrace::detach(pid, None).context("detaching from the restored process")?;
    tl.mark("let go");
    Ok(placed)
}

/// Gives the process the owner's supplementary groups and filesystem uid/gid (a privileged
/// restorer keeps its other capabilities for the mm fields and the final credentials).
fn act_as_owner_for_files(inj: &mut Injector, c: &telefork_image::Creds) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(()); // an unprivileged restorer opens files with its own rights anyway
    }
    if c.groups.len() > 65536 {
        bail!("image is corrupt: {} supplementary groups", c.groups.len());
    }
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    let addr = if groups.is_empty() { 0 } else { inj.stage(&groups)? };
    let (fsuid, fsgid) = (c.uid[3] as u64, c.gid[3] as u64);
    let calls = [
        Call::new(
            libc::SYS_setgroups,
            &[c.groups.len() as u64, addr],
            "taking the owner's groups to open files",
        ),
        Call::new(libc::SYS_setfsgid, &[fsgid], "taking the owner's filesystem gid to open files"),
        Call::new(libc::SYS_setfsuid, &[fsuid], "taking the owner's filesystem uid to open files"),
    ];
    inj.defer(calls.into());
    Ok(())
}

/// The fork's `[vdso]`, `[vvar]`, `[vvar_vclock]` mappings.
fn stub_specials(maps: &[procfs::MapsEntry]) -> Vec<(SpecialMap, u64, u64)> {
    maps.iter()
        .filter_map(|m| {
            let k = match m.name.as_str() {
                "[vdso]" => SpecialMap::Vdso,
                "[vvar]" => SpecialMap::Vvar,
                "[vvar_vclock]" => SpecialMap::VvarVclock,
                _ => return None,
            };
            Some((k, m.start, m.end))
        })
        .collect()
}

/// A call that moves the `len` bytes mapped at `from` to `to` (mremap, fixed), failing
/// unless it lands there.
fn move_call(from: u64, len: u64, to: u64, what: String) -> Call {
    Call::new(
        libc::SYS_mremap,
        &[from, len, len, (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64, to],
        what,
    )
    .expecting(to)
}

/// Whether ranges `a` and `b` are at least `GUARD_GAP` apart.
fn clear_of(a: (u64, u64), b: (u64, u64)) -> bool {
    a.1 + GUARD_GAP <= b.0 || a.0 >= b.1 + GUARD_GAP
}

/// An address range of `len` bytes free in the image, in the fork, and apart from `taken`.
fn free_area(
    vmas: &[Vma],
    stub: &[procfs::MapsEntry],
    taken: &[(u64, u64)],
    len: u64,
) -> Result<u64> {
    let busy: Vec<(u64, u64)> = vmas
        .iter()
        .map(|v| (v.start, v.end))
        .chain(stub.iter().map(|m| (m.start, m.end)))
        .chain(taken.iter().copied())
        .collect();
    let mut cand = 1u64 << 32;
    while cand + len < 0x7f00_0000_0000 {
        if busy.iter().all(|&b| clear_of((cand, cand + len), b)) {
            return Ok(cand);
        }
        cand += 1 << 30;
    }
    bail!("no free address range of {len} bytes for the restore's control area")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bounds::tests::image;

    /// The daemon's options (a vouched owner, its groups here) reach the bounds.
    #[test]
    fn owner_and_groups_are_checked() {
        let opts = RestoreOptions {
            expect_owner: Some((1000, 1000)),
            allowed_groups: Some(vec![1000, 27]),
            ..Default::default()
        };
        if nix::unistd::geteuid().is_root() {
            check_owner(&image(1000, 1000, vec![27]), &opts).unwrap(); // (else: only one's own)
        }
        let e = check_owner(&image(0, 0, vec![]), &opts).unwrap_err().to_string();
        assert!(e.contains("uid 0"), "{e}");
        let mut img = image(1000, 1000, vec![]);
        img.creds.uid[1] = 0; // effective uid root: refused too
        assert!(check_owner(&img, &opts).is_err());
        let e = check_owner(&image(1000, 1000, vec![27, 0]), &opts).unwrap_err().to_string();
        assert!(e.contains("supplementary group 0"), "{e}");
    }
}
