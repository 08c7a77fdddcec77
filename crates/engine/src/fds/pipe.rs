//! Pipes: both ends, the bytes buffered in them and their size.
//!
//! Capture records each pipe fd with its pipe's inode, which end it is, its status flags and
//! the pipe's size (F_GETPIPE_SZ). A pipe whose two ends are both in the process dies with
//! it, so its buffered bytes travel: they are copied out without being consumed (the pipe
//! reopened through /proc/PID/fd, then tee(2) into a pipe of ours). A pipe with one end in
//! the process and the other held elsewhere lives on without it: its bytes stay in it, and
//! restore attaches the new process to that very pipe, through whichever process holds it
//! then (/proc/PID/fd of a holder, opened inside the new process, with the image owner's
//! rights) — or refuses, naming the fd, if nobody holds it any more.
//!
//! Restore makes a new pipe (pipe2) for a pipe of the process, gives it its size, writes the
//! bytes back into it, and places both ends on their fd numbers with their status flags; an
//! end the process had opened again (through /proc/PID/fd: an open file description of its
//! own) is opened again the same way.
//! Named FIFOs are `fifo`'s.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{bail, Context, Result};
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::Pid;

use super::Probe;
use crate::inject::{Call, Injector};
use telefork_image::{Fd, FdKind};

/// The pipe's inode, if the fd is an anonymous pipe (`pipe:[N]`).
fn pipe_inode(p: &Probe) -> Option<u64> {
    if p.mode & libc::S_IFMT != libc::S_IFIFO {
        return None;
    }
    p.link.strip_prefix("pipe:[")?.strip_suffix(']')?.parse().ok()
}

/// This fd as a pipe end, without its pipe's bytes (`capture_all` adds them once every fd
/// is known); `None` if it is no anonymous pipe.
pub(crate) fn capture(pid: Pid, p: &Probe) -> Result<Option<FdKind>> {
    let Some(ino) = pipe_inode(p) else { return Ok(None) };
    let write = match p.info.flags as i32 & libc::O_ACCMODE {
        libc::O_RDONLY => false,
        libc::O_WRONLY => true,
        _ => {
            return Err(crate::error::refusal(
                format!("fd {} ({}) is a pipe opened for reading and writing", p.fd, p.link),
                "only the ends pipe(2) makes are carried",
            ))
        }
    };
    let size = pipe_size(pid, p.fd)?;
    Ok(Some(FdKind::Pipe {
        ino,
        write,
        flags: p.info.flags,
        size,
        data: Vec::new(),
        external: false,
    }))
}

pub(crate) fn pipe_size(pid: Pid, fd: i32) -> Result<u32> {
    let f = open_again(pid, fd)?;
    let size = nix::fcntl::fcntl(f.as_raw_fd(), FcntlArg::F_GETPIPE_SZ)
        .with_context(|| format!("fd {fd}: F_GETPIPE_SZ"))?;
    Ok(size as u32)
}

/// The pipe of fd `fd` of `pid`, opened again for reading (never blocking: a pipe opened
/// through /proc is opened as a FIFO).
fn open_again(pid: Pid, fd: i32) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .with_context(|| format!("fd {fd}: opening its pipe again through /proc"))
}

