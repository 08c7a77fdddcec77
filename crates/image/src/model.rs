//! The data model of a process image: every piece of state that makes a Linux process that
//! process, as plain data. Capture fills these structs from a frozen process; restore reads
//! them back to rebuild it. Nothing here makes a system call, so the same types travel to a
//! file, over a socket, or through the fuzzer.
//!
//! Memory contents are *not* in this model: they follow the [`ProcessImage`] record as a
//! stream of page records (see `format`), so a large process never has to sit in memory twice.

use serde::{Deserialize, Serialize};

/// What the machine that made the image was; checked before anything is restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub arch: Arch,
    pub page_size: u64,
    /// `uname -r` of the capturing kernel. The vDSO is only reused on the same release.
    pub kernel_release: String,
    /// XSAVE feature bits (XCR0 bits) the saved CPU state uses; restore refuses an image
    /// whose bits the restoring CPU does not enable.
    pub xfeatures: u64,
    /// Seconds since the epoch when the image was made (informational).
    pub created_unix: u64,
    /// Host name of the machine that made the image (informational).
    pub hostname: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    X86_64,
    Aarch64,
}

/// Everything about one process but its memory contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessImage {
    pub pid: i32,
    pub comm: String,
    pub creds: Creds,
    pub misc: Misc,
    pub mm: MmFields,
    pub vmas: Vec<Vma>,
    /// The threads; the first is the thread-group leader (pid == tid).
    pub threads: Vec<ThreadState>,
    /// Dispositions of signals 1..=64 (index 0 is signal 1). SIGKILL/SIGSTOP are kept as
    /// default and never restored.
    pub sigactions: Vec<SigAction>,
    /// Signals pending for the whole process (shared queue), raw `siginfo_t`s.
    pub shared_pending: Vec<SigInfo>,
    pub fds: Vec<Fd>,
    /// Interval timers and POSIX timers (version 4).
    pub timers: Timers,
    /// Process attributes set with prctl(2), /proc or membarrier(2) (version 4).
    pub attrs: Attrs,
    /// Locks held on open files (version 4).
    pub locks: Vec<FileLock>,
}

/// User and group identity of the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creds {
    /// real, effective, saved, filesystem
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    /// Capability sets (version 4); `None`: as a change of uid leaves them.
    pub caps: Option<Caps>,
}

/// Capability sets, one bit per capability (bit n: capability n).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
}

/// Small per-process state that has no better home.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Misc {
    pub cwd: String,
    pub umask: u32,
    pub nice: i32,
    pub personality: u64,
    pub rlimits: Vec<Rlimit>,
    /// PR_SET_NO_NEW_PRIVS was set (it can be set, never cleared).
    pub no_new_privs: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// RLIMIT_* number.
    pub resource: u32,
    /// `u64::MAX` means unlimited.
    pub soft: u64,
    pub hard: u64,
}

/// The mm fields settable with PR_SET_MM_MAP, plus the auxiliary vector and the exe link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// Raw auxv words (pairs of key, value, ending with AT_NULL).
    pub auxv: Vec<u64>,
    /// Path of /proc/PID/exe at capture.
    pub exe: String,
    pub exe_id: Option<FileId>,
}

/// One mapping of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_READ | PROT_WRITE | PROT_EXEC bits as in mmap(2).
    pub prot: u32,
    /// MAP_SHARED (true) or MAP_PRIVATE (false).
    pub shared: bool,
    /// Offset in the file, in bytes (file mappings only).
    pub offset: u64,
    pub kind: VmaKind,
    /// VM_GROWSDOWN (the main `[stack]`): the mapping still grows down after restore.
    pub growsdown: bool,
    /// VM_ACCOUNT: the mapping is charged against the commit limit (it was writable, without
    /// MAP_NORESERVE). Kept so restore neither over-commits a 64 GiB MAP_NORESERVE
    /// reservation nor merges mappings the kernel kept apart.
    pub accounted: bool,
    /// madvise(2) advice in effect (MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_DONTFORK,
    /// MADV_DONTDUMP, MADV_WIPEONFORK, MADV_SEQUENTIAL, MADV_RANDOM, MADV_MERGEABLE), applied
    /// again on restore.
    pub advice: Vec<i32>,
    /// The rest of the mapping's flags (version 4).
    pub flags: VmaFlags,
}

/// Flags of a mapping beyond its protection, sharing and advice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmaFlags {
    /// mlock(2)ed (VM_LOCKED), and how.
    pub lock: Option<MemLock>,
    /// MAP_DROPPABLE: the kernel may drop its pages under memory pressure.
    pub droppable: bool,
    /// mseal(2)ed: its layout and protection can no longer change.
    pub sealed: bool,
    /// Guard regions (MADV_GUARD_INSTALL) inside it, as (start, end) ranges.
    pub guards: Vec<(u64, u64)>,
    /// The name anonymous memory was given (prctl PR_SET_VMA_ANON_NAME).
    pub name: Option<String>,
}

