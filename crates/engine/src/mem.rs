//! The address space: which mappings exist (`Vma`s, from /proc/PID/maps) and what is in them
//! (page records, from /proc/PID/pagemap and /proc/PID/mem).
//!
//! Only pages that exist travel: pagemap tells which pages are present or swapped, so a
//! process that reserved 64 GiB and touched 10 MiB makes a 10 MiB image. Private file
//! mappings travel as a reference to their file plus only the pages that became anonymous
//! (written by the process); shared file mappings travel as a reference only (the file holds
//! their contents). Special kernel mappings ([vdso], [vvar], …) travel as addresses only —
//! `restore` moves the new process's own ones there.
//!
//! On restore, every mapping is created at its address, writable first so its pages can be
//! written in, and given its final protection once all pages are in (`finish`).

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, MetadataExt};

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;
use telefork_image::{FileId, ImageWriter, SpecialMap, Vma, VmaKind};

use crate::huge::{HugeBlocks, Placement};
use crate::inject::{Call, Injector};
use crate::procfs::MapsEntry;
use crate::self_send::{PageRoute, SelfSender};
use crate::uffd::RemoteUffd;

pub const PAGE: u64 = 4096;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// Turns the maps of a stopped process into `Vma`s, with file identities. Refuses what
/// cannot be restored faithfully.
pub fn capture_vmas(pid: Pid, maps: &[MapsEntry]) -> Result<Vec<Vma>> {
    let vmflags = crate::procfs::read_vmflags(pid)?;
    // smaps must show the very mappings `maps` did (it may be read while a scratch area is
    // mapped: one merged with a neighbour would hide that neighbour's flags).
    if let Some(m) = maps.iter().find(|m| !vmflags.contains_key(&(m.start, m.end))) {
        bail!(MappingsChanged(format!(
            "mapping {:#x}-{:#x} is not in /proc/{pid}/smaps as in maps",
            m.start, m.end
        )));
    }
    let mut vmas = Vec::with_capacity(maps.len());
    // A library is mapped four or five times: stat it once (by the device and inode maps
    // names, and the path).
    let mut files: Vec<(&str, u64, &str, FileId)> = Vec::new();
    for m in maps {
        let prot = (m.read as u32 * libc::PROT_READ as u32)
            | (m.write as u32 * libc::PROT_WRITE as u32)
            | (m.exec as u32 * libc::PROT_EXEC as u32);
        let kind = match m.name.as_str() {
            "[vdso]" => VmaKind::Special(SpecialMap::Vdso),
            "[vvar]" => VmaKind::Special(SpecialMap::Vvar),
            "[vvar_vclock]" => VmaKind::Special(SpecialMap::VvarVclock),
            "[vsyscall]" => VmaKind::Special(SpecialMap::Vsyscall),
            "" | "[heap]" | "[stack]" => VmaKind::Anon,
            // A shared anonymous mapping is a hidden shmem file the kernel names this way.
            n if m.shared && n.starts_with("/dev/zero") => VmaKind::Anon,
            n if n.starts_with('[') => bail!(
                "mapping {:#x}-{:#x} is the special mapping {n}, which is not supported",
                m.start,
                m.end
            ),
            n if n.ends_with(" (deleted)") => {
                bail!("mapping {:#x}-{:#x} is backed by the deleted file {n:?}, which cannot be mapped again", m.start, m.end)
            }
            n if n.starts_with("/SYSV") || n.starts_with("/memfd:") => {
                bail!("mapping {:#x}-{:#x} is backed by {n}: SysV shared memory and memfd are not supported yet", m.start, m.end)
            }
            n => match files
                .iter()
                .find(|(dev, ino, path, _)| *dev == m.dev && *ino == m.inode && *path == n)
            {
                Some((_, _, _, id)) => VmaKind::File(id.clone()),
                None => {
                    let id = file_id_of_mapping(pid, m, n)?;
                    files.push((&m.dev, m.inode, n, id.clone()));
                    VmaKind::File(id)
                }
            },
        };
        let flags = vmflags.get(&(m.start, m.end)).map(Vec::as_slice).unwrap_or(&[]);
        let has = |f: &str| flags.iter().any(|x| x == f);
        let advice = ["hg", "nh", "dc", "dd", "wf"]
            .iter()
            .zip(RESTORED_ADVICE)
            .filter(|(f, _)| has(f))
            .map(|(_, a)| a)
            .collect();
        vmas.push(Vma {
            start: m.start,
            end: m.end,
            prot,
            shared: m.shared,
            offset: m.offset,
            kind,
            growsdown: has("gd") || m.name == "[stack]",
            accounted: has("ac"),
            advice,
        });
    }
    Ok(vmas)
}

/// The mappings changed between reading /proc/PID/maps and /proc/PID/smaps.
#[derive(Debug)]
pub struct MappingsChanged(pub String);

impl std::fmt::Display for MappingsChanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MappingsChanged {}

fn file_id_of_mapping(pid: Pid, m: &MapsEntry, path: &str) -> Result<FileId> {
    // map_files/ names the very file mapped, even if `path` was replaced since.
    let link = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
    let st = std::fs::metadata(&link).with_context(|| {
        format!("identifying the file of mapping {:#x}-{:#x} ({path})", m.start, m.end)
    })?;
    Ok(FileId {
        path: path.to_string(),
        dev: st.dev(),
        ino: st.ino(),
        size: st.size(),
        mtime_sec: st.mtime(),
        mtime_nsec: st.mtime_nsec(),
    })
}

/// Whether a page of this mapping must travel, given its pagemap entry.
fn page_travels(vma: &Vma, pm: u64) -> bool {
    if pm & (PM_PRESENT | PM_SWAPPED) == 0 {
        return false;
    }
    match vma.kind {
        VmaKind::Anon => true,
        // Private file pages travel only once the process wrote them (they became anonymous).
        VmaKind::File(_) if !vma.shared => pm & PM_FILE == 0,
        VmaKind::File(_) | VmaKind::Special(_) => false,
    }
}

