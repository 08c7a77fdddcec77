//! File descriptors: which numbers are open, on what, with which flags and offsets, and which
//! of them share one open file description.
//!
//! Capture reads /proc/PID/fd (the link says what the fd is), stat()s through the link (the
//! object's type and identity) and /proc/PID/fdinfo/N (offset, open flags, close-on-exec);
//! fds that share an open file description (dup'd, or inherited) are found with
//! kcmp(KCMP_FILE) and get the same `open_file` index. Each kind has its own file:
//! `path` (regular files, directories and a few harmless character devices, reopened by
//! path) and `stdio` (a terminal or pipe on 0/1/2, bound on restore to the restoring
//! command's own). Anything else fails the capture with a message naming the fd and what it
//! is, before the target has been changed in any way.
//!
//! Restore closes what the restore stub inherited, then recreates each open file description
//! once inside the new process (injected openat + lseek) and duplicates it onto every fd
//! number that shared it.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;

use crate::inject::{Call, Injector};
use crate::procfs::{self, FdInfo};
use crate::state::State;
use telefork_image::{Fd, FdKind, FileLock, ProcessImage};

pub(crate) mod epoll;
pub(crate) mod eventfd;
pub(crate) mod fifo;
pub(crate) mod ghost;
pub(crate) mod path;
pub(crate) mod pipe;
pub(crate) mod signalfd;
pub(crate) mod stdio;
pub(crate) mod timerfd;

/// The fds, as one kind of state (`State`); each kind of fd is a `Kind` of its own.
pub(crate) struct Fds;

impl State for Fds {
    /// The fds, and the locks held through them (`locks`).
    type Image = (Vec<Fd>, Vec<FileLock>);
    type Source<'a> = FdsLook;

    fn capture(from: FdsLook) -> Result<(Vec<Fd>, Vec<FileLock>)> {
        capture(from)
    }

    fn restore(inj: &mut Injector, img: &ProcessImage) -> Result<()> {
        restore(inj, &img.fds)
    }
}

/// What the fds are captured from.
#[derive(Clone, Copy)]
pub(crate) struct FdsLook {
    pub pid: Pid,
    /// Record fds 0/1/2 as inherited, whatever they are.
    pub inherit_stdio: bool,
    /// Leave the locks to the original, which keeps running (see `locks`).
    pub leave_locks: bool,
    /// The process is a fork of one that keeps running (`DumpOptions::fork_copy`).
    pub fork_copy: bool,
}

/// One kind of fd: which fds it takes at capture, and how it recreates them.
pub(crate) trait Kind {
    /// This fd as this kind; `None` if it is another kind; an error (an `Uncarried`
    /// refusal) for one of this kind that cannot be carried.
    fn capture(p: &Probe) -> Result<Option<FdKind>>;

    /// Recreates one open file description of this kind on every fd of `members` (all of
    /// this kind, sharing it; the first carries the kind).
    fn restore(inj: &mut Injector, members: &[&Fd]) -> Result<()>;
}

/// What /proc says about one fd of the target.
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    pub fd: i32,
    /// readlink of /proc/PID/fd/N.
    pub link: String,
    /// stat() through the link: the object itself.
    pub mode: u32,
    pub rdev: u64,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
    /// Last access, links, owner and group of the object.
    pub atime_sec: i64,
    pub atime_nsec: i64,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub info: FdInfo,
}

fn probe(pid: Pid, fd: i32) -> Result<Probe> {
    let link_path = procfs::fd_path(pid, fd);
    let link =
        std::fs::read_link(&link_path).with_context(|| format!("fd {fd}: reading {link_path}"))?;
    let link = link.to_string_lossy().into_owned();
    let st = nix::sys::stat::stat(link_path.as_str())
        .with_context(|| format!("fd {fd} ({link}): stat"))?;
    let info = procfs::read_fdinfo(pid, fd)?;
    Ok(Probe {
        fd,
        link,
        mode: st.st_mode,
        rdev: st.st_rdev,
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size as u64,
        mtime_sec: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec,
        atime_sec: st.st_atime,
        atime_nsec: st.st_atime_nsec,
        nlink: st.st_nlink,
        uid: st.st_uid,
        gid: st.st_gid,
        info,
    })
}

