//! telefork's engine: freeze a Linux process, write down everything that makes it that
//! process (`dump`), and rebuild it so it cannot tell the difference (`restore`).
//!
//! The public surface is small: [`dump()`] and [`restore()`] (or [`restore_into`] a [`Stub`]
//! made ahead of time), their options and summaries, [`Error`] (with [`Uncarried`], the
//! state the engine refuses by name), [`learn_cpu`], [`pidfd`], the /proc files callers
//! read too ([`procfs`]), and [`timeline`] for TELEFORK_DEBUG stamps.
//!
//! Inside, one module per kind of state, its capture and its restore side by side: mm
//! fields (`mm`), signals (`signals`), thread identity (`threads`), credentials (`creds`),
//! small per-process state (`misc`) and file descriptors (`fds`, one `fds::Kind` per kind
//! of fd) each implement `state::State`; memory (`pages`: the mappings, which pages travel,
//! how they leave the process and how they are placed in the new one) and CPU state
//! (`arch`) have routes of their own. `capture` and `restore` are the order of steps over
//! them.
//! `inject` runs system calls inside a stopped process; `sys` is the low layer — raw system
//! calls, ptrace, pidfds, /proc parsed once per file — and holds the engine's `unsafe`.

pub(crate) mod arch;
pub(crate) mod attrs;
pub(crate) mod bounds;
pub(crate) mod capture;
pub(crate) mod cgroups;
pub(crate) mod creds;
mod error;
pub(crate) mod fds;
pub(crate) mod inject;
pub(crate) mod locks;
pub(crate) mod misc;
pub(crate) mod mm;
pub(crate) mod pages;
pub(crate) mod pin;
pub(crate) mod restore;
pub(crate) mod signals;
pub(crate) mod state;
mod sys;
pub(crate) mod threads;
pub mod timeline;
pub(crate) mod timers;

pub use bounds::BeyondOwner;
pub use capture::{dump, DumpOptions, DumpSummary, OutsideReader};
pub use error::{Error, Uncarried};
pub use pages::{PageRoute, PagesSocket, Placed};
pub use restore::{restore, restore_into, RestoreOptions, Restored, Stub, StubTemplate};
// The low layer's doors the engine's callers use too: pidfds, and /proc parsed once.
pub use sys::{pidfd, procfs};
// (Inside the engine, under the names it has always used.)
pub(crate) use sys::ptrace;

/// PAGEMAP_SCAN (Linux 6.7+) over a process's pagemap, for programs that measure what a
/// capture would send (the benchmark's floor); not part of the engine's contract.
#[doc(hidden)]
pub mod pagemap {
    pub use crate::pages::scan::{
        pagemap_scan, PageRegion, PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED,
    };
}

/// Kills process `pid` (SIGKILL) and reaps it if it is our child: never leave a half-made
/// process behind.
pub fn kill_quietly(pid: nix::unistd::Pid) {
    ptrace::kill_quietly(pid);
}

/// How many system calls this process has injected into others so far (for
/// `TELEFORK_DEBUG` statistics).
pub fn injected_calls() -> u64 {
    inject::INJECTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Learns what this CPU offers, once per process. CPUID and XGETBV trap to the hypervisor
/// in a VM (microseconds each): a daemon calls this before it forks its sessions, which
/// inherit the answers instead of asking again each time.
pub fn learn_cpu() {
    arch::native::learn_cpu();
}

/// Learns, once per process, what every capture and restore compares a process against:
/// this process's own namespaces, cgroups, security label and speculation control, the CPUs
/// online and the capabilities the kernel knows. A daemon calls this before it forks its
/// sessions (which share those), so that no capture reads them again.
pub fn learn_host() {
    attrs::warm_up();
    creds::warm_up();
}
/// A `never`/`always` switch from the environment: `Some(false)`, `Some(true)`, or `None` for
/// the default (unset, or anything else, which is said and ignored).
pub(crate) fn never_or_always(var: &str) -> Option<bool> {
    match std::env::var(var).as_deref() {
        Ok("never") => Some(false),
        Ok("always") => Some(true),
        Ok(other) => {
            tracing::warn!("ignoring {var}={other:?} (never or always)");
            None
        }
        Err(_) => None,
    }
}
