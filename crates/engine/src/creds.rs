//! Credentials: real, effective, saved and filesystem user and group ids, and the
//! supplementary groups.
//!
//! Capture takes them from the `Uid:`, `Gid:` and `Groups:` lines of /proc/PID/status (no
//! system call in the target is needed). Restore runs *last* of all the per-process steps,
//! because it drops the restored process from the restorer's identity (root) to the image's:
//! setgroups, setresgid, setfsgid, setresuid, setfsuid, injected into the process itself. We
//! only ever set the ids recorded in the image, which `bounds` checked against its owner
//! before anything was made, so the restored process never gets more than its owner could
//! have.
//!
//! Capabilities travel too (the `Cap*:` lines of status, and the securebits): a process
//! whose sets are what a change of uid gives anyway (root: all; anyone else: none) costs
//! nothing more; any other — a root daemon that dropped capabilities, a bounding set with
//! bits dropped, a non-root process that kept some (only a root-owned image may) — gets its
//! bounding set trimmed and its securebits (with SECBIT_KEEP_CAPS for the while) before the
//! uids change, and capset plus ambient raises after, in the same batch.

use anyhow::{bail, Result};

use crate::inject::{Call, Injector};
use crate::state::{Proc, State};
use telefork_image::{Caps, Creds, ProcessImage};

/// The credentials, as one kind of state (`State`).
pub(crate) struct Credentials;

impl State for Credentials {
    type Image = Creds;
    type Source<'a> = Proc<'a>;

    fn capture(from: Proc<'_>) -> Result<Creds> {
        let s = from.status;
        let caps = s.caps.map(|[inheritable, permitted, effective, bounding, ambient]| Caps {
            inheritable,
            permitted,
            effective,
            bounding,
            ambient,
        });
        Ok(Creds { uid: s.uid, gid: s.gid, groups: s.groups.clone(), caps })
    }

    /// Runs last of all the per-process steps (see `set`).
    fn restore(inj: &mut Injector, img: &ProcessImage) -> Result<()> {
        set(inj, &img.creds, img.attrs.dumpable.unwrap_or(1), img.attrs.securebits)
    }
}

