//! The new process receives its own pages. On the plain image transport the restorer gives
//! the process it is restoring a copy of the image's TCP socket and has it read the page
//! records straight into place: one injected recvmsg per batch of records, whose iovecs point
//! at the pages' addresses and, for the records' headers and checksums, at slots of scratch
//! memory the restorer checks afterwards. Each byte is copied once on this side, off the wire
//! into its page — where reading it here first and placing it then copies it twice. The
//! image's page index, which the origin sends before the pages, says where every record goes
//! before it arrives.
//!
//! Fresh private anonymous memory is populated ahead of the reads, by the restorer: copies of
//! zeros through the process's userfaultfd, by a helper thread running ahead of the batches
//! and by this (the tracer's) thread whenever the helper is behind. A kernel write into a page
//! the process does not have yet would otherwise fault it in one page at a time (and, in a
//! range registered with the userfaultfd, fail).
//!
//! Owns the process's copy of the socket (closed again before the process runs) and scratch
//! memory for one batch at a time. Records in mappings the process cannot write yet
//! (read-only file text) are read and placed by the restorer, in their turn. Where the socket
//! cannot be passed (pidfd_getfd refused), or the image has no page index, `hand_over` says
//! so and the restorer reads every record itself (`write`).

use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use anyhow::{bail, Context, Result};
use telefork_image::format::{page_record_head, PAGE_RECORD_HEAD_LEN, PAGE_RECORD_TAIL_LEN};
use telefork_image::{ImageReader, Vma};

use super::uffd::RemoteUffd;
use super::write::{place_run, MADV_POPULATE_WRITE, POPULATE_MIN};
use crate::inject::Injector;
use crate::pages::layout::{check_page_run, initial_prot};

/// The socket an image arrives on, for the new process to receive its pages from.
#[derive(Debug, Clone, Copy)]
pub struct PagesSocket<'a> {
    /// The socket (the restore's `input` must read it without buffering: the process takes
    /// over the stream where the reader stopped).
    pub fd: BorrowedFd<'a>,
    /// At most this many bytes of page records reach the process this way (`input` has a
    /// limit of its own for what it reads).
    pub max_bytes: u64,
}

/// Records per injected recvmsg (2 iovecs each: 257 ≤ IOV_MAX) ...
const BATCH_RECORDS: usize = 128;
/// ... and bytes of pages (the helper populates ahead by at least this much).
const BATCH_BYTES: u64 = 32 << 20;

/// The process's copy of the image socket, and the page records it is to receive from it.
pub(crate) struct HandOver {
    index: Vec<(u64, u64)>,
    fd: u64,
}

/// Gives the process a copy of `socket` to receive its pages from (see the module text),
/// where the image has a page index (an origin of this version sends one on a socket) and
/// the socket can be passed; `None` where not: the restorer places the pages itself.
pub(crate) fn hand_over<R: Read>(
    inj: &mut Injector,
    vmas: &[Vma],
    reader: &mut ImageReader<R>,
    socket: &PagesSocket,
) -> Result<Option<HandOver>> {
    if reader.checks_page_checksums() {
        bail!("internal error: pages received by the process cannot have their checksums verified");
    }
    let Some(index) = read_index(reader, vmas, socket)? else {
        return Ok(None);
    };
    let Some(fd) = take_socket(inj, socket.fd.as_raw_fd())? else {
        crate::timeline::stamp("the socket could not be passed: pages read by the restorer");
        return Ok(None);
    };
    crate::timeline::stamp("pages received by the process");
    Ok(Some(HandOver { index, fd }))
}

/// Has the process receive its pages through what `hand_over` gave it, closes its copy of
/// the socket and releases `uffd`. Returns the bytes placed and how many of them were
/// populated (or placed) through the userfaultfd.
pub(crate) fn receive<R: Read>(
    inj: &mut Injector,
    vmas: &[Vma],
    big: bool,
    reader: &mut ImageReader<R>,
    HandOver { index, fd }: HandOver,
    uffd: Option<RemoteUffd>,
) -> Result<(u64, u64)> {
    let received = receive_into(inj, vmas, big, reader, &index, fd, uffd.as_ref());
    let closed =
        inj.syscall(libc::SYS_close, &[fd], "closing the process's copy of the image socket");
    let (total, by_uffd) = received?;
    closed?;
    if let Some(u) = uffd {
        u.release()?;
    }
    // The trailer (the reader refuses a record beyond the index).
    if reader.next_pages()?.is_some() {
        bail!("image is corrupt: a page record beyond its page index");
    }
    Ok((total, by_uffd))
}

