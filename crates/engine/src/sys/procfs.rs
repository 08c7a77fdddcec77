//! Reading /proc: one parser per file, used by every caller (engine, daemon, CLI) — the
//! mappings list (maps, smaps' VmFlags), stat, status, fdinfo, limits, personality, auxv and
//! the links (cwd, exe, fd/N). Parsing is pure (unit-tested); reading is one read of the
//! whole file. Bad content becomes an error naming the file, never a panic.
//!
//! The `procfs` crate could parse these too, but it drops fields we need (the raw perms and
//! the mapping names exactly as the kernel prints them).

use anyhow::{anyhow, bail, Context, Result};
use nix::unistd::Pid;

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    /// The file's device as maps prints it ("fe:00"; "00:00" for anonymous memory).
    pub dev: String,
    pub inode: u64,
    /// File path, `"[heap]"`, `"[stack]"`, `"[vdso]"`, … or empty for anonymous memory.
    pub name: String,
}

/// Reads a /proc file whole. /proc files report size 0, so `std::fs::read` starts small
/// and grows its buffer one read(2) at a time (a dozen calls for /proc/PID/smaps, each
/// regenerating text); this reads into 16 KiB and more from the first call.
pub(crate) fn read_file(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 16 << 10];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// `read_file` as text (what /proc prints is text; anything else becomes an error).
pub(crate) fn read_text(path: &str) -> std::io::Result<String> {
    String::from_utf8(read_file(path)?).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{path} is not text"))
    })
}

