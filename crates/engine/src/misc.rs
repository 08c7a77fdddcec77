//! Small per-process state with no better home: working directory, umask, nice value,
//! personality, resource limits, no_new_privs, and the command name.
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
use crate::state::{Proc, State};
use telefork_image::{Misc, ProcessImage, Rlimit};

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

/// The small per-process state and the command name, as one kind of state (`State`).
pub(crate) struct MiscState;

impl State for MiscState {
    /// The small state, and the command name (field 2 of /proc/PID/stat).
    type Image = (Misc, String);
    type Source<'a> = Proc<'a>;

    fn capture(from: Proc<'_>) -> Result<(Misc, String)> {
        Ok((capture(from.pid, from.stat, from.status)?, from.stat.comm.clone()))
    }

    fn restore(inj: &mut Injector, img: &ProcessImage) -> Result<()> {
        set(inj, &img.misc, &img.comm)
    }
}

/// Misc state of process `pid`, whose /proc stat and status the caller read.
fn capture(pid: Pid, stat: &crate::procfs::Stat, status: &crate::procfs::Status) -> Result<Misc> {
    let cwd = crate::procfs::read_cwd(pid)?;
    if cwd.ends_with(" (deleted)") {
        return Err(crate::error::refusal(
            format!("the working directory {cwd:?}"),
            "has been deleted: cannot be restored",
        ));
    }
    if !cwd.starts_with('/') {
        return Err(crate::error::refusal(
            format!("the working directory {cwd:?}"),
            "is not reachable from our root",
        ));
    }

    // A seccomp filter cannot be captured yet; restoring the process without it would lift
    // its sandbox, so it is refused.
    match status.seccomp {
        Some(0) => {}
        Some(mode) => {
            return Err(crate::error::refusal(
                format!("process {pid} runs under seccomp (mode {mode})"),
                "its filters cannot be captured yet, and restoring it without them would lift its sandbox",
            ))
        }
        None => bail!("no Seccomp line in /proc/{pid}/status"),
    }
    let no_new_privs =
        status.no_new_privs.with_context(|| format!("no NoNewPrivs line in /proc/{pid}/status"))?;
    let umask = status.umask.with_context(|| format!("no Umask line in /proc/{pid}/status"))?;
    let nice = stat_nice(stat).with_context(|| format!("parsing /proc/{pid}/stat"))?;
    let personality = crate::procfs::read_personality(pid)?;
    let rlimits = crate::procfs::read_limits(pid)?;
    Ok(Misc { cwd, umask, nice, personality, rlimits, no_new_privs })
}

/// Field 19 (nice) of /proc/PID/stat.
pub(crate) fn stat_nice(stat: &crate::procfs::Stat) -> Result<i32> {
    let nice = stat.num(19)? as i64;
    i32::try_from(nice).with_context(|| format!("bad nice value {nice}"))
}

fn set(inj: &mut Injector, m: &Misc, comm: &str) -> Result<()> {
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
    tracing::warn!(
        "cannot raise {name} to {} / {} (no CAP_SYS_RESOURCE); restored as {} / {}",
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
}
