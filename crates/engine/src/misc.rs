//! Small per-process state with no better home: working directory, umask, nice value,
//! personality, resource limits, and (on restore) the command name.
//!
//! Capture reads everything from /proc/PID (cwd link, status, stat, personality, limits), so
//! nothing runs in the target. Resource limits come from /proc/PID/limits rather than
//! prlimit(2), which here fails on another uid's task (no CAP_SYS_RESOURCE). Restore injects
//! chdir, umask, personality, setpriority, prctl(PR_SET_NAME) and prlimit64 into the new
//! process. The values were checked against the image's owner before anything was made
//! (`bounds`); a hard limit the kernel still will not raise (no CAP_SYS_RESOURCE, or
//! RLIMIT_NOFILE above fs.nr_open) is clamped to what the process may have, with a warning,
//! rather than failing the restore.

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;

use crate::inject::{Call, Injector};
use telefork_image::{Misc, Rlimit};

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

/// The symbolic name of RLIMIT number `res`, for messages.
pub fn rlimit_name(res: u32) -> &'static str {
    const N: [&str; 16] = [
        "RLIMIT_CPU",
        "RLIMIT_FSIZE",
        "RLIMIT_DATA",
        "RLIMIT_STACK",
        "RLIMIT_CORE",
        "RLIMIT_RSS",
        "RLIMIT_NPROC",
        "RLIMIT_NOFILE",
        "RLIMIT_MEMLOCK",
        "RLIMIT_AS",
        "RLIMIT_LOCKS",
        "RLIMIT_SIGPENDING",
        "RLIMIT_MSGQUEUE",
        "RLIMIT_NICE",
        "RLIMIT_RTPRIO",
        "RLIMIT_RTTIME",
    ];
    N.get(res as usize).copied().unwrap_or("RLIMIT_?")
}

fn read_proc(pid: Pid, what: &str) -> Result<String> {
    let path = format!("/proc/{pid}/{what}");
    crate::procfs::read_text(&path).with_context(|| format!("reading {path}"))
}

/// Misc state of process `pid`, whose /proc stat and status the caller read.
pub fn capture(pid: Pid, stat: &crate::procfs::Stat, status: &str) -> Result<Misc> {
    let cwd_link = format!("/proc/{pid}/cwd");
    let cwd = std::fs::read_link(&cwd_link).with_context(|| format!("reading {cwd_link}"))?;
    let cwd = cwd
        .into_os_string()
        .into_string()
        .map_err(|p| anyhow::anyhow!("working directory {p:?} is not valid UTF-8"))?;
    if cwd.ends_with(" (deleted)") {
        bail!("the working directory {cwd:?} has been deleted: cannot be restored");
    }
    if !cwd.starts_with('/') {
        bail!("the working directory {cwd:?} is not reachable from our root");
    }

    // A seccomp filter cannot be captured yet; restoring the process without it would lift
    // its sandbox, so it is refused.
    match status_number(status, "Seccomp:") {
        Some(0) => {}
        Some(mode) => bail!("process {pid} runs under seccomp (mode {mode}); its filters cannot be captured yet, and restoring it without them would lift its sandbox"),
        None => bail!("no Seccomp line in /proc/{pid}/status"),
    }
    let no_new_privs = status_number(status, "NoNewPrivs:")
        .with_context(|| format!("no NoNewPrivs line in /proc/{pid}/status"))?
        != 0;
    let umask = parse_umask(status).with_context(|| format!("parsing /proc/{pid}/status"))?;
    let nice = stat_nice(stat).with_context(|| format!("parsing /proc/{pid}/stat"))?;
    let pers = read_proc(pid, "personality")?;
    let personality = u64::from_str_radix(pers.trim(), 16)
        .with_context(|| format!("parsing /proc/{pid}/personality {:?}", pers.trim()))?;
    let rlimits = parse_limits(&read_proc(pid, "limits")?)
        .with_context(|| format!("parsing /proc/{pid}/limits"))?;
    Ok(Misc { cwd, umask, nice, personality, rlimits, no_new_privs })
}

/// A numeric `Key:` line of /proc/PID/status.
fn status_number(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok())
}

/// The `Umask:` line of /proc/PID/status (octal).
pub fn parse_umask(status: &str) -> Result<u32> {
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("Umask:") {
            return u32::from_str_radix(v.trim(), 8)
                .with_context(|| format!("bad Umask {:?}", v.trim()));
        }
    }
    bail!("no Umask line")
}

/// Field 19 (nice) of /proc/PID/stat.
pub(crate) fn stat_nice(stat: &crate::procfs::Stat) -> Result<i32> {
    let nice = stat.num(19)? as i64;
    i32::try_from(nice).with_context(|| format!("bad nice value {nice}"))
}