fn carries_pages(vma: &Vma) -> bool {
    match vma.kind {
        VmaKind::Anon => true,
        VmaKind::File(_) => !vma.shared,
        VmaKind::Special(_) => false,
    }
}

/// Bytes of memory per page record (and per read of the process's memory).
const CHUNK: u64 = 1 << 20;
const _: () =
    assert!(CHUNK as usize <= telefork_image::MAX_PAGE_CHUNK, "a run must fit one record");
/// Buffers in flight between the thread that reads memory and the one that writes records.
const BUFFERS: usize = 3;
/// Up to this many bytes of pages, capture reads and writes them in one thread.
const INLINE_MAX: u64 = 16 << 20;

/// Splits `[start, end)` into runs of at most `CHUNK` bytes.
fn push_runs(runs: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    let mut a = start;
    while a < end {
        let n = (end - a).min(CHUNK);
        runs.push((a, n));
        a += n;
    }
}

/// One region PAGEMAP_SCAN returns: pages [start, end) with the categories asked for
/// (`PAGE_IS_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;

/// PAGEMAP_SCAN (Linux 6.7+) over [start, end) of the process whose /proc/PID/pagemap is
/// `pagemap`: the regions whose categories, with those in `inverted` flipped, have all of
/// `mask` and any of `anyof`, reported with the categories in `returned` (the kernel's
/// `pm_scan_arg`); appended to `out`. False if the kernel lacks it. The kernel walks only
/// the page tables that exist, so a 64 GiB reservation with 10 MiB touched costs what 10 MiB
/// cost — where reading /proc/PID/pagemap would return 16 million entries. Written by hand:
/// no crate wraps this ioctl yet.
pub fn pagemap_scan(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
    (inverted, mask, anyof, returned): (u64, u64, u64, u64),
    out: &mut Vec<PageRegion>,
) -> bool {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct PmScanArg {
        size: u64,
        flags: u64,
        start: u64,
        end: u64,
        walk_end: u64,
        vec: u64,
        vec_len: u64,
        max_pages: u64,
        category_inverted: u64,
        category_mask: u64,
        category_anyof_mask: u64,
        return_mask: u64,
    }
    // _IOWR('f', 16, struct pm_scan_arg)
    const PAGEMAP_SCAN: u64 =
        (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;
    // Regions per call, written straight into `out`'s spare room.
    const ROOM: usize = 1024;
    let mut at = start;
    while at < end {
        out.reserve(ROOM);
        let spare = out.spare_capacity_mut();
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: 0,
            start: at,
            end,
            walk_end: 0,
            vec: spare.as_mut_ptr() as u64,
            vec_len: spare.len().min(ROOM) as u64,
            max_pages: 0,
            category_inverted: inverted,
            category_mask: mask,
            category_anyof_mask: anyof,
            return_mask: returned,
        };
        // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points at `out`'s spare room,
        // which has space for `vec_len` entries and outlives the call; the kernel writes only
        // there and into `arg.walk_end`.
        let n = unsafe {
            libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg as *mut PmScanArg)
        };
        if n < 0 {
            return false;
        }
        // SAFETY: the kernel filled the first `n` (at most `vec_len`) entries of the spare
        // room with initialized regions (plain integers).
        unsafe { out.set_len(out.len() + (n as usize).min(arg.vec_len as usize)) };
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    true
}

/// The runs of pages that must travel, found with `pagemap_scan`; `None` if the kernel
/// lacks it.
fn scan_runs(pagemap: &std::fs::File, vmas: &[Vma]) -> Option<Vec<(u64, u64)>> {
    let mut found = Vec::new();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for vma in vmas.iter().filter(|v| carries_pages(v)) {
        // Anonymous: present or swapped. Private file: the same, and no longer the file's
        // page (PAGE_IS_FILE clear: the process wrote it).
        let (inverted, mask) = match vma.kind {
            VmaKind::File(_) => (PAGE_IS_FILE, PAGE_IS_FILE),
            _ => (0, 0),
        };
        found.clear();
        let wanted = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
        if !pagemap_scan(pagemap, vma.start, vma.end, (inverted, mask, wanted, wanted), &mut found)
        {
            return None;
        }
        let first = runs.len();
        for r in &found {
            // Adjacent regions (present, then swapped) of one mapping join into one run.
            let extends = runs.len() > first;
            match runs.last_mut() {
                Some((s, len)) if extends && *s + *len == r.start => *len = r.end - *s,
                _ => runs.push((r.start, r.end - r.start)),
            }
        }
    }
    // Cut into chunks (a run never spans two mappings: each scan stays in its mapping).
    let mut out = Vec::with_capacity(runs.len());
    for (s, len) in runs {
        push_runs(&mut out, s, s + len);
    }
    Some(out)
}

