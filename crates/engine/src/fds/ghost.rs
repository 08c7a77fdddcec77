//! Files deleted while open ("ghost files", as CRIU calls them): a regular file whose last
//! name is gone but which the process still holds.
//!
//! Captured with their data (read through /proc/PID/fd run by run, holes skipped, at most
//! `MAX_BYTES` in all: it travels in the process record), size, owner, permissions, the
//! path they had, the open flags and the offset of each open file description; fds on the
//! same deleted file share one ghost. A file that lost its name but has another (a hard
//! link) is refused: the other name cannot be found. Restored inside the new process, with
//! the owner's rights, as an unnamed file (O_TMPFILE) in the directory the file was in — so
//! it is a regular file on the same file system, with no name, as before — filled run by
//! run, sized, given its times, owner (fchown: only a privileged restore may give another)
//! and permissions, then opened again through /proc/self/fd for each open file description
//! with its own flags and offset. A directory that is gone, or a file system without
//! O_TMPFILE, refuses the restore naming the fd. Mappings of deleted files are not carried
//! yet (refused at capture).

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;

use super::Probe;
use crate::inject::{Call, Injector};
use telefork_image::{Fd, FdKind};

/// The most bytes of deleted files one image carries.
pub(crate) const MAX_BYTES: u64 = 32 << 20;

/// This fd as a ghost file (its contents read once per file: `seen` keeps the inodes
/// already read, with the bytes used so far); `None` if it is no deleted regular file.
pub(crate) fn capture(pid: Pid, p: &Probe, used: &mut u64) -> Result<Option<FdKind>> {
    let Some(path) = p.link.strip_suffix(" (deleted)") else { return Ok(None) };
    // (A memfd's name reads like a deleted file's: `/memfd:NAME (deleted)`.)
    if p.mode & libc::S_IFMT != libc::S_IFREG
        || !path.starts_with('/')
        || path.starts_with("/memfd:")
    {
        return Ok(None);
    }
    if p.nlink > 0 {
        return Err(crate::error::refusal(
            format!("fd {} ({})", p.fd, p.link),
            "the file lost that name but has another one, which cannot be found: not supported yet",
        ));
    }
    let f = std::fs::File::open(crate::procfs::fd_path(pid, p.fd))
        .with_context(|| format!("fd {} ({}): reading the deleted file", p.fd, p.link))?;
    let data = data_runs(&f, p.size)
        .with_context(|| format!("fd {} ({}): reading the deleted file", p.fd, p.link))?;
    let bytes: u64 = data.iter().map(|(_, d)| d.len() as u64).sum();
    if bytes > MAX_BYTES.saturating_sub(*used) {
        return Err(crate::error::refusal(
            format!("fd {} ({}, {bytes} bytes of data)", p.fd, p.link),
            &format!(
                "the contents of deleted files travel in the image, at most {} MiB of them",
                MAX_BYTES >> 20
            ),
        ));
    }
    *used += bytes;
    Ok(Some(FdKind::Ghost {
        path: path.to_string(),
        ino: p.ino,
        mode: p.mode & 0o7777,
        uid: p.uid,
        gid: p.gid,
        size: p.size,
        data,
        atime: (p.atime_sec, p.atime_nsec),
        mtime: (p.mtime_sec, p.mtime_nsec),
        flags: p.info.flags,
        pos: p.info.pos,
    }))
}

/// The runs of data of a file of `size` bytes (SEEK_DATA / SEEK_HOLE: holes are skipped),
/// at most `MAX_BYTES` of them.
fn data_runs(f: &std::fs::File, size: u64) -> Result<Vec<(u64, Vec<u8>)>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let mut runs = Vec::new();
    let mut at = 0u64;
    let mut total = 0u64;
    while at < size {
        let start =
            match nix::unistd::lseek(f.as_raw_fd(), at as i64, nix::unistd::Whence::SeekData) {
                Ok(s) => s as u64,
                Err(nix::errno::Errno::ENXIO) => break, // only a hole from here on
                Err(e) => return Err(e).context("SEEK_DATA"),
            };
        let end = nix::unistd::lseek(f.as_raw_fd(), start as i64, nix::unistd::Whence::SeekHole)
            .context("SEEK_HOLE")? as u64;
        let end = end.min(size);
        if end <= start {
            break;
        }
        total += end - start;
        if total > MAX_BYTES {
            bail!("more than {} MiB of data", MAX_BYTES >> 20);
        }
        let mut buf = vec![0u8; (end - start) as usize];
        f.read_exact_at(&mut buf, start).context("reading its data")?;
        runs.push((start, buf));
        at = end;
    }
    Ok(runs)
}