/// How a mapping is locked in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemLock {
    /// mlock(2): every page is faulted in and kept.
    Now,
    /// mlock2(2) MLOCK_ONFAULT: pages are kept once touched.
    OnFault,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaKind {
    /// Anonymous memory (also `[heap]` and `[stack]`: which one is named by the mm fields).
    Anon,
    /// Memory backed by a file on disk.
    File(FileId),
    /// A special kernel mapping: `[vdso]`, `[vvar]`, `[vvar_vclock]`, `[vsyscall]`.
    Special(SpecialMap),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpecialMap {
    Vdso,
    Vvar,
    VvarVclock,
    Vsyscall,
}

/// Which file a mapping or fd refers to, so restore can refuse a file that changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
}

/// Per-thread state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadState {
    pub tid: i32,
    pub cpu: CpuState,
    /// Blocked signal mask (bit n-1 = signal n).
    pub sigmask: u64,
    /// Signals pending for this thread only, raw `siginfo_t`s.
    pub pending: Vec<SigInfo>,
    pub altstack: AltStack,
    pub rseq: Option<Rseq>,
    /// set_tid_address(2) value (PR_GET_TID_ADDRESS).
    pub clear_child_tid: u64,
    /// set_robust_list(2) head and length.
    pub robust_list: u64,
    pub robust_list_len: u64,
    /// Where glibc caches this thread's tid (fs_base + offset), if found at capture; restore
    /// rewrites it when the thread gets a different tid.
    pub tid_cache_addr: Option<u64>,
}

/// CPU state of one thread, per architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuState {
    X86_64(X86_64Cpu),
}

/// x86-64: `struct user_regs_struct` (27 words, kernel order) and the XSAVE area as returned
/// by PTRACE_GETREGSET NT_X86_XSTATE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct X86_64Cpu {
    pub gpregs: Vec<u64>,
    pub xsave: Vec<u8>,
}

/// A raw `siginfo_t` (128 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigInfo(pub Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    /// Handler address, or 0 = SIG_DFL, 1 = SIG_IGN.
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub abi_pointer: u64,
    pub abi_size: u32,
    pub flags: u32,
    pub signature: u32,
}

/// One open file descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fd {
    pub fd: i32,
    pub cloexec: bool,
    /// Fds with the same `open_file` index share one open file description (dup'd or
    /// inherited): restore opens it once and duplicates it.
    pub open_file: u32,
    pub kind: FdKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// A regular file or directory, reopened by path.
    Path {
        id: FileId,
        /// open(2) flags as in fdinfo (access mode, O_APPEND, O_NONBLOCK, …; no O_CLOEXEC).
        flags: u32,
        pos: u64,
        directory: bool,
    },
    /// A terminal or pipe on fd 0/1/2 at capture: bound to the restoring command's own fd of
    /// the same number.
    InheritedStdio,
    /// An eventfd: its counter and mode (version 4).
    EventFd { count: u64, semaphore: bool, nonblock: bool },
    /// A timerfd: its clock, what is left and the interval, expirations not read yet, and
    /// how it was set (TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET) (version 4).
    TimerFd {
        clock: i32,
        nonblock: bool,
        settime_flags: u32,
        value_ns: u64,
        interval_ns: u64,
        ticks: u64,
    },
    /// A signalfd: the signals it takes (bit n-1: signal n) (version 4).
    SignalFd { mask: u64, nonblock: bool },
    /// One end of a pipe (version 4): which pipe (its inode at capture, pairing the ends),
    /// which end, its open flags, the pipe's size, the bytes buffered in it (on one read
    /// end of a pipe whose both ends the process holds), and whether its other end is held
    /// outside the process (then the pipe is found again, not made).
    Pipe { ino: u64, write: bool, flags: u32, size: u32, data: Vec<u8>, external: bool },
    /// An end of a named pipe (version 4): its path and inode (fds on one FIFO share it),
    /// open flags, the pipe's size, its buffered bytes (on the FIFO's first fd, unless
    /// another process held it: then they stayed in it).
    Fifo { path: String, ino: u64, flags: u32, size: u32, data: Vec<u8>, external: bool },
    /// An epoll instance and its interest list (version 4).
    Epoll { watches: Vec<EpollWatch> },
    /// A regular file deleted while open, with its contents (version 4): the path it had,
    /// its inode at capture (fds on one deleted file share it), permissions, owner, size,
    /// the runs of data in it (holes stay holes), its times, the open flags and offset of
    /// this open file description.
    Ghost {
        path: String,
        ino: u64,
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        data: Vec<(u64, Vec<u8>)>,
        /// Last access and modification, (seconds, nanoseconds).
        atime: (i64, i64),
        mtime: (i64, i64),
        flags: u32,
        pos: u64,
    },
}

/// One entry of an epoll interest list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollWatch {
    /// The fd number it was added under (the process's fd on that file).
    pub fd: i32,
    /// The events it asks for, with EPOLLET, EPOLLONESHOT, … as the kernel keeps them.
    pub events: u32,
    /// The data its events carry.
    pub data: u64,
}

