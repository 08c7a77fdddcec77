//! epoll: an interest list of fds with their events and the data each event carries.
//!
//! Captured from the `tfd:` lines of /proc/PID/fdinfo (each watched fd's number, events,
//! data, and the identity of its file, checked against what that fd number holds now: an
//! entry whose fd was closed or replaced since it was added is refused, since it could not
//! be added again). Restored last of all fds, an epoll watched by another before that one,
//! by injecting epoll_create1 and one epoll_ctl(EPOLL_CTL_ADD) per entry with the same
//! events (EPOLLET, EPOLLONESHOT — a fired one-shot entry stays disarmed — and the rest)
//! and data. Readiness is the watched files' own state, which they carry.

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;

use super::Probe;
use crate::inject::{Call, Injector};
use telefork_image::{EpollWatch, Fd, FdKind};

/// This fd as an epoll instance with its interest list; `None` if it is another kind.
pub(crate) fn capture(pid: Pid, p: &Probe) -> Result<Option<FdKind>> {
    if p.link != "anon_inode:[eventpoll]" {
        return Ok(None);
    }
    let mut watches = Vec::new();
    for (_, line) in p.info.fields.iter().filter(|(k, _)| k == "tfd") {
        let w = parse_tfd(line).with_context(|| format!("fd {}: bad tfd line {line:?}", p.fd))?;
        // The fd number it was added under must still hold that file.
        let here = nix::sys::stat::stat(crate::procfs::fd_path(pid, w.0.fd).as_str()).ok();
        let same = here.is_some_and(|st| st.st_ino == w.1 && st.st_dev == w.2);
        if !same {
            return Err(crate::error::refusal(
                format!("fd {} (epoll) watches fd {}", p.fd, w.0.fd),
                "that fd was closed or replaced since it was added: not supported yet",
            ));
        }
        watches.push(w.0);
    }
    Ok(Some(FdKind::Epoll { watches }))
}

/// `N events: X data: Y  pos:P ino:I sdev:D` (hexadecimal but the fd and pos): the entry,
/// and its file's inode and device.
fn parse_tfd(line: &str) -> Result<(EpollWatch, u64, u64)> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let value = |key: &str| -> Result<&str> {
        if let Some(i) = w.iter().position(|x| *x == key) {
            return w.get(i + 1).copied().context("no value");
        }
        w.iter().find_map(|x| x.strip_prefix(key)).context("missing field")
    };
    let fd: i32 = w.first().context("no fd")?.parse()?;
    let events = u32::from_str_radix(value("events:")?, 16)?;
    let data = u64::from_str_radix(value("data:")?, 16)?;
    let ino = u64::from_str_radix(value("ino:")?, 16)?;
    let sdev = u64::from_str_radix(value("sdev:")?, 16)?;
    // (sdev is the kernel's dev_t: major << 20 | minor; stat's is glibc's encoding.)
    let dev = nix::sys::stat::makedev(sdev >> 20, sdev & 0xfffff);
    Ok((EpollWatch { fd, events, data }, ino, dev))
}

/// Restores the epoll instances, each once every fd it watches exists: `epolls` are their
/// groups (one per open file description).
pub(crate) fn restore_all(inj: &mut Injector, epolls: &[&[&Fd]]) -> Result<()> {
    let watched = |g: &[&Fd]| -> Vec<i32> {
        match &g[0].kind {
            FdKind::Epoll { watches } => watches.iter().map(|w| w.fd).collect(),
            _ => Vec::new(),
        }
    };
    let is_epoll_fd = |fd: i32| epolls.iter().any(|g| g.iter().any(|f| f.fd == fd));
    let mut done: Vec<usize> = Vec::new();
    while done.len() < epolls.len() {
        let ready = (0..epolls.len()).find(|i| {
            !done.contains(i)
                && watched(epolls[*i]).iter().all(|fd| {
                    !is_epoll_fd(*fd) || done.iter().any(|d| epolls[*d].iter().any(|f| f.fd == *fd))
                })
        });
        let Some(i) = ready else {
            bail!("image: epoll instances watch each other in a cycle");
        };
        restore(inj, epolls[i])?;
        done.push(i);
    }
    Ok(())
}

fn restore(inj: &mut Injector, members: &[&Fd]) -> Result<()> {
    let FdKind::Epoll { watches } = &members[0].kind else {
        bail!("internal error: epoll::restore on another kind");
    };
    inj.reset_scratch();
    super::create_onto_members(
        inj,
        members,
        (libc::SYS_epoll_create1, &[libc::EPOLL_CLOEXEC as u64]),
        "epoll",
        |inj, ep| {
            let mut calls = Vec::with_capacity(watches.len());
            for w in watches {
                // struct epoll_event is packed on x86-64: u32 events, u64 data.
                let mut ev = [0u8; 12];
                ev[..4].copy_from_slice(&w.events.to_ne_bytes());
                ev[4..].copy_from_slice(&w.data.to_ne_bytes());
                let at = inj.stage(&ev)?;
                calls.push(Call::new(
                    libc::SYS_epoll_ctl,
                    &[ep, libc::EPOLL_CTL_ADD as u64, w.fd as u64, at],
                    format!(
                        "restoring epoll fd {}: watching fd {}: epoll_ctl",
                        members[0].fd, w.fd
                    ),
                ));
            }
            Ok(calls)
        },
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn tfd_lines() {
        let (w, ino, _) =
            super::parse_tfd("3 events: 80000019 data:             1234  pos:0 ino:1a sdev:10")
                .unwrap();
        assert_eq!((w.fd, w.events, w.data, ino), (3, 0x8000_0019, 0x1234, 0x1a));
        assert!(super::parse_tfd("x events: 1").is_err());
    }
}
