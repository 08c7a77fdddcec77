//! Named pipes (FIFOs): each open end, reopened by path, with the bytes buffered in it.
//!
//! Captured: the path, the open flags of each open file description, the pipe's size, and its
//! buffered bytes (copied without being consumed, as for pipes) unless another process holds
//! the FIFO open too — then the bytes stay in it, held by that process. Restored inside the
//! new process with the owner's rights: the FIFO opened read-write first (which never
//! blocks and keeps the pipe alive), sized and given back its bytes, then opened again for
//! each open file description with its own access mode and flags, and the read-write open
//! closed. A FIFO deleted while open is refused.

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;

use super::Probe;
use crate::inject::{Call, Injector};
use telefork_image::{Fd, FdKind};

/// This fd as an end of a FIFO; `None` if it is no FIFO.
pub(crate) fn capture(pid: Pid, p: &Probe, first_of_fifo: bool) -> Result<Option<FdKind>> {
    if p.mode & libc::S_IFMT != libc::S_IFIFO || !p.link.starts_with('/') {
        return Ok(None);
    }
    if p.link.ends_with(" (deleted)") {
        return Err(crate::error::refusal(
            format!("fd {} ({})", p.fd, p.link),
            "a FIFO deleted while open cannot be opened again",
        ));
    }
    let size = super::pipe::pipe_size(pid, p.fd)?;
    let external = held_elsewhere(pid, p.dev, p.ino)?;
    let data = if first_of_fifo && !external {
        super::pipe::buffered_bytes(pid, p.fd, size)?
    } else {
        Vec::new()
    };
    Ok(Some(FdKind::Fifo {
        path: p.link.clone(),
        ino: p.ino,
        flags: p.info.flags,
        size,
        data,
        external,
    }))
}

/// Whether a process other than `pid` has the FIFO (`dev`, `ino`) open.
fn held_elsewhere(pid: Pid, dev: u64, ino: u64) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    for e in std::fs::read_dir("/proc").context("listing /proc")?.flatten() {
        let Ok(other) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if other == pid.as_raw() {
            continue;
        }
        let Ok(dir) = std::fs::read_dir(format!("/proc/{other}/fd")) else { continue };
        for fd in dir.flatten() {
            if std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Restores the FIFOs: `groups` are the groups (open file descriptions) of FIFO fds.
pub(crate) fn restore_all(inj: &mut Injector, groups: &[&[&Fd]]) -> Result<()> {
    let mut done: Vec<u64> = Vec::new();
    for g in groups {
        let FdKind::Fifo { ino, .. } = g[0].kind else { continue };
        if done.contains(&ino) {
            continue;
        }
        done.push(ino);
        let same: Vec<&[&Fd]> = groups
            .iter()
            .filter(|h| matches!(h[0].kind, FdKind::Fifo { ino: i, .. } if i == ino))
            .copied()
            .collect();
        restore_fifo(inj, &same)?;
    }
    Ok(())
}

fn restore_fifo(inj: &mut Injector, groups: &[&[&Fd]]) -> Result<()> {
    let FdKind::Fifo { path, size, .. } = &groups[0][0].kind else {
        bail!("internal error: fifo::restore on another kind");
    };
    let data: Vec<u8> = groups
        .iter()
        .find_map(|g| match &g[0].kind {
            FdKind::Fifo { data, .. } if !data.is_empty() => Some(data.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let name = format!("FIFO {path}");
    inj.reset_scratch();
    let at = inj.stage_cstr(path)?;
    let keeper = inj.syscall(
        libc::SYS_openat,
        &[libc::AT_FDCWD as u64, at, (libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) as u64],
        format!("restoring fd {} ({name}): open", groups[0][0].fd),
    )?;
    // The read-write open must not sit on a number one of the fds takes.
    let targets: Vec<u64> = groups.iter().flat_map(|g| g.iter().map(|f| f.fd as u64)).collect();
    let keeper = if targets.contains(&keeper) {
        let spare = (0..)
            .find(|n| !targets.contains(n) && *n != keeper && !taken_numbers(inj, *n))
            .unwrap_or(0);
        let moved = [
            Call::new(
                libc::SYS_dup3,
                &[keeper, spare, libc::O_CLOEXEC as u64],
                format!("restoring {name}: dup3"),
            ),
            Call::new(libc::SYS_close, &[keeper], format!("restoring {name}: close")),
        ];
        inj.run_batch(&moved)?;
        spare
    } else {
        keeper
    };
    // (Checked as a FIFO still: a path that became something else is refused.)
    let st = inj.alloc_zeroed(144)?;
    inj.syscall(libc::SYS_fstat, &[keeper, st], format!("restoring {name}: fstat"))?;
    let mut mode = [0u8; 4];
    inj.read_mem(st + 24, &mut mode)?;
    if u32::from_ne_bytes(mode) & libc::S_IFMT != libc::S_IFIFO {
        bail!("restoring {name}: the path is no longer a FIFO");
    }
    if data.len() > *size as usize {
        bail!("image is corrupt: {} bytes in {name} of {size} bytes", data.len());
    }
    inj.syscall(
        libc::SYS_fcntl,
        &[keeper, libc::F_SETPIPE_SZ as u64, *size as u64],
        format!("restoring the size of {name}: fcntl(F_SETPIPE_SZ)"),
    )?;
    super::pipe::write_back(inj, keeper, &data, &name)?;
    for g in groups {
        let FdKind::Fifo { flags, .. } = g[0].kind else { continue };
        inj.reset_scratch();
        let at = inj.stage_cstr(path)?;
        let access = flags as i32 & libc::O_ACCMODE;
        let fd = inj.syscall(
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, at, (access | libc::O_NONBLOCK | libc::O_CLOEXEC) as u64],
            format!("restoring fd {} ({name}): open", g[0].fd),
        )?;
        let mut calls = vec![Call::new(
            libc::SYS_fcntl,
            &[fd, libc::F_SETFL as u64, (flags & !(libc::O_ACCMODE as u32)) as u64],
            format!("restoring the flags of fd {} ({name}): fcntl(F_SETFL)", g[0].fd),
        )];
        calls.extend(super::onto_members(fd, g, &name));
        inj.run_batch(&calls)?;
    }
    inj.syscall(libc::SYS_close, &[keeper], format!("restoring {name}: closing fd {keeper}"))?;
    Ok(())
}

/// Whether fd `n` is open in the process now (fcntl F_GETFD answers).
fn taken_numbers(inj: &mut Injector, n: u64) -> bool {
    inj.syscall_raw(libc::SYS_fcntl, &[n, libc::F_GETFD as u64]).is_ok_and(|r| r >= 0)
}