/// Reads the page index, if the image has one, and checks it against the mappings and the
/// size limit: the records the process will receive.
fn read_index<R: Read>(
    reader: &mut ImageReader<R>,
    vmas: &[Vma],
    socket: &PagesSocket,
) -> Result<Option<Vec<(u64, u64)>>> {
    let Some(index) = reader.page_index()? else { return Ok(None) };
    let index = index.to_vec();
    // (Counted with their records' heads and checksums, which the process receives too.)
    let overhead = (PAGE_RECORD_HEAD_LEN + PAGE_RECORD_TAIL_LEN) as u64;
    let mut total = 0u64;
    for &(addr, len) in &index {
        check_page_run(vmas, addr, len)?;
        total += len + overhead;
    }
    if total > socket.max_bytes {
        bail!("the image's page index announces {total} bytes of page records, more than the limit of {}", socket.max_bytes);
    }
    Ok(Some(index))
}

/// A copy of our fd `socket` in the process (pidfd_getfd there, on a pidfd of us); `None`
/// where the kernel or the process's credentials refuse it.
fn take_socket(inj: &mut Injector, socket: RawFd) -> Result<Option<u64>> {
    let me = std::process::id() as u64;
    let pidfd = inj.syscall_raw(libc::SYS_pidfd_open, &[me, 0])?;
    if pidfd < 0 {
        return Ok(None);
    }
    let fd = inj.syscall_raw(libc::SYS_pidfd_getfd, &[pidfd as u64, socket as u64, 0])?;
    inj.syscall(libc::SYS_close, &[pidfd as u64], "closing the process's pidfd of the restorer")?;
    Ok((fd >= 0).then_some(fd as u64))
}