/// The interval timers (setitimer(2), alarm(2)) and POSIX timers (timer_create(2)).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timers {
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF, in that order; empty means all disarmed.
    pub itimers: Vec<TimerValue>,
    /// POSIX timers, by id.
    pub posix: Vec<PosixTimer>,
}

/// What is left of a timer and how it repeats, in nanoseconds (0: disarmed / one-shot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerValue {
    pub value_ns: u64,
    pub interval_ns: u64,
}

/// One POSIX timer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    /// Its timer_t, which the process holds and which restore gives it again.
    pub id: i32,
    /// The clock it counts (CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME, …).
    pub clock: i32,
    pub notify: TimerNotify,
    /// The signal it sends, and the value that signal carries (sigev_value).
    pub signo: i32,
    pub sigval: u64,
    pub value: TimerValue,
    /// Expirations lost when it fired last (timer_getoverrun(2)); informational: no call
    /// sets it.
    pub overrun: i32,
}

/// How a POSIX timer notifies (sigev_notify).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimerNotify {
    /// SIGEV_SIGNAL: a signal to the process.
    Signal,
    /// SIGEV_NONE: nothing; the process polls it.
    None,
    /// SIGEV_THREAD_ID: a signal to one thread.
    Thread { tid: i32 },
}

/// Process attributes set through prctl(2), /proc/PID or membarrier(2). `None` and `false`
/// mean "as a new process has it".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attrs {
    /// /proc/PID/oom_score_adj.
    pub oom_score_adj: i32,
    /// /proc/PID/loginuid (the audit login uid); `None`: as the restorer's.
    pub loginuid: Option<u32>,
    /// PR_SET_THP_DISABLE.
    pub thp_disable: bool,
    /// PR_SET_CHILD_SUBREAPER.
    pub child_subreaper: bool,
    /// PR_SET_DUMPABLE (0 or 1); `None`: as the credentials leave it.
    pub dumpable: Option<u32>,
    /// PR_SET_TIMERSLACK in nanoseconds; `None`: inherited.
    pub timer_slack_ns: Option<u64>,
    /// membarrier(2) registrations: the MEMBARRIER_CMD_REGISTER_* bits it registered.
    pub membarrier: u32,
    /// PR_SET_MEMORY_MERGE (KSM for the whole process).
    pub memory_merge: bool,
    /// PR_SET_MDWE flags (memory-deny-write-execute).
    pub mdwe: u32,
    /// PR_SET_PDEATHSIG at capture (restored only where its meaning holds; see the engine).
    pub pdeath_signal: i32,
    /// PR_SET_SECUREBITS.
    pub securebits: u32,
    /// The CPUs it may run on, where it was restricted to fewer than the machine had online;
    /// `None`: any.
    pub cpus: Option<Vec<u32>>,
    /// The cgroups it had been put in, where the program that captured it was not.
    pub cgroups: Vec<CgroupMembership>,
    /// It led its own session (setsid) or, else, its own process group (setpgid): it leads
    /// one again after restore (one that was in another's stays in its restorer's).
    pub leader: Option<Leader>,
    /// Its scheduling policy, where not SCHED_OTHER (the nice value is in `Misc`).
    pub sched: Option<Sched>,
    /// Its I/O priority (ioprio_set's value; 0: none set).
    pub ioprio: u32,
    /// /proc/PID/coredump_filter, where it differs from the machine's default.
    pub coredump_filter: Option<u32>,
}

/// A scheduling policy (sched_setscheduler).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sched {
    /// SCHED_FIFO, SCHED_RR, SCHED_BATCH or SCHED_IDLE.
    pub policy: i32,
    /// The real-time priority (FIFO, RR), else 0.
    pub priority: i32,
    /// SCHED_RESET_ON_FORK.
    pub reset_on_fork: bool,
}

/// What a process led.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Leader {
    Session,
    ProcessGroup,
}

/// A cgroup a process is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupMembership {
    /// The hierarchy: its v1 controllers or `name=…` as /proc/PID/cgroup shows them; empty
    /// for the v2 hierarchy.
    pub controllers: String,
    /// The cgroup's path inside the hierarchy.
    pub path: String,
}

/// A lock held on an open file, by one of the fds that refer to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLock {
    /// An fd of the process on the locked open file.
    pub fd: i32,
    pub kind: LockKind,
    /// A write (exclusive) lock, else a read (shared) one.
    pub write: bool,
    /// The byte range of a record lock (ignored for flock): start, and length (0: to the
    /// end of the file, however it grows).
    pub start: u64,
    pub len: u64,
}

/// What kind of lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockKind {
    /// flock(2): owned by the open file description.
    Flock,
    /// fcntl(2) F_SETLK: owned by the process.
    Posix,
    /// fcntl(2) F_OFD_SETLK: owned by the open file description.
    Ofd,
}

/// Trailer of an image: what the reader must have seen, so truncation is detected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    pub page_records: u64,
    pub page_bytes: u64,
}