/// Whether a kind of fd, carried by a copy of its state, would stop being shared with the
/// parent of a telefork (a regular file is reopened: its offset is a copy, as documented).
fn shared_after_fork(kind: &FdKind) -> bool {
    matches!(
        kind,
        FdKind::EventFd { .. }
            | FdKind::TimerFd { .. }
            | FdKind::SignalFd { .. }
            | FdKind::Pipe { .. }
            | FdKind::Fifo { .. }
            | FdKind::Epoll { .. }
    )
}

/// The calls that put a new open file description, now on fd `tmp`, on the fd number of
/// every member (with its close-on-exec flag), and close `tmp` unless it is one of them.
/// `name` says what it is, for errors.
pub(crate) fn onto_members(tmp: u64, members: &[&Fd], name: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut keep_tmp = false;
    for m in members {
        if m.fd as u64 == tmp {
            keep_tmp = true;
            let fl = if m.cloexec { libc::FD_CLOEXEC } else { 0 };
            calls.push(Call::new(
                libc::SYS_fcntl,
                &[tmp, libc::F_SETFD as u64, fl as u64],
                format!("restoring fd {} ({name}): fcntl(F_SETFD)", m.fd),
            ));
        } else {
            let fl = if m.cloexec { libc::O_CLOEXEC } else { 0 };
            calls.push(Call::new(
                libc::SYS_dup3,
                &[tmp, m.fd as u64, fl as u64],
                format!("restoring fd {} ({name}): dup3", m.fd),
            ));
        }
    }
    if !keep_tmp {
        calls.push(Call::new(
            libc::SYS_close,
            &[tmp],
            format!("restoring {name}: closing the temporary fd {tmp}"),
        ));
    }
    calls
}

/// Creates a new open file description in the process with `nr(args)` (an fd-returning
/// call: eventfd2, timerfd_create, signalfd4, …), then runs `setup(fd)` and puts it on every
/// member's number, in one batch.
pub(crate) fn create_onto_members(
    inj: &mut Injector,
    members: &[&Fd],
    (nr, args): (libc::c_long, &[u64]),
    name: &str,
    setup: impl FnOnce(&mut Injector, u64) -> Result<Vec<Call>>,
) -> Result<()> {
    let what = format!("restoring fd {} ({name})", members[0].fd);
    let tmp = inj.syscall(nr, args, format!("{what}: creating it"))?;
    let mut calls = setup(inj, tmp)?;
    calls.extend(onto_members(tmp, members, name));
    inj.run_batch(&calls)?;
    Ok(())
}

/// The kind of namespace an fd on an nsfs file (`net:[4026531840]`) refers to.
fn namespace_of(link: &str) -> Option<&'static str> {
    const KINDS: [(&str, &str); 10] = [
        ("cgroup", "cgroup namespace"),
        ("ipc", "IPC namespace"),
        ("mnt", "mount namespace"),
        ("net", "network namespace"),
        ("pid", "PID namespace"),
        ("pid_for_children", "PID namespace"),
        ("time", "time namespace"),
        ("time_for_children", "time namespace"),
        ("user", "user namespace"),
        ("uts", "UTS namespace"),
    ];
    let (kind, rest) = link.split_once(':')?;
    let inode = rest.strip_prefix('[')?.strip_suffix(']')?;
    if inode.is_empty() || !inode.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    KINDS.iter().find(|(k, _)| *k == kind).map(|(_, name)| *name)
}