fn receive_into<R: Read>(
    inj: &mut Injector,
    vmas: &[Vma],
    big: bool,
    reader: &mut ImageReader<R>,
    index: &[(u64, u64)],
    fd: u64,
    uffd: Option<&RemoteUffd>,
) -> Result<(u64, u64)> {
    // Which records the process can receive (its mapping is writable now), which of those
    // go into memory the userfaultfd populates.
    let mut receivable = Vec::with_capacity(index.len());
    let mut covered = Vec::with_capacity(index.len());
    for &(addr, len) in index {
        let vma = check_page_run(vmas, addr, len)?;
        let writable = initial_prot(vma) & libc::PROT_WRITE as u32 != 0;
        receivable.push(writable);
        covered.push(writable && uffd.is_some_and(|u| u.covers(addr, len)));
    }
    let to_populate: Vec<usize> = (0..index.len()).filter(|&i| covered[i]).collect();
    let by_uffd: u64 = to_populate.iter().map(|&i| index[i].1).sum();
    let fill = uffd.map(|u| ZeroFill::new(u, index, to_populate));
    let pid = inj.pid();
    std::thread::scope(|scope| {
        // (A big image only: the helper wants the second CPU, which `restore` gives a big
        // one; otherwise the tracer populates each batch before it.)
        if let Some(fill) = fill.as_ref().filter(|_| big) {
            scope.spawn(move || while fill.fill_next() {});
        }
        let placed = (|| -> Result<u64> {
            let mut total = 0u64;
            let mut i = 0;
            while i < index.len() {
                if !receivable[i] {
                    // (The reader checks that it is the record the index announced.)
                    let run = reader.next_pages()?.context(
                        "image is truncated: it ends before the pages its index announced",
                    )?;
                    place_run(None, inj.mem_file(), pid, run.addr, run.data)?;
                    total += run.data.len() as u64;
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                let mut bytes = index[i].1;
                while j < index.len()
                    && receivable[j]
                    && j - i < BATCH_RECORDS
                    && bytes + index[j].1 <= BATCH_BYTES
                {
                    bytes += index[j].1;
                    j += 1;
                }
                if let Some(fill) = &fill {
                    fill.ensure(j - 1)?;
                }
                populate(inj, &index[i..j], &covered[i..j])?;
                receive_batch(inj, fd, &index[i..j])?;
                reader.pages_received_elsewhere(j - i)?;
                total += bytes;
                i = j;
            }
            Ok(total)
        })();
        if let Some(fill) = &fill {
            fill.stop();
        }
        placed
    })
    .map(|total| (total, by_uffd))
}

/// Populates the memory of the records no userfaultfd populates (shared memory, written
/// pages of private files; all of them where the process has no userfaultfd) with an injected
/// MADV_POPULATE_WRITE per stretch of adjacent records of at least `POPULATE_MIN` bytes:
/// one call in bulk instead of a fault per page during the process's reads. Best effort (a
/// kernel without it: the reads fault them in).
fn populate(inj: &mut Injector, records: &[(u64, u64)], covered: &[bool]) -> Result<()> {
    let mut stretches: Vec<(u64, u64)> = Vec::new();
    let mut adjacent = false;
    for (&(addr, len), &covered) in records.iter().zip(covered) {
        if covered {
            adjacent = false;
            continue;
        }
        match stretches.last_mut() {
            Some((_, end)) if adjacent && *end == addr => *end = addr + len,
            _ => stretches.push((addr, addr + len)),
        }
        adjacent = true;
    }
    for (start, end) in stretches.into_iter().filter(|(s, e)| e - s >= POPULATE_MIN as u64) {
        let _ = inj.syscall_raw(libc::SYS_madvise, &[start, end - start, MADV_POPULATE_WRITE])?;
    }
    Ok(())
}

/// Has the process receive `records` (consecutive in the stream) with one recvmsg, and checks
/// their headers. (Another recvmsg for the rest where the first one returned early: the
/// socket's receive timeout bounds a whole call, so a slow link may take several.)
fn receive_batch(inj: &mut Injector, fd: u64, records: &[(u64, u64)]) -> Result<()> {
    const HEAD: usize = PAGE_RECORD_HEAD_LEN;
    const TAIL: usize = PAGE_RECORD_TAIL_LEN;
    let k = records.len();
    // Slot n (HEAD + TAIL bytes) holds record n's head, then its checksum.
    let slot = (HEAD + TAIL) as u64;
    inj.reset_scratch();
    let slots = inj.alloc_zeroed(slot * k as u64)?;
    // The stream's pieces, in order: (where in the process, how many bytes).
    let mut pieces = Vec::with_capacity(2 * k + 1);
    pieces.push((slots, HEAD as u64));
    for (n, &(addr, len)) in records.iter().enumerate() {
        pieces.push((addr, len));
        // This record's checksum and the next one's head are adjacent in the stream.
        let between = if n + 1 < k { slot } else { TAIL as u64 };
        pieces.push((slots + n as u64 * slot + HEAD as u64, between));
    }
    let want: u64 = pieces.iter().map(|p| p.1).sum();
    let (first, last) = (records[0].0, records[k - 1].0 + records[k - 1].1);
    let scratch = inj.scratch_mark();
    let mut got = 0u64;
    while got < want {
        // The pieces not received yet (the first one perhaps in part), as iovecs.
        inj.reset_scratch_to(scratch);
        let mut iov = Vec::with_capacity(pieces.len() * 16);
        let mut skip = got;
        for &(base, len) in &pieces {
            if skip >= len {
                skip -= len;
                continue;
            }
            iov.extend_from_slice(&(base + skip).to_ne_bytes());
            iov.extend_from_slice(&(len - skip).to_ne_bytes());
            skip = 0;
        }
        let iov_addr = inj.stage(&iov)?;
        // struct msghdr (LP64): name, namelen (padded), iov, iovlen, control, controllen,
        // flags (padded).
        let mut msg = Vec::with_capacity(56);
        for word in [0u64, 0, iov_addr, iov.len() as u64 / 16, 0, 0, 0] {
            msg.extend_from_slice(&word.to_ne_bytes());
        }
        let msg_addr = inj.stage(&msg)?;
        let n = inj.syscall_raw(libc::SYS_recvmsg, &[fd, msg_addr, libc::MSG_WAITALL as u64])?;
        match n {
            0 => bail!("image is truncated: the connection ended after {got} of the {want} bytes of page records {first:#x}-{last:#x}"),
            n if n == -(libc::EAGAIN as i64) => {
                bail!("the image stalled: no bytes came for the socket's timeout, after {got} of the {want} bytes of page records {first:#x}-{last:#x}")
            }
            n if n < 0 => {
                let err = std::io::Error::from_raw_os_error(-n as i32);
                bail!("the process receiving its pages {first:#x}-{last:#x} from the image socket: recvmsg: {err}");
            }
            n => got += n as u64,
        }
    }
    let mut heads = vec![0u8; slot as usize * k];
    inj.read_mem(slots, &mut heads)?;
    for (n, &(addr, len)) in records.iter().enumerate() {
        let at = n * slot as usize;
        // (The head as the index announced it; the checksum 0, as pages without checksums
        // are written.)
        if heads[at..at + HEAD] != page_record_head(addr, len)
            || heads[at + HEAD..at + HEAD + TAIL] != [0; TAIL]
        {
            bail!("image is corrupt: the page record received for {addr:#x}-{:#x} is not the one its page index announced", addr + len);
        }
    }
    Ok(())
}

/// Populates the fresh memory of the records the process will receive, in stream order:
/// userfaultfd copies of zeros (one pass that allocates and clears each page, as a
/// MADV_POPULATE_WRITE of its own would), by a helper thread and by whoever needs a record
/// the helper has not reached (`ensure`).
struct ZeroFill<'a> {
    uffd: &'a RemoteUffd,
    index: &'a [(u64, u64)],
    /// Indices into `index` of the records to populate, ascending.
    todo: Vec<usize>,
    /// The next position in `todo` to claim.
    next: AtomicUsize,
    state: Mutex<FillState>,
    changed: Condvar,
    /// Read-only zeros to copy from: never written, so every read comes from the kernel's
    /// shared zero page, always in cache.
    zeros: Vec<u8>,
}