pub(crate) fn read_maps(pid: Pid) -> Result<Vec<MapsEntry>> {
    let text = read_text(&format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading /proc/{pid}/maps"))?;
    parse_maps(&text)
}

pub(crate) fn parse_maps(text: &str) -> Result<Vec<MapsEntry>> {
    text.lines().filter(|l| !l.is_empty()).map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Result<MapsEntry> {
    let bad = || anyhow!("malformed /proc maps line: {line:?}");
    let mut rest = line;
    let mut field = || -> Option<&str> {
        let t = rest.trim_start();
        let end = t.find(' ').unwrap_or(t.len());
        let (f, r) = t.split_at(end);
        rest = r;
        if f.is_empty() {
            None
        } else {
            Some(f)
        }
    };
    let range = field().ok_or_else(bad)?;
    let perms = field().ok_or_else(bad)?;
    let offset = field().ok_or_else(bad)?;
    let dev = field().ok_or_else(bad)?.to_string();
    let inode = field().ok_or_else(bad)?;
    let name = rest.trim_start().to_string();
    let (s, e) = range.split_once('-').ok_or_else(bad)?;
    let p = perms.as_bytes();
    if p.len() != 4 {
        return Err(bad());
    }
    let start = u64::from_str_radix(s, 16).map_err(|_| bad())?;
    let end = u64::from_str_radix(e, 16).map_err(|_| bad())?;
    if end <= start {
        return Err(bad());
    }
    Ok(MapsEntry {
        start,
        end,
        read: p[0] == b'r',
        write: p[1] == b'w',
        exec: p[2] == b'x',
        shared: p[3] == b's',
        offset: u64::from_str_radix(offset, 16).map_err(|_| bad())?,
        dev,
        inode: inode.parse().map_err(|_| bad())?,
        name,
    })
}

/// The VmFlags of every mapping in /proc/PID/smaps, by (start, end).
pub(crate) fn read_vmflags(pid: Pid) -> Result<std::collections::HashMap<(u64, u64), Vec<String>>> {
    let text = read_text(&format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    Ok(parse_vmflags(&text))
}

pub(crate) fn parse_vmflags(text: &str) -> std::collections::HashMap<(u64, u64), Vec<String>> {
    let mut out = std::collections::HashMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(start) = current.take() {
                out.insert(start, flags.split_whitespace().map(str::to_string).collect());
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            // A mapping's header line starts with "start-end"; field lines with "Name:".
            if let Some((s, e)) = range.split_once('-') {
                if let (Ok(start), Ok(end)) =
                    (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16))
                {
                    current = Some((start, end));
                }
            }
        }
    }
    out
}

/// The fields of /proc/PID/stat, 1-based as in proc(5); field 2 (comm) is returned apart.
pub struct Stat {
    /// The command name (field 2, without its parentheses).
    pub comm: String,
    fields: Vec<String>,
}

impl Stat {
    /// The process state (field 3): 'R', 'S', 'T', 't', 'Z', …
    pub fn state(&self) -> Option<char> {
        self.fields.first().and_then(|f| f.chars().next())
    }

    /// Field `n` (1-based, n ≥ 3) as a number.
    pub fn num(&self, n: usize) -> Result<u64> {
        let f = self
            .fields
            .get(n.wrapping_sub(3))
            .ok_or_else(|| anyhow!("/proc stat has no field {n}"))?;
        if let Ok(v) = f.parse::<u64>() {
            return Ok(v);
        }
        f.parse::<i64>()
            .map(|v| v as u64)
            .map_err(|_| anyhow!("/proc stat field {n} is not a number: {f:?}"))
    }
}

/// /proc/PID/stat of process `pid`.
pub fn read_stat(pid: Pid) -> Result<Stat> {
    let text = read_text(&format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_stat(&text)
}

/// Parses a /proc/PID/stat line.
pub(crate) fn parse_stat(text: &str) -> Result<Stat> {
    // comm is in parentheses and may itself contain spaces and ')': split at the last ')'.
    let open = text.find('(').ok_or_else(|| anyhow!("malformed /proc stat"))?;
    let close = text.rfind(')').ok_or_else(|| anyhow!("malformed /proc stat"))?;
    if close < open {
        bail!("malformed /proc stat");
    }
    let comm = text[open + 1..close].to_string();
    let fields = text[close + 1..].split_whitespace().map(str::to_string).collect();
    Ok(Stat { comm, fields })
}

/// Thread ids of a process.
pub(crate) fn list_threads(pid: Pid) -> Result<Vec<Pid>> {
    let mut tids = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing threads of process {pid}"))?
    {
        let e = e?;
        if let Some(t) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            tids.push(Pid::from_raw(t));
        }
    }
    tids.sort();
    Ok(tids)
}

/// The child processes of process `pid`, whose threads are `tids` (zombies included, until
/// they are reaped), from /proc/PID/task/TID/children; on a kernel without that file
/// (CONFIG_PROC_CHILDREN off), from every process's parent in /proc.
pub(crate) fn list_children(pid: Pid, tids: &[Pid]) -> Result<Vec<i32>> {
    let mut children = Vec::new();
    for &tid in tids {
        match std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")) {
            Ok(text) => children.extend(parse_children(&text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tid == pid => {
                return children_by_parent(pid)
            }
            // (A thread that ended since the listing has no children left.)
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("listing children of process {pid}")),
        }
    }
    children.sort_unstable();
    Ok(children)
}

/// The PIDs of a `children` file: decimal numbers separated by spaces.
pub(crate) fn parse_children(text: &str) -> Result<Vec<i32>> {
    text.split_whitespace()
        .map(|n| n.parse::<i32>().with_context(|| format!("a child PID {n:?} in /proc")))
        .collect()
}

fn children_by_parent(pid: Pid) -> Result<Vec<i32>> {
    let mut children = Vec::new();
    for e in std::fs::read_dir("/proc").context("listing /proc")? {
        let Some(p) = e?.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // (Processes that end while we look are not children any more.)
        if read_status(Pid::from_raw(p)).is_ok_and(|s| s.ppid == pid.as_raw()) {
            children.push(p);
        }
    }
    children.sort_unstable();
    Ok(children)
}

/// The fields of /proc/PID/status the engine and its callers use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The parent's PID (`PPid:`).
    pub ppid: i32,
    /// Real, effective, saved and filesystem uid (`Uid:`).
    pub uid: [u32; 4],
    /// Real, effective, saved and filesystem gid (`Gid:`).
    pub gid: [u32; 4],
    /// Supplementary groups (`Groups:`).
    pub groups: Vec<u32>,
    /// The file mode creation mask (`Umask:`, Linux 4.7+).
    pub umask: Option<u32>,
    /// Seccomp mode (`Seccomp:`; absent without CONFIG_SECCOMP).
    pub seccomp: Option<u32>,
    /// The no_new_privs bit (`NoNewPrivs:`).
    pub no_new_privs: Option<bool>,
    /// Resident memory in KiB (`VmRSS:`; absent for a process without memory).
    pub vm_rss_kib: Option<u64>,
    /// Swapped-out memory in KiB (`VmSwap:`).
    pub vm_swap_kib: Option<u64>,
    /// Capability sets: CapInh, CapPrm, CapEff, CapBnd, CapAmb (all or none).
    pub caps: Option<[u64; 5]>,
    /// The CPUs it may run on (`Cpus_allowed_list:`).
    pub cpus_allowed: Option<Vec<u32>>,
    /// The speculation control lines (`Speculation_Store_Bypass:`,
    /// `SpeculationIndirectBranch:`), as (key, value).
    pub speculation: Vec<(String, String)>,
}

