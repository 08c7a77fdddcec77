//! Files deleted while open ("ghost files", as CRIU calls them): a regular file whose last
//! name is gone but which the process still holds.
//!
//! Captured with their contents (read through /proc/PID/fd, at most `MAX_BYTES` in all: the
//! contents travel in the process record), their permissions, the path they had, the open
//! flags and the offset of each open file description; fds on the same deleted file share
//! one ghost. Restored inside the new process, with the owner's rights, as an unnamed file
//! (O_TMPFILE) in the directory the file was in — so it is a regular file on the same file
//! system, with no name, as before — filled with the contents, then opened again through
//! /proc/self/fd for each open file description with its own flags and offset. A directory
//! that is gone, or a file system without O_TMPFILE, refuses the restore naming the fd.
//! Mappings of deleted files are not carried yet (refused at capture).

use std::io::Read;

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
    if p.mode & libc::S_IFMT != libc::S_IFREG || !path.starts_with('/') {
        return Ok(None);
    }
    if p.size > MAX_BYTES.saturating_sub(*used) {
        return Err(crate::error::refusal(
            format!("fd {} ({}, {} bytes)", p.fd, p.link, p.size),
            &format!(
                "the contents of deleted files travel in the image, at most {} MiB of them",
                MAX_BYTES >> 20
            ),
        ));
    }
    let mut contents = Vec::with_capacity(p.size as usize);
    std::fs::File::open(crate::procfs::fd_path(pid, p.fd))
        .and_then(|f| f.take(MAX_BYTES).read_to_end(&mut contents))
        .with_context(|| format!("fd {} ({}): reading the deleted file", p.fd, p.link))?;
    *used += contents.len() as u64;
    Ok(Some(FdKind::Ghost {
        path: path.to_string(),
        ino: p.ino,
        mode: p.mode & 0o7777,
        flags: p.info.flags,
        pos: p.info.pos,
        contents,
    }))
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
    let FdKind::Ghost { path, mode, contents, .. } = &groups[0][0].kind else {
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
            *mode as u64,
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
    for chunk in contents.chunks(32 << 10) {
        inj.reset_scratch();
        let data = inj.stage(chunk)?;
        let n = inj.syscall(
            libc::SYS_write,
            &[tmp, data, chunk.len() as u64],
            format!("restoring {name}: write"),
        )?;
        if n as usize != chunk.len() {
            bail!("restoring {name}: wrote {n} of {} bytes", chunk.len());
        }
    }
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