/// The runs of pages that must travel, in address order, each at most `CHUNK` long.
fn travelling_runs(pid: Pid, vmas: &[Vma]) -> Result<Vec<(u64, u64)>> {
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .with_context(|| format!("opening /proc/{pid}/pagemap"))?;
    if std::env::var_os("TELEFORK_NO_PAGEMAP_SCAN").is_none() {
        if let Some(runs) = scan_runs(&pagemap, vmas) {
            return Ok(runs);
        }
    }
    // Older kernels: read the pagemap, 8 bytes per page.
    const BATCH_PAGES: u64 = 16384; // one pagemap read covers 64 MiB
    let mut pm = vec![0u8; (BATCH_PAGES * 8) as usize];
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for vma in vmas.iter().filter(|v| carries_pages(v)) {
        // Runs never span two mappings (restore checks each run against one).
        let first_run_of_vma = runs.len();
        let mut addr = vma.start;
        while addr < vma.end {
            let n = ((vma.end - addr) / PAGE).min(BATCH_PAGES);
            let pm = &mut pm[..(n * 8) as usize];
            pagemap.read_exact_at(pm, addr / PAGE * 8).with_context(|| {
                format!("reading the pagemap of {addr:#x}-{:#x}", addr + n * PAGE)
            })?;
            for (i, e) in pm.chunks_exact(8).enumerate() {
                let entry = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
                if !page_travels(vma, entry) {
                    continue;
                }
                let page = addr + i as u64 * PAGE;
                let extends_last = runs.len() > first_run_of_vma;
                match runs.last_mut() {
                    Some((start, len)) if extends_last && *start + *len == page && *len < CHUNK => {
                        *len += PAGE
                    }
                    _ => runs.push((page, PAGE)),
                }
            }
            addr += n * PAGE;
        }
    }
    Ok(runs)
}

/// Reads `len` bytes at `addr` of a stopped process into `buf`, through /proc/PID/mem.
///
/// Not process_vm_readv: it *pins* the pages, and pinning an anonymous page that is shared
/// copy-on-write (every page of a frozen fork is shared with its parent) makes the kernel
/// unshare it first — it copies every page, doubling the memory of a telefork and halving
/// its speed. /proc/PID/mem only takes references: no copies.
fn read_remote(pid: Pid, mem: &std::fs::File, addr: u64, buf: &mut [u8]) -> Result<()> {
    let len = buf.len();
    mem.read_exact_at(buf, addr).with_context(|| {
        format!("reading memory {addr:#x}-{:#x} of process {pid}", addr + len as u64)
    })
}

/// Writes the contents of every page that must travel, in address order, as page records.
/// A second thread reads the process's memory while this one writes (encrypts, sends) the
/// previous chunk. Returns the number of bytes written.
///
/// With a `route` (and the injector of the stopped process), a big image's large runs are
/// handed over by the process itself (`self_send` module) instead of being read here. On the
/// socket route (a stream to a restorer) the runs are announced first (the image's page
/// index): the new process there can then receive them straight into place (`self_receive`).
/// Every run is one record (runs are at most `CHUNK` long).
pub fn write_pages<W: std::io::Write + Send>(
    pid: Pid,
    vmas: &[Vma],
    out: &mut ImageWriter<W>,
    route: Option<(&mut Injector, &PageRoute)>,
) -> Result<u64> {
    let runs = travelling_runs(pid, vmas)?;
    let total: u64 = runs.iter().map(|(_, len)| len).sum();
    // The page index: for the plain transport (the new process may receive its pages itself)
    // and for every big image (its restorer backs fully carried blocks with huge pages).
    if matches!(route, Some((_, PageRoute::Socket(_)))) || total > INLINE_MAX {
        out.write_page_index(&runs).context("writing the page index")?;
        // (A big image's on its way at once: a destination whose new process receives the
        // pages, or that prepares huge pages, waits for it. A small one's goes with the first
        // pages.)
        if total > INLINE_MAX {
            out.flush().context("sending the page index")?;
        }
    }
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    if let Some((inj, route)) = route {
        // (If the process cannot take the channel — a seccomp filter, its fd limit — its
        // memory is read here as usual.)
        if total > INLINE_MAX {
            match route {
                PageRoute::Socket(sock) => {
                    if let Ok(sender) = SelfSender::open_socket(inj, *sock) {
                        return write_pages_self_sent(pid, &mem, vmas, &runs, out, inj, sender)
                            .map(|()| total);
                    }
                }
                PageRoute::Pipe(forward) => {
                    if let Ok((sender, pipe)) = SelfSender::open_pipe(inj) {
                        return write_pages_spliced(
                            pid, &mem, vmas, &runs, out, inj, sender, pipe, *forward,
                        )
                        .map(|()| total);
                    }
                }
            }
        }
    }
    if total <= INLINE_MAX {
        // Small: one thread, one buffer (a second thread costs more than it saves here),
        // sent on every 64 KiB so the other end places pages while we read the next.
        let mut buf = Vec::new();
        let mut unsent = 0u64;
        for &(addr, len) in &runs {
            buf.resize(len as usize, 0);
            read_remote(pid, &mem, addr, &mut buf)?;
            out.write_pages(addr, &buf).context("writing the image")?;
            unsent += len;
            if unsent >= 64 << 10 {
                out.flush().context("sending the image")?;
                unsent = 0;
            }
        }
        return Ok(total);
    }
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<(u64, Vec<u8>)>>(BUFFERS);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        let _ = empty_tx.send(Vec::with_capacity(CHUNK as usize));
    }
    std::thread::scope(|scope| {
        let mem = &mem;
        let runs = &runs;
        scope.spawn(move || {
            for &(addr, len) in runs {
                let Ok(mut buf) = empty_rx.recv() else { return };
                buf.resize(len as usize, 0);
                let r = read_remote(pid, mem, addr, &mut buf).map(|_| (addr, buf));
                let failed = r.is_err();
                if full_tx.send(r).is_err() || failed {
                    return;
                }
            }
        });
        let mut total = 0u64;
        for _ in 0..runs.len() {
            let (addr, buf) = full_rx.recv().context("the memory reader stopped")??;
            out.write_pages(addr, &buf).context("writing the image")?;
            total += buf.len() as u64;
            let _ = empty_tx.send(buf);
        }
        drop(empty_tx);
        Ok(total)
    })
}

/// Runs at least this long are sent by the process itself (each costs an injected call).
const SELF_SEND_MIN: u64 = 1 << 20;

