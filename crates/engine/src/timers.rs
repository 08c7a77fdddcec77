//! Timers: the three interval timers (setitimer(2), alarm(2)) and the POSIX timers
//! (timer_create(2)), each with what is left of it, its interval, clock and signal.
//!
//! Capture lists the POSIX timers from /proc/PID/timers (id, clock, signal, sigev_value,
//! whom it notifies) and reads what only the process can tell — getitimer, timer_gettime,
//! timer_getoverrun — with calls injected in the capture's one batch. Restore creates every
//! POSIX timer again under its own id (prctl(PR_TIMER_CREATE_RESTORE_IDS), Linux 6.16+; a
//! kernel without it still restores a timer whose id comes out the same, and refuses the
//! rest by name) and arms all timers in the restore's last batch, just before the process
//! runs, with the time that was left at capture: a frozen process's timers do not run on
//! while it travels, as with CRIU. A timer's overrun count is recorded but no call sets it.

use anyhow::{bail, Result};
use nix::unistd::Pid;
use telefork_image::{PosixTimer, ProcessImage, TimerNotify, TimerValue, Timers};

use crate::inject::{Call, Injector};
use crate::procfs;
use crate::state::State;

/// prctl(PR_TIMER_CREATE_RESTORE_IDS): timer_create takes the id to give from its
/// `timerid` argument (Linux 6.16).
const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
const PR_TIMER_CREATE_RESTORE_IDS_ON: u64 = 1;
const PR_TIMER_CREATE_RESTORE_IDS_OFF: u64 = 0;
/// Bytes of `struct itimerval` and `struct itimerspec` (two pairs of 64-bit words).
const TIMER_BYTES: u64 = 32;
/// Bytes of `struct sigevent` the kernel reads.
const SIGEVENT_BYTES: usize = 64;

/// The timers of a process, as one kind of state (`State`).
pub(crate) struct TimerState;

/// Where the capture's injected reads leave the timers (see `capture_calls`).
pub(crate) struct TimerReads {
    itimers: u64,
    posix: Vec<(procfs::ProcTimer, u64)>,
    /// Index of the first timer_getoverrun call among the batch's results, relative to the
    /// first call `capture_calls` returned.
    overruns_at: usize,
}

/// What the timers are captured from: the capture's batch results from the first of
/// `capture_calls`'s calls on, and the injector to read the scratch area.
pub(crate) struct TimerLook<'a> {
    pub inj: &'a Injector,
    pub results: &'a [u64],
    pub reads: TimerReads,
}

impl State for TimerState {
    type Image = Timers;
    type Source<'a> = TimerLook<'a>;

    fn capture(from: TimerLook<'_>) -> Result<Timers> {
        let mut b = [0u8; 3 * TIMER_BYTES as usize];
        from.inj.read_mem(from.reads.itimers, &mut b)?;
        let itimers: Vec<TimerValue> =
            b.chunks(TIMER_BYTES as usize).map(|c| timer_value(c, 1_000)).collect();
        let itimers = if itimers.iter().all(|t| t.value_ns == 0) { Vec::new() } else { itimers };
        let mut posix = Vec::new();
        for (i, (t, addr)) in from.reads.posix.iter().enumerate() {
            let mut b = [0u8; TIMER_BYTES as usize];
            from.inj.read_mem(*addr, &mut b)?;
            let notify = match t.notify {
                n if n == libc::SIGEV_SIGNAL => TimerNotify::Signal,
                n if n == libc::SIGEV_NONE => TimerNotify::None,
                n if n == libc::SIGEV_SIGNAL | libc::SIGEV_THREAD_ID => {
                    TimerNotify::Thread { tid: t.target }
                }
                n => {
                    return Err(crate::error::refusal(
                        format!("POSIX timer {} (notification {n:#x})", t.id),
                        "notifies in a way the engine does not know",
                    ))
                }
            };
            let overrun = from.results.get(from.reads.overruns_at + i).copied().unwrap_or(0);
            posix.push(PosixTimer {
                id: t.id,
                clock: t.clock,
                notify,
                signo: t.signo,
                sigval: t.sigval,
                value: timer_value(&b, 1),
                overrun: overrun as i32,
            });
        }
        Ok(Timers { itimers, posix })
    }

    fn restore(inj: &mut Injector, img: &ProcessImage) -> Result<()> {
        let t = &img.timers;
        if !t.itimers.is_empty() && t.itimers.len() != 3 {
            bail!("image is corrupt: {} interval timers (there are 3)", t.itimers.len());
        }
        create_posix(inj, &t.posix, img.pid)?;
        // Armed in the last batch: as close to the moment the process runs as can be.
        let mut calls = Vec::new();
        for (which, v) in t.itimers.iter().enumerate() {
            let addr = inj.stage(&timer_bytes(v, 1_000))?;
            calls.push(Call::new(
                libc::SYS_setitimer,
                &[which as u64, addr, 0],
                format!("arming {}: setitimer", itimer_name(which)),
            ));
        }
        for p in &t.posix {
            let addr = inj.stage(&timer_bytes(&p.value, 1))?;
            calls.push(Call::new(
                libc::SYS_timer_settime,
                &[p.id as u64, 0, addr, 0],
                format!("arming POSIX timer {}: timer_settime", p.id),
            ));
        }
        inj.defer(calls);
        Ok(())
    }
}