/// /proc/PID/status of process `pid`.
pub fn read_status(pid: Pid) -> Result<Status> {
    let path = format!("/proc/{pid}/status");
    let text = read_text(&path).with_context(|| format!("reading {path}"))?;
    parse_status(&text).with_context(|| format!("parsing {path}"))
}

/// Parses a /proc/PID/status text. PPid, Uid, Gid and Groups must be there (every kernel
/// prints them); the other fields are `None` when absent.
pub(crate) fn parse_status(text: &str) -> Result<Status> {
    let (mut ppid, mut uid, mut gid, mut groups) = (None, None, None, None);
    let (mut umask, mut seccomp, mut no_new_privs) = (None, None, None);
    let (mut vm_rss_kib, mut vm_swap_kib) = (None, None);
    let mut caps = [None; 5];
    let (mut cpus_allowed, mut speculation) = (None, Vec::new());
    let number = |key: &str, v: &str| -> Result<u64> {
        v.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("bad {key} line {v:?}"))
    };
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else { continue };
        match key {
            "PPid" => {
                ppid =
                    Some(rest.trim().parse::<i32>().with_context(|| format!("bad PPid {rest:?}"))?)
            }
            "Uid" => uid = Some(four_ids(rest).context("bad Uid line")?),
            "Gid" => gid = Some(four_ids(rest).context("bad Gid line")?),
            "Groups" => {
                let g = rest
                    .split_whitespace()
                    .map(|w| w.parse::<u32>().with_context(|| format!("bad group id {w:?}")))
                    .collect::<Result<Vec<_>>>()?;
                groups = Some(g);
            }
            "Umask" => {
                let v = rest.trim();
                umask = Some(u32::from_str_radix(v, 8).with_context(|| format!("bad Umask {v:?}"))?)
            }
            "Seccomp" => seccomp = Some(number(key, rest)? as u32),
            "NoNewPrivs" => no_new_privs = Some(number(key, rest)? != 0),
            "VmRSS" => vm_rss_kib = Some(number(key, rest)?),
            "VmSwap" => vm_swap_kib = Some(number(key, rest)?),
            "CapInh" | "CapPrm" | "CapEff" | "CapBnd" | "CapAmb" => {
                let i = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]
                    .iter()
                    .position(|k| *k == key)
                    .unwrap_or(0);
                let v = rest.trim();
                caps[i] =
                    Some(u64::from_str_radix(v, 16).with_context(|| format!("bad {key} {v:?}"))?);
            }
            "Cpus_allowed_list" => cpus_allowed = Some(parse_cpu_list(rest.trim())?),
            k if k.starts_with("Speculation") => {
                speculation.push((k.to_string(), rest.trim().to_string()))
            }
            _ => {}
        }
    }
    match (ppid, uid, gid, groups) {
        (Some(ppid), Some(uid), Some(gid), Some(groups)) => Ok(Status {
            ppid,
            uid,
            gid,
            groups,
            umask,
            seccomp,
            no_new_privs,
            vm_rss_kib,
            vm_swap_kib,
            caps: match caps {
                [Some(i), Some(p), Some(e), Some(b), Some(a)] => Some([i, p, e, b, a]),
                _ => None,
            },
            cpus_allowed,
            speculation,
        }),
        _ => bail!("PPid, Uid, Gid or Groups line missing"),
    }
}

/// A CPU list as the kernel writes it (`0-3,8,10-11`).
pub(crate) fn parse_cpu_list(text: &str) -> Result<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let a: u32 = a.trim().parse().with_context(|| format!("bad CPU list {text:?}"))?;
        let b: u32 = b.trim().parse().with_context(|| format!("bad CPU list {text:?}"))?;
        if b < a || b - a > 1 << 16 {
            bail!("bad CPU list {text:?}");
        }
        cpus.extend(a..=b);
    }
    Ok(cpus)
}

