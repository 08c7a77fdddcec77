//! The fork that becomes a restored process: clone3 (with a chosen PID when it is free),
//! and the child's few raw system calls until it stops under its parent's ptrace. Owns no
//! process state; `restore::spawn_stub` waits for the stop and takes over.

use std::os::fd::RawFd;

/// Forks this process into a child that, before anything else, dies with its parent
/// (PR_SET_PDEATHSIG), takes `stdio` as its 0/1/2, closes every other fd, asks to be traced
/// and stops itself (SIGSTOP). With PID `want_pid` if that is free (clone3 set_tid needs
/// CAP_CHECKPOINT_RESTORE), else any. Returns the child's PID and whether it is `want_pid`.
///
/// The child exits with 124 (close_range failed), 125 (its parent was already gone) or 126
/// (dup2 of its stdio failed) instead of stopping.
pub(crate) fn fork_stopped_child(
    want_pid: i32,
    stdio: Option<[RawFd; 3]>,
) -> std::io::Result<(i32, bool)> {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let tid = [want_pid as libc::pid_t];
    let restorer = nix::unistd::getpid().as_raw();
    let mut args = CloneArgs { exit_signal: libc::SIGCHLD as u64, ..Default::default() };
    let mut same = true;
    if want_pid > 0 {
        args.set_tid = tid.as_ptr() as u64;
        args.set_tid_size = 1;
    }
    // SAFETY: clone3 without CLONE_VM behaves like fork(): the child gets a copy of our
    // memory. `args` and `tid` live across the call. Other threads may exist (a daemon
    // session's), so the child makes only async-signal-safe system calls before it stops.
    let mut r = unsafe {
        libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>())
    };
    if r < 0 && want_pid > 0 {
        // PID taken (EEXIST) or not permitted: fork semantics, a new PID.
        same = false;
        args.set_tid = 0;
        args.set_tid_size = 0;
        // SAFETY: as above.
        r = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
    }
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if r == 0 {
        // The child: only raw system calls from here (we are a fork of a process that may
        // hold locks). It stops; the parent takes over and rebuilds it from outside.
        // SAFETY: plain system calls without memory arguments.
        unsafe {
            // Should the restorer die before it holds us under ptrace (EXITKILL covers us
            // only from then on), die too: never a stopped orphan holding its sockets. The
            // restore clears this again (`clear_parent_death_signal`).
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            if libc::getppid() != restorer {
                libc::_exit(125);
            }
            if let Some(fds) = stdio {
                for (target, fd) in fds.iter().enumerate() {
                    if libc::dup2(*fd, target as i32) < 0 {
                        libc::_exit(126);
                    }
                }
            }
            // None of the restorer's other fds (a stub made while another restored process
            // runs must not hold, say, the write end of that one's stdin pipe).
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                libc::_exit(124);
            }
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            libc::raise(libc::SIGSTOP);
            libc::_exit(127);
        }
    }
    Ok((r as i32, same && want_pid > 0))
}
