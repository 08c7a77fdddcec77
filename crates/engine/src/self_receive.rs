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
//! cannot be passed (pidfd_getfd refused), the restorer reads every record itself
//! (`mem::fill_pages`).

use std::io::Read;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use anyhow::{bail, Context, Result};
use telefork_image::{ImageReader, Vma};

use crate::inject::Injector;
use crate::mem;
use crate::uffd::RemoteUffd;

/// The socket an image arrives on, for the new process to receive its pages from.
#[derive(Debug, Clone, Copy)]
pub struct PagesSocket {
    /// The socket (the restore's `input` must read it without buffering: the process takes
    /// over the stream where the reader stopped).
    pub fd: RawFd,
    /// At most this many bytes of pages (the size limit `input` enforces for the rest).
    pub max_bytes: u64,
}

/// Records per injected recvmsg (2 iovecs each: 257 ≤ IOV_MAX) ...
const BATCH_RECORDS: usize = 128;
/// ... and bytes of pages (the helper populates ahead by at least this much).
const BATCH_BYTES: u64 = 32 << 20;

/// Reads the page index and checks it against the mappings and the size limit: the runs
/// the process will receive.
pub fn read_index<R: Read>(reader: &mut ImageReader<R>, vmas: &[Vma], socket: &PagesSocket) -> Result<Vec<(u64, u64)>> {
    let index = reader.page_index()?.to_vec();
    let mut total = 0u64;
    for &(addr, len) in &index {
        mem::check_page_run(vmas, addr, len)?;
        total += len;
    }
    if total > socket.max_bytes {
        bail!("the image's page index announces {total} bytes of pages, more than the limit of {}", socket.max_bytes);
    }
    Ok(index)
}

/// Places the pages `index` announces: received by the process itself from `socket` where
/// it can (see the module text), else read here. Returns the bytes placed and how many of
/// them were populated through the userfaultfd.
pub fn receive_pages<R: Read + Send>(
    inj: &mut Injector,
    vmas: &[Vma],
    big: bool,
    reader: &mut ImageReader<R>,
    index: &[(u64, u64)],
    socket: &PagesSocket,
    uffd: Option<RemoteUffd>,
) -> Result<(u64, u64)> {
    if reader.checks_page_checksums() {
        bail!("internal error: pages received by the process cannot have their checksums verified");
    }
    let Some(fd) = take_socket(inj, socket.fd)? else {
        crate::timeline::stamp("the socket could not be passed: pages read by the restorer");
        return mem::fill_pages(inj, vmas, big, reader, uffd);
    };
    crate::timeline::stamp("pages received by the process");
    let received = receive_into(inj, vmas, reader, index, fd, uffd.as_ref());
    let closed = inj.syscall(libc::SYS_close, &[fd], "closing the process's copy of the image socket");
    let (total, by_uffd) = received?;
    closed?;
    if let Some(u) = uffd {
        u.release()?;
    }
    // The trailer: nothing may follow the announced records.
    if reader.next_pages()?.is_some() {
        bail!("image is corrupt: a page record beyond its page index");
    }
    Ok((total, by_uffd))
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

fn receive_into<R: Read>(inj: &mut Injector, vmas: &[Vma], reader: &mut ImageReader<R>, index: &[(u64, u64)], fd: u64, uffd: Option<&RemoteUffd>) -> Result<(u64, u64)> {
    // Which records the process can receive (its mapping is writable now), which of those
    // go into memory the userfaultfd populates.
    let mut receivable = Vec::with_capacity(index.len());
    let mut to_populate = Vec::new();
    for (i, &(addr, len)) in index.iter().enumerate() {
        let vma = mem::check_page_run(vmas, addr, len)?;
        let writable = mem::initial_prot(vma) & libc::PROT_WRITE as u32 != 0;
        receivable.push(writable);
        if writable && uffd.is_some_and(|u| u.covers(addr, len)) {
            to_populate.push(i);
        }
    }
    let by_uffd: u64 = to_populate.iter().map(|&i| index[i].1).sum();
    let fill = uffd.map(|u| ZeroFill::new(u, index, to_populate));
    let pid = inj.pid();
    std::thread::scope(|scope| {
        if let Some(fill) = &fill {
            scope.spawn(move || while fill.fill_next() {});
        }
        let placed = (|| -> Result<u64> {
            let mut total = 0u64;
            let mut i = 0;
            while i < index.len() {
                if !receivable[i] {
                    // (The reader checks that it is the record the index announced.)
                    let run = reader.next_pages()?.context("image is truncated: it ends before the pages its index announced")?;
                    mem::place_run(None, inj.mem_file(), pid, run.addr, run.data)?;
                    total += run.data.len() as u64;
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                let mut bytes = index[i].1;
                while j < index.len() && receivable[j] && j - i < BATCH_RECORDS && bytes + index[j].1 <= BATCH_BYTES {
                    bytes += index[j].1;
                    j += 1;
                }
                if let Some(fill) = &fill {
                    fill.ensure(j - 1)?;
                }
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

/// Has the process receive `records` (consecutive in the stream) with one recvmsg, and checks
/// their headers.
fn receive_batch(inj: &mut Injector, fd: u64, records: &[(u64, u64)]) -> Result<()> {
    use telefork_image::format::{page_record_head, PAGE_RECORD_HEAD_LEN as HEAD, PAGE_RECORD_TAIL_LEN as TAIL};
    let k = records.len();
    // Slot n (HEAD + TAIL bytes) holds record n's head, then its checksum.
    let slot = (HEAD + TAIL) as u64;
    inj.reset_scratch();
    let slots = inj.alloc_zeroed(slot * k as u64)?;
    let mut iov = Vec::with_capacity((2 * k + 1) * 16);
    let mut push = |base: u64, len: u64| {
        iov.extend_from_slice(&base.to_ne_bytes());
        iov.extend_from_slice(&len.to_ne_bytes());
    };
    push(slots, HEAD as u64);
    for (n, &(addr, len)) in records.iter().enumerate() {
        push(addr, len);
        // This record's checksum and the next one's head are adjacent in the stream.
        let between = if n + 1 < k { slot } else { TAIL as u64 };
        push(slots + n as u64 * slot + HEAD as u64, between);
    }
    let iov_addr = inj.stage(&iov)?;
    // struct msghdr (LP64): name, namelen (padded), iov, iovlen, control, controllen, flags
    // (padded).
    let mut msg = Vec::with_capacity(56);
    for word in [0u64, 0, iov_addr, (2 * k + 1) as u64, 0, 0, 0] {
        msg.extend_from_slice(&word.to_ne_bytes());
    }
    let msg_addr = inj.stage(&msg)?;
    let want = slot * k as u64 + records.iter().map(|r| r.1).sum::<u64>();
    let (first, last) = (records[0].0, records[k - 1].0 + records[k - 1].1);
    let got = inj.syscall_raw(libc::SYS_recvmsg, &[fd, msg_addr, libc::MSG_WAITALL as u64])?;
    if got < 0 {
        let err = std::io::Error::from_raw_os_error(-got as i32);
        bail!("the process receiving its pages {first:#x}-{last:#x} from the image socket: recvmsg: {err}");
    }
    if got as u64 != want {
        bail!("image is truncated: the connection ended or stalled after {got} of the {want} bytes of page records {first:#x}-{last:#x}");
    }
    let mut heads = vec![0u8; slot as usize * k];
    inj.read_mem(slots, &mut heads)?;
    for (n, &(addr, len)) in records.iter().enumerate() {
        let at = n * slot as usize;
        if heads[at..at + HEAD] != page_record_head(addr, len) {
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
