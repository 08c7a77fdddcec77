//! Huge pages for the new process's fully written memory. Where the image's page index shows
//! that every page of an aligned huge-page block (2 MiB on x86-64) of private anonymous memory
//! travels, the restorer backs that block with one transparent huge page before the pages
//! arrive: it gives the block its first 4 KiB page and asks the kernel to collapse the block
//! into a huge page (process_madvise MADV_COLLAPSE, from a thread of its own, running ahead of
//! the pages). The pages are then copied into memory that is already
//! there. Placing 4 KiB pages costs a fault, an allocation, a zeroing and a cgroup charge each:
//! a 4 GiB process's fresh memory was placed at 2.3–2.9 GB/s here, its huge pages at 10–18
//! (warm memory; `README`'s "Huge pages").
//!
//! What the process relies on stays as captured: only blocks the image fills completely (no
//! page allocated that the process did not have: the same resident size), never in a mapping
//! with MADV_NOHUGEPAGE, and MADV_COLLAPSE sets no flag on the mapping (its VmFlags, the THP
//! advice its children inherit, stay as they were). Only smaps' AnonHugePages tells — a
//! layout the kernel chooses itself wherever THP is "always". Where the kernel will not (THP
//! disabled, no free huge page, no CAP_SYS_NICE for process_madvise), a block simply stays in
//! 4 KiB pages.
//!
//! A block's first page is given before its pages are written (the block's state says when a
//! placing thread may write into it: a block not prepared yet when its pages come is given up,
//! one being prepared is waited for), so the pages always win.
//!
//! Owns: the list of blocks and each block's state, for one restore. Written by hand: no
//! crate offers process_madvise (one system call).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};

use nix::unistd::Pid;
use telefork_image::{Vma, VmaKind};

use super::uffd::RemoteUffd;
use crate::pages::layout::{initial_prot, PAGE};

/// MADV_COLLAPSE (Linux 6.1): make huge pages of a range now, whatever the THP setting
/// ("never" aside).
const MADV_COLLAPSE: i32 = 25;
/// Images carrying more page bytes than this get huge pages. Measured (TLS transport, a
/// testbed of two nodes on 2 vCPUs, interleaved rounds): at 4 GiB the telefork ran at 1.48
/// against 1.27 GB/s with 4 KiB pages (medians of 18), at 1 GiB at 1.78 against 1.97 (medians
/// of 21) — there 4 KiB pages come fast from memory the VM still holds, and each collapse
/// holds the process's mmap lock for writing while the placing threads wait.
const MIN_BYTES: u64 = 2 << 30;
/// Blocks prepared per round (16 MiB on x86-64): a first page each, one unregister per
/// stretch of neighbours, one process_madvise.
const BATCH: usize = 8;

const UNTOUCHED: u8 = 0;
const PREPARING: u8 = 1;
/// Given up (or never prepared): placed the usual way.
const SETTLED: u8 = 2;
/// Its first page given and out of the userfaultfd (or none watched it), but the kernel made
/// no huge page of it: written straight into.
const PREPARED: u8 = 3;
/// Prepared and backed by a huge page.
const HUGE: u8 = 4;
/// Its first page given, but still watched by the userfaultfd (taking it out failed): that
/// page is written straight in, the rest the usual way.
const TOUCHED: u8 = 5;
/// Preparing slower than this (bytes per second of the preparing thread's CPU time), twice in
/// a row, stops it: 4 KiB pages are faster then. (Measured against stopping at any second slow
/// batch, 4 GiB TLS, four interleaved rounds of three: 1.38 against 1.25 GB/s, medians of 12.)
const SLOW_BYTES_PER_SEC: f64 = 3e9;

/// The huge-page blocks of one restore and where each stands.
pub struct HugeBlocks {
    pid: Pid,
    pidfd: OwnedFd,
    size: u64,
    /// Block start addresses, ascending (the page records' order).
    starts: Vec<u64>,
    state: Vec<AtomicU8>,
    lock: Mutex<()>,
    settled: Condvar,
    /// Why preparing stopped before the last block, if it did.
    stopped: Mutex<Option<String>>,
    /// Prepare every block, however slow (`TELEFORK_HUGE_PAGES=always`).
    even_if_slow: bool,
    /// Stop preparing (`no_more`).
    no_more: AtomicBool,
}