/// Whether the process itself can read `[addr, addr + len)` (its mapping is readable: a
/// PROT_NONE mapping's pages still travel, but only /proc/PID/mem can read them) and the run
/// is worth an injected call.
fn self_sendable(vmas: &[Vma], addr: u64, len: u64) -> bool {
    len >= SELF_SEND_MIN
        && vmas
            .iter()
            .any(|v| v.start <= addr && addr + len <= v.end && v.prot & libc::PROT_READ as u32 != 0)
}

#[allow(clippy::too_many_arguments)]
fn write_pages_self_sent<W: std::io::Write>(
    pid: Pid,
    mem: &std::fs::File,
    vmas: &[Vma],
    runs: &[(u64, u64)],
    out: &mut ImageWriter<W>,
    inj: &mut Injector,
    sender: SelfSender,
) -> Result<()> {
    let sent = (|| -> Result<()> {
        let mut buf = Vec::new();
        for &(addr, len) in runs {
            if self_sendable(vmas, addr, len) {
                let mut failure = None;
                let r = out.write_pages_sent_by(addr, len as usize, |w| {
                    w.flush()?;
                    sender.send_runs(inj, &[(addr, len)]).map_err(|e| {
                        let io = std::io::Error::other(format!("{e:#}"));
                        failure = Some(e);
                        io
                    })
                });
                if let Some(e) = failure {
                    return Err(e);
                }
                r.context("writing the image")?;
            } else {
                buf.resize(len as usize, 0);
                read_remote(pid, mem, addr, &mut buf)?;
                out.write_pages(addr, &buf).context("writing the image")?;
            }
        }
        Ok(())
    })();
    let closed = sender.close(inj);
    sent?;
    closed
}

/// Runs handed over per injected vmsplice.
const SPLICE_BATCH: usize = 64;

/// A page record for the writer thread of `write_pages_spliced`.
enum Record {
    /// `len` bytes at `addr`, coming through the pipe.
    Spliced(u64, u64),
    /// Bytes read here (small runs).
    Read(u64, Vec<u8>),
}

/// The pipe route: this (tracer) thread has the process vmsplice its big runs into a pipe,
/// in order, and reads the small ones itself; a writer thread writes the records, taking each
/// big run's bytes from the pipe with `forward`.
#[allow(clippy::too_many_arguments)]
fn write_pages_spliced<W: std::io::Write + Send>(
    pid: Pid,
    mem: &std::fs::File,
    vmas: &[Vma],
    runs: &[(u64, u64)],
    out: &mut ImageWriter<W>,
    inj: &mut Injector,
    sender: SelfSender,
    pipe: std::os::fd::OwnedFd,
    forward: &(dyn Fn(std::os::fd::RawFd, usize) -> std::io::Result<()> + Sync),
) -> Result<()> {
    use std::os::fd::AsRawFd;
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Record>(256);
        let writer = scope.spawn(move || -> Result<()> {
            // (Dropping the read end on failure makes the process's vmsplice fail: EPIPE.)
            let pipe = pipe;
            for rec in rx {
                match rec {
                    Record::Spliced(addr, len) => out
                        .write_pages_sent_by(addr, len as usize, |w| {
                            w.flush()?;
                            forward(pipe.as_raw_fd(), len as usize)
                        })
                        .with_context(|| format!("sending memory {addr:#x}-{:#x}", addr + len))?,
                    Record::Read(addr, buf) => out.write_pages(addr, &buf).context("writing the image")?,
                }
            }
            // Exactly the process's memory came through: more would be someone else's bytes.
            let mut extra: libc::c_int = 0;
            // SAFETY: FIONREAD writes one c_int.
            if unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut extra) } == 0 && extra > 0 {
                bail!("the process's pipe held {extra} bytes beyond its memory (written by someone else)");
            }
            Ok(())
        });
        let handed = (|| -> Result<()> {
            // Big runs go in batches: one injected vmsplice each.
            let mut batch: Vec<(u64, u64)> = Vec::with_capacity(SPLICE_BATCH);
            for (i, &(addr, len)) in runs.iter().enumerate() {
                if self_sendable(vmas, addr, len) {
                    if tx.send(Record::Spliced(addr, len)).is_err() {
                        return Ok(()); // the writer stopped: its error says why
                    }
                    batch.push((addr, len));
                    let next_is_big =
                        runs.get(i + 1).is_some_and(|&(a, l)| self_sendable(vmas, a, l));
                    if batch.len() == SPLICE_BATCH || !next_is_big {
                        sender.send_runs(inj, &batch)?;
                        batch.clear();
                    }
                } else {
                    let mut buf = vec![0u8; len as usize];
                    read_remote(pid, mem, addr, &mut buf)?;
                    if tx.send(Record::Read(addr, buf)).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })();
        drop(tx);
        // The process closes its end now: a writer still waiting for bytes sees the end.
        let closed = sender.close(inj);
        let written =
            writer.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the page writer panicked")));
        match (written, handed) {
            // The process could not hand over (its error is the cause; the writer then saw
            // its pipe end early).
            (Err(w), Err(h)) if format!("{w:#}").contains("ended early") => Err(h),
            (Err(w), _) => Err(w),
            (Ok(()), Err(h)) => Err(h),
            (Ok(()), Ok(())) => closed,
        }
    })
}

/// The new process's userfaultfd with its private anonymous mappings registered, for
/// `fill_pages` (None where userfaultfd is absent, forbidden or turned off). Opened before the
/// image's limits are in place (a low RLIMIT_NOFILE would refuse it).
///
/// Only where the private anonymous mappings span more than `UFFD_MIN` (or with
/// `TELEFORK_USERFAULTFD=always`; never with `=never`): for a small process, opening,
/// registering and releasing it took ~0.05 ms, more than writing its few pages saves (a small
/// telefork's restore: 0.61 → 0.57 ms, medians of 180).
pub fn open_uffd(inj: &mut Injector, vmas: &[Vma]) -> Result<Option<RemoteUffd>> {
    let ranges = uffd_ranges(vmas);
    let span: u64 = ranges.iter().map(|(_, len)| len).sum();
    if !crate::never_or_always("TELEFORK_USERFAULTFD").unwrap_or(span > UFFD_MIN) {
        return Ok(None);
    }
    RemoteUffd::open(inj, &ranges)
}

