//! The restorer writes the pages in: it reads each page record of the image and places it in
//! the new process — through the process's userfaultfd (`uffd`) where it watches the memory,
//! straight into blocks already backed by huge pages (`huge`), else with process_vm_writev
//! after populating big runs in bulk, or through /proc/PID/mem where the mapping is not
//! writable yet. Every record is checked against the mappings before it is placed.

use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;
use telefork_image::{ImageReader, Vma};

use super::huge::{HugeBlocks, Segment};
use super::uffd::RemoteUffd;
use crate::inject::Injector;
use crate::pages::layout::{check_page_run, initial_prot};

/// Buffers in flight between the thread that reads the image and those that place its records.
const BUFFERS: usize = 3;

/// Streams the image's page records into the restored process: into private anonymous
/// memory with UFFDIO_COPY through the process's userfaultfd (`uffd`: fresh pages allocated
/// and filled in one pass), straight into the blocks `huge` prepared, elsewhere — or where
/// userfaultfd is not used — by populating a big run in bulk (an injected
/// MADV_POPULATE_WRITE, far cheaper than faulting page by page) and copying with
/// process_vm_writev (or /proc/PID/mem where the mapping is not writable). A small image is
/// read and placed by this thread (the tracer) alone; a `big` one (see `is_big`) is read and
/// verified by a reader thread and, with userfaultfd or huge pages, placed by this thread and
/// a helper (which never populates: that is an injected call, the tracer's); `huge` prepares
/// its blocks on a thread of its own meanwhile. Releases `uffd` once all pages are in.
/// Returns the number of bytes written, and how many of them went through userfaultfd.
pub(crate) fn fill<R: std::io::Read + Send>(
    inj: &mut Injector,
    vmas: &[Vma],
    big: bool,
    reader: &mut ImageReader<R>,
    uffd: Option<RemoteUffd>,
    huge: Option<&HugeBlocks>,
) -> Result<(u64, u64)> {
    let pid = inj.pid();
    let (mut total, mut by_uffd) = (0u64, 0u64);
    let mut place = |inj: &mut Injector, addr: u64, data: &[u8]| -> Result<()> {
        let vma = check_page_run(vmas, addr, data.len() as u64)?;
        for (at, piece, how) in placements(huge, addr, data) {
            let uffd = uffd.as_ref().filter(|_| how == Segment::Usual);
            let covered = uffd.is_some_and(|u| u.covers(at, piece.len() as u64));
            // Populating costs one injected call: worth it for big runs only. (Calls still
            // deferred run first, and their failures count.)
            let huge_page = how == Segment::Prepared { huge: true };
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
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<NextRecord>(BUFFERS);
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
                                uffd.filter(|_| how == Segment::Usual),
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
    Ok((total, by_uffd))
}

/// The parts of a page run `data` at `addr` and how each is placed (all of it the usual way
/// where no blocks are prepared).
fn placements<'d>(
    huge: Option<&HugeBlocks>,
    addr: u64,
    data: &'d [u8],
) -> Vec<(u64, &'d [u8], Segment)> {
    match huge {
        None => vec![(addr, data, Segment::Usual)],
        Some(h) => h
            .segments(addr, data.len() as u64)
            .into_iter()
            .map(|(at, len, how)| (at, &data[(at - addr) as usize..][..len as usize], how))
            .collect(),
    }
}

/// What the reader thread passes on: the next page record (its address, and a buffer of its
/// bytes after an 8-byte head), `None` at the image's end, or why reading failed.
type NextRecord = Result<Option<(u64, Vec<u8>)>>;

/// The page records a reader thread passes to the threads that place them.
struct Records {
    rx: std::sync::Mutex<std::sync::mpsc::Receiver<NextRecord>>,
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
    fn next(&self) -> NextRecord {
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
