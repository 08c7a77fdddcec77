//! A terminal or pipe on fd 0, 1 or 2: the process's link to whoever started it. It cannot
//! be carried to another process tree, so on restore the fd is bound to the restoring
//! command's own fd of the same number (the restore stub inherited it); only its
//! close-on-exec flag is taken from the image.

use super::Probe;
use crate::inject::Call;
use telefork_image::Fd;

/// Major numbers of terminal devices: 4 (virtual consoles, serial), 5 (/dev/tty,
/// /dev/console, /dev/ptmx), 136..=143 (Unix98 pty slaves, /dev/pts/*).
fn is_tty_major(major: u64) -> bool {
    major == 4 || major == 5 || (136..=143).contains(&major)
}

fn major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}

pub fn is_terminal(p: &Probe) -> bool {
    p.mode & libc::S_IFMT == libc::S_IFCHR
        && (is_tty_major(major(p.rdev)) || p.link.starts_with("/dev/pts/"))
}

/// Whether capture records this fd as `InheritedStdio`.
pub fn is_inherited_stdio(p: &Probe) -> bool {
    (0..=2).contains(&p.fd) && (is_terminal(p) || p.mode & libc::S_IFMT == libc::S_IFIFO)
}

/// The call that leaves an inherited fd as it is, but for its close-on-exec flag.
pub fn set_cloexec_call(m: &Fd) -> Call {
    Call::new(
        libc::SYS_fcntl,
        &[m.fd as u64, libc::F_SETFD as u64, if m.cloexec { 1 } else { 0 }],
        format!("restoring fd {} (inherited stdio): fcntl(F_SETFD)", m.fd),
    )
}

/// An fd that was inherited stdio at capture has no counterpart here: it stays closed.
pub fn warn_missing(m: &Fd) {
    tracing::warn!("fd {} was inherited stdio at capture, but the restoring command has no fd {}: it stays closed", m.fd, m.fd);
}