/// Private anonymous memory (address space, not pages) above which restore places pages
/// through userfaultfd (see `open_uffd`).
const UFFD_MIN: u64 = 16 << 20;

/// Streams the image's page records into the restored process: into private anonymous
/// memory with UFFDIO_COPY through the process's userfaultfd (`uffd`: fresh pages allocated
/// and filled in one pass), elsewhere — or where userfaultfd is not used — by populating a
/// big run in bulk (an injected MADV_POPULATE_WRITE, far cheaper than faulting page by page)
/// and copying with process_vm_writev (or /proc/PID/mem where the mapping is not writable).
/// A small image is read and placed by this thread (the tracer) alone; a `big` one (see
/// `is_big`) is read and verified by a reader thread and, with userfaultfd, placed by this
/// thread and a helper (which never populates: that is an injected call, the tracer's).
/// Returns the number of bytes written, and how many of them went through userfaultfd.
pub fn fill_pages<R: std::io::Read + Send>(
    inj: &mut Injector,
    vmas: &[Vma],
    big: bool,
    reader: &mut telefork_image::ImageReader<R>,
    uffd: Option<RemoteUffd>,
) -> Result<Placed> {
    let pid = inj.pid();
    // A big image's fully carried huge-page blocks are made huge pages ahead of their pages
    // (by a thread of their own, below).
    let index = if big { reader.page_index_once()? } else { None };
    let huge = match index {
        Some(index) => {
            // (The reader checked the index's order; where its records go is checked here,
            // as each record will be.)
            for &(addr, len) in index {
                check_page_run(vmas, addr, len)?;
            }
            HugeBlocks::plan(pid, vmas, index)
        }
        None => None,
    };
    let (mut total, mut by_uffd) = (0u64, 0u64);
    let mut place = |inj: &mut Injector, addr: u64, data: &[u8]| -> Result<()> {
        let vma = check_page_run(vmas, addr, data.len() as u64)?;
        for (at, piece, how) in placements(huge.as_ref(), addr, data) {
            let uffd = uffd.as_ref().filter(|_| how == Placement::Usual);
            let covered = uffd.is_some_and(|u| u.covers(at, piece.len() as u64));
            // Populating costs one injected call: worth it for big runs only. (Calls still
            // deferred run first, and their failures count.)
            let huge_page = how == Placement::Prepared { huge: true };
            if !covered
                && !huge_page
                && piece.len() >= POPULATE_MIN
                && initial_prot(vma) & libc::PROT_WRITE as u32 != 0
            {
                inj.flush()?;
                // Best effort: an old kernel without MADV_POPULATE_WRITE just faults later.
                let _ = inj
                    .syscall_raw(libc::SYS_madvise, &[at, piece.len() as u64, MADV_POPULATE_WRITE]);
            }
            if place_run(uffd, inj.mem_file(), pid, at, piece)? {
                by_uffd += piece.len() as u64;
            }
        }
        total += data.len() as u64;
        Ok(())
    };
    if !big {
        // Small: read and place in turn (a reader thread costs more than it saves here).
        let mut buf = Vec::new();
        while let Some((addr, b)) = reader.next_pages_owned(buf)? {
            place(inj, addr, &b[8..])?;
            buf = b;
        }
    } else {
        // Big: a reader thread reads (and checks) the next records, and two threads place
        // them — we and, with userfaultfd, a helper, on both CPUs: a VM places fresh memory
        // several times faster from two vCPUs than from one (4 GiB written by two threads:
        // 4.2-5.8 GB/s, by one: 1.0-2.9 GB/s). The helper writes what userfaultfd does not
        // cover without populating first (an injected call, ours): with process_vm_writev,
        // else through its own handle on /proc/PID/mem. Without userfaultfd (where most runs
        // want populating) we place them all.
        let (full_tx, full_rx) =
            std::sync::mpsc::sync_channel::<Result<Option<(u64, Vec<u8>)>>>(BUFFERS);
        let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        for _ in 0..BUFFERS {
            let _ = empty_tx.send(Vec::new());
        }
        let records = Records {
            rx: std::sync::Mutex::new(full_rx),
            ended: std::sync::atomic::AtomicBool::new(false),
        };
        let helper_mem =
            inj.mem_file().try_clone().context("duplicating the handle on the process's memory")?;
        let huge = huge.as_ref();
        let helper_bytes = std::thread::scope(|scope| {
            if let Some(h) = huge {
                let uffd = uffd.as_ref();
                scope.spawn(move || h.prepare_all(uffd));
            }
            scope.spawn(move || loop {
                let Ok(spare) = empty_rx.recv() else { return };
                let r = reader.next_pages_owned(spare).map_err(anyhow::Error::from);
                let stop = !matches!(r, Ok(Some(_)));
                if full_tx.send(r).is_err() || stop {
                    return;
                }
            });
            let helper = (uffd.is_some() || huge.is_some()).then(|| {
                let (records, empty_tx, uffd) = (&records, empty_tx.clone(), uffd.as_ref());
                scope.spawn(move || -> Result<(u64, u64)> {
                    let (mut placed, mut through_uffd) = (0u64, 0u64);
                    // (However it stops — at the end, on a failure — the records end for us both.)
                    let _end = records.end_on_drop();
                    while let Some((addr, buf)) = records.next()? {
                        let data = &buf[8..];
                        check_page_run(vmas, addr, data.len() as u64)?;
                        for (at, piece, how) in placements(huge, addr, data) {
                            if place_run(
                                uffd.filter(|_| how == Placement::Usual),
                                &helper_mem,
                                pid,
                                at,
                                piece,
                            )? {
                                through_uffd += piece.len() as u64;
                            }
                        }
                        placed += data.len() as u64;
                        let _ = empty_tx.send(buf);
                    }
                    Ok((placed, through_uffd))
                })
            });
            let ours = (|| -> Result<()> {
                // (However it stops — at the end, on a failure, in a panic — the records end
                // for us both.)
                let _end = records.end_on_drop();
                while let Some((addr, buf)) = records.next()? {
                    place(inj, addr, &buf[8..])?;
                    let _ = empty_tx.send(buf);
                }
                Ok(())
            })();
            // (The pages ended, or placing them failed: nothing more to prepare.)
            if let Some(h) = huge {
                h.no_more();
            }
            drop(empty_tx);
            let theirs = match helper {
                Some(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the thread placing pages panicked"))),
                None => Ok((0, 0)),
            };
            ours?;
            theirs
        })?;
        total += helper_bytes.0;
        by_uffd += helper_bytes.1;
    }
    if let Some(u) = uffd {
        u.release()?;
    }
    if let Some(why) = huge.as_ref().and_then(|h| h.stopped_because()) {
        crate::timeline::stamp(&format!("huge pages stopped: {why}"));
    }
    Ok(Placed {
        bytes: total,
        by_uffd,
        in_huge_pages: huge.map_or(0, |h| h.huge_bytes()),
        by_process: false,
    })
}

/// How a restore's pages were placed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Placed {
    /// Page bytes written.
    pub bytes: u64,
    /// Of those, placed through the process's userfaultfd (or received into memory it populated).
    pub by_uffd: u64,
    /// Bytes in blocks made huge pages before their pages came (`huge`).
    pub in_huge_pages: u64,
    /// The process received its pages itself (`self_receive`).
    pub by_process: bool,
}

