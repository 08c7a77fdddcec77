//! Fds reopened by path: regular files, directories, and a few stateless character devices
//! (/dev/null, /dev/zero, /dev/full, /dev/random, /dev/urandom).
//!
//! Captured: the path, the object's identity (dev, inode, size, mtime — informational for
//! fds: a file that grew since is still the same file for an fd), the open flags and the
//! offset. Restored by injecting openat(path, flags) into the new process, checking that the
//! path still names the same kind of object, seeking to the offset, and duplicating the new
//! open file description onto every fd number that shared it.

use anyhow::{bail, Result};

use super::{Kind, Probe};
use crate::inject::{Call, Injector};
use telefork_image::{Fd, FdKind, FileId};

/// Character devices that carry no state and can simply be reopened.
pub const ALLOWED_CHAR_DEVICES: [&str; 5] =
    ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];

/// Fds reopened by path, as one kind of fd (`Kind`).
pub(crate) struct ByPath;

impl Kind for ByPath {
    fn capture(p: &Probe) -> Result<Option<FdKind>> {
        capture(p)
    }

    fn restore(inj: &mut Injector, members: &[&Fd]) -> Result<()> {
        restore(inj, members)
    }
}

/// `Some` if this fd is reopened by path; `None` if it is some other kind (a file deleted
/// while open is a ghost, `ghost`); an error for a deleted directory.
fn capture(p: &Probe) -> Result<Option<FdKind>> {
    let fmt = p.mode & libc::S_IFMT;
    let directory = fmt == libc::S_IFDIR;
    match fmt {
        libc::S_IFREG | libc::S_IFDIR => {
            // memfds and anonymous-inode files are S_IFREG too, but have no path.
            if !p.link.starts_with('/') || p.link.starts_with("/memfd:") {
                return Ok(None);
            }
            if p.link.ends_with(" (deleted)") {
                // A directory deleted while open cannot be carried; a file is a ghost.
                if directory {
                    let what = format!("fd {} ({})", p.fd, p.link);
                    let why = "the directory has been deleted and cannot be reopened";
                    return Err(crate::error::refusal(what, why));
                }
                return Ok(None);
            }
        }
        libc::S_IFCHR if ALLOWED_CHAR_DEVICES.contains(&p.link.as_str()) => {}
        _ => return Ok(None),
    }
    Ok(Some(FdKind::Path {
        id: FileId {
            path: p.link.clone(),
            dev: p.dev,
            ino: p.ino,
            size: p.size,
            mtime_sec: p.mtime_sec,
            mtime_nsec: p.mtime_nsec,
        },
        flags: p.info.flags,
        pos: p.info.pos,
        directory,
    }))
}

/// Kind of object a path of the image must still name.
fn expected_type(id: &FileId, directory: bool) -> (u32, &'static str) {
    if directory {
        (libc::S_IFDIR, "a directory")
    } else if ALLOWED_CHAR_DEVICES.contains(&id.path.as_str()) {
        (libc::S_IFCHR, "a character device")
    } else {
        (libc::S_IFREG, "a regular file")
    }
}

fn type_name(fmt: u32) -> &'static str {
    match fmt {
        libc::S_IFDIR => "a directory",
        libc::S_IFCHR => "a character device",
        libc::S_IFREG => "a regular file",
        libc::S_IFBLK => "a block device",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFLNK => "a symbolic link",
        _ => "an object of unknown type",
    }
}

/// Recreates one open file description and puts it on every fd of `members`.
///
/// The temporary fd from openat is the lowest free number. It can never be an fd already
/// placed (those are open), and it is closed again before the next group is opened, so it
/// cannot clobber or be clobbered by another group's fds; if it happens to be one of this
/// group's own numbers, it simply stays.
fn restore(inj: &mut Injector, members: &[&Fd]) -> Result<()> {
    let first = members[0];
    let FdKind::Path { id, flags, pos, directory } = &first.kind else {
        bail!("internal error: path::restore on a non-path fd {}", first.fd);
    };
    let what = format!("restoring fd {} ({})", first.fd, id.path);

    let open_flags =
        (*flags as i32 & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL)) | libc::O_CLOEXEC;
    let path = inj.stage_cstr(&id.path)?;
    // Opened non-blocking: had the path become a FIFO, a blocking open would wait for a
    // writer forever (and the restore with it). The type is checked next, and the flag put
    // back after.
    let tmp = inj.syscall_raw(
        libc::SYS_openat,
        &[libc::AT_FDCWD as i64 as u64, path, (open_flags | libc::O_NONBLOCK) as u32 as u64, 0],
    )?;
    if tmp == -(libc::EACCES as i64) || tmp == -(libc::EPERM as i64) {
        // The process could hold it only from before it gave up privileges (an fd opened
        // before setuid()): a privileged open would hand its owner a file they may not open.
        return Err(crate::error::refusal(
            format!("fd {} ({})", first.fd, id.path),
            &format!(
                "the image's owner may not open it ({}): the process must have opened it \
                 before giving up privileges (setuid), and the engine reopens files only \
                 with the owner's rights",
                std::io::Error::from_raw_os_error(-tmp as i32)
            ),
        ));
    }
    if tmp < 0 {
        let err = std::io::Error::from_raw_os_error(-tmp as i32);
        bail!("{what}: open: {err}");
    }
    let tmp = tmp as u64;

    // The same kind of object as at capture (a regular file may have changed size or mtime).
    let st = inj.alloc_zeroed(144)?;
    inj.syscall(libc::SYS_fstat, &[tmp, st], format!("{what}: fstat"))?;
    let mut mode = [0u8; 4];
    inj.read_mem(st + 24, &mut mode)?; // st_mode in the x86-64 struct stat
    let fmt = u32::from_ne_bytes(mode) & libc::S_IFMT;
    let (want, want_name) = expected_type(id, *directory);
    if fmt != want {
        bail!("{what}: the path is now {}, it was {want_name}", type_name(fmt));
    }

    // The rest needs no result: one batch (status flags, offset, the fd numbers, cloexec).
    let mut calls = Vec::new();
    if *flags as i32 & (libc::O_NONBLOCK | libc::O_PATH) == 0 {
        // (F_SETFL takes the status flags only; the access mode and creation flags are ignored.)
        calls.push(Call::new(
            libc::SYS_fcntl,
            &[tmp, libc::F_SETFL as u64, open_flags as u32 as u64],
            format!("{what}: fcntl(F_SETFL)"),
        ));
    }
    if *pos != 0 && *flags as i32 & libc::O_PATH == 0 {
        let off =
            i64::try_from(*pos).map_err(|_| anyhow::anyhow!("{what}: offset {pos} too large"))?;
        calls.push(Call::new(
            libc::SYS_lseek,
            &[tmp, off as u64, libc::SEEK_SET as u64],
            format!("{what}: lseek to {pos}"),
        ));
    }
    calls.extend(super::onto_members(tmp, members, &id.path));
    inj.run_batch(&calls)?;
    Ok(())
}