/// Once every fd is known: marks the pipes with an end outside the process, and gives each
/// pipe whose ends are both inside its buffered bytes (on its first read end).
pub(crate) fn capture_all(pid: Pid, fds: &mut [Fd]) -> Result<()> {
    let mut inodes: Vec<u64> = fds
        .iter()
        .filter_map(|f| match f.kind {
            FdKind::Pipe { ino, .. } => Some(ino),
            _ => None,
        })
        .collect();
    inodes.sort_unstable();
    inodes.dedup();
    for ino in inodes {
        let ends = |want: bool| {
            fds.iter().any(|f| matches!(f.kind, FdKind::Pipe { ino: i, write, .. } if i == ino && write == want))
        };
        let internal = ends(false) && ends(true);
        let first_reader = fds
            .iter()
            .position(|f| matches!(f.kind, FdKind::Pipe { ino: i, write: false, .. } if i == ino));
        let bytes = match (internal, first_reader) {
            (true, Some(i)) => match fds[i].kind {
                FdKind::Pipe { size, .. } => buffered_bytes(pid, fds[i].fd, size)?,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        for (i, f) in fds.iter_mut().enumerate() {
            if let FdKind::Pipe { ino: fi, external, data, .. } = &mut f.kind {
                if *fi == ino {
                    *external = !internal;
                    if Some(i) == first_reader {
                        *data = bytes.clone();
                    }
                }
            }
        }
    }
    Ok(())
}

/// The bytes buffered in the pipe (or FIFO) of fd `fd`, of `size` bytes, copied without
/// being consumed: the pipe opened again through /proc, then tee(2) into a pipe of ours.
pub(crate) fn buffered_bytes(pid: Pid, fd: i32, size: u32) -> Result<Vec<u8>> {
    let src = open_again(pid, fd)?;
    let (ours_r, ours_w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
        .context("making a pipe to copy a pipe's bytes into")?;
    nix::fcntl::fcntl(ours_w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(size as i32))
        .with_context(|| format!("fd {fd}: sizing a pipe of {size} bytes"))?;
    let n = match nix::fcntl::tee(
        src.as_fd(),
        ours_w.as_fd(),
        size as usize,
        SpliceFFlags::SPLICE_F_NONBLOCK,
    ) {
        Ok(n) => n,
        Err(nix::errno::Errno::EAGAIN) => 0, // empty
        Err(e) => {
            return Err(e).with_context(|| format!("fd {fd}: copying its pipe's bytes (tee)"))
        }
    };
    let mut out = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match nix::unistd::read(ours_r.as_raw_fd(), &mut out[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) => return Err(e).with_context(|| format!("fd {fd}: reading its pipe's bytes")),
        }
    }
    out.truncate(got);
    Ok(out)
}

/// Restores one pipe from the groups of fds (one per open file description) on it: a whole
/// pipe has at least one group per end (more where an end was opened again through
/// /proc); a pipe whose other end is outside has its side only.
pub(crate) fn restore(inj: &mut Injector, groups: &[&[&Fd]], img_fds: &[Fd]) -> Result<()> {
    let first = groups.first().and_then(|g| g.first()).context("internal error: empty pipe")?;
    let FdKind::Pipe { ino, external, .. } = first.kind else {
        bail!("internal error: pipe::restore on another kind");
    };
    if external {
        for g in groups {
            attach(inj, ino, g)?;
        }
        return Ok(());
    }
    let name = format!("pipe:[{ino}]");
    inj.reset_scratch();
    let pair = inj.alloc_zeroed(8)?;
    inj.syscall(
        libc::SYS_pipe2,
        &[pair, libc::O_CLOEXEC as u64],
        format!("restoring {name}: pipe2"),
    )?;
    let mut b = [0u8; 8];
    inj.read_mem(pair, &mut b)?;
    let r = i32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")) as u64;
    let w = i32::from_ne_bytes(b[4..8].try_into().expect("4 bytes")) as u64;
    // Size, then the bytes (in pieces that fit the scratch area).
    let (size, data) = groups
        .iter()
        .flat_map(|g| g.iter())
        .find_map(|f| match &f.kind {
            FdKind::Pipe { size, data, .. } if !data.is_empty() => Some((*size, data.clone())),
            _ => None,
        })
        .unwrap_or_else(|| match first.kind {
            FdKind::Pipe { size, .. } => (size, Vec::new()),
            _ => (0, Vec::new()),
        });
    if data.len() > size as usize {
        bail!("image is corrupt: {} bytes in {name} of {size} bytes", data.len());
    }
    inj.syscall(
        libc::SYS_fcntl,
        &[w, libc::F_SETPIPE_SZ as u64, size as u64],
        format!("restoring the size of {name} ({size} bytes): fcntl(F_SETPIPE_SZ)"),
    )?;
    write_back(inj, w, &data, &name)?;
    // Each end onto its fds, in an order that never overwrites the other end before it is
    // placed.
    inj.reset_scratch();
    let end_of = |want: bool| {
        groups.iter().find(|g| matches!(g[0].kind, FdKind::Pipe { write, .. } if write == want))
    };
    let (Some(readers), Some(writers)) = (end_of(false), end_of(true)) else {
        bail!("image is corrupt: {name} is marked whole but lacks an end");
    };
    let targets = |g: &[&Fd]| -> Vec<u64> { g.iter().map(|f| f.fd as u64).collect() };
    let (rt, wt) = (targets(readers), targets(writers));
    let mut w = w;
    let mut calls = Vec::new();
    if rt.contains(&w) && wt.contains(&r) {
        // Crossed: the write end moves out of the way first, to a number no fd of the image
        // uses.
        let spare = (0..)
            .find(|n| !img_fds.iter().any(|f| f.fd as u64 == *n) && *n != r && *n != w)
            .unwrap_or(0);
        let what = format!("restoring {name}: moving its write end");
        calls.push(Call::new(libc::SYS_dup3, &[w, spare, libc::O_CLOEXEC as u64], what));
        calls.push(Call::new(libc::SYS_close, &[w], format!("restoring {name}: closing fd {w}")));
        w = spare;
    }
    let place = |end: u64, g: &[&Fd], calls: &mut Vec<Call>| {
        if let FdKind::Pipe { flags, .. } = g[0].kind {
            calls.push(Call::new(
                libc::SYS_fcntl,
                &[end, libc::F_SETFL as u64, (flags & !(libc::O_ACCMODE as u32)) as u64],
                format!("restoring the flags of fd {} ({name}): fcntl(F_SETFL)", g[0].fd),
            ));
        }
        calls.extend(super::onto_members(end, g, &name));
    };
    if rt.contains(&w) {
        place(w, writers, &mut calls);
        place(r, readers, &mut calls);
    } else {
        place(r, readers, &mut calls);
        place(w, writers, &mut calls);
    }
    inj.run_batch(&calls)?;
    // An end opened more than once (through /proc/PID/fd: open file descriptions of their
    // own): opened again the same way, from the end just placed.
    for g in groups.iter().filter(|g| !std::ptr::eq(**g, *readers) && !std::ptr::eq(**g, *writers))
    {
        let FdKind::Pipe { write, .. } = g[0].kind else { continue };
        let from = if write { writers[0].fd } else { readers[0].fd };
        reopen(inj, &format!("/proc/self/fd/{from}"), g, &name)?;
    }
    Ok(())
}

/// Opens `path` (a /proc/PID/fd link to a pipe) inside the new process with the access
/// and flags of `members`' open file description, and places it on their fds.
fn reopen(inj: &mut Injector, path: &str, members: &[&Fd], name: &str) -> Result<()> {
    let FdKind::Pipe { write, flags, .. } = members[0].kind else {
        bail!("internal error: pipe::reopen on another kind");
    };
    inj.reset_scratch();
    let at = inj.stage_cstr(path)?;
    let access = if write { libc::O_WRONLY } else { libc::O_RDONLY };
    let tmp = inj.syscall(
        libc::SYS_openat,
        &[libc::AT_FDCWD as u64, at, (access | libc::O_NONBLOCK | libc::O_CLOEXEC) as u64],
        format!("restoring fd {} ({name}): opening {path}", members[0].fd),
    )?;
    let mut calls = vec![Call::new(
        libc::SYS_fcntl,
        &[tmp, libc::F_SETFL as u64, (flags & !(libc::O_ACCMODE as u32)) as u64],
        format!("restoring the flags of fd {} ({name}): fcntl(F_SETFL)", members[0].fd),
    )];
    calls.extend(super::onto_members(tmp, members, name));
    inj.run_batch(&calls)?;
    Ok(())
}

/// Writes `data` into the pipe (or FIFO) that fd `w` of the process writes to, in pieces
/// that fit the scratch area.
pub(crate) fn write_back(inj: &mut Injector, w: u64, data: &[u8], name: &str) -> Result<()> {
    for chunk in data.chunks(32 << 10) {
        inj.reset_scratch();
        let at = inj.stage(chunk)?;
        let n = inj.syscall(
            libc::SYS_write,
            &[w, at, chunk.len() as u64],
            format!("restoring the bytes of {name}: write"),
        )?;
        if n as usize != chunk.len() {
            bail!("restoring the bytes of {name}: wrote {n} of {}", chunk.len());
        }
    }
    Ok(())
}

/// Attaches fds of the process to a pipe another process still holds: opened inside the
/// new process through that holder's /proc/PID/fd (with the image owner's rights).
fn attach(inj: &mut Injector, ino: u64, members: &[&Fd]) -> Result<()> {
    if !matches!(members[0].kind, FdKind::Pipe { .. }) {
        bail!("internal error: pipe::attach on another kind");
    }
    let name = format!("pipe:[{ino}]");
    let Some((holder, hfd)) = find_holder(ino, inj.pid())? else {
        return Err(crate::error::refusal(
            format!("fd {} ({name})", members[0].fd),
            "its other end was held outside the process, and nobody holds that pipe any more",
        ));
    };
    reopen(inj, &format!("/proc/{holder}/fd/{hfd}"), members, &name)
}

/// A process (not `except`) holding pipe `ino`, and its fd on it.
fn find_holder(ino: u64, except: Pid) -> Result<Option<(i32, i32)>> {
    let want = format!("pipe:[{ino}]");
    for e in std::fs::read_dir("/proc").context("listing /proc")?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid == except.as_raw() {
            continue;
        }
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in dir.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
                if let Ok(n) = fd.file_name().to_string_lossy().parse() {
                    return Ok(Some((pid, n)));
                }
            }
        }
    }
    Ok(None)
}