/// The CPUs online on this machine.
pub(crate) fn online_cpus() -> Result<Vec<u32>> {
    let path = "/sys/devices/system/cpu/online";
    let text = read_text(path).with_context(|| format!("reading {path}"))?;
    parse_cpu_list(text.trim())
}

fn four_ids(s: &str) -> Result<[u32; 4]> {
    let v = s
        .split_whitespace()
        .map(|w| w.parse::<u32>().with_context(|| format!("bad id {w:?}")))
        .collect::<Result<Vec<_>>>()?;
    match v.as_slice() {
        [a, b, c, d] => Ok([*a, *b, *c, *d]),
        _ => bail!("expected 4 ids (real, effective, saved, fs), found {}", v.len()),
    }
}

/// The close-on-exec bit as fdinfo shows it in `flags`.
pub(crate) const FDINFO_O_CLOEXEC: u32 = 0o2000000;

/// The fields of /proc/PID/fdinfo/N we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FdInfo {
    pub pos: u64,
    /// Open flags without O_CLOEXEC.
    pub flags: u32,
    pub cloexec: bool,
    /// The locks held through it (see `parse_fdinfo_locks`).
    pub locks: Vec<FdLock>,
    /// Every other `key: value` line, as the kind of file shows its state there
    /// (`eventfd-count`, `clockid`, `sigmask`, …).
    pub fields: Vec<(String, String)>,
}

impl FdInfo {
    /// The value of line `key`, if there is one.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// /proc/PID/fdinfo/N of fd `fd` of process `pid`.
pub(crate) fn read_fdinfo(pid: Pid, fd: i32) -> Result<FdInfo> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let text = read_text(&path).with_context(|| format!("fd {fd}: reading {path}"))?;
    parse_fdinfo(&text).with_context(|| format!("fd {fd}: parsing {path}"))
}

/// Parses /proc/PID/fdinfo/N (`pos:` decimal, `flags:` octal).
pub(crate) fn parse_fdinfo(text: &str) -> Result<FdInfo> {
    let mut pos = None;
    let mut flags = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        match k {
            "pos" => pos = Some(v.parse::<u64>().with_context(|| format!("bad pos {v:?}"))?),
            "flags" => {
                flags = Some(u32::from_str_radix(v, 8).with_context(|| format!("bad flags {v:?}"))?)
            }
            _ => {}
        }
    }
    let (Some(pos), Some(flags)) = (pos, flags) else { bail!("pos or flags line missing") };
    Ok(FdInfo {
        pos,
        flags: flags & !FDINFO_O_CLOEXEC,
        cloexec: flags & FDINFO_O_CLOEXEC != 0,
        locks: parse_fdinfo_locks(text)?,
        fields: text
            .lines()
            .filter(|l| !l.starts_with("lock:"))
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    })
}

/// One `lock:` line of /proc/PID/fdinfo/N: a lock held through that fd's open file (flock,
/// OFD) or by the process on its file (POSIX), or a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FdLock {
    /// FLOCK, POSIX, OFDLCK, LEASE, DELEG, ACCESS, …, as the kernel names it.
    pub class: String,
    /// MANDATORY, ADVISORY, BREAKING, ACTIVE, BREAKER, … (second word).
    pub mode: String,
    /// READ, WRITE, UNLCK, …
    pub access: String,
    pub start: u64,
    /// Last byte locked, `None` for EOF (to the end of the file).
    pub end: Option<u64>,
}

/// The `lock:` lines of fdinfo text (`lock:\t1: POSIX  ADVISORY  WRITE 1234 08:01:5 0 EOF`).
/// A lock a waiter is blocked on (`->` lines) is not held, and is skipped.
pub(crate) fn parse_fdinfo_locks(text: &str) -> Result<Vec<FdLock>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("lock:") else { continue };
        let words: Vec<&str> = rest.split_whitespace().collect();
        // "1:" CLASS MODE ACCESS PID DEV:INO START END
        if words.get(1) == Some(&"->") {
            continue;
        }
        let [_, class, mode, access, _pid, _file, start, end] = words[..] else {
            bail!("unexpected lock line {line:?}");
        };
        let start = start.parse().with_context(|| format!("bad lock start in {line:?}"))?;
        let end = match end {
            "EOF" => None,
            n => Some(n.parse().with_context(|| format!("bad lock end in {line:?}"))?),
        };
        out.push(FdLock {
            class: class.to_string(),
            mode: mode.to_string(),
            access: access.to_string(),
            start,
            end,
        });
    }
    Ok(out)
}

