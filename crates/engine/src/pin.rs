//! Keeping a tracer and its tracee on one CPU while they take turns. Owns no process state:
//! it narrows CPU sets for the duration of a capture or restore and gives the original
//! ones back.
//!
//! Every injected system call is a stop of the tracee and a wake-up of the tracer, and back.
//! On one CPU that is a plain context switch; across two it is an interrupt between
//! processors each way, which costs far more in a VM (small restores took 2-6 ms, pinned 2).

use nix::sched::{sched_getaffinity, sched_getcpu, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// This thread's CPU set, narrowed to the CPU it runs on until released (or dropped), and
/// optionally a tracee's, narrowed to the same CPU.
pub(crate) struct CpuPin {
    original: Option<CpuSet>,
    /// The tracee pinned with us and its own original set.
    tracee: Option<(libc::pid_t, CpuSet)>,
}

fn get_affinity(tid: libc::pid_t) -> Option<CpuSet> {
    sched_getaffinity(Pid::from_raw(tid)).ok()
}

pub(crate) fn set_affinity(tid: libc::pid_t, set: &CpuSet) -> bool {
    sched_setaffinity(Pid::from_raw(tid), set).is_ok()
}

/// The CPU this thread runs on now.
fn current_cpu() -> Option<usize> {
    sched_getcpu().ok()
}

/// The set holding only the CPU this thread runs on now.
fn this_cpu() -> Option<CpuSet> {
    let mut one = CpuSet::new();
    one.set(current_cpu()?).ok()?;
    Some(one)
}

/// Moves thread `pid` to the CPU this thread runs on now, for good (best effort).
pub(crate) fn move_here(pid: libc::pid_t) {
    if let Some(one) = this_cpu() {
        set_affinity(pid, &one);
    }
}

impl CpuPin {
    /// Pins this thread (best effort: where affinity cannot be read or set, nothing changes).
    pub fn here() -> CpuPin {
        let pin = CpuPin { original: get_affinity(0), tracee: None };
        pin.widen(false);
        pin
    }

    /// Pins this thread and the (stopped) tracee `pid` to one CPU. Best effort: a tracee we
    /// may not change is left alone.
    pub fn with_tracee(pid: libc::pid_t) -> CpuPin {
        let mut pin = CpuPin::here();
        if let (Some(orig), Some(one)) = (get_affinity(pid), this_cpu()) {
            if set_affinity(pid, &one) {
                pin.tracee = Some((pid, orig));
            }
        }
        pin
    }

    /// Lets this thread run anywhere it could again (for a big memory transfer, whose reader
    /// thread inherits our set), or pins it to the CPU it runs on now.
    pub fn widen(&self, wide: bool) {
        let Some(original) = &self.original else { return };
        if wide {
            set_affinity(0, original);
        } else if let Some(one) = this_cpu() {
            set_affinity(0, &one);
        }
    }

    /// Lets thread `tid` (the tracee) run on any CPU of our original set: while it works on its
    /// own for long (receiving a big image's pages), not in turns with us. `move_here` pins
    /// it with us again.
    pub fn let_run_anywhere(&self, tid: libc::pid_t) {
        if let Some(original) = &self.original {
            set_affinity(tid, original);
        }
    }

    /// The CPUs of our original set other than the one we are pinned to (all of the
    /// original set if there is no other): where a helper thread works beside us, not in
    /// turns with us.
    pub fn others(&self) -> Option<CpuSet> {
        let (original, pinned) = (self.original.as_ref()?, current_cpu()?);
        let mut others = *original;
        others.unset(pinned).ok()?;
        let any = (0..CpuSet::count()).any(|cpu| others.is_set(cpu).unwrap_or(false));
        Some(if any { others } else { *original })
    }

    /// The original CPU set's bytes (the kernel's cpumask: CPU n is bit n % 8 of byte
    /// n / 8), for the restored process.
    pub fn original_bytes(&self) -> Option<Vec<u8>> {
        let o = self.original.as_ref()?;
        let mut bytes = vec![0u8; std::mem::size_of::<libc::cpu_set_t>()];
        for cpu in (0..CpuSet::count()).filter(|&c| o.is_set(c).unwrap_or(false)) {
            if let Some(b) = bytes.get_mut(cpu / 8) {
                *b |= 1 << (cpu % 8);
            }
        }
        Some(bytes)
    }

    /// Gives this thread, and the tracee, their original sets back (as dropping does).
    /// The CPUs the tracee had before it was pinned next to us, if it was.
    pub fn tracee_cpus(&self) -> Option<Vec<u32>> {
        let (_, orig) = self.tracee.as_ref()?;
        Some(
            (0..CpuSet::count())
                .filter(|&c| orig.is_set(c).unwrap_or(false))
                .map(|c| c as u32)
                .collect(),
        )
    }

    pub fn release(self) {}
}

impl Drop for CpuPin {
    fn drop(&mut self) {
        self.widen(true);
        if let Some((pid, orig)) = &self.tracee {
            set_affinity(*pid, orig);
        }
    }
}
