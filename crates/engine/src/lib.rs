//! telefork's engine: freeze a Linux process, write down everything that makes it that
//! process (`capture`), and rebuild it so it cannot tell the difference (`restore`).
//!
//! One file per kind of state, its capture and its restore side by side:
//! memory layout and contents (`pages`: the mappings, which pages travel, how they leave the
//! process and how they are placed in the new one), mm fields (`mm`), CPU state (`arch`),
//! signals (`signals`), thread identity (`threads`), credentials (`creds`), small per-process
//! state (`misc`), file descriptors (`fds`). `inject` runs system calls inside a stopped
//! process; `ptrace` and `procfs` are the doors to the kernel.

pub mod arch;
pub mod bounds;
pub mod capture;
pub mod creds;
pub mod error;
pub mod fds;
pub mod inject;
pub mod misc;
pub mod mm;
pub mod pages;
pub mod pidfd;
pub mod pin;
pub mod procfs;
pub mod ptrace;
pub mod restore;
pub mod signals;
pub mod threads;
pub mod timeline;

pub use capture::{dump, DumpOptions, DumpSummary, OutsideReader};
pub use error::{Error, Uncarried};

/// Learns what this CPU offers, once per process. CPUID and XGETBV trap to the hypervisor
/// in a VM (microseconds each): a daemon calls this before it forks its sessions, which
/// inherit the answers instead of asking again each time.
pub fn learn_cpu() {
    arch::native::learn_cpu();
}
/// A `never`/`always` switch from the environment: `Some(false)`, `Some(true)`, or `None` for
/// the default (unset, or anything else, which is said and ignored).
pub(crate) fn never_or_always(var: &str) -> Option<bool> {
    match std::env::var(var).as_deref() {
        Ok("never") => Some(false),
        Ok("always") => Some(true),
        Ok(other) => {
            eprintln!("telefork: ignoring {var}={other:?} (never or always)");
            None
        }
        Err(_) => None,
    }
}

pub use pages::{PageRoute, PagesSocket};
pub use restore::{restore, RestoreOptions, Restored};
