//! Process attributes that are neither credentials nor memory: oom_score_adj, the audit login
//! uid, THP disable, child subreaper, dumpable, timer slack, membarrier registrations,
//! process-wide KSM (PR_SET_MEMORY_MERGE), memory-deny-write-execute — and the guard over
//! the ones the engine does not carry (TSC access mode, machine-check kill policy, syscall
//! user dispatch), which refuses a process that changed them rather than dropping them.
//!
//! Capture reads oom_score_adj and loginuid from /proc/PID, and the prctl(PR_GET_…) and
//! membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS) values with calls injected in the capture's
//! one batch (getters a kernel lacks read as "never set"). Restore writes oom_score_adj from
//! outside, and injects the setters: those that need the restorer's privilege (loginuid,
//! PR_SET_MEMORY_MERGE) and MDWE (which must come after every mapping exists) in the last
//! batch before the credentials; dumpable and the securebits with the credentials
//! (`creds`), since a change of credentials resets the one and the other decides what it
//! does. The CPUs it was restricted to are read from /proc/PID/status and given again where
//! this machine has them; a process that led its session or process group leads a new one. The parent-death signal is recorded, not restored: its parent is
//! now whoever restored it (a warning says so).

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;
use telefork_image::{Attrs, Leader, ProcessImage, Sched};

use crate::inject::{Call, Injector};
use crate::state::State;

const PR_GET_MDWE: u64 = 66;
const PR_SET_MDWE: u64 = 65;
const PR_GET_MEMORY_MERGE: u64 = 68;
const PR_SET_MEMORY_MERGE: u64 = 67;
const MEMBARRIER_CMD_GET_REGISTRATIONS: u64 = 1 << 9;
/// PR_MCE_KILL_GET's answer when the process never set a policy.
const PR_MCE_KILL_DEFAULT: u64 = 2;
/// PR_GET_TSC's answer when the time stamp counter may be read.
const PR_TSC_ENABLE: u32 = 1;
/// The registration commands membarrier(2) knows (MEMBARRIER_CMD_REGISTER_*), each
/// reported by GET_REGISTRATIONS as its own bit.
const MEMBARRIER_REGISTRATIONS: [u64; 4] = [1 << 4, 1 << 2, 1 << 6, 1 << 8];
/// The loginuid meaning "not set".
const NO_LOGINUID: u32 = u32::MAX;

/// The process attributes, as one kind of state (`State`).
pub(crate) struct AttrState;

/// Where the capture's injected reads leave their answers: results by position from the
/// first call of `capture_calls`, and two ints in scratch memory.
pub(crate) struct AttrReads {
    subreaper: u64,
    pdeathsig: u64,
    tsc: u64,
}

/// The calls `capture_calls` makes, by position.
const THP: usize = 0;
const DUMPABLE: usize = 1;
const SLACK: usize = 2;
const MCE: usize = 3;
const SECUREBITS: usize = 7;
/// The getters from here on may be missing on an older kernel (EINVAL).
const OPTIONAL_FROM: usize = 8;
const MDWE: usize = 8;
const MERGE: usize = 9;
const MEMBARRIER: usize = 10;

/// What the attributes are captured from.
pub(crate) struct AttrLook<'a> {
    pub pid: Pid,
    pub inj: &'a Injector,
    /// Results of `capture_calls`'s calls, in order; an optional getter the kernel lacks
    /// reads 0.
    pub results: &'a [u64],
    pub reads: AttrReads,
}

impl State for AttrState {
    type Image = Attrs;
    type Source<'a> = AttrLook<'a>;

