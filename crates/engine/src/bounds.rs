//! What a restore may grant: never more than the image's owner could have had on this machine.
//!
//! The restorer is usually root (the CLI's `restore`, the daemon) and builds the process with
//! root's power — credentials, nice value, resource limits, mappings below
//! `vm.mmap_min_addr` — so an image must not be able to ask for what its owner could not
//! have arranged alone. The owner is who vouches for the image: the owner of the image file
//! (`telefork restore`), or the user an authenticated sending node vouched for (the daemon).
//! `check_image_within_owner` holds every rule in one place and runs before anything of the
//! restore is created; each refusal is a [`BeyondOwner`] naming the item. An owner that is
//! root could have had anything, so a root-owned image is not bounded (nor, for a root
//! restorer, one restored without an owner: `telefork restore --trust-image`).
//!
//! The rules, per item (an unprivileged process of the owner is the measure):
//! - uids (real, effective, saved, filesystem): each is the owner's uid;
//! - gids (real, effective, saved, filesystem) and supplementary groups: each is one of the
//!   owner's groups here (`getgrouplist` of its name with its primary gid);
//! - nice: not below the lower of the restorer's own nice value (what a process it starts
//!   begins with) and 20 − the image's soft RLIMIT_NICE (how far an unprivileged process may
//!   lower it, `setpriority(2)`);
//! - resource limits: each hard limit at most the restorer's own (raising a hard limit needs
//!   CAP_SYS_RESOURCE; the restorer's limits stand for what a user gets here), soft ≤ hard;
//! - mappings: none below `vm.mmap_min_addr` (needs CAP_SYS_RAWIO).
//!
//! What the restore does with root's power besides, and why each stays within the owner:
//! files (mapped, the executable, the cwd, fds) are opened in the new process with the
//! image's filesystem ids and groups — checked above — and the files' identity is checked
//! here as them too (`with_files_reached_as`, so a stat as root cannot tell an image about
//! files its owner cannot reach); the executable link set by PR_SET_MM_MAP is such a file,
//! which the kernel also requires its opener may execute; the other mm fields must lie in
//! the process's own mappings (the kernel checks); madvise advice is limited to what capture
//! records (`pages::layout::validate`: MADV_HWPOISON and MADV_SOFT_OFFLINE need CAP_SYS_ADMIN);
//! personality(2) checks nothing for anyone, and signals re-queued by the process to itself
//! are what any process may queue to itself. The one grant on purpose is the PID: the image's
//! PID when it is free (clone3 set_tid), as a restore promises.

use anyhow::{Context, Result};
use telefork_image::{Creds, ProcessImage, SpecialMap, VmaKind};

use crate::misc::rlimit_name;
use crate::sys;

/// An image asking for more than its owner could have had: the refusal, naming the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeyondOwner(pub String);

impl std::fmt::Display for BeyondOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BeyondOwner {}

/// Who an image belongs to, with the groups that user has on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    /// Every group the owner may act as here (its primary group included).
    pub groups: Vec<u32>,
}

impl Owner {
    /// User `uid` with group `gid` (the image file's group, or the vouched one): its groups
    /// are its primary group and the supplementary groups of its name here (and `gid` where
    /// it is one of those); just `gid` for a uid this machine does not know.
    pub fn of(uid: u32, gid: u32) -> Owner {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten();
        let groups = match user {
            Some(u) => {
                let primary = u.gid.as_raw();
                let mut groups: Vec<u32> = std::ffi::CString::new(u.name)
                    .ok()
                    .and_then(|name| nix::unistd::getgrouplist(&name, u.gid).ok())
                    .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                    .unwrap_or_default();
                groups.push(primary);
                groups
            }
            None => vec![gid],
        };
        Owner { uid, gid, groups }
    }

    /// The restoring process itself: its effective ids and its groups.
    pub fn restorer() -> Owner {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let mut groups: Vec<u32> = nix::unistd::getgroups()
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        groups.push(gid);
        Owner { uid, gid, groups }
    }
}

/// What this machine and this restorer allow, read once per restore.
#[derive(Debug, Clone)]
pub struct Here {
    /// `vm.mmap_min_addr`.
    pub mmap_min_addr: u64,
    /// The restorer's own (soft, hard) limits, by RLIMIT number.
    pub limits: Vec<(u64, u64)>,
    /// The restorer's nice value.
    pub nice: i32,
    /// The restorer's effective uid.
    pub restorer_uid: u32,
}

