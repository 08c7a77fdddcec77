//! Credentials: real, effective, saved and filesystem user and group ids, and the
//! supplementary groups.
//!
//! Capture takes them from the `Uid:`, `Gid:` and `Groups:` lines of /proc/PID/status (no
//! system call in the target is needed). Restore runs *last* of all the per-process steps,
//! because it drops the restored process from the restorer's identity (root) to the image's:
//! setgroups, setresgid, setfsgid, setresuid, setfsuid, injected into the process itself. We
//! only ever set the ids recorded in the image, which `bounds` checked against its owner
//! before anything was made, so the restored process never gets more than its owner could
//! have. Capabilities are not carried: dropping from uid 0 to another uid clears them as
//! usual; an image that was itself uid 0 (a root owner's, or trusted) keeps the restorer's.

use anyhow::{bail, Result};

use crate::inject::{Call, Injector};
use crate::state::{Proc, State};
use telefork_image::{Creds, ProcessImage};

/// The credentials, as one kind of state (`State`).
pub(crate) struct Credentials;

impl State for Credentials {
    type Image = Creds;
    type Source<'a> = Proc<'a>;

    fn capture(from: Proc<'_>) -> Result<Creds> {
        let s = from.status;
        Ok(Creds { uid: s.uid, gid: s.gid, groups: s.groups.clone() })
    }

    /// Runs last of all the per-process steps (see `set`).
    fn restore(inj: &mut Injector, img: &ProcessImage) -> Result<()> {
        set(inj, &img.creds, img.attrs.dumpable.unwrap_or(1))
    }
}

/// Runs last: drops the process to the image's identity. Sets the image's credentials in one
/// batch (with the calls deferred before it, which may need the restorer's privilege):
/// groups, gids, uids — in that order, as each step gives up some privilege the next
/// needs — and dumpable again.
fn set(inj: &mut Injector, c: &Creds, dumpable: u32) -> Result<()> {
    if dumpable > 1 {
        bail!("image is corrupt: dumpable {dumpable}");
    }
    let [ruid, euid, suid, fsuid] = c.uid;
    let [rgid, egid, sgid, fsgid] = c.gid;
    let mut calls = Vec::new();

    // Groups first, while the process still has CAP_SETGID.
    let bytes: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    let list = if bytes.is_empty() { 0 } else { inj.stage(&bytes)? };
    calls.push(Call::new(
        libc::SYS_setgroups,
        &[c.groups.len() as u64, list],
        format!("restoring supplementary groups {:?}: setgroups", c.groups),
    ));
    calls.push(Call::new(
        libc::SYS_setresgid,
        &[rgid as u64, egid as u64, sgid as u64],
        format!("restoring gids {rgid}/{egid}/{sgid}: setresgid"),
    ));
    // setresgid set fsgid = egid; a different fsgid must be set while we are still
    // privileged. setfsgid returns the previous value and never fails, so it is read back
    // (a second call with an invalid id changes nothing) and checked after the batch.
    let mut read_back = Vec::new();
    if fsgid != egid {
        calls.push(Call::new(libc::SYS_setfsgid, &[fsgid as u64], "restoring fsgid: setfsgid"));
        calls.push(Call::new(libc::SYS_setfsgid, &[u32::MAX as u64], "reading fsgid: setfsgid"));
        read_back.push((calls.len() - 1, fsgid, "fsgid"));
    }
    calls.push(Call::new(
        libc::SYS_setresuid,
        &[ruid as u64, euid as u64, suid as u64],
        format!("restoring uids {ruid}/{euid}/{suid}: setresuid"),
    ));
    if fsuid != euid {
        // Allowed without privilege when fsuid is one of the real/effective/saved uids,
        // which is the only way the original could have had it unless it was privileged.
        calls.push(Call::new(libc::SYS_setfsuid, &[fsuid as u64], "restoring fsuid: setfsuid"));
        calls.push(Call::new(libc::SYS_setfsuid, &[u32::MAX as u64], "reading fsuid: setfsuid"));
        read_back.push((calls.len() - 1, fsuid, "fsuid"));
    }
    // Changing the euid made the process non-dumpable, which makes its /proc files
    // root-owned and forbids its owner to ptrace it: it gets back what it had (an ordinary
    // process is dumpable; one that made itself not, to keep its secrets, stays so).
    calls.push(Call::new(
        libc::SYS_prctl,
        &[libc::PR_SET_DUMPABLE as u64, dumpable as u64],
        format!("prctl(PR_SET_DUMPABLE, {dumpable})"),
    ));
    let results = inj.run_batch(&calls)?;
    for (i, want, what) in read_back {
        let now = results.get(i).copied().unwrap_or(u64::MAX) as u32;
        if now != want {
            bail!("restoring {what} {want}: the kernel kept {now}");
        }
    }
    Ok(())
}