/// The kernel's huge page size for anonymous memory (PMD size: 2 MiB on x86-64 and on arm64
/// with 4 KiB pages), or `None` where transparent huge pages are off or absent.
fn huge_page_size() -> Option<u64> {
    let enabled = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    if enabled.contains("[never]") {
        return None;
    }
    let size: u64 = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (size.is_power_of_two() && size > PAGE).then_some(size)
}

/// The CPU time this thread has used.
fn thread_cpu_time() -> std::time::Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(std::time::Duration::from)
        .unwrap_or_default()
}

/// Whether a huge page in `v` is something the process could have had itself.
fn may_be_huge(v: &Vma) -> bool {
    v.kind == VmaKind::Anon
        && !v.shared
        && initial_prot(v) & libc::PROT_WRITE as u32 != 0
        && !v.advice.contains(&libc::MADV_NOHUGEPAGE)
}

/// The aligned blocks of `size` bytes that lie in one mapping `may_be_huge` allows and that
/// the page records of `index` (ascending, checked by the image reader) cover completely.
fn covered_blocks(vmas: &[Vma], index: &[(u64, u64)], size: u64) -> Vec<u64> {
    let mut blocks = Vec::new();
    // Contiguous stretches of the index, merged.
    let mut stretches: Vec<(u64, u64)> = Vec::new();
    for &(addr, len) in index {
        let Some(end) = addr.checked_add(len) else { break };
        match stretches.last_mut() {
            Some((_, e)) if *e == addr => *e = end,
            _ => stretches.push((addr, end)),
        }
    }
    let mut vma = vmas.iter().peekable();
    for (start, end) in stretches {
        // (Checked: the index comes from the sender; nothing near the top of the address
        // space is a block.)
        let mut b = start.checked_next_multiple_of(size);
        while let Some(block) = b.filter(|b| b.checked_add(size).is_some_and(|e| e <= end)) {
            while vma.peek().is_some_and(|v| v.end <= block) {
                vma.next();
            }
            if vma
                .peek()
                .is_some_and(|v| v.start <= block && block + size <= v.end && may_be_huge(v))
            {
                blocks.push(block);
            }
            b = block.checked_add(size);
        }
    }
    blocks
}

/// How the pages of a stretch of memory are placed (`HugeBlocks::segments`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// The usual way (through the userfaultfd, where it watches the mapping).
    Usual,
    /// Into a prepared block, no longer watched by the userfaultfd: copied straight in. `huge`:
    /// the block is a huge page (nothing to populate first).
    Prepared { huge: bool },
}

impl HugeBlocks {
    /// The blocks of process `pid` to back with huge pages, or `None` if there are none (or
    /// the kernel has no transparent huge pages). `index`: the image's page index.
    /// `TELEFORK_HUGE_PAGES=never` turns this off, `=always` on for images under `MIN_BYTES`
    /// too, and however slowly the huge pages come.
    pub fn plan(pid: Pid, vmas: &[Vma], index: &[(u64, u64)]) -> Option<HugeBlocks> {
        let carried: u64 = index.iter().map(|&(_, len)| len).sum();
        let setting = crate::never_or_always("TELEFORK_HUGE_PAGES");
        if !setting.unwrap_or(carried > MIN_BYTES) {
            return None;
        }
        let mut blocks = HugeBlocks::new(pid, vmas, index)?;
        blocks.even_if_slow = setting == Some(true);
        Some(blocks)
    }

    /// The blocks of process `pid` to back with huge pages, whatever the image's size.
    fn new(pid: Pid, vmas: &[Vma], index: &[(u64, u64)]) -> Option<HugeBlocks> {
        let size = huge_page_size()?;
        let starts = covered_blocks(vmas, index, size);
        if starts.is_empty() {
            return None;
        }
        let pidfd = crate::pidfd::open(pid.as_raw()).ok()?;
        let state = starts.iter().map(|_| AtomicU8::new(UNTOUCHED)).collect();
        Some(HugeBlocks {
            pid,
            pidfd,
            size,
            starts,
            state,
            lock: Mutex::new(()),
            settled: Condvar::new(),
            stopped: Mutex::new(None),
            even_if_slow: false,
            no_more: AtomicBool::new(false),
        })
    }