    fn capture(from: AttrLook<'_>) -> Result<Attrs> {
        let pid = from.pid;
        let r = |i: usize| from.results.get(i).copied().unwrap_or(0);
        let int_at = |addr: u64| -> Result<u32> {
            let mut b = [0u8; 4];
            from.inj.read_mem(addr, &mut b)?;
            Ok(u32::from_ne_bytes(b))
        };
        // What the engine does not carry, refused by name if the process changed it.
        let tsc = int_at(from.reads.tsc)?;
        if tsc != PR_TSC_ENABLE {
            return Err(crate::error::refusal(
                format!("process {pid} reads of the time stamp counter (PR_SET_TSC {tsc})"),
                "are set to fault: the engine does not carry that mode",
            ));
        }
        if r(MCE) != PR_MCE_KILL_DEFAULT {
            return Err(crate::error::refusal(
                format!("process {pid}'s machine-check kill policy (PR_MCE_KILL {})", r(MCE)),
                "was set: the engine does not carry it",
            ));
        }
        if crate::ptrace::syscall_user_dispatch_on(pid)? {
            return Err(crate::error::refusal(
                format!("process {pid} uses syscall user dispatch"),
                "the engine does not carry it (PR_SET_SYSCALL_USER_DISPATCH)",
            ));
        }
        let membarrier = r(MEMBARRIER);
        if membarrier & !MEMBARRIER_REGISTRATIONS.iter().sum::<u64>() != 0 {
            return Err(crate::error::refusal(
                format!("process {pid}'s membarrier registrations {membarrier:#x}"),
                "include one the engine does not know",
            ));
        }
        Ok(Attrs {
            oom_score_adj: 0,
            loginuid: None,
            thp_disable: r(THP) != 0,
            child_subreaper: int_at(from.reads.subreaper)? != 0,
            dumpable: Some(r(DUMPABLE) as u32),
            timer_slack_ns: Some(r(SLACK)),
            membarrier: membarrier as u32,
            memory_merge: r(MERGE) != 0,
            mdwe: r(MDWE) as u32,
            pdeath_signal: int_at(from.reads.pdeathsig)? as i32,
            securebits: r(SECUREBITS) as u32,
            cpus: None,
            cgroups: Vec::new(),
            leader: None,
            sched: None,
            ioprio: 0,
            coredump_filter: None,
        })
    }

    fn restore(inj: &mut Injector, img: &ProcessImage) -> Result<()> {
        let a = &img.attrs;
        if !(-1000..=1000).contains(&a.oom_score_adj) {
            bail!("image is corrupt: oom_score_adj {}", a.oom_score_adj);
        }
        if a.oom_score_adj != 0 {
            let path = format!("/proc/{}/oom_score_adj", inj.pid());
            std::fs::write(&path, a.oom_score_adj.to_string())
                .with_context(|| format!("restoring oom_score_adj {}: {path}", a.oom_score_adj))?;
        }
        if a.pdeath_signal != 0 {
            tracing::warn!(
                "the process had parent-death signal {}; not restored: its parent is now the \
                 restorer",
                a.pdeath_signal
            );
        }
        inj.reset_scratch();
        let mut calls = Vec::new();
        let prctl = |args: &[u64], what: &str| Call::new(libc::SYS_prctl, args, what);
        match a.leader {
            Some(Leader::Session) => calls.push(Call::new(
                libc::SYS_setsid,
                &[],
                "making the process lead a session again: setsid",
            )),
            Some(Leader::ProcessGroup) => calls.push(Call::new(
                libc::SYS_setpgid,
                &[0, 0],
                "making the process lead a process group again: setpgid",
            )),
            None => {}
        }
        if let Some(filter) = a.coredump_filter {
            let path = format!("/proc/{}/coredump_filter", inj.pid());
            std::fs::write(&path, format!("{filter:#x}"))
                .with_context(|| format!("restoring coredump_filter {filter:#x}: {path}"))?;
        }
        if let Some(sc) = a.sched {
            let policy = sc.policy | if sc.reset_on_fork { libc::SCHED_RESET_ON_FORK } else { 0 };
            let param = inj.stage(&sc.priority.to_ne_bytes())?;
            calls.push(Call::new(
                libc::SYS_sched_setscheduler,
                &[0, policy as u64, param],
                format!(
                    "restoring scheduling policy {} (priority {}): sched_setscheduler",
                    sc.policy, sc.priority
                ),
            ));
        }
        if a.ioprio != 0 {
            const IOPRIO_WHO_PROCESS: u64 = 1;
            calls.push(Call::new(
                libc::SYS_ioprio_set,
                &[IOPRIO_WHO_PROCESS, 0, a.ioprio as u64],
                format!("restoring I/O priority {:#x}: ioprio_set", a.ioprio),
            ));
        }
        if a.thp_disable {
            calls.push(prctl(&[libc::PR_SET_THP_DISABLE as u64, 1, 0, 0, 0], "PR_SET_THP_DISABLE"));
        }
        if a.child_subreaper {
            calls.push(prctl(&[libc::PR_SET_CHILD_SUBREAPER as u64, 1], "PR_SET_CHILD_SUBREAPER"));
        }
        if let Some(ns) = a.timer_slack_ns {
            calls.push(prctl(&[libc::PR_SET_TIMERSLACK as u64, ns], "PR_SET_TIMERSLACK"));
        }
        if a.memory_merge {
            calls.push(prctl(&[PR_SET_MEMORY_MERGE, 1, 0, 0, 0], "PR_SET_MEMORY_MERGE"));
        }
        for cmd in MEMBARRIER_REGISTRATIONS.iter().filter(|&&c| a.membarrier as u64 & c != 0) {
            calls.push(Call::new(
                libc::SYS_membarrier,
                &[*cmd, 0, 0],
                format!("restoring a membarrier registration: membarrier({cmd:#x})"),
            ));
        }
        if let Some(uid) = a.loginuid.filter(|&uid| uid != restorer_loginuid()) {
            calls.extend(loginuid_calls(inj, img, uid)?);
        }
        if a.mdwe != 0 {
            calls.push(prctl(&[PR_SET_MDWE, a.mdwe as u64, 0, 0, 0], "PR_SET_MDWE"));
        }
        inj.defer(calls);
        Ok(())
    }
}