/// The parts of a page run `data` at `addr` and how each is placed (all of it the usual way
/// where no blocks are prepared).
fn placements<'d>(
    huge: Option<&HugeBlocks>,
    addr: u64,
    data: &'d [u8],
) -> Vec<(u64, &'d [u8], Placement)> {
    match huge {
        None => vec![(addr, data, Placement::Usual)],
        Some(h) => h
            .segments(addr, data.len() as u64)
            .into_iter()
            .map(|(at, len, how)| (at, &data[(at - addr) as usize..][..len as usize], how))
            .collect(),
    }
}

/// The page records a reader thread passes to the threads that place them.
struct Records {
    rx: std::sync::Mutex<std::sync::mpsc::Receiver<Result<Option<(u64, Vec<u8>)>>>>,
    /// The end was seen (or a placing thread failed): no more records for anyone.
    ended: std::sync::atomic::AtomicBool,
}

impl Records {
    /// Ends the records for every thread when dropped (a placing thread that stops, however).
    fn end_on_drop(&self) -> impl Drop + '_ {
        struct End<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for End<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        End(&self.ended)
    }

    /// The next record, `None` at the image's end (for every thread that asks after it).
    fn next(&self) -> Result<Option<(u64, Vec<u8>)>> {
        if self.ended.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(None);
        }
        // (The lock held until `ended` is set: whoever comes next sees it.)
        let rx = self.rx.lock().map_err(|_| anyhow::anyhow!("a thread placing pages failed"))?;
        match rx.recv() {
            Ok(Ok(Some(record))) => Ok(Some(record)),
            Ok(Ok(None)) => {
                self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(None)
            }
            Ok(Err(e)) => {
                self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
                Err(e)
            }
            // (The reader is gone: after the end another thread took, or after an error.)
            Err(_) if self.ended.load(std::sync::atomic::Ordering::SeqCst) => Ok(None),
            Err(_) => bail!("the image reader stopped"),
        }
    }
}

/// Whether the image's private memory is big enough to want both CPUs and a reader thread
/// while it is placed (more than 64 MiB of anonymous mappings).
pub fn is_big(vmas: &[Vma]) -> bool {
    vmas.iter().filter(|v| v.kind == VmaKind::Anon).map(|v| v.end - v.start).sum::<u64>() > 64 << 20
}

/// The mappings whose pages are placed through userfaultfd: private anonymous memory (the
/// kernel supports MISSING registration there; private file mappings keep the file's pages).
fn uffd_ranges(vmas: &[Vma]) -> Vec<(u64, u64)> {
    vmas.iter()
        .filter(|v| v.kind == VmaKind::Anon && !v.shared)
        .map(|v| (v.start, v.end - v.start))
        .collect()
}

pub(crate) const MADV_POPULATE_WRITE: u64 = 23;
/// Runs at least this long are populated in bulk before they are written.
pub(crate) const POPULATE_MIN: usize = 1 << 20;

/// Places one run of pages at `addr` of process `pid`: through `uffd` where it covers the
/// run (true), else with process_vm_writev, or through `mem` (/proc/PID/mem: it may write to
/// memory not writable yet).
pub(crate) fn place_run(
    uffd: Option<&RemoteUffd>,
    mem: &std::fs::File,
    pid: Pid,
    addr: u64,
    data: &[u8],
) -> Result<bool> {
    if let Some(u) = uffd.filter(|u| u.covers(addr, data.len() as u64)) {
        u.copy(addr, data)?;
        return Ok(true);
    }
    let local = [std::io::IoSlice::new(data)];
    let remote = [nix::sys::uio::RemoteIoVec { base: addr as usize, len: data.len() }];
    if let Ok(n) = nix::sys::uio::process_vm_writev(pid, &local, &remote) {
        if n == data.len() {
            return Ok(false);
        }
    }
    mem.write_all_at(data, addr)
        .with_context(|| format!("writing {} bytes at {addr:#x} of process {pid}", data.len()))?;
    Ok(false)
}