/// All 16 limits of /proc/PID/limits. The kernel prints the raw rlimit values (the Units
/// column only says what they count), "unlimited" for RLIM_INFINITY.
pub fn parse_limits(text: &str) -> Result<Vec<Rlimit>> {
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
            Some((soft, hard)) => Ok(Rlimit { resource: res as u32, soft: *soft, hard: *hard }),
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

pub fn restore(inj: &mut Injector, m: &Misc, comm: &str) -> Result<()> {
    inj.reset_scratch();
    let pers = u32::try_from(m.personality).context("personality does not fit 32 bits")?;
    if pers == u32::MAX {
        bail!("personality 0xffffffff is not a valid value");
    }
    for l in &m.rlimits {
        if l.soft > l.hard {
            bail!(
                "{}: soft limit {} above hard limit {} in the image",
                rlimit_name(l.resource),
                l.soft,
                l.hard
            );
        }
    }
    let cwd = inj.stage_cstr(&m.cwd)?;
    // The kernel keeps 15 bytes of name plus NUL.
    let mut name = [0u8; 16];
    let b = comm.as_bytes();
    let n = b.len().min(15);
    name[..n].copy_from_slice(&b[..n]);
    let name_addr = inj.stage(&name)?;
    // One batch (one ptrace round trip) for all of it.
    let mut calls = vec![
        Call::new(
            libc::SYS_chdir,
            &[cwd],
            format!("restoring the working directory {}: chdir", m.cwd),
        ),
        Call::new(libc::SYS_umask, &[(m.umask & 0o777) as u64], "restoring the umask"),
        Call::new(
            libc::SYS_personality,
            &[pers as u64],
            format!("restoring personality {pers:#x}"),
        ),
        Call::new(
            libc::SYS_setpriority,
            &[libc::PRIO_PROCESS as u64, 0, m.nice as i64 as u64],
            format!("restoring nice value {}: setpriority", m.nice),
        ),
        Call::new(
            libc::SYS_prctl,
            &[libc::PR_SET_NAME as u64, name_addr],
            format!("restoring the command name {comm:?}"),
        ),
    ];
    if m.no_new_privs {
        calls.push(Call::new(
            libc::SYS_prctl,
            &[libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0],
            "restoring no_new_privs",
        ));
    }
    let fixed = calls.len();
    for l in &m.rlimits {
        let newp = inj.stage(&rlimit_bytes(l.soft, l.hard))?;
        calls.push(Call::new(
            libc::SYS_prlimit64,
            &[0, l.resource as u64, newp, 0],
            format!("restoring {}: prlimit64", rlimit_name(l.resource)),
        ));
    }
    match inj.try_batch(&calls)? {
        Ok(_) => Ok(()),
        // Raising a hard limit needs CAP_SYS_RESOURCE: those limits one by one, the careful way.
        Err((i, errno)) if i >= fixed && errno == libc::EPERM => {
            for l in &m.rlimits[i - fixed..] {
                restore_rlimit(inj, l)?;
            }
            Ok(())
        }
        Err((i, errno)) => bail!("{}: {}", calls[i].what, std::io::Error::from_raw_os_error(errno)),
    }
}

fn restore_rlimit(inj: &mut Injector, l: &Rlimit) -> Result<()> {
    let name = rlimit_name(l.resource);
    if l.soft > l.hard {
        bail!("{name}: soft limit {} above hard limit {} in the image", l.soft, l.hard);
    }
    let newp = inj.stage(&rlimit_bytes(l.soft, l.hard))?;
    let r = inj.syscall_raw(libc::SYS_prlimit64, &[0, l.resource as u64, newp, 0])?;
    if r == 0 {
        return Ok(());
    }
    if r != -(libc::EPERM as i64) {
        let err = std::io::Error::from_raw_os_error(-r as i32);
        bail!("restoring {name} ({} / {}): prlimit64: {err}", fmt_lim(l.soft), fmt_lim(l.hard));
    }
    // Raising the hard limit needs CAP_SYS_RESOURCE (and RLIMIT_NOFILE cannot exceed
    // fs.nr_open): keep the current hard limit and put the soft one under it.
    let oldp = inj.alloc_zeroed(16)?;
    inj.syscall(
        libc::SYS_prlimit64,
        &[0, l.resource as u64, 0, oldp],
        format!("reading {name}: prlimit64"),
    )?;
    let mut buf = [0u8; 16];
    inj.read_mem(oldp, &mut buf)?;
    let cur_hard = u64::from_ne_bytes(buf[8..16].try_into().expect("8 bytes"));
    let hard = l.hard.min(cur_hard);
    let soft = l.soft.min(hard);
    eprintln!(
        "telefork: warning: cannot raise {name} to {} / {} (no CAP_SYS_RESOURCE); restored as {} / {}",
        fmt_lim(l.soft),
        fmt_lim(l.hard),
        fmt_lim(soft),
        fmt_lim(hard)
    );
    let newp = inj.stage(&rlimit_bytes(soft, hard))?;
    inj.syscall(
        libc::SYS_prlimit64,
        &[0, l.resource as u64, newp, 0],
        format!("restoring {name} clamped to {} / {}: prlimit64", fmt_lim(soft), fmt_lim(hard)),
    )?;
    Ok(())
}

fn rlimit_bytes(soft: u64, hard: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&soft.to_ne_bytes());
    b[8..].copy_from_slice(&hard.to_ne_bytes());
    b
}

fn fmt_lim(v: u64) -> String {
    if v == u64::MAX {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn parses_nice() {
        let nice = |text: &str| crate::procfs::parse_stat(text).and_then(|s| stat_nice(&s));
        let stat = "1234 (a) b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 -5 1 0 12345 1000 100 18446744073709551615";
        assert_eq!(nice(stat).unwrap(), -5);
        let stat = "1 (init) S 0 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 39 19 1 0 12345";
        assert_eq!(nice(stat).unwrap(), 19);
        assert!(nice("1 (x S 0").is_err());
        assert!(nice("1 (x) S 0 1").is_err());
    }

    #[test]
    fn parses_umask() {
        assert_eq!(parse_umask("Name:\tx\nUmask:\t0027\n").unwrap(), 0o027);
        assert!(parse_umask("Name:\tx\n").is_err());
        assert!(parse_umask("Umask:\t0099\n").is_err());
    }
}
