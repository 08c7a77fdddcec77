//! The engine's low layer: the doors to the kernel. System calls no safe wrapper covers
//! (each `unsafe` block here says why it is sound), ptrace requests (`ptrace`), pidfds
//! (`pidfd`), the fork that becomes a restored process (`fork`) and /proc, parsed once per
//! file (`procfs`). Owns no process state: everything above it is safe code that asks
//! through these functions.

pub(crate) mod fork;
pub mod pidfd;
pub mod procfs;
pub mod ptrace;

use anyhow::{Context, Result};
use nix::unistd::Pid;

/// get_robust_list(2) on another thread (we must be allowed to ptrace it): the head of its
/// robust futex list and that head's length.
pub(crate) fn get_robust_list(tid: Pid) -> Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: the kernel writes one pointer to `head` and one size_t to `len`, both live.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid.as_raw(),
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("get_robust_list of thread {tid}"));
    }
    Ok((head, len as u64))
}

/// kcmp(KCMP_FILE): do fds `a` and `b` of `pid` refer to the same open file description?
pub(crate) fn same_open_file(pid: Pid, a: i32, b: i32) -> Result<bool> {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: kcmp takes only integers and touches no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid.as_raw(),
            pid.as_raw(),
            KCMP_FILE,
            a as libc::c_ulong,
            b as libc::c_ulong,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("kcmp(KCMP_FILE) on fds {a} and {b}"));
    }
    Ok(r == 0)
}

/// This process's own (soft, hard) limit of RLIMIT number `res` (0..16), RLIM_INFINITY as
/// `u64::MAX`; `None` for a number that names no limit.
pub(crate) fn getrlimit(res: u32) -> Option<(u64, u64)> {
    use rustix::process::Resource as R;
    const BY_NUMBER: [R; 16] = [
        R::Cpu,
        R::Fsize,
        R::Data,
        R::Stack,
        R::Core,
        R::Rss,
        R::Nproc,
        R::Nofile,
        R::Memlock,
        R::As,
        R::Locks,
        R::Sigpending,
        R::Msgqueue,
        R::Nice,
        R::Rtprio,
        R::Rttime,
    ];
    let l = rustix::process::getrlimit(*BY_NUMBER.get(res as usize)?);
    Some((l.current.unwrap_or(u64::MAX), l.maximum.unwrap_or(u64::MAX)))
}

/// The release of the running kernel (uname -r), empty if it cannot be read.
pub(crate) fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// setfsuid(2) for this thread only: sets the filesystem uid and returns the previous one
/// (an invalid id, u32::MAX, changes nothing: a read).
pub(crate) fn setfsuid(uid: u32) -> u32 {
    // SAFETY: a plain integer argument; the raw call changes this thread's credentials only.
    unsafe { libc::syscall(libc::SYS_setfsuid, uid) as u32 }
}

/// setfsgid(2) for this thread only, as `setfsuid`.
pub(crate) fn setfsgid(gid: u32) -> u32 {
    // SAFETY: a plain integer argument; the raw call changes this thread's credentials only.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid) as u32 }
}

/// setgroups(2) for this thread only (glibc's setgroups changes every thread's).
pub(crate) fn set_thread_groups(groups: &[u32]) -> std::io::Result<()> {
    let groups: Vec<rustix::process::Gid> =
        groups.iter().map(|&g| rustix::process::Gid::from_raw_unchecked(g)).collect();
    Ok(rustix::thread::set_thread_groups(&groups)?)
}

/// ioprio_get(IOPRIO_WHO_PROCESS, pid): its I/O priority (0 when none was set).
pub(crate) fn ioprio_of(pid: Pid) -> Result<u32> {
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    // SAFETY: ioprio_get takes two integers and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, pid.as_raw()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("ioprio_get of process {pid}"));
    }
    // (A process that never set one reads as IOPRIO_CLASS_NONE, with some data on older
    // kernels: none set.)
    Ok(if r as u32 >> 13 == 0 { 0 } else { r as u32 })
}

/// sched_getscheduler and sched_getparam of `pid`: its policy (with SCHED_RESET_ON_FORK)
/// and real-time priority.
pub(crate) fn sched_of(pid: Pid) -> Result<(i32, i32)> {
    // SAFETY: takes an integer and touches no memory of ours.
    let policy = unsafe { libc::sched_getscheduler(pid.as_raw()) };
    if policy < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("sched_getscheduler of process {pid}"));
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the kernel writes one sched_param into `param`, which lives through the call.
    if unsafe { libc::sched_getparam(pid.as_raw(), &mut param) } < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("sched_getparam of process {pid}"));
    }
    Ok((policy, param.sched_priority))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::resource::Resource;

    /// Each RLIMIT number reads its own limit (the table follows the kernel's numbering).
    #[test]
    fn rlimits_by_number() {
        let pairs = [
            (libc::RLIMIT_STACK, Resource::RLIMIT_STACK),
            (libc::RLIMIT_NOFILE, Resource::RLIMIT_NOFILE),
            (libc::RLIMIT_NPROC, Resource::RLIMIT_NPROC),
            (libc::RLIMIT_RTTIME, Resource::RLIMIT_RTTIME),
        ];
        for (n, r) in pairs {
            let (soft, hard) = nix::sys::resource::getrlimit(r).unwrap();
            assert_eq!(getrlimit(n), Some((soft, hard)), "RLIMIT number {n}");
        }
        assert_eq!(getrlimit(16), None);
    }
}