/// The injected reads, to run in the capture's batch; the optional getters last (see
/// `OPTIONAL_FROM`).
pub(crate) fn capture_calls(inj: &mut Injector) -> Result<(Vec<Call>, AttrReads)> {
    let subreaper = inj.alloc_zeroed(4)?;
    let pdeathsig = inj.alloc_zeroed(4)?;
    let tsc = inj.alloc_zeroed(4)?;
    let prctl = |args: &[u64], what: &str| {
        Call::new(libc::SYS_prctl, args, format!("reading {what}: prctl"))
    };
    let calls = vec![
        prctl(&[libc::PR_GET_THP_DISABLE as u64, 0, 0, 0, 0], "PR_GET_THP_DISABLE"),
        prctl(&[libc::PR_GET_DUMPABLE as u64], "PR_GET_DUMPABLE"),
        prctl(&[libc::PR_GET_TIMERSLACK as u64], "PR_GET_TIMERSLACK"),
        prctl(&[libc::PR_MCE_KILL_GET as u64, 0, 0, 0, 0], "PR_MCE_KILL_GET"),
        prctl(&[libc::PR_GET_CHILD_SUBREAPER as u64, subreaper], "PR_GET_CHILD_SUBREAPER"),
        prctl(&[libc::PR_GET_PDEATHSIG as u64, pdeathsig], "PR_GET_PDEATHSIG"),
        prctl(&[libc::PR_GET_TSC as u64, tsc], "PR_GET_TSC"),
        prctl(&[libc::PR_GET_SECUREBITS as u64], "PR_GET_SECUREBITS"),
        prctl(&[PR_GET_MDWE, 0, 0, 0, 0], "PR_GET_MDWE"),
        prctl(&[PR_GET_MEMORY_MERGE, 0, 0, 0, 0], "PR_GET_MEMORY_MERGE"),
        Call::new(
            libc::SYS_membarrier,
            &[MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0],
            "reading the membarrier registrations: membarrier(GET_REGISTRATIONS)",
        ),
    ];
    Ok((calls, AttrReads { subreaper, pdeathsig, tsc }))
}

/// Whether call `i` of `capture_calls` may fail with EINVAL on an older kernel (and then
/// reads as "never set").
pub(crate) fn optional_call(i: usize) -> bool {
    i >= OPTIONAL_FROM
}