    /// Prepares the blocks in order, skipping those a placing thread gave up, until all are
    /// settled: each batch is taken out of `uffd` first (the kernel collapses no range a
    /// userfaultfd watches for missing pages). Run on a thread of its own. Stops (and gives
    /// up the rest, which `uffd` still watches) at the first refusal that would repeat — no
    /// MADV_COLLAPSE, THP off for the process, no permission — and where huge pages come
    /// slower than 4 KiB pages would: fresh memory the host must fault in first (a VM's freed
    /// memory it took back) is zeroed at ~0.5–1 GB/s in huge pages, and copied into 4 KiB pages
    /// at ~1–1.5 GB/s by the placing threads.
    pub fn prepare_all(&self, uffd: Option<&RemoteUffd>) {
        // (However this stops, no block stays PREPARING: placing threads wait for those.)
        let _settle = SettleOnDrop(self);
        let stop =
            |why: String| *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        let mut next = 0;
        let (mut slow_batches, mut refused_batches) = (0, 0);
        let mut claimed = Vec::with_capacity(BATCH);
        while next < self.starts.len() && !self.no_more.load(Ordering::Acquire) {
            claimed.clear();
            while claimed.len() < BATCH && next < self.starts.len() {
                if self.state[next]
                    .compare_exchange(UNTOUCHED, PREPARING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    claimed.push(next);
                }
                next += 1;
            }
            if claimed.is_empty() {
                continue;
            }
            // (In the tests, placing threads reach blocks still being prepared.)
            #[cfg(test)]
            std::thread::sleep(std::time::Duration::from_millis(20));
            let t0 = thread_cpu_time();
            let (done, refused) = self.prepare(&claimed, uffd);
            {
                let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                for (&i, &state) in claimed.iter().zip(&done) {
                    self.state[i].store(state, Ordering::Release);
                }
            }
            self.settled.notify_all();
            match refused {
                Some(Refusal::Final(why)) => return stop(why),
                // (EINVAL twice in a row: THP is off for the process, or MADV_COLLAPSE unknown.)
                Some(Refusal::Collapse(why)) => {
                    refused_batches += 1;
                    if refused_batches >= 2 {
                        return stop(why);
                    }
                }
                None => refused_batches = 0,
            }
            // (Its own CPU time: a VM's host faulting memory in counts, waiting for a CPU not.)
            let took = thread_cpu_time().saturating_sub(t0);
            // (Twice in a row: one slow batch may be a passing stretch of cold memory.)
            if took.as_secs_f64() * SLOW_BYTES_PER_SEC > (claimed.len() as u64 * self.size) as f64 {
                slow_batches += 1;
                if slow_batches >= 2 && !self.even_if_slow {
                    return stop(format!("slow ({} blocks took {took:?})", claimed.len()));
                }
            } else {
                slow_batches = 0;
            }
        }
    }

    /// Asks `prepare_all` to stop after the batch in hand (the pages ended, or placing them
    /// failed).
    pub fn no_more(&self) {
        self.no_more.store(true, Ordering::Release);
    }