impl Here {
    pub fn read() -> Result<Here> {
        let mmap_min_addr = crate::procfs::mmap_min_addr()?;
        let mut limits = vec![(u64::MAX, u64::MAX); 16];
        for (res, slot) in limits.iter_mut().enumerate() {
            *slot = crate::sys::getrlimit(res as u32)
                .with_context(|| format!("reading our own {}", rlimit_name(res as u32)))?;
        }
        let nice = rustix::process::getpriority_process(None)
            .context("reading our own nice value: getpriority")?;
        Ok(Here { mmap_min_addr, limits, nice, restorer_uid: nix::unistd::geteuid().as_raw() })
    }
}

/// Refuses an image that asks for more than `owner` could have had here (see the module's
/// rules); a root owner could have had anything.
pub fn check_image_within_owner(img: &ProcessImage, owner: &Owner) -> Result<()> {
    if owner.uid == 0 {
        return Ok(());
    }
    check_within(img, owner, &Here::read()?)
}

fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("user {uid} ({})", u.name),
        _ => format!("user {uid}"),
    }
}

fn group_name(gid: u32) -> String {
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(g)) => format!("{gid} ({})", g.name),
        _ => gid.to_string(),
    }
}

fn uid_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("{uid} ({})", u.name),
        _ => uid.to_string(),
    }
}