struct FillState {
    done: Vec<bool>,
    /// `todo[..prefix]` are all done.
    prefix: usize,
    failed: Option<String>,
}

impl<'a> ZeroFill<'a> {
    fn new(uffd: &'a RemoteUffd, index: &'a [(u64, u64)], todo: Vec<usize>) -> ZeroFill<'a> {
        let n = todo.len();
        ZeroFill {
            uffd,
            index,
            todo,
            next: AtomicUsize::new(0),
            state: Mutex::new(FillState { done: vec![false; n], prefix: 0, failed: None }),
            changed: Condvar::new(),
            zeros: vec![0u8; 1 << 20],
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FillState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims and populates the next record; false once none is left (or after a failure).
    fn fill_next(&self) -> bool {
        let pos = self.next.fetch_add(1, Ordering::SeqCst);
        if pos >= self.todo.len() || self.lock().failed.is_some() {
            return false;
        }
        // (Whatever happens from here, the claimed record ends done or failed: a panic would
        // otherwise leave whoever waits for it waiting.)
        struct Claimed<'f, 'a>(&'f ZeroFill<'a>, bool);
        impl Drop for Claimed<'_, '_> {
            fn drop(&mut self) {
                if !self.1 {
                    let mut st = self.0.lock();
                    st.failed.get_or_insert_with(|| "the thread populating memory panicked".into());
                    self.0.changed.notify_all();
                }
            }
        }
        let mut claimed = Claimed(self, false);
        let (addr, len) = self.index[self.todo[pos]];
        let mut r = Ok(());
        let mut off = 0;
        while off < len && r.is_ok() {
            let n = (len - off).min(self.zeros.len() as u64);
            r = self.uffd.copy(addr + off, &self.zeros[..n as usize]);
            off += n;
        }
        let mut st = self.lock();
        match r {
            Ok(()) => {
                st.done[pos] = true;
                while st.prefix < st.done.len() && st.done[st.prefix] {
                    st.prefix += 1;
                }
            }
            Err(e) => st.failed = Some(format!("{e:#}")),
        }
        self.changed.notify_all();
        claimed.1 = true;
        st.failed.is_none()
    }

    /// Returns once every record up to `index[upto]` that needs it is populated: populating
    /// them here while the helper has not claimed them, waiting for those it has.
    fn ensure(&self, upto: usize) -> Result<()> {
        let need = self.todo.partition_point(|&i| i <= upto);
        while self.next.load(Ordering::SeqCst) < need && self.fill_next() {}
        let mut st = self.lock();
        while st.prefix < need && st.failed.is_none() {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        match &st.failed {
            Some(e) => bail!("populating the process's memory ahead of its pages: {e}"),
            None => Ok(()),
        }
    }

    /// Stops the helper (nothing more to claim).
    fn stop(&self) {
        self.next.store(usize::MAX / 2, Ordering::SeqCst);
    }
}
