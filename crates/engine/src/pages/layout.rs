//! The memory layout: which mappings a process has (`Vma`s, from /proc/PID/maps and the
//! VmFlags of /proc/PID/smaps), with their protection, sharing, backing file and advice —
//! captured on one side, checked and created again on the other.
//!
//! Capture turns the maps of the stopped process into `Vma`s (`capture`), naming each mapped
//! file by its identity (device, inode, size, mtime). Private file mappings travel as a
//! reference to their file plus only the pages that became anonymous (written by the
//! process); shared file mappings travel as a reference only (the file holds their contents).
//! Special kernel mappings (`[vdso]`, `[vvar]`, …) travel as addresses only — `restore` moves
//! the new process's own ones there. Which pages travel is `scan`'s business.
//!
//! Restore refuses a layout it cannot rebuild faithfully (`validate`, `check_file`), creates
//! every mapping at its address, writable first so its pages can be written in (`create`),
//! and gives each its final protection once all pages are in (`finish`).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;
use telefork_image::{FileId, MemLock, SpecialMap, Vma, VmaFlags, VmaKind};

use crate::inject::{Call, Injector};
use crate::procfs::MapsEntry;

/// The page size, on every architecture telefork runs on (checked against the image's).
pub const PAGE: u64 = 4096;

/// Turns the maps of a stopped process into `Vma`s, with file identities. Refuses what
/// cannot be restored faithfully.
pub fn capture(pid: Pid, maps: &[MapsEntry]) -> Result<Vec<Vma>> {
    let vmflags = crate::procfs::read_vmflags(pid)?;
    let guards = crate::pages::scan::guard_regions(pid, maps)?;
    // smaps must show the very mappings `maps` did (it may be read while a scratch area is
    // mapped: one merged with a neighbour would hide that neighbour's flags).
    if let Some(m) = maps.iter().find(|m| !vmflags.contains_key(&(m.start, m.end))) {
        bail!(MappingsChanged(format!(
            "mapping {:#x}-{:#x} is not in /proc/{pid}/smaps as in maps",
            m.start, m.end
        )));
    }
    refuse_aliased_shared_memory(maps)?;
    let mut vmas = Vec::with_capacity(maps.len());
    // A library is mapped four or five times: stat it once (by the device and inode maps
    // names, and the path).
    let mut files: Vec<(&str, u64, &str, FileId)> = Vec::new();
    for m in maps {
        let prot = (m.read as u32 * libc::PROT_READ as u32)
            | (m.write as u32 * libc::PROT_WRITE as u32)
            | (m.exec as u32 * libc::PROT_EXEC as u32);
        let kind =
            match m.name.as_str() {
                "[vdso]" => VmaKind::Special(SpecialMap::Vdso),
                "[vvar]" => VmaKind::Special(SpecialMap::Vvar),
                "[vvar_vclock]" => VmaKind::Special(SpecialMap::VvarVclock),
                "[vsyscall]" => VmaKind::Special(SpecialMap::Vsyscall),
                "" | "[heap]" | "[stack]" => VmaKind::Anon,
                // A shared anonymous mapping is a hidden shmem file the kernel names this way.
                n if m.shared && n.starts_with("/dev/zero") => VmaKind::Anon,
                // Anonymous memory named with prctl(PR_SET_VMA_ANON_NAME).
                n if anon_name(n, m.shared).is_some() => VmaKind::Anon,
                n if n.starts_with('[') => {
                    return Err(crate::error::refusal(
                        format!("mapping {:#x}-{:#x} is the special mapping {n}", m.start, m.end),
                        "the engine does not know it",
                    ))
                }
                "/[aio] (deleted)" => {
                    return Err(crate::error::refusal(
                        format!("mapping {:#x}-{:#x} is an AIO ring (io_setup)", m.start, m.end),
                        "asynchronous I/O contexts are not supported yet",
                    ))
                }
                n if n.ends_with(" (deleted)") => return Err(crate::error::refusal(
                    format!(
                        "mapping {:#x}-{:#x} is backed by the deleted file {n:?}",
                        m.start, m.end
                    ),
                    "it cannot be mapped again (files deleted while open are not supported yet)",
                )),
                n if n.starts_with("/SYSV") || n.starts_with("/memfd:") => {
                    return Err(crate::error::refusal(
                        format!("mapping {:#x}-{:#x} is backed by {n}", m.start, m.end),
                        "SysV shared memory and memfd are not supported yet",
                    ))
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
        check_vmflags(m, flags, matches!(kind, VmaKind::Special(_)))?;
        let advice = ADVICE_FLAGS
            .iter()
            .zip(RESTORED_ADVICE)
            .filter(|(f, _)| has(f))
            .map(|(_, a)| a)
            .collect();
        let lock = match (has("lo"), has("lf")) {
            (true, true) => Some(MemLock::OnFault),
            (true, false) => Some(MemLock::Now),
            _ => None,
        };
        let flags = VmaFlags {
            lock,
            droppable: has("dp"),
            sealed: has("sl"),
            name: anon_name(&m.name, m.shared).map(str::to_string),
            guards: guards
                .iter()
                .map(|&(s, e)| (s.max(m.start), e.min(m.end)))
                .filter(|(s, e)| s < e)
                .collect(),
        };
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
            flags,
        });
    }
    Ok(vmas)
}