/// One POSIX timer as /proc/PID/timers lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcTimer {
    pub id: i32,
    pub signo: i32,
    pub sigval: u64,
    /// sigev_notify: SIGEV_SIGNAL, SIGEV_NONE or SIGEV_THREAD, with SIGEV_THREAD_ID added
    /// when it targets a thread.
    pub notify: i32,
    /// The thread (SIGEV_THREAD_ID) or process it signals.
    pub target: i32,
    pub clock: i32,
}

/// The POSIX timers of process `pid` (/proc/PID/timers).
pub(crate) fn read_timers(pid: Pid) -> Result<Vec<ProcTimer>> {
    let path = format!("/proc/{pid}/timers");
    let text = read_text(&path).with_context(|| format!("reading {path}"))?;
    parse_timers(&text).with_context(|| format!("parsing {path}"))
}

/// Parses /proc/PID/timers: blocks of `ID:`, `signal: SIGNO/SIGVAL`, `notify: HOW/pid.N` or
/// `HOW/tid.N`, `ClockID:`.
pub(crate) fn parse_timers(text: &str) -> Result<Vec<ProcTimer>> {
    let mut out: Vec<ProcTimer> = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        if k == "ID" {
            let id = v.parse().with_context(|| format!("bad timer id {v:?}"))?;
            out.push(ProcTimer { id, signo: 0, sigval: 0, notify: 0, target: 0, clock: 0 });
            continue;
        }
        let t = out.last_mut().with_context(|| format!("{line:?} before any ID line"))?;
        match k {
            "signal" => {
                let (signo, val) = v.split_once('/').with_context(|| format!("bad {line:?}"))?;
                t.signo = signo.parse().with_context(|| format!("bad signal in {line:?}"))?;
                t.sigval = u64::from_str_radix(val.trim_start_matches("0x"), 16)
                    .with_context(|| format!("bad value in {line:?}"))?;
            }
            "notify" => {
                let (how, whom) = v.split_once('/').with_context(|| format!("bad {line:?}"))?;
                let how = match how {
                    "signal" => libc::SIGEV_SIGNAL,
                    "none" => libc::SIGEV_NONE,
                    "thread" => libc::SIGEV_THREAD,
                    _ => bail!("unknown notification {how:?} in {line:?}"),
                };
                let (kind, n) = whom.split_once('.').with_context(|| format!("bad {line:?}"))?;
                t.notify = match kind {
                    "tid" => how | libc::SIGEV_THREAD_ID,
                    "pid" => how,
                    _ => bail!("unknown target {kind:?} in {line:?}"),
                };
                t.target = n.parse().with_context(|| format!("bad target in {line:?}"))?;
            }
            "ClockID" => t.clock = v.parse().with_context(|| format!("bad clock in {line:?}"))?,
            _ => {}
        }
    }
    Ok(out)
}

/// The path of /proc/PID/fd/N (to read the link, or stat() the object through it).
pub(crate) fn fd_path(pid: Pid, fd: i32) -> String {
    format!("/proc/{pid}/fd/{fd}")
}

/// The open fd numbers of process `pid`, sorted (/proc/PID/fd).
pub(crate) fn list_fds(pid: Pid) -> Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/fd");
    let mut nums = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let e = e.with_context(|| format!("listing {dir}"))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        let n: i32 = name.parse().with_context(|| format!("unexpected entry {name:?} in {dir}"))?;
        nums.push(n);
    }
    nums.sort_unstable();
    Ok(nums)
}

/// The working directory of process `pid` (/proc/PID/cwd), as the kernel prints it (with
/// " (deleted)" appended if it was removed).
pub(crate) fn read_cwd(pid: Pid) -> Result<String> {
    let path = format!("/proc/{pid}/cwd");
    let cwd = std::fs::read_link(&path).with_context(|| format!("reading {path}"))?;
    cwd.into_os_string()
        .into_string()
        .map_err(|p| anyhow!("working directory {p:?} is not valid UTF-8"))
}

/// The executable of process `pid` (/proc/PID/exe): its path as the kernel prints it, and
/// the file's metadata (through the link, so even if the path is gone).
pub(crate) fn read_exe(pid: Pid) -> Result<(String, std::fs::Metadata)> {
    let path = format!("/proc/{pid}/exe");
    let exe = std::fs::read_link(&path)
        .with_context(|| format!("reading {path}"))?
        .to_string_lossy()
        .into_owned();
    let md = std::fs::metadata(&path).with_context(|| format!("stat {path}"))?;
    Ok((exe, md))
}

