//! signalfd: an fd that reads the signals of a mask.
//!
//! Captured from /proc/PID/fdinfo (`sigmask`, hexadecimal) with the O_NONBLOCK flag;
//! restored by injecting signalfd4 with the same mask. The signals themselves are pending
//! on the process, which carries them (`signals`).

use anyhow::{bail, Context, Result};

use super::{Kind, Probe};
use crate::inject::Injector;
use telefork_image::{Fd, FdKind};

/// signalfds, as one kind of fd (`Kind`).
pub(crate) struct SignalFd;

impl Kind for SignalFd {
    fn capture(p: &Probe) -> Result<Option<FdKind>> {
        if p.link != "anon_inode:[signalfd]" {
            return Ok(None);
        }
        let mask = p.info.field("sigmask").with_context(|| format!("fd {}: no sigmask", p.fd))?;
        let mask = u64::from_str_radix(mask, 16)
            .with_context(|| format!("fd {}: bad sigmask {mask:?}", p.fd))?;
        let nonblock = p.info.flags & libc::O_NONBLOCK as u32 != 0;
        Ok(Some(FdKind::SignalFd { mask, nonblock }))
    }

    fn restore(inj: &mut Injector, members: &[&Fd]) -> Result<()> {
        let FdKind::SignalFd { mask, nonblock } = members[0].kind else {
            bail!("internal error: signalfd::restore on another kind");
        };
        let set = inj.stage(&mask.to_ne_bytes())?;
        let flags = if nonblock { libc::SFD_NONBLOCK } else { 0 };
        super::create_onto_members(
            inj,
            members,
            (libc::SYS_signalfd4, &[u64::MAX, set, 8, flags as u64]),
            "signalfd",
            |_, _| Ok(Vec::new()),
        )
    }
}
