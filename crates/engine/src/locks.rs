//! File locks: flock(2) locks and OFD record locks (owned by an open file description) and
//! POSIX record locks (owned by the process), held on files the image reopens.
//!
//! Capture reads the `lock:` lines of /proc/PID/fdinfo/N (each names a lock held through that
//! fd's open file description) as the fds are read, once per open file description; a
//! lease or delegation is refused by name. When the original keeps running (a telefork),
//! its locks stay with it, as fork(2) gives a child none of its POSIX locks: they are not
//! captured, and a debug message says so. Restore takes each lock again in the new process
//! (injected flock / fcntl(F_SETLK, F_OFD_SETLK), never waiting), after its fds exist; a
//! lock someone else took meanwhile fails the restore, naming the fd and the lock.

use anyhow::{bail, Result};
use telefork_image::{FileLock, LockKind, ProcessImage};

use crate::inject::{Call, Injector};
use crate::procfs::FdLock;

/// The locks `fd` shows, added to `out` if it is the first fd of its open file description
/// (the others show the same ones).
pub(crate) fn capture_fd(
    fd: i32,
    link: &str,
    locks: &[FdLock],
    first_of_open_file: bool,
    out: &mut Vec<FileLock>,
) -> Result<()> {
    if locks.is_empty() || !first_of_open_file {
        return Ok(());
    }
    for l in locks {
        let kind =
            match l.class.as_str() {
                "FLOCK" => LockKind::Flock,
                "POSIX" => LockKind::Posix,
                "OFDLCK" => LockKind::Ofd,
                "LEASE" | "DELEG" => return Err(crate::error::refusal(
                    format!(
                        "fd {fd} ({link}) holds a {} ({} {})",
                        l.class.to_lowercase(),
                        l.mode,
                        l.access
                    ),
                    "leases cannot be carried: the kernel gives no way to hand one to a new open",
                )),
                other => {
                    return Err(crate::error::refusal(
                        format!("fd {fd} ({link}) holds a lock of kind {other}"),
                        "the engine does not know it",
                    ))
                }
            };
        let write = match l.access.as_str() {
            "WRITE" => true,
            "READ" => false,
            other => {
                return Err(crate::error::refusal(
                    format!("fd {fd} ({link}) holds a {} lock in state {other}", l.class),
                    "the engine does not know it",
                ))
            }
        };
        let len = match l.end {
            None => 0,
            Some(end) if end >= l.start => end - l.start + 1,
            Some(end) => bail!("fd {fd}: lock from {} to {end}", l.start),
        };
        out.push(FileLock { fd, kind, write, start: l.start, len });
    }
    Ok(())
}

/// Takes the image's locks again in the process being restored, whose fds exist: queued to
/// run with the next batch.
pub(crate) fn restore(inj: &mut Injector, img: &ProcessImage) -> Result<()> {
    let mut calls = Vec::new();
    for l in &img.locks {
        if !img.fds.iter().any(|f| f.fd == l.fd) {
            bail!("image is corrupt: a lock on fd {}, which it does not have", l.fd);
        }
        let what = |how: &str| {
            let range = match l.len {
                0 => format!("bytes {} to the end", l.start),
                n => format!("bytes {}..{}", l.start, l.start.saturating_add(n)),
            };
            format!(
                "taking the {} {} lock on fd {} again ({range}): {how} (held by another \
                 process now?)",
                if l.write { "write" } else { "read" },
                match l.kind {
                    LockKind::Flock => "flock",
                    LockKind::Posix => "POSIX",
                    LockKind::Ofd => "OFD",
                },
                l.fd
            )
        };
        calls.push(match l.kind {
            LockKind::Flock => {
                let op = if l.write { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
                Call::new(libc::SYS_flock, &[l.fd as u64, op as u64], what("flock"))
            }
            LockKind::Posix | LockKind::Ofd => {
                let cmd = if l.kind == LockKind::Posix { libc::F_SETLK } else { libc::F_OFD_SETLK };
                let addr = inj.stage(&flock_bytes(l))?;
                Call::new(libc::SYS_fcntl, &[l.fd as u64, cmd as u64, addr], what("fcntl"))
            }
        });
    }
    inj.defer(calls);
    Ok(())
}

/// `struct flock` (x86-64 and aarch64 layout: short type, short whence, off_t start, off_t
/// len, pid_t pid, padding).
fn flock_bytes(l: &FileLock) -> [u8; 32] {
    let mut b = [0u8; 32];
    let ty = if l.write { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
    b[0..2].copy_from_slice(&ty.to_ne_bytes());
    b[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_ne_bytes());
    b[8..16].copy_from_slice(&l.start.to_ne_bytes());
    b[16..24].copy_from_slice(&l.len.to_ne_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(class: &str, access: &str, start: u64, end: Option<u64>) -> FdLock {
        FdLock { class: class.into(), mode: "ADVISORY".into(), access: access.into(), start, end }
    }

    #[test]
    fn locks_are_taken_once_per_open_file_and_leases_refused() {
        let mut out = vec![];
        let l = [lock("POSIX", "WRITE", 10, Some(19)), lock("FLOCK", "READ", 0, None)];
        capture_fd(3, "/f", &l, true, &mut out).unwrap();
        capture_fd(4, "/f", &l, false, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].kind, out[0].write, out[0].start, out[0].len),
            (LockKind::Posix, true, 10, 10)
        );
        assert_eq!((out[1].kind, out[1].write, out[1].len), (LockKind::Flock, false, 0));
        let e = capture_fd(5, "/f", &[lock("LEASE", "READ", 0, None)], true, &mut out).unwrap_err();
        assert!(format!("{e:#}").contains("fd 5 (/f) holds a lease"), "{e:#}");
    }
}