/// The attributes read from outside the process (/proc, and calls made on it by PID), with
/// the pin's knowledge of its CPUs added by the capture.
pub(crate) struct OutsideAttrs {
    pub cpus: Option<Vec<u32>>,
    pub cgroups: Vec<telefork_image::CgroupMembership>,
    pub leader: Option<Leader>,
    pub sched: Option<Sched>,
    pub ioprio: u32,
    pub coredump_filter: Option<u32>,
    pub oom_score_adj: i32,
    pub loginuid: u32,
}

impl OutsideAttrs {
    /// Reads them, refusing what the engine does not carry (speculation control, a namespace
    /// or security label of its own, SCHED_DEADLINE).
    pub(crate) fn capture(
        pid: Pid,
        stat: &crate::procfs::Stat,
        status: &crate::procfs::Status,
    ) -> Result<OutsideAttrs> {
        refuse_speculation_control(pid, status)?;
        refuse_own_namespaces(pid)?;
        refuse_security_label(pid)?;
        Ok(OutsideAttrs {
            cpus: restricted_cpus(status.cpus_allowed.as_deref())?,
            cgroups: crate::cgroups::capture(pid, &own_view()?.cgroups)?,
            leader: leader(pid, stat)?,
            sched: sched(pid)?,
            ioprio: crate::sys::ioprio_of(pid)?,
            coredump_filter: coredump_filter(pid)?,
            oom_score_adj: read_oom_score_adj(pid)?,
            loginuid: read_loginuid(&format!("/proc/{pid}/loginuid"))?,
        })
    }

    /// `attrs` (what the injected reads found) with these.
    pub(crate) fn into_attrs(self, attrs: Attrs) -> Attrs {
        Attrs {
            cpus: self.cpus,
            cgroups: self.cgroups,
            leader: self.leader,
            sched: self.sched,
            ioprio: self.ioprio,
            coredump_filter: self.coredump_filter,
            oom_score_adj: self.oom_score_adj,
            loginuid: Some(self.loginuid),
            ..attrs
        }
    }
}

/// What the capturing process itself has of what is compared against (its namespaces,
/// cgroups, speculation control, security label, coredump_filter) and the CPUs online:
/// read once per process (`warm_up` reads it ahead of a capture).
struct OwnView {
    namespaces: Vec<(&'static str, Option<std::path::PathBuf>)>,
    cgroups: Vec<(String, String)>,
    speculation: Vec<(String, String)>,
    label: Option<Vec<u8>>,
    coredump_filter: Option<u32>,
    online_cpus: Vec<u32>,
}

const NAMESPACES: [&str; 10] = [
    "cgroup",
    "ipc",
    "mnt",
    "net",
    "pid",
    "pid_for_children",
    "time",
    "time_for_children",
    "user",
    "uts",
];

fn own_view() -> Result<&'static OwnView> {
    static VIEW: std::sync::OnceLock<OwnView> = std::sync::OnceLock::new();
    if let Some(v) = VIEW.get() {
        return Ok(v);
    }
    let status = crate::procfs::read_status(Pid::this())?;
    let view = OwnView {
        namespaces: NAMESPACES
            .iter()
            .map(|k| (*k, std::fs::read_link(format!("/proc/self/ns/{k}")).ok()))
            .collect(),
        cgroups: crate::cgroups::own()?,
        speculation: status.speculation,
        label: crate::procfs::read_file("/proc/self/attr/current").ok(),
        coredump_filter: read_coredump_filter("self").ok(),
        online_cpus: crate::procfs::online_cpus()?,
    };
    Ok(VIEW.get_or_init(|| view))
}

/// Reads what captures compare against once, ahead of them.
pub(crate) fn warm_up() {
    let _ = own_view();
}