/// A name for what an fd refers to, for "not supported" messages.
pub fn describe_kind(p: &Probe) -> &'static str {
    let l = p.link.as_str();
    if l.starts_with("/memfd:") {
        return "memfd";
    }
    if l.starts_with("pipe:") {
        return "pipe";
    }
    if l.starts_with("socket:") {
        return "socket";
    }
    if let Some(rest) = l.strip_prefix("anon_inode:") {
        let rest = rest.trim_start_matches('[').trim_end_matches(']');
        return match rest {
            "eventfd" => "eventfd",
            "eventpoll" => "epoll instance",
            "signalfd" => "signalfd",
            "timerfd" => "timerfd",
            "inotify" => "inotify instance",
            "fanotify" => "fanotify instance",
            "pidfd" => "pidfd",
            "io_uring" => "io_uring instance",
            "userfaultfd" => "userfaultfd",
            "perf_event" => "perf event",
            "bpf-map" | "bpf-prog" | "bpf_link" => "BPF object",
            _ => "anonymous-inode file",
        };
    }
    if l.starts_with("pidfd:") {
        return "pidfd";
    }
    if let Some(ns) = namespace_of(l) {
        return ns;
    }
    match p.mode & libc::S_IFMT {
        libc::S_IFCHR if stdio::is_terminal(p) => "terminal",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        libc::S_IFIFO if l.starts_with('/') => "FIFO",
        libc::S_IFIFO => "pipe",
        libc::S_IFSOCK => "socket",
        libc::S_IFREG => "regular file",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symbolic link (O_PATH)",
        _ => "file of unknown type",
    }
}

/// Captures the fds of `pid`. With `inherit_stdio`, fds 0/1/2 are recorded as
/// `InheritedStdio` whatever they are (telefork: the child's stdio is its parent's, relayed).
fn capture(look: FdsLook) -> Result<(Vec<Fd>, Vec<FileLock>)> {
    let FdsLook { pid, inherit_stdio, leave_locks, fork_copy } = look;
    let nums = procfs::list_fds(pid)?;

    let mut out = Vec::with_capacity(nums.len());
    let mut locks = Vec::new();
    let mut locks_left = false;
    let mut ghost_bytes = 0u64;
    let mut fifos_seen = std::collections::BTreeSet::new();
    // Representative fd of each open file description found so far.
    let mut reps: Vec<i32> = Vec::new();
    let mut kcmp_ok = true;
    for fd in nums {
        let p = match probe(pid, fd) {
            Ok(p) => p,
            // Closed between listing and reading: it is gone, and the target is frozen, so
            // this can only be a race with an fd another thread closed right before the stop.
            Err(e) if is_enoent(&e) => continue,
            Err(e) => return Err(e),
        };
        let kind = if inherit_stdio && (0..=2).contains(&fd) {
            FdKind::InheritedStdio
        } else if let Some(k) = stdio::Stdio::capture(&p)? {
            k
        } else if let Some(k) = path::ByPath::capture(&p)? {
            k
        } else if let Some(k) = eventfd::EventFd::capture(&p)? {
            k
        } else if let Some(k) = timerfd::TimerFd::capture(&p)? {
            k
        } else if let Some(k) = signalfd::SignalFd::capture(&p)? {
            k
        } else if let Some(k) = pipe::capture(pid, &p)? {
            k
        } else if let Some(k) = epoll::capture(pid, &p)? {
            k
        } else if let Some(k) = ghost::capture(pid, &p, &mut ghost_bytes)? {
            k
        } else if let Some(k) = fifo::capture(pid, &p, fifos_seen.insert(p.ino))? {
            k
        } else {
            let kind = describe_kind(&p);
            let (kind, target) = (kind.to_string(), p.link.clone());
            return Err(crate::error::Uncarried::Fd { fd, kind, target }.into());
        };

        if fork_copy && shared_after_fork(&kind) {
            let what = format!("fd {fd} ({})", p.link);
            let why = "a telefork's copy would share it with its parent, and that sharing \
                       cannot be kept across machines yet";
            return Err(crate::error::refusal(what, why));
        }
        let mut open_file = None;
        if kcmp_ok {
            for (i, &r) in reps.iter().enumerate() {
                match crate::sys::same_open_file(pid, r, fd) {
                    Ok(true) => {
                        open_file = Some(i as u32);
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!("cannot tell shared open files apart ({e:#}); fds are restored as independent opens");
                        kcmp_ok = false;
                        break;
                    }
                }
            }
        }
        let first_of_its_open_file = open_file.is_none();
        let open_file = match open_file {
            Some(i) => i,
            None => {
                reps.push(fd);
                (reps.len() - 1) as u32
            }
        };
        if leave_locks {
            locks_left |= !p.info.locks.is_empty();
        } else {
            let first = first_of_its_open_file;
            crate::locks::capture_fd(fd, &p.link, &p.info.locks, first, &mut locks)?;
        }
        out.push(Fd { fd, cloexec: p.info.cloexec, open_file, kind });
    }
    if locks_left {
        tracing::debug!("process {pid} holds file locks: they stay with it (a copy gets none)");
    }
    pipe::capture_all(pid, &mut out)?;
    Ok((out, locks))
}