/// Refuses two mappings of the same part of one shared anonymous memory object (made by
/// mremap with an old size of 0): each mapping is restored as memory of its own, so a write
/// through one would no longer show through the other. Parts of one object mapped once
/// each (a shared mapping split by mprotect) are fine.
fn refuse_aliased_shared_memory(maps: &[MapsEntry]) -> Result<()> {
    let shared: Vec<&MapsEntry> = maps
        .iter()
        .filter(|m| {
            m.shared && (m.name.starts_with("/dev/zero") || m.name.starts_with("[anon_shmem:"))
        })
        .collect();
    for (i, a) in shared.iter().enumerate() {
        for b in &shared[i + 1..] {
            let (a_end, b_end) = (a.offset + (a.end - a.start), b.offset + (b.end - b.start));
            if a.dev == b.dev && a.inode == b.inode && a.offset < b_end && b.offset < a_end {
                return Err(crate::error::refusal(
                    format!(
                        "mappings {:#x}-{:#x} and {:#x}-{:#x} show the same shared memory",
                        a.start, a.end, b.start, b.end
                    ),
                    "aliased shared anonymous memory is not carried (each mapping would be \
                     restored as memory of its own)",
                ));
            }
        }
    }
    Ok(())
}

/// The name an anonymous mapping was given (prctl PR_SET_VMA_ANON_NAME), from its maps
/// name: `[anon:NAME]` (private) or `[anon_shmem:NAME]` (shared).
fn anon_name(maps_name: &str, shared: bool) -> Option<&str> {
    let prefix = if shared { "[anon_shmem:" } else { "[anon:" };
    maps_name.strip_prefix(prefix)?.strip_suffix(']')
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

/// Whether a mapping holds pages of its own that travel (anonymous memory, and the written
/// pages of a private file mapping), as opposed to a file's pages or the kernel's.
pub(crate) fn carries_pages(vma: &Vma) -> bool {
    match vma.kind {
        VmaKind::Anon => true,
        VmaKind::File(_) => !vma.shared,
        VmaKind::Special(_) => false,
    }
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
pub const RESTORED_ADVICE: [i32; 8] = [
    libc::MADV_HUGEPAGE,
    libc::MADV_NOHUGEPAGE,
    libc::MADV_DONTFORK,
    libc::MADV_DONTDUMP,
    libc::MADV_WIPEONFORK,
    libc::MADV_SEQUENTIAL,
    libc::MADV_RANDOM,
    libc::MADV_MERGEABLE,
];
/// The VmFlags that show each of `RESTORED_ADVICE`, in the same order.
const ADVICE_FLAGS: [&str; 8] = ["hg", "nh", "dc", "dd", "wf", "sr", "rr", "mg"];

/// The guard over mappings: every VmFlag of /proc/PID/smaps is either carried (protection,
/// sharing, growth, accounting, advice, locking, droppable, sealed), bookkeeping that needs
/// no carrying, or refused here by its name — so a flag a newer kernel adds is refused, not
/// dropped.
fn check_vmflags(m: &MapsEntry, flags: &[String], special: bool) -> Result<()> {
    const CARRIED: [&str; 17] = [
        "rd", "wr", "ex", "sh", "mr", "mw", "me", "ms", "gd", "ac", "nr", "lo", "lf", "dp", "sl",
        // (May hold guard regions: they are found page by page, `scan::guard_regions`.)
        "gu", // (Soft-dirty: the kernel's own bookkeeping, set on every new mapping.)
        "sd",
    ];
    // What the kernel's own mappings ([vdso], [vvar]) have; the engine moves those whole.
    const KERNEL_MAPPING: [&str; 5] = ["de", "pf", "io", "mm", "ar"];
    for f in flags {
        let f = f.as_str();
        if CARRIED.contains(&f) || ADVICE_FLAGS.contains(&f) {
            continue;
        }
        if special && KERNEL_MAPPING.contains(&f) {
            continue;
        }
        let what = match f {
            "um" | "uw" | "ui" => "is registered with a userfaultfd",
            "ht" => "is hugetlbfs memory",
            "ss" => "is a shadow stack (CET)",
            "sf" => "is a MAP_SYNC mapping of persistent memory",
            "mt" => "holds MTE memory tags",
            "bt" => "is a BTI-guarded mapping",
            "de" | "pf" | "io" | "mm" | "ar" => "is a device's memory (a driver's mapping)",
            _ => "has a VmFlag this engine does not know (a newer kernel's state)",
        };
        let name = if m.name.is_empty() { String::new() } else { format!(" ({})", m.name) };
        return Err(crate::error::refusal(
            format!("mapping {:#x}-{:#x}{name} (VmFlag {f:?})", m.start, m.end),
            &format!("it {what}: the engine cannot carry it"),
        ));
    }
    Ok(())
}

/// Refuses an image whose mappings overlap, are unaligned, leave user space, or carry advice
/// capture never records.
pub fn validate(vmas: &[Vma]) -> Result<()> {
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
pub fn create(inj: &mut Injector, vmas: &[Vma]) -> Result<()> {
    let files = open_mapped_files(inj, vmas)?;
    let mut calls = Vec::with_capacity(vmas.len() + 8);
    for v in vmas {
        let len = v.end - v.start;
        let prot = initial_prot(v) as u64;
        let noreserve = if v.accounted || v.shared { 0 } else { libc::MAP_NORESERVE };
        let (flags, fd) = match &v.kind {
            VmaKind::Special(_) => continue,
            VmaKind::Anon => {
                let share = match (v.shared, v.flags.droppable) {
                    (true, _) => libc::MAP_SHARED,
                    (false, true) => MAP_DROPPABLE,
                    (false, false) => libc::MAP_PRIVATE,
                };
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
        if let Some(name) = &v.flags.name {
            if name.len() > 255 {
                bail!("image is corrupt: a mapping name of {} bytes", name.len());
            }
            let addr = inj.stage_cstr(name)?;
            calls.push(Call::new(
                libc::SYS_prctl,
                &[PR_SET_VMA, PR_SET_VMA_ANON_NAME, v.start, len, addr],
                format!("naming {:#x}-{:#x} {name:?}: prctl(PR_SET_VMA_ANON_NAME)", v.start, v.end),
            ));
        }
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
    let mut calls: Vec<Call> = vmas
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
    // Then what fixes a mapping as it is: guard regions, locks, and the seal, last.
    for v in vmas {
        for &(start, end) in &v.flags.guards {
            calls.push(Call::new(
                libc::SYS_madvise,
                &[start, end - start, MADV_GUARD_INSTALL],
                format!("installing the guard region {start:#x}-{end:#x}: madvise"),
            ));
        }
        if let Some(lock) = v.flags.lock {
            let flags = if lock == MemLock::OnFault { MLOCK_ONFAULT } else { 0 };
            calls.push(Call::new(
                libc::SYS_mlock2,
                &[v.start, v.end - v.start, flags],
                format!("locking {:#x}-{:#x} in memory: mlock2", v.start, v.end),
            ));
        }
    }
    for v in vmas.iter().filter(|v| v.flags.sealed && !matches!(v.kind, VmaKind::Special(_))) {
        calls.push(Call::new(
            SYS_MSEAL,
            &[v.start, v.end - v.start, 0],
            format!("sealing {:#x}-{:#x}: mseal", v.start, v.end),
        ));
    }
    inj.defer(calls);
}

const MADV_GUARD_INSTALL: u64 = 102;
const PR_SET_VMA: u64 = 0x53564d41;
const PR_SET_VMA_ANON_NAME: u64 = 0;
const MLOCK_ONFAULT: u64 = 1;
const SYS_MSEAL: libc::c_long = 462;
/// mmap's map type for droppable memory (Linux 6.11).
const MAP_DROPPABLE: i32 = 0x08;

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
            flags: Default::default(),
        };
        validate(&[vma(RESTORED_ADVICE.to_vec())]).unwrap();
        for bad in [libc::MADV_HWPOISON, libc::MADV_SOFT_OFFLINE, libc::MADV_REMOVE, 99] {
            let e = validate(&[vma(vec![libc::MADV_HUGEPAGE, bad])]).unwrap_err().to_string();
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
            .find(|maps| capture(me, maps).is_ok())
            .expect("maps and smaps never agreed");
        let mut changed = maps.clone();
        let last =
            changed.iter_mut().rev().find(|m| m.name.is_empty()).expect("an anonymous mapping");
        last.end += PAGE; // as if merged with a page above it
        let e = capture(me, &changed).unwrap_err();
        assert!(e.downcast_ref::<MappingsChanged>().is_some(), "{e:#}");
    }
}
