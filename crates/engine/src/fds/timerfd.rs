//! timerfd: a timer read through an fd.
//!
//! Captured from /proc/PID/fdinfo (`clockid`, `ticks` — expirations not read yet —,
//! `settime flags`, `it_value` — the time left — and `it_interval`) with O_NONBLOCK.
//! Restored by injecting timerfd_create and timerfd_settime: the time left counts from the
//! restore (as the process's other timers); a timer set with TFD_TIMER_ABSTIME is set
//! absolute again, at this machine's now plus what was left, keeping TFD_TIMER_CANCEL_ON_SET.
//! Unread expirations are put back with the TFD_IOC_SET_TICKS ioctl.

use anyhow::{bail, Context, Result};

use super::{Kind, Probe};
use crate::inject::{Call, Injector};
use telefork_image::{Fd, FdKind};

/// TFD_IOC_SET_TICKS: _IOW('T', 0, __u64).
const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;
const TFD_TIMER_ABSTIME: u32 = 1;

/// timerfds, as one kind of fd (`Kind`).
pub(crate) struct TimerFd;

impl Kind for TimerFd {
    fn capture(p: &Probe) -> Result<Option<FdKind>> {
        if p.link != "anon_inode:[timerfd]" {
            return Ok(None);
        }
        let field = |k: &str| p.info.field(k).with_context(|| format!("fd {}: no {k}", p.fd));
        let clock = field("clockid")?.parse().with_context(|| format!("fd {}: clockid", p.fd))?;
        let ticks = field("ticks")?.parse().with_context(|| format!("fd {}: ticks", p.fd))?;
        let settime_flags = u32::from_str_radix(field("settime flags")?, 8)
            .with_context(|| format!("fd {}: settime flags", p.fd))?;
        Ok(Some(FdKind::TimerFd {
            clock,
            nonblock: p.info.flags & libc::O_NONBLOCK as u32 != 0,
            settime_flags,
            value_ns: timespec_ns(field("it_value")?)
                .with_context(|| format!("fd {}: it_value", p.fd))?,
            interval_ns: timespec_ns(field("it_interval")?)
                .with_context(|| format!("fd {}: it_interval", p.fd))?,
            ticks,
        }))
    }

    fn restore(inj: &mut Injector, members: &[&Fd]) -> Result<()> {
        let FdKind::TimerFd { clock, nonblock, settime_flags, value_ns, interval_ns, ticks } =
            members[0].kind
        else {
            bail!("internal error: timerfd::restore on another kind");
        };
        let flags = if nonblock { libc::TFD_NONBLOCK } else { 0 };
        let abstime = settime_flags & TFD_TIMER_ABSTIME != 0 && value_ns != 0;
        let value = if abstime { now_ns(clock)?.saturating_add(value_ns) } else { value_ns };
        let settime = if abstime { settime_flags } else { settime_flags & !TFD_TIMER_ABSTIME };
        super::create_onto_members(
            inj,
            members,
            (libc::SYS_timerfd_create, &[clock as u64, flags as u64]),
            "timerfd",
            |inj, fd| {
                let mut its = [0u8; 32];
                for (i, ns) in [interval_ns / 1_000_000_000, interval_ns % 1_000_000_000]
                    .into_iter()
                    .chain([value / 1_000_000_000, value % 1_000_000_000])
                    .enumerate()
                {
                    its[i * 8..i * 8 + 8].copy_from_slice(&ns.to_ne_bytes());
                }
                let its = inj.stage(&its)?;
                let mut calls = vec![Call::new(
                    libc::SYS_timerfd_settime,
                    &[fd, settime as u64, its, 0],
                    format!("restoring the timerfd's time (clock {clock}): timerfd_settime"),
                )];
                if ticks != 0 {
                    let t = inj.stage(&ticks.to_ne_bytes())?;
                    calls.push(Call::new(
                        libc::SYS_ioctl,
                        &[fd, TFD_IOC_SET_TICKS, t],
                        format!("restoring {ticks} unread expirations: ioctl(TFD_IOC_SET_TICKS)"),
                    ));
                }
                Ok(calls)
            },
        )
    }
}

/// `(sec, nsec)` as fdinfo prints a timespec, in nanoseconds.
fn timespec_ns(text: &str) -> Result<u64> {
    let inner = text.trim().strip_prefix('(').and_then(|t| t.strip_suffix(')'));
    let (sec, nsec) = inner.and_then(|t| t.split_once(',')).context("not (sec, nsec)")?;
    let sec: u64 = sec.trim().parse()?;
    let nsec: u64 = nsec.trim().parse()?;
    Ok(sec.saturating_mul(1_000_000_000).saturating_add(nsec))
}

/// This machine's time on `clock`, in nanoseconds.
fn now_ns(clock: i32) -> Result<u64> {
    let id = nix::time::ClockId::from_raw(clock);
    let t = nix::time::clock_gettime(id).with_context(|| format!("reading clock {clock}"))?;
    Ok((t.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec() as u64))
}

#[cfg(test)]
mod tests {
    #[test]
    fn timespecs() {
        assert_eq!(super::timespec_ns("(29, 985100703)").unwrap(), 29_985_100_703);
        assert_eq!(super::timespec_ns("(0, 0)").unwrap(), 0);
        assert!(super::timespec_ns("29").is_err());
    }
}