/// The scheduling policy of `pid`, unless SCHED_OTHER; SCHED_DEADLINE is refused.
fn sched(pid: Pid) -> Result<Option<Sched>> {
    let (policy, priority) = crate::sys::sched_of(pid)?;
    let reset_on_fork = policy & libc::SCHED_RESET_ON_FORK != 0;
    let policy = policy & !libc::SCHED_RESET_ON_FORK;
    match policy {
        libc::SCHED_OTHER if !reset_on_fork => Ok(None),
        libc::SCHED_OTHER
        | libc::SCHED_FIFO
        | libc::SCHED_RR
        | libc::SCHED_BATCH
        | libc::SCHED_IDLE => Ok(Some(Sched { policy, priority, reset_on_fork })),
        6 => Err(crate::error::refusal(
            format!("process {pid} runs under SCHED_DEADLINE"),
            "its runtime, deadline and period are not carried",
        )),
        p => Err(crate::error::refusal(
            format!("process {pid}'s scheduling policy {p}"),
            "the engine does not know it",
        )),
    }
}

fn read_coredump_filter(who: &str) -> Result<u32> {
    let path = format!("/proc/{who}/coredump_filter");
    let text = crate::procfs::read_text(&path).with_context(|| format!("reading {path}"))?;
    u32::from_str_radix(text.trim(), 16).with_context(|| format!("bad {path}: {text:?}"))
}

/// /proc/PID/coredump_filter, if it differs from the capturer's (what new processes get).
fn coredump_filter(pid: Pid) -> Result<Option<u32>> {
    let theirs = read_coredump_filter(&pid.to_string())?;
    Ok((Some(theirs) != own_view()?.coredump_filter).then_some(theirs))
}

/// Refuses a process whose security label (/proc/PID/attr/current: AppArmor, SELinux, …)
/// differs from the capturer's: restored with the restorer's, it would leave its confinement.
fn refuse_security_label(pid: Pid) -> Result<()> {
    let theirs = crate::procfs::read_file(&format!("/proc/{pid}/attr/current")).ok();
    // (No security module that labels processes: EINVAL, nothing to compare.)
    if theirs.is_some() && theirs != own_view()?.label {
        let shown =
            String::from_utf8_lossy(theirs.as_deref().unwrap_or_default()).trim().to_string();
        return Err(crate::error::refusal(
            format!("process {pid} runs under the security label {shown:?}"),
            "security labels are not carried: restored with ours, it would leave its confinement",
        ));
    }
    Ok(())
}

/// What the process leads, from fields 5 (process group) and 6 (session) of its stat.
fn leader(pid: Pid, stat: &crate::procfs::Stat) -> Result<Option<Leader>> {
    let (pgrp, session) = (stat.num(5)? as i32, stat.num(6)? as i32);
    Ok(if session == pid.as_raw() {
        Some(Leader::Session)
    } else if pgrp == pid.as_raw() {
        Some(Leader::ProcessGroup)
    } else {
        None
    })
}