/// Checks that a file mapped by the image is still the same file (size and modification
/// time): a changed file would be mapped wrong, silently.
pub fn check_file(id: &FileId, what: &str) -> Result<()> {
    let st = std::fs::metadata(&id.path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            anyhow::anyhow!("{what} {:?} is missing on this machine", id.path)
        }
        _ => anyhow::Error::new(e)
            .context(format!("{what} {:?} cannot be reached by the image's process", id.path)),
    })?;
    if st.size() != id.size || st.mtime() != id.mtime_sec || st.mtime_nsec() != id.mtime_nsec {
        bail!(
            "{what} {:?} changed since the image was made (size {} → {}, mtime {}.{:09} → {}.{:09}); refusing to map it",
            id.path,
            id.size,
            st.size(),
            id.mtime_sec,
            id.mtime_nsec,
            st.mtime(),
            st.mtime_nsec()
        );
    }
    Ok(())
}

/// The madvise advice capture records (from smaps' VmFlags) and restore gives again; any
/// other is refused — some need privilege (MADV_HWPOISON and MADV_SOFT_OFFLINE take pages
/// out of service for the whole machine), and the restorer is root.
pub const RESTORED_ADVICE: [i32; 5] = [
    libc::MADV_HUGEPAGE,
    libc::MADV_NOHUGEPAGE,
    libc::MADV_DONTFORK,
    libc::MADV_DONTDUMP,
    libc::MADV_WIPEONFORK,
];

