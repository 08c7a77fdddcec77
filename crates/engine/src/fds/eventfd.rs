//! eventfd: a counter in the kernel that one side adds to and the other reads.
//!
//! Captured from /proc/PID/fdinfo (`eventfd-count`, in hexadecimal, and
//! `eventfd-semaphore`) with the O_NONBLOCK flag; restored by injecting eventfd2 with the
//! same count and flags into the new process, then placing it on every fd that shared it.

use anyhow::{bail, Context, Result};

use super::{Kind, Probe};
use crate::inject::Injector;
use telefork_image::{Fd, FdKind};

/// eventfds, as one kind of fd (`Kind`).
pub(crate) struct EventFd;

impl Kind for EventFd {
    fn capture(p: &Probe) -> Result<Option<FdKind>> {
        if p.link != "anon_inode:[eventfd]" {
            return Ok(None);
        }
        let field =
            |k: &str| p.info.field(k).with_context(|| format!("fd {}: no {k} in its fdinfo", p.fd));
        let count = field("eventfd-count")?;
        let count = u64::from_str_radix(count, 16)
            .with_context(|| format!("fd {}: bad eventfd-count {count:?}", p.fd))?;
        let semaphore = field("eventfd-semaphore")? == "1";
        let nonblock = p.info.flags & libc::O_NONBLOCK as u32 != 0;
        Ok(Some(FdKind::EventFd { count, semaphore, nonblock }))
    }

    fn restore(inj: &mut Injector, members: &[&Fd]) -> Result<()> {
        let FdKind::EventFd { count, semaphore, nonblock } = members[0].kind else {
            bail!("internal error: eventfd::restore on another kind");
        };
        if count == u64::MAX {
            bail!("image is corrupt: eventfd count {count:#x}");
        }
        // eventfd2 takes an unsigned int: a larger count is written in after.
        let initial = u32::try_from(count).unwrap_or(0);
        let flags = if semaphore { libc::EFD_SEMAPHORE } else { 0 }
            | if nonblock { libc::EFD_NONBLOCK } else { 0 };
        super::create_onto_members(
            inj,
            members,
            (libc::SYS_eventfd2, &[initial as u64, flags as u64]),
            "eventfd",
            |inj, fd| {
                if count == initial as u64 {
                    return Ok(Vec::new());
                }
                let value = inj.stage(&count.to_ne_bytes())?;
                Ok(vec![crate::inject::Call::new(
                    libc::SYS_write,
                    &[fd, value, 8],
                    format!("restoring the eventfd's count {count}: write"),
                )])
            },
        )
    }
}