    /// Prepares `blocks`: gives each its first page (through `uffd` while it still watches
    /// the block, so the mapping has its anon_vma before any part of it is taken out of the
    /// userfaultfd — parts with different ones would never merge again; else a byte written
    /// with process_vm_writev), takes them out of `uffd`, and collapses them (one
    /// process_madvise). Returns each block's new state, and why preparing should stop, if it
    /// should.
    fn prepare(&self, blocks: &[usize], uffd: Option<&RemoteUffd>) -> (Vec<u8>, Option<Refusal>) {
        let mut done = vec![PREPARED; blocks.len()];
        let mut refused = None;
        match uffd {
            Some(u) => {
                for (k, &i) in blocks.iter().enumerate() {
                    if u.copy(self.starts[i], &ZERO_PAGE).is_err() {
                        done[k] = SETTLED; // (untouched and still watched: placed the usual way)
                    }
                }
                // (Consecutive blocks in one call: each call splits a mapping, merged again
                // when the userfaultfd lets go of it all.)
                let mut k = 0;
                while k < blocks.len() {
                    if done[k] != PREPARED {
                        k += 1;
                        continue;
                    }
                    let first = k;
                    let start = self.starts[blocks[k]];
                    let mut end = start + self.size;
                    k += 1;
                    while k < blocks.len() && done[k] == PREPARED && self.starts[blocks[k]] == end {
                        end += self.size;
                        k += 1;
                    }
                    if let Err(e) = u.unwatch(start, end - start) {
                        done[first..k].fill(TOUCHED);
                        refused = Some(Refusal::Final(format!("{e:#}")));
                    }
                }
            }
            None => {
                let zero = [0u8; 1];
                let local: Vec<std::io::IoSlice> =
                    blocks.iter().map(|_| std::io::IoSlice::new(&zero)).collect();
                let remote: Vec<nix::sys::uio::RemoteIoVec> = blocks
                    .iter()
                    .map(|&i| nix::sys::uio::RemoteIoVec { base: self.starts[i] as usize, len: 1 })
                    .collect();
                // (If it fails, so does the collapse: the blocks are just written into.)
                let _ = nix::sys::uio::process_vm_writev(self.pid, &local, &remote);
            }
        }
        let ready: Vec<usize> = (0..blocks.len()).filter(|&k| done[k] == PREPARED).collect();
        if ready.is_empty() {
            return (done, refused);
        }
        let ranges: Vec<libc::iovec> = ready
            .iter()
            .map(|&k| libc::iovec {
                iov_base: self.starts[blocks[k]] as *mut libc::c_void,
                iov_len: self.size as usize,
            })
            .collect();
        // SAFETY: process_madvise reads `ranges.len()` iovecs from `ranges`, which outlives
        // the call; the addresses are the other process's, never dereferenced here.
        let r = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                self.pidfd.as_raw_fd(),
                ranges.as_ptr(),
                ranges.len(),
                MADV_COLLAPSE,
                0,
            )
        };
        if r >= 0 {
            // The bytes advised: the blocks before the first that failed, if one did.
            for &k in ready.iter().take((r as u64 / self.size) as usize) {
                done[k] = HUGE;
            }
        } else {
            let e = std::io::Error::last_os_error();
            let why = format!("MADV_COLLAPSE: {e}");
            refused = refused.or(match e.raw_os_error() {
                Some(libc::EPERM | libc::ENOSYS | libc::ESRCH) => Some(Refusal::Final(why)),
                Some(libc::EINVAL) => Some(Refusal::Collapse(why)),
                _ => None, // (no huge page free just now, a page busy: the next may do)
            });
        }
        (done, refused)
    }

    /// Called before pages are written at `[addr, addr+len)`: gives up the blocks there not
    /// prepared yet, waits for those being prepared, and says how each part of the run is to
    /// be placed (a run of the usual kind and prepared blocks is cut at the block edges).
    pub fn segments(&self, addr: u64, len: u64) -> Vec<(u64, u64, Segment)> {
        let mut out: Vec<(u64, u64, Segment)> = Vec::with_capacity(1);
        let mut push = |from: u64, to: u64, how: Segment| {
            if from >= to {
                return;
            }
            match out.last_mut() {
                Some((a, l, h)) if *h == how && *a + *l == from => *l += to - from,
                _ => out.push((from, to - from, how)),
            }
        };
        let end = addr + len;
        let mut at = addr;
        let first = self.starts.partition_point(|&b| b + self.size <= addr);
        for (&start, s) in
            self.starts[first..].iter().zip(&self.state[first..]).take_while(|(&b, _)| b < end)
        {
            if s.compare_exchange(UNTOUCHED, SETTLED, Ordering::AcqRel, Ordering::Acquire)
                == Err(PREPARING)
            {
                let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                while s.load(Ordering::Acquire) == PREPARING {
                    g = self.settled.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            }
            push(at, start.max(at), Segment::Usual);
            at = start.max(at);
            let to = (start + self.size).min(end);
            match s.load(Ordering::Acquire) {
                HUGE => push(at, to, Segment::Prepared { huge: true }),
                PREPARED => push(at, to, Segment::Prepared { huge: false }),
                TOUCHED => {
                    let first_page_end = (start + PAGE).min(to);
                    push(at, first_page_end, Segment::Prepared { huge: false });
                    push(at.max(first_page_end), to, Segment::Usual);
                }
                _ => push(at, to, Segment::Usual),
            }
            at = to;
        }
        push(at, end, Segment::Usual);
        out
    }

    /// Why preparing stopped early, if it did.
    pub fn stopped_because(&self) -> Option<String> {
        self.stopped.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The bytes of the blocks that became huge pages.
    pub fn huge_bytes(&self) -> u64 {
        self.state.iter().filter(|s| s.load(Ordering::Acquire) == HUGE).count() as u64 * self.size
    }
}

/// Why preparing should stop (`prepare`).
enum Refusal {
    /// For good: no permission, no such call, the process gone, the userfaultfd refusing.
    Final(String),
    /// The collapse was refused (EINVAL): for good if it happens again.
    Collapse(String),
}

/// A page of zeros, copied to the start of a block to prepare it.
static ZERO_PAGE: [u8; PAGE as usize] = [0; PAGE as usize];

struct SettleOnDrop<'a>(&'a HugeBlocks);