/// The auxiliary vector of process `pid` (/proc/PID/auxv), word by word.
pub(crate) fn read_auxv(pid: Pid) -> Result<Vec<u64>> {
    let path = format!("/proc/{pid}/auxv");
    let bytes = read_file(&path).with_context(|| format!("reading {path}"))?;
    Ok(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
}

/// The personality of process `pid` (/proc/PID/personality, hexadecimal).
pub(crate) fn read_personality(pid: Pid) -> Result<u64> {
    let path = format!("/proc/{pid}/personality");
    let text = read_text(&path).with_context(|| format!("reading {path}"))?;
    u64::from_str_radix(text.trim(), 16)
        .with_context(|| format!("parsing {path} {:?}", text.trim()))
}

/// Names of the RLIMIT_* resources as /proc/PID/limits prints them, indexed by number.
const LIMIT_NAMES: [&str; 16] = [
    "Max cpu time",
    "Max file size",
    "Max data size",
    "Max stack size",
    "Max core file size",
    "Max resident set",
    "Max processes",
    "Max open files",
    "Max locked memory",
    "Max address space",
    "Max file locks",
    "Max pending signals",
    "Max msgqueue size",
    "Max nice priority",
    "Max realtime priority",
    "Max realtime timeout",
];

/// The 16 resource limits of process `pid` (/proc/PID/limits).
pub(crate) fn read_limits(pid: Pid) -> Result<Vec<telefork_image::Rlimit>> {
    let path = format!("/proc/{pid}/limits");
    let text = read_text(&path).with_context(|| format!("reading {path}"))?;
    parse_limits(&text).with_context(|| format!("parsing {path}"))
}

/// All 16 limits of /proc/PID/limits. The kernel prints the raw rlimit values (the Units
/// column only says what they count), "unlimited" for RLIM_INFINITY.
pub(crate) fn parse_limits(text: &str) -> Result<Vec<telefork_image::Rlimit>> {
    let mut found: [Option<(u64, u64)>; 16] = [None; 16];
    for line in text.lines().skip(1) {
        let Some((res, name)) = LIMIT_NAMES
            .iter()
            .enumerate()
            .find(|(_, n)| line.strip_prefix(**n).is_some_and(|rest| rest.starts_with(' ')))
        else {
            if line.trim().is_empty() {
                continue;
            }
            bail!("unknown limit line {line:?}");
        };
        let mut words = line[name.len()..].split_whitespace();
        let soft = parse_limit_value(words.next(), line)?;
        let hard = parse_limit_value(words.next(), line)?;
        found[res] = Some((soft, hard));
    }
    found
        .iter()
        .enumerate()
        .map(|(res, v)| match v {
            Some((soft, hard)) => {
                Ok(telefork_image::Rlimit { resource: res as u32, soft: *soft, hard: *hard })
            }
            None => bail!("line {:?} missing", LIMIT_NAMES[res]),
        })
        .collect()
}

fn parse_limit_value(w: Option<&str>, line: &str) -> Result<u64> {
    match w {
        Some("unlimited") => Ok(u64::MAX),
        Some(n) => n.parse::<u64>().with_context(|| format!("bad limit value {n:?} in {line:?}")),
        None => bail!("missing value in {line:?}"),
    }
}

/// /proc/PID/mem of process `pid`, for reading (and with `write`, writing) its memory.
pub(crate) fn open_mem(pid: Pid, write: bool) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))
}