fn is_enoent(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.raw_os_error() == Some(libc::ENOENT))
            || c.downcast_ref::<nix::Error>().is_some_and(|n| *n == nix::Error::ENOENT)
    })
}

/// Closes every fd the restore stub inherited (but 0/1/2 that are `InheritedStdio`) and
/// recreates the image's fds.
fn restore(inj: &mut Injector, fds: &[Fd]) -> Result<()> {
    inj.reset_scratch();

    // Sanity of the image: fd numbers unique and non-negative, InheritedStdio only on 0..=2.
    let mut seen = std::collections::BTreeSet::new();
    for f in fds {
        if f.fd < 0 || !seen.insert(f.fd) {
            bail!("image lists fd {} twice or with a negative number", f.fd);
        }
        if matches!(f.kind, FdKind::InheritedStdio) && f.fd > 2 {
            bail!("image has fd {} as inherited stdio: only 0, 1 and 2 can be", f.fd);
        }
    }

    // The restorer's fds closed, RLIMIT_NOFILE read, the inherited stdio fds' close-on-exec
    // flags set: one batch.
    let lim = inj.alloc_zeroed(16)?;
    let mut calls = vec![
        Call::new(
            libc::SYS_close_range,
            &[3, u32::MAX as u64, 0],
            "closing the restorer's fds: close_range(3, ~0)",
        ),
        Call::new(
            libc::SYS_prlimit64,
            &[0, libc::RLIMIT_NOFILE as u64, 0, lim],
            "reading RLIMIT_NOFILE: prlimit64",
        ),
    ];
    let inherited: Vec<&Fd> =
        fds.iter().filter(|f| matches!(f.kind, FdKind::InheritedStdio)).collect();
    calls.extend(inherited.iter().map(|m| stdio::set_cloexec_call(m)));
    let mut from = 0;
    while let Err((i, errno)) = inj.try_batch(&calls[from..])? {
        let i = from + i;
        match inherited.get(i.wrapping_sub(2)) {
            Some(m) if errno == libc::EBADF => stdio::warn_missing(m),
            _ => bail!("{}: {}", calls[i].what, std::io::Error::from_raw_os_error(errno)),
        }
        from = i + 1;
    }
    for n in 0..=2 {
        if !seen.contains(&n) {
            // Not open in the image: close ours (EBADF if the stub has none is fine).
            let r = inj.syscall_raw(libc::SYS_close, &[n as u64])?;
            if r < 0 && r != -(libc::EBADF as i64) {
                bail!("closing fd {n}: {}", std::io::Error::from_raw_os_error(-r as i32));
            }
        }
    }

    // The image's RLIMIT_NOFILE is already in place (misc runs first), and a process may
    // have lowered its soft limit below fds it already had open: lift the soft limit while
    // placing the fds, and put it back after.
    let max_fd = fds.iter().map(|f| f.fd as u64).max().unwrap_or(0);
    let mut b = [0u8; 16];
    inj.read_mem(lim, &mut b)?;
    let soft = u64::from_ne_bytes(b[..8].try_into().expect("8 bytes"));
    let hard = u64::from_ne_bytes(b[8..].try_into().expect("8 bytes"));
    if max_fd >= hard {
        bail!("restoring fd {max_fd}: the restored process's hard RLIMIT_NOFILE is {hard}, below the fd number");
    }
    let lifted = max_fd >= soft;
    if lifted {
        inj.write_mem(lim, &[(max_fd + 1).to_ne_bytes(), hard.to_ne_bytes()].concat())?;
        inj.syscall(
            libc::SYS_prlimit64,
            &[0, libc::RLIMIT_NOFILE as u64, lim, 0],
            "raising the soft RLIMIT_NOFILE for the fds: prlimit64",
        )?;
    }

    // Group by open file description; the group's first fd carries the kind.
    let mut groups: BTreeMap<u32, Vec<&Fd>> = BTreeMap::new();
    for f in fds {
        groups.entry(f.open_file).or_default().push(f);
    }
    // Pipes, a pipe at a time (its two ends are made together).
    let mut pipes: BTreeMap<u64, Vec<&[&Fd]>> = BTreeMap::new();
    for members in groups.values() {
        if let FdKind::Pipe { ino, .. } = members[0].kind {
            let per_end = |w: bool| {
                members.iter().all(|m| matches!(m.kind, FdKind::Pipe { ino: i, write, .. } if i == ino && write == w))
            };
            if !per_end(false) && !per_end(true) {
                bail!(
                    "image: fds {} and others share an open file but differ in pipe end",
                    members[0].fd
                );
            }
            pipes.entry(ino).or_default().push(members.as_slice());
        }
    }
    for ends in pipes.values() {
        inj.reset_scratch();
        pipe::restore(inj, ends, fds)?;
    }
    let ghosts: Vec<&[&Fd]> = groups
        .values()
        .filter(|g| matches!(g[0].kind, FdKind::Ghost { .. }))
        .map(Vec::as_slice)
        .collect();
    ghost::restore_all(inj, &ghosts)?;
    let fifos: Vec<&[&Fd]> = groups
        .values()
        .filter(|g| matches!(g[0].kind, FdKind::Fifo { .. }))
        .map(Vec::as_slice)
        .collect();
    fifo::restore_all(inj, &fifos)?;
    let mut epolls: Vec<&[&Fd]> = Vec::new();
    for members in groups.values() {
        let first = members[0];
        if matches!(first.kind, FdKind::Pipe { .. } | FdKind::Ghost { .. } | FdKind::Fifo { .. }) {
            continue;
        }
        if matches!(first.kind, FdKind::Epoll { .. }) {
            epolls.push(members.as_slice()); // (last: the fds they watch exist by then)
            continue;
        }
        for m in &members[1..] {
            if m.kind != first.kind {
                bail!("image: fds {} and {} share an open file but differ in kind", first.fd, m.fd);
            }
        }
        inj.reset_scratch(); // each group stages its own path: keep the scratch use bounded
        match &first.kind {
            FdKind::InheritedStdio => stdio::Stdio::restore(inj, members)?,
            FdKind::Path { .. } => path::ByPath::restore(inj, members)?,
            FdKind::EventFd { .. } => eventfd::EventFd::restore(inj, members)?,
            FdKind::TimerFd { .. } => timerfd::TimerFd::restore(inj, members)?,
            FdKind::SignalFd { .. } => signalfd::SignalFd::restore(inj, members)?,
            FdKind::Pipe { .. }
            | FdKind::Ghost { .. }
            | FdKind::Fifo { .. }
            | FdKind::Epoll { .. } => {} // (elsewhere)
        }
    }
    epoll::restore_all(inj, &epolls)?;
    if lifted {
        let lim = inj.stage(&[soft.to_ne_bytes(), hard.to_ne_bytes()].concat())?;
        inj.syscall(
            libc::SYS_prlimit64,
            &[0, libc::RLIMIT_NOFILE as u64, lim, 0],
            "putting back the soft RLIMIT_NOFILE: prlimit64",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod classify_tests {
    use super::*;
    use crate::error::article;

    fn probe(fd: i32, link: &str, mode: u32, rdev: u64) -> Probe {
        Probe {
            fd,
            link: link.into(),
            mode,
            rdev,
            dev: 1,
            ino: 2,
            size: 3,
            mtime_sec: 4,
            mtime_nsec: 5,
            atime_sec: 6,
            atime_nsec: 7,
            nlink: 1,
            uid: 0,
            gid: 0,
            info: FdInfo { pos: 7, flags: 0o100002, cloexec: false, locks: vec![], fields: vec![] },
        }
    }
    const PTS0: u64 = 136 << 8;

    #[test]
    fn stdio() {
        assert!(stdio::is_inherited_stdio(&probe(1, "/dev/pts/0", libc::S_IFCHR | 0o620, PTS0)));
        assert!(stdio::is_inherited_stdio(&probe(0, "pipe:[1]", libc::S_IFIFO | 0o600, 0)));
        assert!(stdio::is_inherited_stdio(&probe(2, "/dev/tty", libc::S_IFCHR, 5 << 8)));
        assert!(!stdio::is_inherited_stdio(&probe(3, "/dev/pts/0", libc::S_IFCHR, PTS0)));
        assert!(!stdio::is_inherited_stdio(&probe(0, "/dev/null", libc::S_IFCHR, (1 << 8) | 3)));
        assert!(!stdio::is_inherited_stdio(&probe(1, "/tmp/x", libc::S_IFREG, 0)));
    }

    #[test]
    fn namespace_fds_are_named() {
        let ns = probe(5, "net:[4026531840]", libc::S_IFREG | 0o444, 0);
        assert_eq!(describe_kind(&ns), "network namespace");
        assert!(path::ByPath::capture(&ns).unwrap().is_none());
        let ns = probe(5, "pid_for_children:[4026531836]", libc::S_IFREG | 0o444, 0);
        assert_eq!(describe_kind(&ns), "PID namespace");
        assert_eq!(describe_kind(&probe(5, "net:[x]", libc::S_IFREG, 0)), "regular file");
    }

    #[test]
    fn paths() {
        let k =
            path::ByPath::capture(&probe(3, "/tmp/x", libc::S_IFREG | 0o644, 0)).unwrap().unwrap();
        let FdKind::Path { id, flags, pos, directory } = k else { panic!("not a path") };
        assert_eq!(
            (id.path.as_str(), id.ino, flags, pos, directory),
            ("/tmp/x", 2, 0o100002, 7, false)
        );
        let k =
            path::ByPath::capture(&probe(3, "/tmp", libc::S_IFDIR | 0o755, 0)).unwrap().unwrap();
        assert!(matches!(k, FdKind::Path { directory: true, .. }));
        assert!(path::ByPath::capture(&probe(0, "/dev/null", libc::S_IFCHR, (1 << 8) | 3))
            .unwrap()
            .is_some());
        assert!(path::ByPath::capture(&probe(4, "/dev/sda", libc::S_IFBLK, 8 << 8))
            .unwrap()
            .is_none());
        assert!(path::ByPath::capture(&probe(4, "/dev/ttyS0", libc::S_IFCHR, 4 << 8))
            .unwrap()
            .is_none());
        assert!(path::ByPath::capture(&probe(4, "/memfd:x (deleted)", libc::S_IFREG, 0))
            .unwrap()
            .is_none());
        assert!(path::ByPath::capture(&probe(4, "anon_inode:[eventfd]", libc::S_IFREG, 0))
            .unwrap()
            .is_none());
        // A file deleted while open is a ghost's, a deleted directory is refused.
        assert!(path::ByPath::capture(&probe(4, "/tmp/gone (deleted)", libc::S_IFREG, 0))
            .unwrap()
            .is_none());
        let gone =
            path::ByPath::capture(&probe(4, "/tmp/gone (deleted)", libc::S_IFDIR, 0)).unwrap_err();
        let e = crate::Error::from(gone);
        assert!(
            matches!(e.uncarried(), Some(crate::Uncarried::State { what, .. }) if what == "fd 4 (/tmp/gone (deleted))"),
            "{e:#}"
        );
    }

    #[test]
    fn kinds() {
        assert_eq!(describe_kind(&probe(5, "pipe:[9]", libc::S_IFIFO, 0)), "pipe");
        assert_eq!(describe_kind(&probe(5, "socket:[9]", libc::S_IFSOCK, 0)), "socket");
        assert_eq!(describe_kind(&probe(5, "anon_inode:[eventpoll]", 0, 0)), "epoll instance");
        assert_eq!(describe_kind(&probe(5, "anon_inode:inotify", 0, 0)), "inotify instance");
        assert_eq!(describe_kind(&probe(5, "/memfd:a (deleted)", libc::S_IFREG, 0)), "memfd");
        assert_eq!(describe_kind(&probe(5, "/dev/pts/3", libc::S_IFCHR, PTS0 + 3)), "terminal");
        assert_eq!(article("eventfd"), "an");
        assert_eq!(article("socket"), "a");
        assert_eq!(article("userfaultfd"), "a");
    }
}
