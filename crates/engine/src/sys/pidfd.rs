//! pidfds: handles on a process that can never name another one (a PID is free for reuse once
//! its process is reaped, a pidfd stays bound to the process it was opened on). Owns no
//! process state; the restorer, the destination daemon and the library use these.
//!
//! Written by hand: rustix has them, but its pidfd_send_signal takes a typed `Signal`, while a
//! telefork relays any signal number (real-time ones included); each is one system call.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A pidfd on process `pid` (pidfd_open).
pub fn open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers and returns a new fd (or -1).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `signal` to the process behind `pidfd`, as kill(2) would.
pub fn send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> std::io::Result<()> {
    // SAFETY: plain integers; a NULL siginfo means "as kill(2) would".
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A copy of fd `target_fd` of the process behind `pidfd` (pidfd_getfd: we must be allowed
/// to ptrace it).
pub fn get_fd(pidfd: BorrowedFd<'_>, target_fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: plain integers; the fd returned is new and ours to own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