/// The lowest address a mapping may have here (vm.mmap_min_addr).
pub(crate) fn mmap_min_addr() -> Result<u64> {
    let path = "/proc/sys/vm/mmap_min_addr";
    let text = read_text(path).with_context(|| format!("reading {path}"))?;
    text.trim().parse().with_context(|| format!("parsing vm.mmap_min_addr {:?}", text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_lists() {
        assert_eq!(parse_children("").unwrap(), Vec::<i32>::new());
        assert_eq!(parse_children("4821 4822 \n").unwrap(), vec![4821, 4822]);
        assert!(parse_children("4821 x").is_err());
    }

    #[test]
    fn this_process_children() {
        let me = Pid::this();
        let child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let listed = list_children(me, &list_threads(me).unwrap()).unwrap();
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(listed.contains(&(child.id() as i32)), "{listed:?} lacks {}", child.id());
    }

    #[test]
    fn maps_lines() {
        let m = parse_maps(
            "55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 1234     /usr/bin/my prog\n\
             7ffd1000-7ffd3000 rw-p 00000000 00:00 0                          [stack]\n\
             7f0000000000-7f0000001000 rw-s 00001000 00:01 77 /dev/zero (deleted)\n",
        )
        .unwrap();
        assert_eq!(m[0].name, "/usr/bin/my prog");
        assert!(m[0].read && !m[0].write && !m[0].shared);
        assert_eq!(m[1].name, "[stack]");
        assert!(m[2].shared && m[2].offset == 0x1000 && m[2].inode == 77);
        assert!(parse_maps("zz-10 rw-p 0 0 0\n").is_err());
        assert!(parse_maps("10-5 rw-p 0 0:0 0\n").is_err());
    }

    #[test]
    fn timers() {
        let t = parse_timers(
            "ID: 0\nsignal: 14/0000000000000000\nnotify: signal/pid.77\nClockID: 1\n\
             ID: 5\nsignal: 34/00007ffc12345678\nnotify: signal/tid.78\nClockID: 0\n\
             ID: 6\nsignal: 0/0000000000000000\nnotify: none/pid.77\nClockID: 2\n",
        )
        .unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!((t[0].id, t[0].signo, t[0].notify, t[0].target, t[0].clock), (0, 14, 0, 77, 1));
        assert_eq!((t[1].sigval, t[1].notify, t[1].target), (0x7ffc12345678, 4, 78));
        assert_eq!(t[2].notify, libc::SIGEV_NONE);
        assert!(parse_timers("signal: 1/0\n").is_err());
        assert!(parse_timers("ID: 1\nnotify: sometimes/pid.1\n").is_err());
    }

    #[test]
    fn fdinfo_locks() {
        let l = parse_fdinfo_locks(
            "pos:\t0\nflags:\t02\nlock:\t1: FLOCK  ADVISORY  WRITE 1234 08:01:5 0 EOF\n\
             lock:\t2: POSIX  ADVISORY  READ 1234 08:01:5 10 19\n\
             lock:\t2: -> POSIX  ADVISORY  WRITE 99 08:01:5 10 19\n",
        )
        .unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].class.as_str(), l[0].access.as_str(), l[0].end), ("FLOCK", "WRITE", None));
        assert_eq!((l[1].start, l[1].end), (10, Some(19)));
        assert!(parse_fdinfo_locks("lock:\t1: FLOCK\n").is_err());
    }

    #[test]
    fn vmflags() {
        let f = parse_vmflags("7f00-7f10 rw-p 00000000 00:00 0\nRss:  4 kB\nVmFlags: rd wr mr mw me ac sd \n7f20-7f30 ---p 0 00:00 0\nVmFlags: mr mw me\n");
        assert_eq!(f[&(0x7f00, 0x7f10)], ["rd", "wr", "mr", "mw", "me", "ac", "sd"]);
        assert_eq!(f[&(0x7f20, 0x7f30)], ["mr", "mw", "me"]);
    }

    #[test]
    fn stat_with_parens_in_comm() {
        let s = parse_stat("42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 -5").unwrap();
        assert_eq!(s.comm, "a) b");
        assert!(s.num(3).is_err()); // "S" is not a number
        assert_eq!(s.num(4).unwrap(), 1);
        assert_eq!(s.num(19).unwrap() as i64, -5);
        assert!(s.num(99).is_err());
    }

    #[test]
    fn status_fields() {
        let text = "Name:\tcat\nUmask:\t0022\nState:\tR (running)\nPPid:\t7\nUid:\t1000\t1001\t1002\t1003\nGid:\t100\t101\t102\t103\nFDSize:\t64\nGroups:\t4 24 27 \nVmRSS:\t  1234 kB\nNoNewPrivs:\t1\nSeccomp:\t2\n";
        let s = parse_status(text).unwrap();
        assert_eq!(s.ppid, 7);
        assert_eq!(s.uid, [1000, 1001, 1002, 1003]);
        assert_eq!(s.gid, [100, 101, 102, 103]);
        assert_eq!(s.groups, vec![4, 24, 27]);
        assert_eq!(s.umask, Some(0o022));
        assert_eq!((s.seccomp, s.no_new_privs), (Some(2), Some(true)));
        assert_eq!((s.vm_rss_kib, s.vm_swap_kib), (Some(1234), None));
    }

    #[test]
    fn status_empty_groups() {
        let s = parse_status("PPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n").unwrap();
        assert!(s.groups.is_empty());
        assert_eq!((s.umask, s.seccomp, s.no_new_privs), (None, None, None));
    }

    #[test]
    fn status_rejects_bad() {
        let ok = "PPid:\t1\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\n";
        assert!(parse_status(ok).is_ok());
        assert!(parse_status(&ok.replace("Uid:\t0\t", "Uid:\t")).is_err());
        assert!(parse_status(&ok.replace("Uid:\t0", "Uid:\tx")).is_err());
        assert!(parse_status(&ok.replace("PPid:\t1\n", "")).is_err());
        assert!(parse_status(&format!("{ok}Umask:\t0099\n")).is_err());
        assert!(parse_status(&format!("{ok}Seccomp:\tx\n")).is_err());
    }

    #[test]
    fn stat_state() {
        let s = parse_stat("42 (a) b) T 1 42 42 0 -1").unwrap();
        assert_eq!(s.state(), Some('T'));
        assert_eq!(parse_stat("42 (x)").unwrap().state(), None);
    }

    #[test]
    fn fdinfo() {
        let i = parse_fdinfo("pos:\t4096\nflags:\t02100002\nmnt_id:\t25\nino:\t1234\n").unwrap();
        assert_eq!((i.pos, i.flags, i.cloexec), (4096, 0o100002, true));
        assert_eq!(i.field("ino"), Some("1234"));
        let i = parse_fdinfo("pos:\t0\nflags:\t0100000\nmnt_id:\t25\neventfd-count: 7\n").unwrap();
        assert_eq!((i.pos, i.flags, i.cloexec), (0, 0o100000, false));
        assert_eq!(i.field("eventfd-count"), Some("7"));
        assert!(parse_fdinfo("pos:\t0\n").is_err());
        assert!(parse_fdinfo("pos:\tx\nflags:\t0\n").is_err());
        assert!(parse_fdinfo("pos:\t1\nflags:\t9\n").is_err());
    }

    const LIMITS: &str =
        "Limit                     Soft Limit           Hard Limit           Units     \n\
Max cpu time              unlimited            unlimited            seconds   \n\
Max file size             unlimited            unlimited            bytes     \n\
Max data size             unlimited            unlimited            bytes     \n\
Max stack size            8388608              unlimited            bytes     \n\
Max core file size        0                    unlimited            bytes     \n\
Max resident set          unlimited            unlimited            bytes     \n\
Max processes             7823                 7823                 processes \n\
Max open files            1024                 524288               files     \n\
Max locked memory         8388608              8388608              bytes     \n\
Max address space         unlimited            unlimited            bytes     \n\
Max file locks            unlimited            unlimited            locks     \n\
Max pending signals       7823                 7823                 signals   \n\
Max msgqueue size         819200               819200               bytes     \n\
Max nice priority         0                    0                    \n\
Max realtime priority     0                    0                    \n\
Max realtime timeout      unlimited            unlimited            us        \n";

    #[test]
    fn parses_limits() {
        let l = parse_limits(LIMITS).unwrap();
        assert_eq!(l.len(), 16);
        for (i, r) in l.iter().enumerate() {
            assert_eq!(r.resource, i as u32);
        }
        assert_eq!(l[0].soft, u64::MAX);
        assert_eq!((l[3].soft, l[3].hard), (8388608, u64::MAX));
        assert_eq!((l[4].soft, l[4].hard), (0, u64::MAX));
        assert_eq!((l[7].soft, l[7].hard), (1024, 524288));
        assert_eq!((l[13].soft, l[13].hard), (0, 0));
        assert_eq!(l[15].hard, u64::MAX);
    }

    #[test]
    fn limits_errors() {
        // A missing line.
        let short: String = LIMITS.lines().take(10).map(|l| format!("{l}\n")).collect();
        assert!(parse_limits(&short).is_err());
        // A garbage value.
        assert!(parse_limits(
            &LIMITS.replace("8388608              unlimited", "88x      unlimited")
        )
        .is_err());
        // An unknown line.
        assert!(parse_limits(&format!("{LIMITS}Max widgets  1  2  things\n")).is_err());
    }
}