impl Drop for SettleOnDrop<'_> {
    fn drop(&mut self) {
        let _g = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        for s in &self.0.state {
            let _ = s.compare_exchange(PREPARING, SETTLED, Ordering::AcqRel, Ordering::Acquire);
            let _ = s.compare_exchange(UNTOUCHED, SETTLED, Ordering::AcqRel, Ordering::Acquire);
        }
        drop(_g);
        self.0.settled.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon(start: u64, end: u64) -> Vma {
        Vma {
            start,
            end,
            prot: 3,
            shared: false,
            offset: 0,
            kind: VmaKind::Anon,
            growsdown: false,
            accounted: true,
            advice: vec![],
            flags: Default::default(),
        }
    }

    const M: u64 = 1 << 20;

    #[test]
    fn only_blocks_the_records_fill_inside_one_allowed_mapping() {
        let vmas = [
            anon(0, 7 * M),
            anon(7 * M, 12 * M),
            Vma { advice: vec![libc::MADV_NOHUGEPAGE], ..anon(20 * M, 24 * M) },
        ];
        // Records of 1 MiB from 1 MiB to 12 MiB, with 5..6 MiB missing, and all of 20..24.
        let mut index: Vec<(u64, u64)> = (1..12).filter(|&m| m != 5).map(|m| (m * M, M)).collect();
        index.extend((20..24).map(|m| (m * M, M)));
        // 0-2: not all carried; 2-4 yes; 4-6: 5 missing; 6-8 crosses a mapping's end;
        // 8-10 and 10-12 yes; 20-24: MADV_NOHUGEPAGE.
        assert_eq!(covered_blocks(&vmas, &index, 2 * M), vec![2 * M, 8 * M, 10 * M]);
    }

    /// The pages in this process's own memory, written while the blocks are prepared: the
    /// pages win over the byte written to prepare a block, the blocks become huge pages where
    /// the kernel has them, and the run cut at block edges is placed whole.
    #[test]
    fn pages_written_while_blocks_are_prepared_win() {
        let Some(size) = huge_page_size() else {
            // (On the real stderr: libtest keeps a passing test's eprintln! to itself.)
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"skipped: no transparent huge pages on this kernel: nothing to test\n",
            );
            return;
        };
        let blocks = 6u64;
        let len = (blocks + 1) * size;
        // SAFETY: a fresh private anonymous mapping, ours alone; unmapped at the end.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED);
        let start = (raw as u64).div_ceil(size) * size;
        let end = start + (blocks - 1) * size;
        let vmas = [anon(start, end)];
        // Records of 768 KiB (cutting across block edges) from a page into the first block
        // to the end: that block is not carried whole, the others are.
        let rec = 768 << 10;
        let index: Vec<(u64, u64)> = (0..)
            .map(|k| start + PAGE + k * rec)
            .take_while(|&a| a < end)
            .map(|a| (a, rec.min(end - a)))
            .collect();
        let pid = nix::unistd::getpid();
        let h = HugeBlocks::new(pid, &vmas, &index).expect("blocks to prepare");
        assert_eq!(h.starts, (1..blocks - 1).map(|k| start + k * size).collect::<Vec<_>>());
        let byte = |a: u64| (a / 4096 % 251) as u8 + 1;
        let mut kinds = Vec::new();
        std::thread::scope(|scope| {
            scope.spawn(|| h.prepare_all(None));
            for &(addr, len) in &index {
                let data: Vec<u8> = (addr..addr + len).map(byte).collect();
                let mut placed = 0;
                for (at, n, how) in h.segments(addr, len) {
                    assert_eq!(at, addr + placed, "segments must follow each other");
                    placed += n;
                    kinds.push(how);
                    let piece = &data[(at - addr) as usize..][..n as usize];
                    let local = [std::io::IoSlice::new(piece)];
                    let remote =
                        [nix::sys::uio::RemoteIoVec { base: at as usize, len: n as usize }];
                    assert_eq!(
                        nix::sys::uio::process_vm_writev(pid, &local, &remote).unwrap(),
                        n as usize
                    );
                }
                assert_eq!(placed, len);
            }
        });
        // SAFETY: the mapping is ours and readable, `index` lies inside it.
        let wrong = index
            .iter()
            .flat_map(|&(a, l)| (a..a + l).step_by(512))
            .find(|&a| unsafe { *(a as *const u8) } != byte(a));
        assert_eq!(wrong, None, "a page lost to the byte written to prepare its block");
        // AnonHugePages of the mapping holding the blocks (with any neighbour it merged with).
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_it = false;
        let mut huge_kib = None;
        for line in smaps.lines() {
            let range = line.split_once(' ').and_then(|(r, _)| r.split_once('-'));
            if let Some((lo, hi)) = range.and_then(|(lo, hi)| {
                Some((u64::from_str_radix(lo, 16).ok()?, u64::from_str_radix(hi, 16).ok()?))
            }) {
                in_it = lo <= start && start < hi;
            } else if let Some(v) = line.strip_prefix("AnonHugePages:").filter(|_| in_it) {
                huge_kib = v.trim().trim_end_matches("kB").trim().parse::<u64>().ok();
            }
        }
        let huge_kib = huge_kib.expect("the mapping in /proc/self/smaps");
        eprintln!(
            "{} of {} blocks huge ({} KiB), segments {kinds:?}",
            h.huge_bytes() / size,
            h.starts.len(),
            huge_kib
        );
        assert!(
            huge_kib * 1024 >= h.huge_bytes(),
            "the blocks reported huge are huge pages in the mapping"
        );
        assert!(
            kinds.iter().any(|k| matches!(k, Segment::Prepared { .. })),
            "no page run went into a prepared block"
        );
        // SAFETY: unmapping our own mapping, nothing refers to it any more.
        unsafe { libc::munmap(raw, len as usize) };
    }

    #[test]
    fn no_blocks_in_shared_or_file_memory() {
        let vmas = [
            Vma { shared: true, ..anon(0, 4 * M) },
            Vma {
                kind: VmaKind::File(telefork_image::FileId {
                    path: "/x".into(),
                    size: 0,
                    mtime_sec: 0,
                    mtime_nsec: 0,
                    dev: 0,
                    ino: 0,
                }),
                ..anon(8 * M, 12 * M)
            },
        ];
        let index: Vec<(u64, u64)> = (0..4).chain(8..12).map(|m| (m * M, M)).collect();
        assert!(covered_blocks(&vmas, &index, 2 * M).is_empty());
    }
}
