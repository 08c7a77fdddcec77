//! pidfds: handles on a process that can never name another one (a PID is free for reuse once
//! its process is reaped, a pidfd stays bound to the process it was opened on). Owns no
//! process state; the restorer, the destination daemon and the library use these.
//!
//! pidfd_open and pidfd_getfd through rustix; pidfd_send_signal by hand, as rustix's takes a
//! typed `Signal` while a telefork relays any signal number (real-time ones included).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// A pidfd on process `pid` (pidfd_open).
///
/// # Errors
/// The system call's (ESRCH: no such process; EINVAL for PID 0 or below).
pub fn open(pid: i32) -> std::io::Result<OwnedFd> {
    let pid = (pid > 0)
        .then(|| rustix::process::Pid::from_raw(pid))
        .flatten()
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?)
}

/// Sends `signal` to the process behind `pidfd`, as kill(2) would.
///
/// # Errors
/// The system call's (ESRCH: the process has ended; EINVAL: no such signal).
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
///
/// # Errors
/// The system call's (EBADF: no such fd; EPERM: not allowed).
pub fn get_fd(pidfd: BorrowedFd<'_>, target_fd: RawFd) -> std::io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_getfd(pidfd, target_fd, rustix::process::PidfdGetfdFlags::empty())?)
}