/// Runs last: drops the process to the image's identity. Sets the image's credentials in one
/// batch (with the calls deferred before it, which may need the restorer's privilege):
/// groups, gids, uids — in that order, as each step gives up some privilege the next
/// needs — and dumpable again.
fn set(inj: &mut Injector, c: &Creds, dumpable: u32, securebits: u32) -> Result<()> {
    if dumpable > 1 {
        bail!("image is corrupt: dumpable {dumpable}");
    }
    let [ruid, euid, suid, fsuid] = c.uid;
    let [rgid, egid, sgid, fsgid] = c.gid;
    let mut calls = Vec::new();
    let caps = CapsPlan::new(c, securebits)?;
    if let Some(plan) = &caps {
        calls.extend(plan.before_ids());
    }

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
    if let Some(plan) = &caps {
        calls.extend(plan.after_ids(inj)?);
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

const SECBIT_KEEP_CAPS: u32 = 1 << 4;
const SECBIT_KEEP_CAPS_LOCKED: u32 = 1 << 5;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Reads the capabilities the kernel knows ahead of a restore.
pub(crate) fn warm_up() {
    all_caps();
}

/// All capabilities this kernel knows (read once).
fn all_caps() -> u64 {
    static ALL: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ALL.get_or_init(|| {
        let last = crate::procfs::read_text("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .unwrap_or(40)
            .min(63);
        u64::MAX >> (63 - last)
    })
}

/// The capability sets a change to the image's uids leaves (root keeps all, anyone else
/// has none), with the full bounding set.
pub(crate) fn natural_caps(euid: u32) -> Caps {
    let all = all_caps();
    let root = if euid == 0 { all } else { 0 };
    Caps { inheritable: 0, permitted: root, effective: root, bounding: all, ambient: 0 }
}

/// What it takes to give the image's capabilities and securebits, when a change of uid
/// alone does not.
struct CapsPlan {
    caps: Caps,
    securebits: u32,
    /// SECBIT_KEEP_CAPS set for the change of uid only (the image does not have it).
    keep_caps_added: bool,
}

impl CapsPlan {
    fn new(c: &Creds, securebits: u32) -> Result<Option<CapsPlan>> {
        let all = all_caps();
        let natural = natural_caps(c.uid[1]);
        let caps = match c.caps {
            Some(caps) => Caps { bounding: caps.bounding & all, ..caps },
            None => natural,
        };
        if caps == natural && securebits == 0 {
            return Ok(None);
        }
        for (set, name) in [
            (caps.permitted, "permitted"),
            (caps.effective, "effective"),
            (caps.inheritable, "inheritable"),
            (caps.ambient, "ambient"),
        ] {
            if set & !all != 0 {
                bail!(
                    "the image's {name} capabilities {set:#x} include some this kernel does not \
                     know (it knows {all:#x})"
                );
            }
        }
        if securebits & 0xff != securebits {
            bail!("image is corrupt: securebits {securebits:#x}");
        }
        let keep_caps_added =
            securebits & (SECBIT_KEEP_CAPS | SECBIT_KEEP_CAPS_LOCKED) == 0 && caps.permitted != 0;
        Ok(Some(CapsPlan { caps, securebits, keep_caps_added }))
    }

    /// Before the uids change (the process is still the restorer's root): the bounding set
    /// trimmed, the securebits set, with SECBIT_KEEP_CAPS so that the permitted set survives
    /// the change of uid.
    fn before_ids(&self) -> Vec<Call> {
        let mut calls = Vec::new();
        let all = all_caps();
        for cap in 0..64u64 {
            if all & (1 << cap) != 0 && self.caps.bounding & (1 << cap) == 0 {
                calls.push(Call::new(
                    libc::SYS_prctl,
                    &[libc::PR_CAPBSET_DROP as u64, cap],
                    format!("dropping capability {cap} from the bounding set: prctl"),
                ));
            }
        }
        let bits = self.securebits | if self.keep_caps_added { SECBIT_KEEP_CAPS } else { 0 };
        if bits != 0 {
            calls.push(Call::new(
                libc::SYS_prctl,
                &[libc::PR_SET_SECUREBITS as u64, bits as u64],
                format!("restoring securebits {:#x}: prctl", self.securebits),
            ));
        }
        calls
    }

    /// After the uids changed: the three sets (capset), the ambient ones, and
    /// SECBIT_KEEP_CAPS off again if it was only ours.
    fn after_ids(&self, inj: &mut Injector) -> Result<Vec<Call>> {
        let c = &self.caps;
        let mut data = Vec::with_capacity(32);
        data.extend_from_slice(&LINUX_CAPABILITY_VERSION_3.to_ne_bytes());
        data.extend_from_slice(&0i32.to_ne_bytes());
        for half in [0, 32] {
            for set in [c.effective, c.permitted, c.inheritable] {
                data.extend_from_slice(&((set >> half) as u32).to_ne_bytes());
            }
        }
        let header = inj.stage(&data[..8])?;
        let sets = inj.stage(&data[8..])?;
        let mut calls = vec![Call::new(
            libc::SYS_capset,
            &[header, sets],
            format!(
                "restoring capabilities (permitted {:#x}, effective {:#x}, inheritable {:#x}): \
                 capset",
                c.permitted, c.effective, c.inheritable
            ),
        )];
        for cap in (0..64u64).filter(|cap| c.ambient & (1 << cap) != 0) {
            calls.push(Call::new(
                libc::SYS_prctl,
                &[libc::PR_CAP_AMBIENT as u64, libc::PR_CAP_AMBIENT_RAISE as u64, cap, 0, 0],
                format!("raising ambient capability {cap}: prctl"),
            ));
        }
        if self.keep_caps_added {
            calls.push(Call::new(
                libc::SYS_prctl,
                &[libc::PR_SET_KEEPCAPS as u64, 0],
                "clearing SECBIT_KEEP_CAPS again: prctl",
            ));
        }
        Ok(calls)
    }
}