/// Refuses a process whose speculation control (PR_SET_SPECULATION_CTRL, shown in
/// /proc/PID/status) differs from what a process this engine makes gets: the engine does not
/// carry it, and a process that asked for a mitigation must not lose it silently.
fn refuse_speculation_control(pid: Pid, status: &crate::procfs::Status) -> Result<()> {
    if status.speculation.is_empty() {
        return Ok(());
    }
    let ours = &own_view()?.speculation;
    for (key, value) in &status.speculation {
        let mine = ours.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        if mine != Some(value.as_str()) {
            return Err(crate::error::refusal(
                format!("process {pid}'s speculation control ({key}: {value})"),
                &format!(
                    "differs from a new process's ({}): the engine does not carry \
                     PR_SET_SPECULATION_CTRL",
                    mine.unwrap_or("absent")
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses a process that lives in a namespace of its own (one the capturer is not in), or
/// has made one for its children: namespaces are not carried, and restored into the
/// restorer's, it would see another network, file system tree, PID numbering or clock.
fn refuse_own_namespaces(pid: Pid) -> Result<()> {
    for (kind, ours) in &own_view()?.namespaces {
        let theirs = match std::fs::read_link(format!("/proc/{pid}/ns/{kind}")) {
            Ok(l) => l,
            // (A kernel without this kind of namespace.)
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("reading /proc/{pid}/ns/{kind}"));
            }
        };
        if ours.as_ref() != Some(&theirs) {
            let what = if kind.ends_with("_for_children") {
                format!(
                    "process {pid} made a {} namespace for its children ({})",
                    kind.trim_end_matches("_for_children"),
                    theirs.display()
                )
            } else {
                format!("process {pid} is in a {kind} namespace of its own ({})", theirs.display())
            };
            return Err(crate::error::refusal(
                what,
                "namespaces are not carried: restored into the restorer's, it would see \
                 another one",
            ));
        }
    }
    Ok(())
}

/// The CPUs the process is restricted to (`allowed`), if fewer than this machine has online.
pub(crate) fn restricted_cpus(allowed: Option<&[u32]>) -> Result<Option<Vec<u32>>> {
    let Some(allowed) = allowed else { return Ok(None) };
    let online = &own_view()?.online_cpus;
    Ok(if online.iter().all(|c| allowed.contains(c)) { None } else { Some(allowed.to_vec()) })
}

/// The CPU set `sched_setaffinity` takes for the image's CPUs that this machine has online,
/// as bytes; `None` (with a warning) if it has none of them.
pub(crate) fn cpu_set_bytes(cpus: &[u32]) -> Result<Option<Vec<u8>>> {
    let online = crate::procfs::online_cpus()?;
    let here: Vec<u32> = cpus.iter().copied().filter(|c| online.contains(c)).collect();
    if here.is_empty() {
        tracing::warn!(
            "the process was restricted to CPUs {cpus:?}, none of which is online here: it may \
             run on any"
        );
        return Ok(None);
    }
    let len = (here.iter().max().copied().unwrap_or(0) as usize / 64 + 1) * 8;
    let mut set = vec![0u8; len];
    for c in here {
        set[c as usize / 8] |= 1 << (c % 8);
    }
    Ok(Some(set))
}

/// The audit login uid of the restorer, which a process it makes inherits.
pub(crate) fn restorer_loginuid() -> u32 {
    read_loginuid("/proc/self/loginuid").unwrap_or(NO_LOGINUID)
}

fn read_loginuid(path: &str) -> Result<u32> {
    let text = crate::procfs::read_text(path).with_context(|| format!("reading {path}"))?;
    text.trim().parse().with_context(|| format!("bad loginuid {text:?} in {path}"))
}

fn read_oom_score_adj(pid: Pid) -> Result<i32> {
    let path = format!("/proc/{pid}/oom_score_adj");
    let text = crate::procfs::read_text(&path).with_context(|| format!("reading {path}"))?;
    text.trim().parse().with_context(|| format!("bad oom_score_adj {text:?} in {path}"))
}

/// open, write and close /proc/self/loginuid in the process (only the process itself may
/// set its own), with the restorer's CAP_AUDIT_CONTROL still in it. The open returns the
/// lowest free fd, which is known: the restored process has exactly the image's fds.
fn loginuid_calls(inj: &mut Injector, img: &ProcessImage, uid: u32) -> Result<Vec<Call>> {
    let fd = (0..).find(|n| !img.fds.iter().any(|f| f.fd == *n)).unwrap_or(0) as u64;
    let path = inj.stage_cstr("/proc/self/loginuid")?;
    let text = uid.to_string();
    let buf = inj.stage(text.as_bytes())?;
    let what = format!("restoring the audit login uid {uid}");
    Ok(vec![
        // (The file is the process's own, still root's: opened with the restorer's
        // filesystem uid, which the credentials' batch then sets to the image's.)
        Call::new(libc::SYS_setfsuid, &[0], format!("{what}: setfsuid(0)")),
        Call::new(
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, path, (libc::O_WRONLY | libc::O_CLOEXEC) as u64],
            format!("{what}: open /proc/self/loginuid"),
        )
        .expecting(fd),
        Call::new(libc::SYS_write, &[fd, buf, text.len() as u64], format!("{what}: write")),
        Call::new(libc::SYS_close, &[fd], format!("{what}: close")),
    ])
}
