//! Deciding what travels: the runs of pages of a stopped process that the image must carry,
//! in address order, each at most `CHUNK` long and inside one mapping.
//!
//! Only pages that exist travel: the kernel's page tables tell which pages are present or
//! swapped, so a process that reserved 64 GiB and touched 10 MiB makes a 10 MiB image. Of a
//! private file mapping only the pages the process wrote travel (no longer the file's);
//! shared and special mappings carry none (`layout::carries_pages`). The kernel is asked
//! with PAGEMAP_SCAN (Linux 6.7+), which walks only the page tables that exist; on older
//! kernels (or with `TELEFORK_NO_PAGEMAP_SCAN` set) /proc/PID/pagemap is read, 8 bytes per
//! page.

use std::os::unix::fs::FileExt;

use anyhow::{Context, Result};
use nix::unistd::Pid;
use telefork_image::{Vma, VmaKind};

use crate::pages::layout::{carries_pages, PAGE};

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

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

/// Bytes of memory per page record (and per read of the process's memory).
pub(crate) const CHUNK: u64 = 1 << 20;
const _: () =
    assert!(CHUNK as usize <= telefork_image::MAX_PAGE_CHUNK, "a run must fit one record");

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
/// A guard region's page (MADV_GUARD_INSTALL; the category since Linux 6.14).
pub const PAGE_IS_GUARD: u64 = 1 << 8;

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

/// The guard regions (MADV_GUARD_INSTALL) of the process, as (start, end) ranges in address
/// order: one PAGEMAP_SCAN over its whole user address space. None on a kernel whose
/// PAGEMAP_SCAN does not know them (before 6.14; guard regions came in 6.13, and such a
/// kernel cannot show them).
pub(crate) fn guard_regions(
    pid: Pid,
    maps: &[crate::procfs::MapsEntry],
) -> Result<Vec<(u64, u64)>> {
    const TASK_SIZE: u64 = 0x7fff_ffff_f000;
    let (Some(first), Some(last)) = (maps.first(), maps.iter().rfind(|m| m.end <= TASK_SIZE))
    else {
        return Ok(Vec::new());
    };
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .with_context(|| format!("opening /proc/{pid}/pagemap"))?;
    let mut found = Vec::new();
    let want = (0, PAGE_IS_GUARD, 0, PAGE_IS_GUARD);
    if !pagemap_scan(&pagemap, first.start, last.end, want, &mut found) {
        return Ok(Vec::new());
    }
    Ok(found.iter().map(|r| (r.start, r.end)).collect())
}

/// The runs of pages that must travel, in address order, each at most `CHUNK` long. A
/// guard region's pages never travel (the kernel shows them as swapped: they hold a marker,
/// and reading them fails).
pub(crate) fn travelling_runs(pid: Pid, vmas: &[Vma]) -> Result<Vec<(u64, u64)>> {
    let runs = runs_with_guards(pid, vmas)?;
    let guards: Vec<(u64, u64)> =
        vmas.iter().flat_map(|v| v.flags.guards.iter().copied()).collect();
    if guards.is_empty() {
        return Ok(runs);
    }
    let mut out = Vec::with_capacity(runs.len());
    for (start, len) in runs {
        let mut at = start;
        let end = start + len;
        for &(gs, ge) in guards.iter().filter(|(gs, ge)| *gs < end && *ge > start) {
            if gs > at {
                out.push((at, gs - at));
            }
            at = at.max(ge);
        }
        if at < end {
            out.push((at, end - at));
        }
    }
    Ok(out)
}

fn runs_with_guards(pid: Pid, vmas: &[Vma]) -> Result<Vec<(u64, u64)>> {
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
