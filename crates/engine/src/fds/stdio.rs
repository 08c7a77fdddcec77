//! A terminal or pipe on fd 0, 1 or 2: the process's link to whoever started it. It cannot
//! be carried to another process tree, so on restore the fd is bound to the restoring
//! command's own fd of the same number (the restore stub inherited it); only its
//! close-on-exec flag is taken from the image.

use anyhow::Result;

use super::{Kind, Probe};
use crate::inject::{Call, Injector};
use telefork_image::{Fd, FdKind};

/// Major numbers of terminal devices: 4 (virtual consoles, serial), 5 (/dev/tty,
/// /dev/console, /dev/ptmx), 136..=143 (Unix98 pty slaves, /dev/pts/*).
fn is_tty_major(major: u64) -> bool {
    major == 4 || major == 5 || (136..=143).contains(&major)
}

fn major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}

pub(crate) fn is_terminal(p: &Probe) -> bool {
    p.mode & libc::S_IFMT == libc::S_IFCHR
        && (is_tty_major(major(p.rdev)) || p.link.starts_with("/dev/pts/"))
}

/// Inherited stdio, as one kind of fd (`Kind`).
pub(crate) struct Stdio;

impl Kind for Stdio {
    fn capture(p: &Probe) -> Result<Option<FdKind>> {
        Ok(is_inherited_stdio(p).then_some(FdKind::InheritedStdio))
    }

    /// Nothing left to do: the fd is the restorer's, and its close-on-exec flag was set in
    /// the fds' first batch (`set_cloexec_call`), with the closing of the restorer's others.
    fn restore(_inj: &mut Injector, _members: &[&Fd]) -> Result<()> {
        Ok(())
    }
}

/// Whether capture records this fd as `InheritedStdio`.
pub(crate) fn is_inherited_stdio(p: &Probe) -> bool {
    (0..=2).contains(&p.fd) && (is_terminal(p) || p.mode & libc::S_IFMT == libc::S_IFIFO)
}

/// The call that leaves an inherited fd as it is, but for its close-on-exec flag.
pub(crate) fn set_cloexec_call(m: &Fd) -> Call {
    Call::new(
        libc::SYS_fcntl,
        &[m.fd as u64, libc::F_SETFD as u64, if m.cloexec { 1 } else { 0 }],
        format!("restoring fd {} (inherited stdio): fcntl(F_SETFD)", m.fd),
    )
}

/// An fd that was inherited stdio at capture has no counterpart here: it stays closed.
pub(crate) fn warn_missing(m: &Fd) {
    tracing::warn!("fd {} was inherited stdio at capture, but the restoring command has no fd {}: it stays closed", m.fd, m.fd);
}