/// The injected reads of the timers, to run in the capture's batch; then `capture`.
pub(crate) fn capture_calls(inj: &mut Injector, pid: Pid) -> Result<(Vec<Call>, TimerReads)> {
    let listed = procfs::read_timers(pid)?;
    let itimers = inj.alloc_zeroed(3 * TIMER_BYTES)?;
    let mut calls: Vec<Call> = (0..3)
        .map(|which| {
            Call::new(
                libc::SYS_getitimer,
                &[which, itimers + which * TIMER_BYTES],
                format!("reading {}: getitimer", itimer_name(which as usize)),
            )
        })
        .collect();
    let mut posix = Vec::with_capacity(listed.len());
    for t in listed {
        let addr = inj.alloc_zeroed(TIMER_BYTES)?;
        calls.push(Call::new(
            libc::SYS_timer_gettime,
            &[t.id as u64, addr],
            format!("reading POSIX timer {}: timer_gettime", t.id),
        ));
        posix.push((t, addr));
    }
    let overruns_at = calls.len();
    for (t, _) in &posix {
        calls.push(Call::new(
            libc::SYS_timer_getoverrun,
            &[t.id as u64],
            format!("reading the overrun of POSIX timer {}: timer_getoverrun", t.id),
        ));
    }
    Ok((calls, TimerReads { itimers, posix, overruns_at }))
}

/// Creates the image's POSIX timers (disarmed) under their ids.
fn create_posix(inj: &mut Injector, timers: &[PosixTimer], image_pid: i32) -> Result<()> {
    if timers.is_empty() {
        return Ok(());
    }
    let mut ids: Vec<i32> = timers.iter().map(|t| t.id).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) || ids[0] < 0 {
        bail!("image is corrupt: POSIX timer ids {ids:?}");
    }
    let by_id = inj.syscall_raw(
        libc::SYS_prctl,
        &[PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_ON, 0, 0, 0],
    )? == 0;
    let tid = inj.pid().as_raw();
    let mut calls = Vec::new();
    for t in timers {
        let mut ev = [0u8; SIGEVENT_BYTES];
        ev[0..8].copy_from_slice(&t.sigval.to_ne_bytes());
        ev[8..12].copy_from_slice(&t.signo.to_ne_bytes());
        let notify = match t.notify {
            TimerNotify::Signal => libc::SIGEV_SIGNAL,
            TimerNotify::None => libc::SIGEV_NONE,
            TimerNotify::Thread { tid: was } => {
                if was != image_pid {
                    bail!(
                        "POSIX timer {} signals thread {was}, not the process's thread \
                         {image_pid}",
                        t.id
                    );
                }
                libc::SIGEV_SIGNAL | libc::SIGEV_THREAD_ID
            }
        };
        ev[12..16].copy_from_slice(&notify.to_ne_bytes());
        ev[16..20].copy_from_slice(&tid.to_ne_bytes());
        let ev_addr = inj.stage(&ev)?;
        let id_addr = inj.stage(&t.id.to_ne_bytes())?;
        calls.push((
            Call::new(
                libc::SYS_timer_create,
                &[t.clock as u64, ev_addr, id_addr],
                format!("creating POSIX timer {} (clock {}): timer_create", t.id, t.clock),
            ),
            id_addr,
        ));
    }
    let mut batch: Vec<Call> = calls.iter().map(|(c, _)| c.clone()).collect();
    if by_id {
        batch.push(Call::new(
            libc::SYS_prctl,
            &[PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_OFF, 0, 0, 0],
            "prctl(PR_TIMER_CREATE_RESTORE_IDS, OFF)",
        ));
    }
    inj.run_batch(&batch)?;
    for (t, (_, id_addr)) in timers.iter().zip(&calls) {
        let mut b = [0u8; 4];
        inj.read_mem(*id_addr, &mut b)?;
        let got = i32::from_ne_bytes(b);
        if got != t.id {
            return Err(crate::error::refusal(
                format!("POSIX timer {}", t.id),
                format!(
                    "this kernel gave it id {got}: it cannot create a timer with a given id \
                     (prctl PR_TIMER_CREATE_RESTORE_IDS, Linux 6.16)"
                )
                .as_str(),
            ));
        }
    }
    Ok(())
}

/// An itimerval (`unit_ns` = 1000: microseconds) or itimerspec (1: nanoseconds): interval
/// first, then the value.
fn timer_value(b: &[u8], unit_ns: u64) -> TimerValue {
    let word = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let ns = |sec: u64, frac: u64| sec.saturating_mul(1_000_000_000).saturating_add(frac * unit_ns);
    TimerValue { interval_ns: ns(word(0), word(1)), value_ns: ns(word(2), word(3)) }
}

fn timer_bytes(v: &TimerValue, unit_ns: u64) -> [u8; TIMER_BYTES as usize] {
    let mut b = [0u8; TIMER_BYTES as usize];
    let split = |ns: u64| (ns / 1_000_000_000, (ns % 1_000_000_000) / unit_ns);
    let (is, isub) = split(v.interval_ns);
    let (vs, vsub) = split(v.value_ns);
    // A value that rounds down to zero would disarm the timer: it fires at once instead.
    let vsub = if vs == 0 && vsub == 0 && v.value_ns > 0 { 1 } else { vsub };
    for (i, w) in [is, isub, vs, vsub].into_iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
    }
    b
}

fn itimer_name(which: usize) -> &'static str {
    ["ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF"].get(which).copied().unwrap_or("ITIMER_?")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_travel_in_their_units() {
        let v = TimerValue { value_ns: 1_500_000_000, interval_ns: 250_000 };
        assert_eq!(timer_value(&timer_bytes(&v, 1_000), 1_000), v);
        assert_eq!(timer_value(&timer_bytes(&v, 1), 1), v);
        // Less than a microsecond left is not "disarmed".
        let tiny = TimerValue { value_ns: 10, interval_ns: 0 };
        assert_eq!(timer_value(&timer_bytes(&tiny, 1_000), 1_000).value_ns, 1_000);
    }
}