/// Restores the ghost files: `groups` are the groups (open file descriptions) of ghost fds.
/// One unnamed file per deleted file, opened again for each open file description.
pub(crate) fn restore_all(inj: &mut Injector, groups: &[&[&Fd]]) -> Result<()> {
    let mut done: Vec<u64> = Vec::new();
    for g in groups {
        let FdKind::Ghost { ino, .. } = g[0].kind else { continue };
        if done.contains(&ino) {
            continue;
        }
        done.push(ino);
        let same: Vec<&[&Fd]> = groups
            .iter()
            .filter(|h| matches!(h[0].kind, FdKind::Ghost { ino: i, .. } if i == ino))
            .copied()
            .collect();
        restore_file(inj, &same)?;
    }
    Ok(())
}

fn restore_file(inj: &mut Injector, groups: &[&[&Fd]]) -> Result<()> {
    let FdKind::Ghost { path, mode, uid, gid, size, data, atime, mtime, .. } = &groups[0][0].kind
    else {
        bail!("internal error: ghost::restore on another kind");
    };
    let fd0 = groups[0][0].fd;
    let name = format!("{path} (deleted)");
    let dir = std::path::Path::new(path).parent().and_then(|d| d.to_str()).unwrap_or("/");
    inj.reset_scratch();
    let at = inj.stage_cstr(dir)?;
    let tmp = inj.syscall_raw(
        libc::SYS_openat,
        &[
            libc::AT_FDCWD as u64,
            at,
            (libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC) as u64,
            (*mode & 0o777) as u64,
        ],
    )?;
    if tmp < 0 {
        let err = std::io::Error::from_raw_os_error(-tmp as i32);
        return Err(crate::error::refusal(
            format!("fd {fd0} ({name})"),
            &format!("an unnamed file cannot be made in {dir} to hold its contents: {err}"),
        ));
    }
    let tmp = tmp as u64;
    // Its data where it was (holes stay holes), its size, owner and permissions (the umask
    // took some; the owner's needs privilege: a failure names it).
    for (offset, run) in data {
        for (k, chunk) in run.chunks(32 << 10).enumerate() {
            inj.reset_scratch();
            let buf = inj.stage(chunk)?;
            let off = offset + (k as u64) * (32 << 10);
            let n = inj.syscall(
                libc::SYS_pwrite64,
                &[tmp, buf, chunk.len() as u64, off],
                format!("restoring {name}: pwrite"),
            )?;
            if n as usize != chunk.len() {
                bail!("restoring {name}: wrote {n} of {} bytes", chunk.len());
            }
        }
    }
    let mut times = [0u8; 32];
    for (i, v) in [atime.0, atime.1, mtime.0, mtime.1].into_iter().enumerate() {
        times[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
    }
    inj.reset_scratch();
    let times = inj.stage(&times)?;
    let calls = [
        Call::new(
            libc::SYS_ftruncate,
            &[tmp, *size],
            format!("restoring {name}: ftruncate to {size}"),
        ),
        // (Its times last but the owner and mode: writing changed them.)
        Call::new(
            libc::SYS_utimensat,
            &[tmp, 0, times, 0],
            format!("restoring {name}: its access and modification times (utimensat)"),
        ),
        Call::new(
            libc::SYS_fchown,
            &[tmp, *uid as u64, *gid as u64],
            format!("restoring {name}: giving it owner {uid}:{gid} (fchown)"),
        ),
        Call::new(
            libc::SYS_fchmod,
            &[tmp, *mode as u64],
            format!("restoring {name}: fchmod {mode:o}"),
        ),
    ];
    inj.run_batch(&calls)?;
    // Each open file description: the file opened again with its flags, at its offset —
    // the first from the unnamed file (closed at once: its number may be one of the fds to
    // place), the others from the first's fd.
    let mut from = tmp;
    for (i, g) in groups.iter().enumerate() {
        let FdKind::Ghost { flags, pos, .. } = g[0].kind else { continue };
        inj.reset_scratch();
        let again = inj.stage_cstr(&format!("/proc/self/fd/{from}"))?;
        let open_flags =
            (flags as i32 & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL)) | libc::O_CLOEXEC;
        let fd = inj.syscall(
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, again, open_flags as u32 as u64, 0],
            format!("restoring fd {} ({name}): open", g[0].fd),
        )?;
        let mut calls = Vec::new();
        if i == 0 {
            calls.push(Call::new(
                libc::SYS_close,
                &[tmp],
                format!("restoring {name}: closing the unnamed file's first fd"),
            ));
        }
        if pos != 0 {
            calls.push(Call::new(
                libc::SYS_lseek,
                &[fd, pos, libc::SEEK_SET as u64],
                format!("restoring fd {} ({name}): lseek to {pos}", g[0].fd),
            ));
        }
        calls.extend(super::onto_members(fd, g, &name));
        inj.run_batch(&calls)?;
        from = g[0].fd as u64;
    }
    Ok(())
}