/// Refuses an image whose mappings overlap, are unaligned, leave user space, or carry advice
/// capture never records.
pub fn validate_layout(vmas: &[Vma]) -> Result<()> {
    const TASK_SIZE: u64 = 0x7fff_ffff_f000;
    let mut prev_end = 0u64;
    for v in vmas {
        let special = matches!(v.kind, VmaKind::Special(SpecialMap::Vsyscall));
        if v.start % PAGE != 0
            || v.end % PAGE != 0
            || v.end <= v.start
            || v.start < prev_end
            || (!special && v.end > TASK_SIZE)
        {
            bail!("image is corrupt: mapping {:#x}-{:#x} is unaligned, empty, overlapping or outside user space", v.start, v.end);
        }
        if v.prot & !((libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u32) != 0 {
            bail!(
                "image is corrupt: mapping {:#x}-{:#x} has protection bits {:#x}",
                v.start,
                v.end,
                v.prot
            );
        }
        if let Some(a) = v.advice.iter().find(|a| !RESTORED_ADVICE.contains(a)) {
            bail!("image is corrupt: mapping {:#x}-{:#x} has madvise advice {a}, which capture never records", v.start, v.end);
        }
        prev_end = v.end;
    }
    Ok(())
}

/// The protection a mapping is created with: writable (so its pages can be written in) when
/// that matches its history — it is charged (VM_ACCOUNT, i.e. it was writable) or anonymous,
/// where MAP_NORESERVE keeps an unaccounted one uncharged — and its final protection
/// otherwise (read-only file text: any changed page is written in through /proc/PID/mem,
/// which may write to private read-only memory, as a debugger's breakpoints do).
pub(crate) fn initial_prot(v: &Vma) -> u32 {
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    match v.kind {
        VmaKind::Special(_) => v.prot,
        VmaKind::Anon => rw,
        VmaKind::File(_) if v.shared => v.prot,
        VmaKind::File(_) if v.accounted || v.prot & libc::PROT_WRITE as u32 != 0 => rw | v.prot,
        VmaKind::File(_) => v.prot,
    }
}

/// Creates every non-special mapping of the image in the (emptied) restore process, writable
/// so pages can be written in. Files are opened inside the process (one batch) and closed
/// again; the mappings are deferred calls (`Injector::defer`), made with the next batch.
pub fn create_mappings(inj: &mut Injector, vmas: &[Vma]) -> Result<()> {
    let files = open_mapped_files(inj, vmas)?;
    let mut calls = Vec::with_capacity(vmas.len() + 8);
    for v in vmas {
        let len = v.end - v.start;
        let prot = initial_prot(v) as u64;
        let noreserve = if v.accounted || v.shared { 0 } else { libc::MAP_NORESERVE };
        let (flags, fd) = match &v.kind {
            VmaKind::Special(_) => continue,
            VmaKind::Anon => {
                let share = if v.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
                let grows = if v.growsdown { libc::MAP_GROWSDOWN } else { 0 };
                ((share | libc::MAP_ANONYMOUS | grows | noreserve) as u64, u64::MAX)
            }
            VmaKind::File(id) => {
                let fd = files
                    .get(&(id.path.clone(), v.shared))
                    .copied()
                    .context("internal error: a mapped file was not opened")?;
                if v.shared {
                    (libc::MAP_SHARED as u64, fd)
                } else {
                    ((libc::MAP_PRIVATE | noreserve) as u64, fd)
                }
            }
        };
        // MAP_FIXED_NOREPLACE: the address space was emptied, so nothing may be there; an
        // image whose mappings collide gets an error instead of a silent overwrite.
        calls.push(
            Call::new(
                libc::SYS_mmap,
                &[v.start, len, prot, flags | libc::MAP_FIXED_NOREPLACE as u64, fd, v.offset],
                format!("mapping {:#x}-{:#x}", v.start, v.end),
            )
            .expecting(v.start),
        );
        for advice in &v.advice {
            calls.push(Call::new(
                libc::SYS_madvise,
                &[v.start, len, *advice as u64],
                format!("madvise({advice}) on {:#x}-{:#x}", v.start, v.end),
            ));
        }
    }
    for fd in files.into_values() {
        calls.push(Call::new(libc::SYS_close, &[fd], "closing a mapped file"));
    }
    // (Nothing waits for them: they run with the next batch — see `Injector::defer`.)
    inj.defer(calls);
    Ok(())
}

/// Opens every file the mappings map, in the process: (path, shared) → fd. Files mapped
/// privately are opened read-only, all in one batch; files mapped shared read-write if
/// they can be (a shared mapping needs a writable file to be writable, now or after a later
/// mprotect), else read-only, one at a time (they are rare). (Each file's identity was
/// checked before anything was created: restore's check_process.)
fn open_mapped_files(inj: &mut Injector, vmas: &[Vma]) -> Result<HashMap<(String, bool), u64>> {
    let mut files: HashMap<(String, bool), u64> = HashMap::new();
    let mut private: Vec<&str> = Vec::new();
    for v in vmas {
        let VmaKind::File(id) = &v.kind else { continue };
        if !v.shared {
            if !private.contains(&id.path.as_str()) {
                private.push(&id.path);
            }
            continue;
        }
        if files.contains_key(&(id.path.clone(), true)) {
            continue;
        }
        inj.reset_scratch();
        let path = inj.stage_cstr(&id.path)?;
        let open = |flags: i32| [libc::AT_FDCWD as u64, path, (flags | libc::O_CLOEXEC) as u64];
        let mut fd = inj.syscall_raw(libc::SYS_openat, &open(libc::O_RDWR))?;
        if fd < 0 {
            fd = inj.syscall(
                libc::SYS_openat,
                &open(libc::O_RDONLY),
                format_args!("opening mapped file {:?}", id.path),
            )? as i64;
        }
        files.insert((id.path.clone(), true), fd as u64);
    }
    // As many paths per batch as fit the scratch area with the batch's table (64 bytes a
    // call, the deferred calls that run with it included).
    let mut rest = &private[..];
    while !rest.is_empty() {
        inj.reset_scratch();
        let mut room = inj.scratch_left().saturating_sub(inj.deferred_len() as u64 * 64 + 64);
        let n = rest.iter().take_while(|p| {
            let need = (p.len() as u64 + 1).next_multiple_of(16) + 64;
            room = room.saturating_sub(need);
            room > 0
        });
        let n = n.count().max(1);
        let (chunk, later) = rest.split_at(n);
        rest = later;
        let mut calls = Vec::with_capacity(chunk.len());
        for path in chunk {
            let at = inj.stage_cstr(path)?;
            calls.push(Call::new(
                libc::SYS_openat,
                &[libc::AT_FDCWD as u64, at, (libc::O_RDONLY | libc::O_CLOEXEC) as u64],
                format!("opening mapped file {path:?}"),
            ));
        }
        for (path, fd) in chunk.iter().zip(inj.run_batch(&calls)?) {
            files.insert((path.to_string(), false), fd);
        }
    }
    inj.reset_scratch();
    Ok(files)
}

/// Checks that a page record from the image falls inside a mapping that carries pages, and
/// returns that mapping.
pub fn check_page_run(vmas: &[Vma], addr: u64, len: u64) -> Result<&Vma> {
    let end = addr.saturating_add(len);
    match vmas.iter().find(|v| carries_pages(v) && v.start <= addr && end <= v.end) {
        Some(v) if addr.is_multiple_of(PAGE) => Ok(v),
        _ => bail!("image is corrupt: page data at {addr:#x}-{end:#x} lies outside the mappings that hold pages"),
    }
}

/// Gives every mapping its final protection once its pages are in (deferred: they run with
/// the next batch).
pub fn finish(inj: &mut Injector, vmas: &[Vma]) {
    let calls: Vec<Call> = vmas
        .iter()
        .filter(|v| initial_prot(v) != v.prot)
        .map(|v| {
            Call::new(
                libc::SYS_mprotect,
                &[v.start, v.end - v.start, v.prot as u64],
                format!("setting the protection of {:#x}-{:#x}", v.start, v.end),
            )
        })
        .collect();
    inj.defer(calls);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Advice capture records passes; advice that needs privilege (or is unknown) does not.
    #[test]
    fn only_recorded_advice_is_restored() {
        let vma = |advice: Vec<i32>| Vma {
            start: 1 << 20,
            end: 2 << 20,
            prot: 3,
            shared: false,
            offset: 0,
            kind: VmaKind::Anon,
            growsdown: false,
            accounted: true,
            advice,
        };
        validate_layout(&[vma(RESTORED_ADVICE.to_vec())]).unwrap();
        for bad in [libc::MADV_HWPOISON, libc::MADV_SOFT_OFFLINE, libc::MADV_REMOVE, 99] {
            let e =
                validate_layout(&[vma(vec![libc::MADV_HUGEPAGE, bad])]).unwrap_err().to_string();
            assert!(e.contains(&format!("advice {bad}")), "{e}");
        }
    }

    /// A mapping that smaps does not show as maps did (a scratch area merged with it while
    /// smaps was read) is reported as such, for the capture to read again.
    #[test]
    fn smaps_that_disagrees_with_maps_is_noticed() {
        let me = nix::unistd::getpid();
        // (Other test threads may map memory meanwhile: a few tries for a quiet moment.)
        let maps = (0..20)
            .map(|_| crate::procfs::read_maps(me).unwrap())
            .find(|maps| capture_vmas(me, maps).is_ok())
            .expect("maps and smaps never agreed");
        let mut changed = maps.clone();
        let last =
            changed.iter_mut().rev().find(|m| m.name.is_empty()).expect("an anonymous mapping");
        last.end += PAGE; // as if merged with a page above it
        let e = capture_vmas(me, &changed).unwrap_err();
        assert!(e.downcast_ref::<MappingsChanged>().is_some(), "{e:#}");
    }
}