fn fmt_limit(v: u64) -> String {
    if v == u64::MAX {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// The rules, against what `here` allows (a non-root `owner`).
pub fn check_within(img: &ProcessImage, owner: &Owner, here: &Here) -> Result<()> {
    let refuse = |msg: String| -> Result<()> { Err(BeyondOwner(msg).into()) };
    let who = user_name(owner.uid);
    // (A restorer without privilege can give a process only its own identity.)
    if here.restorer_uid != 0 && here.restorer_uid != owner.uid {
        return refuse(format!(
            "the image belongs to {who}; {} may restore only its own images",
            user_name(here.restorer_uid)
        ));
    }
    const WHICH: [&str; 4] = ["real", "effective", "saved", "filesystem"];
    let c = &img.creds;
    for (which, uid) in WHICH.iter().zip(c.uid) {
        if uid != owner.uid {
            return refuse(format!(
                "image claims {which} uid {}, but it belongs to {who}, who cannot take another uid",
                uid_name(uid)
            ));
        }
    }
    for (which, gid) in WHICH.iter().zip(c.gid) {
        if !owner.groups.contains(&gid) {
            return refuse(format!(
                "image claims {which} gid {}, which {who} does not have on this machine",
                group_name(gid)
            ));
        }
    }
    if c.groups.len() > 65536 {
        return refuse(format!(
            "image claims {} supplementary groups, more than the kernel allows",
            c.groups.len()
        ));
    }
    for g in &c.groups {
        if !owner.groups.contains(g) {
            return refuse(format!(
                "image claims supplementary group {}, which {who} does not have on this machine",
                group_name(*g)
            ));
        }
    }

    let m = &img.misc;
    for l in &m.rlimits {
        let name = rlimit_name(l.resource);
        let Some(&(_, max)) = here.limits.get(l.resource as usize) else {
            return refuse(format!(
                "image claims a limit on resource {}, which this kernel does not have",
                l.resource
            ));
        };
        if l.soft > l.hard {
            return refuse(format!(
                "image claims a soft {name} of {} above its hard limit {}",
                fmt_limit(l.soft),
                fmt_limit(l.hard)
            ));
        }
        if l.hard > max {
            return refuse(format!(
                "image claims a hard {name} of {}, above {}, the highest {who} can have here (the restorer's own hard limit)",
                fmt_limit(l.hard),
                fmt_limit(max)
            ));
        }
    }
    // setpriority(2) without CAP_SYS_NICE: a nice value below the current one only down to
    // 20 - RLIMIT_NICE (soft). The process starts with the restorer's.
    let nice_rlim = match m.rlimits.iter().find(|l| l.resource == libc::RLIMIT_NICE) {
        Some(l) => l.soft,
        None => here.limits.get(libc::RLIMIT_NICE as usize).map_or(0, |l| l.0),
    };
    let by_rlimit = 20 - nice_rlim.min(40) as i32;
    let lowest = here.nice.min(by_rlimit).max(-20);
    if m.nice < lowest {
        return refuse(format!(
            "image claims nice value {}, below {lowest}, the lowest {who} could set here (a process starts at the restorer's {}, and its RLIMIT_NICE of {} lets it down to {by_rlimit})",
            m.nice,
            here.nice,
            fmt_limit(nice_rlim)
        ));
    }
    // Real-time scheduling within RLIMIT_RTPRIO; no real-time I/O class.
    if let Some(sc) = &img.attrs.sched {
        if sc.policy == libc::SCHED_FIFO || sc.policy == libc::SCHED_RR {
            let rtprio = match m.rlimits.iter().find(|l| l.resource == libc::RLIMIT_RTPRIO) {
                Some(l) => l.soft,
                None => here.limits.get(libc::RLIMIT_RTPRIO as usize).map_or(0, |l| l.0),
            };
            if sc.priority as u64 > rtprio {
                return refuse(format!(
                    "image claims real-time priority {}, above its RLIMIT_RTPRIO of {}",
                    sc.priority,
                    fmt_limit(rtprio)
                ));
            }
        }
    }
    if img.attrs.ioprio >> 13 == 1 {
        return refuse("image claims the real-time I/O class, which only root grants".into());
    }
    // Capabilities: only root grants them.
    if let Some(caps) = &c.caps {
        let none = crate::creds::natural_caps(owner.uid);
        let granted = (caps.permitted | caps.effective | caps.inheritable | caps.ambient)
            & !(none.permitted | none.effective | none.inheritable | none.ambient);
        if granted != 0 {
            return refuse(format!(
                "image claims capabilities {granted:#x}, which {who} does not have (only root \
                 grants them)"
            ));
        }
    }
    // Process attributes that need privilege to set (the restorer's, which the process
    // still has when they are set).
    let a = &img.attrs;
    if a.oom_score_adj < 0 {
        return refuse(format!(
            "image claims oom_score_adj {}: only a privileged process lowers it below 0",
            a.oom_score_adj
        ));
    }
    if let Some(uid) = a.loginuid {
        if uid != owner.uid && uid != u32::MAX && uid != crate::attrs::restorer_loginuid() {
            return refuse(format!("image claims audit login uid {}, not {who}'s", uid_name(uid)));
        }
    }
    if a.memory_merge {
        return refuse(
            "image claims KSM for the whole process (PR_SET_MEMORY_MERGE), which needs \
             CAP_SYS_RESOURCE"
                .to_string(),
        );
    }
    // Locked memory within RLIMIT_MEMLOCK (mlock2 without CAP_IPC_LOCK).
    let locked: u64 =
        img.vmas.iter().filter(|v| v.flags.lock.is_some()).map(|v| v.end - v.start).sum();
    let memlock = match m.rlimits.iter().find(|l| l.resource == libc::RLIMIT_MEMLOCK) {
        Some(l) => l.soft,
        None => here.limits.get(libc::RLIMIT_MEMLOCK as usize).map_or(0, |l| l.0),
    };
    if locked > memlock {
        return refuse(format!(
            "image claims {locked} bytes of locked memory (mlock), above its RLIMIT_MEMLOCK of {}",
            fmt_limit(memlock)
        ));
    }
    for v in &img.vmas {
        if matches!(v.kind, VmaKind::Special(SpecialMap::Vsyscall)) {
            continue; // (the kernel's own, far above user space)
        }
        if v.start < here.mmap_min_addr {
            return refuse(format!(
                "image claims a mapping at {:#x}-{:#x}, below vm.mmap_min_addr ({:#x}), where {who} may not map anything",
                v.start, v.end, here.mmap_min_addr
            ));
        }
    }
    Ok(())
}

/// Runs `f` reaching files as the image's process will: with the image's filesystem uid and
/// gid and its supplementary groups, on this thread, and back to ours after (Linux
/// credentials are per thread, and the raw system calls change only the caller's — glibc's
/// setgroups would change every thread's; a filesystem uid back to 0 gets its capabilities
/// back). A restorer that is not root, or an image with filesystem uid 0, runs `f` as we are.
pub fn with_files_reached_as<T>(c: &Creds, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !nix::unistd::geteuid().is_root() || c.uid[3] == 0 {
        return f();
    }
    let switched = Switched(Some(FsIds::current()?));
    let theirs = FsIds { uid: c.uid[3], gid: c.gid[3], groups: c.groups.clone() };
    theirs.take().context("taking the image's filesystem ids to look at its files")?;
    let r = f();
    switched
        .back()
        .context("taking our own filesystem ids back after looking at the image's files")?;
    r
}

/// The filesystem side of a thread's credentials.
struct FsIds {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl FsIds {
    fn current() -> Result<FsIds> {
        let groups = nix::unistd::getgroups()
            .context("getgroups")?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        // setfsuid/setfsgid with an invalid id change nothing and return the current one.
        let (uid, gid) = (sys::setfsuid(u32::MAX), sys::setfsgid(u32::MAX));
        Ok(FsIds { uid, gid, groups })
    }

    /// Makes these this thread's: groups, gid, uid, in that order (each step may give up
    /// privilege the next needs), each checked.
    fn take(&self) -> Result<()> {
        sys::set_thread_groups(&self.groups).context("setgroups")?;
        // (They return the previous id and never fail: read back with an invalid id.)
        sys::setfsgid(self.gid);
        let gid = sys::setfsgid(u32::MAX);
        sys::setfsuid(self.uid);
        let uid = sys::setfsuid(u32::MAX);
        if gid != self.gid || uid != self.uid {
            anyhow::bail!(
                "the kernel kept filesystem ids {}:{} instead of {}:{}",
                uid,
                gid,
                self.uid,
                self.gid
            );
        }
        Ok(())
    }
}

/// Our own filesystem ids, put back by `back`, or on drop should the look at the files fail
/// or panic half way.
struct Switched(Option<FsIds>);

impl Switched {
    fn back(mut self) -> Result<()> {
        self.0.take().map_or(Ok(()), |ours| ours.take())
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        if let Some(ours) = self.0.take() {
            if let Err(e) = ours.take() {
                // (Going on with another user's filesystem ids is not an option.)
                tracing::error!("taking our own filesystem ids back: {e:#}");
                std::process::abort();
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use telefork_image::{Misc, MmFields, Rlimit, Vma};

    /// A minimal image of a process of `uid`/`gid` with `groups` (also for restore's tests).
    pub(crate) fn image(uid: u32, gid: u32, groups: Vec<u32>) -> ProcessImage {
        ProcessImage {
            pid: 1,
            comm: "t".into(),
            creds: Creds { uid: [uid; 4], gid: [gid; 4], groups, caps: None },
            misc: Misc {
                cwd: "/".into(),
                umask: 0,
                nice: 0,
                personality: 0,
                rlimits: vec![],
                no_new_privs: false,
            },
            mm: MmFields {
                start_code: 0,
                end_code: 0,
                start_data: 0,
                end_data: 0,
                start_brk: 0,
                brk: 0,
                start_stack: 0,
                arg_start: 0,
                arg_end: 0,
                env_start: 0,
                env_end: 0,
                auxv: vec![],
                exe: String::new(),
                exe_id: None,
            },
            vmas: vec![],
            threads: vec![],
            sigactions: vec![],
            shared_pending: vec![],
            fds: vec![],
            timers: Default::default(),
            attrs: Default::default(),
            locks: vec![],
        }
    }

    fn here() -> Here {
        let mut limits = vec![(u64::MAX, u64::MAX); 16];
        limits[libc::RLIMIT_NOFILE as usize] = (1024, 20000);
        limits[libc::RLIMIT_NICE as usize] = (0, 0);
        Here { mmap_min_addr: 65536, limits, nice: 0, restorer_uid: 0 }
    }

    fn owner() -> Owner {
        Owner { uid: 1000, gid: 1000, groups: vec![1000, 27] }
    }

    fn refusal(img: &ProcessImage) -> String {
        let e = check_within(img, &owner(), &here()).unwrap_err();
        assert!(e.downcast_ref::<BeyondOwner>().is_some(), "not a BeyondOwner: {e}");
        e.to_string()
    }

    #[test]
    fn an_honest_image_passes() {
        let mut img = image(1000, 1000, vec![27]);
        img.creds.gid[0] = 27; // (any of the owner's groups, as after newgrp)
        img.misc.nice = 5;
        img.misc.rlimits = vec![Rlimit { resource: libc::RLIMIT_NOFILE, soft: 1024, hard: 20000 }];
        img.vmas = vec![Vma {
            start: 65536,
            end: 69632,
            prot: 3,
            shared: false,
            offset: 0,
            kind: VmaKind::Anon,
            growsdown: false,
            accounted: true,
            advice: vec![],
            flags: Default::default(),
        }];
        check_within(&img, &owner(), &here()).unwrap();
    }

    #[test]
    fn each_id_is_named() {
        for i in 0..4 {
            let mut img = image(1000, 1000, vec![]);
            img.creds.uid[i] = 0;
            let e = refusal(&img);
            assert!(
                e.contains(["real", "effective", "saved", "filesystem"][i]) && e.contains("uid 0"),
                "{e}"
            );
            let mut img = image(1000, 1000, vec![]);
            img.creds.gid[i] = 42;
            let e = refusal(&img);
            assert!(
                e.contains(["real", "effective", "saved", "filesystem"][i]) && e.contains("gid 42"),
                "{e}"
            );
        }
        let e = refusal(&image(1000, 1000, vec![27, 42]));
        assert!(e.contains("supplementary group 42"), "{e}");
    }

    #[test]
    fn nice_limits_and_mappings() {
        let mut img = image(1000, 1000, vec![]);
        img.misc.nice = -1;
        assert!(refusal(&img).contains("nice value -1"));
        // With RLIMIT_NICE 25 (soft and hard within the restorer's), down to -5.
        let mut h = here();
        h.limits[libc::RLIMIT_NICE as usize] = (30, 30);
        img.misc.rlimits = vec![Rlimit { resource: libc::RLIMIT_NICE, soft: 25, hard: 25 }];
        img.misc.nice = -5;
        check_within(&img, &owner(), &h).unwrap();
        img.misc.nice = -6;
        assert!(check_within(&img, &owner(), &h).is_err());

        let mut img = image(1000, 1000, vec![]);
        img.misc.rlimits = vec![Rlimit { resource: libc::RLIMIT_NOFILE, soft: 1024, hard: 20001 }];
        let e = refusal(&img);
        assert!(e.contains("RLIMIT_NOFILE") && e.contains("20001") && e.contains("20000"), "{e}");
        img.misc.rlimits = vec![Rlimit { resource: libc::RLIMIT_NOFILE, soft: 2000, hard: 1000 }];
        assert!(refusal(&img).contains("soft RLIMIT_NOFILE"));

        let mut img = image(1000, 1000, vec![]);
        img.vmas = vec![Vma {
            start: 0,
            end: 4096,
            prot: 3,
            shared: false,
            offset: 0,
            kind: VmaKind::Anon,
            growsdown: false,
            accounted: true,
            advice: vec![],
            flags: Default::default(),
        }];
        let e = refusal(&img);
        assert!(e.contains("0x0-0x1000") && e.contains("mmap_min_addr"), "{e}");
    }

    #[test]
    fn an_unprivileged_restorer_restores_only_its_own() {
        let mut h = here();
        h.restorer_uid = 1001;
        let e = check_within(&image(1000, 1000, vec![]), &owner(), &h).unwrap_err().to_string();
        assert!(e.contains("only its own"), "{e}");
        h.restorer_uid = 1000;
        check_within(&image(1000, 1000, vec![]), &owner(), &h).unwrap();
    }

    /// Files are looked at with the image's filesystem ids, and ours are back after, on this
    /// thread (root: this test runs as the restorer would).
    #[test]
    fn files_are_looked_at_as_the_image_and_our_ids_come_back() {
        use std::os::unix::fs::PermissionsExt;
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test switches filesystem ids: run it as root"
        );
        let dir = std::env::temp_dir().join(format!("telefork-bounds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, b"x").unwrap();
        let before = (
            FsIds::current().unwrap().uid,
            FsIds::current().unwrap().gid,
            nix::unistd::getgroups().unwrap(),
        );
        let nobody = Creds { uid: [65534; 4], gid: [65534; 4], groups: vec![65534], caps: None };
        let seen =
            with_files_reached_as(&nobody, || Ok(std::fs::metadata(&file).map_err(|e| e.kind())));
        let after = (
            FsIds::current().unwrap().uid,
            FsIds::current().unwrap().gid,
            nix::unistd::getgroups().unwrap(),
        );
        let ours = std::fs::metadata(&file).is_ok();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            seen.unwrap().unwrap_err(),
            std::io::ErrorKind::PermissionDenied,
            "nobody looked into a 0700 root directory"
        );
        assert_eq!(before, after, "our filesystem ids and groups did not come back");
        assert!(ours, "we cannot look at our own file after");
        // (An error inside puts them back too.)
        let e = with_files_reached_as(&nobody, || -> Result<()> { anyhow::bail!("inside") });
        assert!(e.is_err());
        assert_eq!(
            before,
            (
                FsIds::current().unwrap().uid,
                FsIds::current().unwrap().gid,
                nix::unistd::getgroups().unwrap()
            )
        );
    }

    #[test]
    fn a_root_owner_is_not_bounded() {
        let mut img = image(0, 42, vec![42]);
        img.misc.nice = -20;
        check_image_within_owner(&img, &Owner { uid: 0, gid: 0, groups: vec![0] }).unwrap();
    }
}
