//! Control-group membership: which cgroups the process had been put in, beyond those of
//! the program that captures it.
//!
//! Capture compares /proc/PID/cgroup with the capturer's own and records each hierarchy
//! (v1 controllers or `name=…`, or v2) where the process sits elsewhere. A restore that is
//! asked to (`RestoreOptions::join_cgroups`: a local `telefork restore`) puts the new process
//! into each of them again before it runs, by writing its PID into the cgroup's
//! `cgroup.procs`, and refuses the restore by name where the cgroup does not exist here, its
//! hierarchy is not mounted, or the image's owner could not have joined it (a non-root
//! owner joins only cgroups delegated to them). A restore that is not asked — a daemon
//! receiving a process from another node, whose cgroups are that node's — leaves it in the
//! restorer's cgroups. The cgroups themselves (their limits and settings) are the
//! machine's, not the process's: they are not captured.

use std::os::unix::fs::MetadataExt;

use anyhow::{Context, Result};
use nix::unistd::Pid;
use telefork_image::CgroupMembership;

/// One line of /proc/PID/cgroup: (controllers, path); v2 has no controllers ("").
fn parse(text: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            anyhow::bail!("bad cgroup line {line:?}");
        };
        out.push((controllers.to_string(), path.to_string()));
    }
    Ok(out)
}

fn read(pid: &str) -> Result<Vec<(String, String)>> {
    let path = format!("/proc/{pid}/cgroup");
    let text = crate::procfs::read_text(&path).with_context(|| format!("reading {path}"))?;
    parse(&text).with_context(|| format!("parsing {path}"))
}

/// The cgroups this process is in (`capture` compares against them).
pub(crate) fn own() -> Result<Vec<(String, String)>> {
    read("self")
}

/// The cgroups process `pid` is in where the capturer (`ours`, from `own`) is not.
pub(crate) fn capture(pid: Pid, ours: &[(String, String)]) -> Result<Vec<CgroupMembership>> {
    let theirs = read(&pid.to_string())?;
    Ok(theirs
        .into_iter()
        .filter(|(c, p)| !ours.iter().any(|(oc, op)| oc == c && op == p))
        .map(|(controllers, path)| CgroupMembership { controllers, path })
        .collect())
}

/// Where hierarchy `controllers` ("" for v2) is mounted here.
fn mount_point(controllers: &str) -> Result<Option<String>> {
    let text = crate::procfs::read_text("/proc/self/mountinfo").context("reading mountinfo")?;
    for line in text.lines() {
        // ... mount-point ... - fstype source super-options
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let mut r = right.split_whitespace();
        let (Some(fstype), Some(_), Some(opts)) = (r.next(), r.next(), r.next()) else {
            continue;
        };
        let Some(mount) = left.split_whitespace().nth(4) else { continue };
        let root = left.split_whitespace().nth(3).unwrap_or("/");
        if root != "/" {
            continue; // a bind mount of a part of the hierarchy
        }
        let matches = match fstype {
            "cgroup2" => controllers.is_empty(),
            "cgroup" if !controllers.is_empty() => {
                let opts: Vec<&str> = opts.split(',').collect();
                controllers.split(',').all(|c| opts.contains(&c))
            }
            _ => false,
        };
        if matches {
            return Ok(Some(mount.replace("\\040", " ")));
        }
    }
    Ok(None)
}

/// Puts process `pid` into the image's cgroups; `owner_uid` is the uid whose rights bound
/// the restore (`None`: not bounded).
pub(crate) fn join(pid: Pid, cgroups: &[CgroupMembership], owner_uid: Option<u32>) -> Result<()> {
    for cg in cgroups {
        let hierarchy = if cg.controllers.is_empty() { "v2" } else { &cg.controllers };
        let what = format!("the process's cgroup {hierarchy}:{}", cg.path);
        if !cg.path.starts_with('/') || cg.path.split('/').any(|c| c == "..") {
            anyhow::bail!("image is corrupt: cgroup path {:?}", cg.path);
        }
        let Some(mount) = mount_point(&cg.controllers)? else {
            return Err(crate::error::refusal(what, "that hierarchy is not mounted here"));
        };
        let dir = format!("{mount}{}", cg.path);
        let procs = format!("{dir}/cgroup.procs");
        let meta = match std::fs::metadata(&procs) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(crate::error::refusal(
                    what,
                    &format!("{dir} does not exist here: cgroups are the machine's, and are not created by a restore"),
                ))
            }
            Err(e) => return Err(e).with_context(|| format!("{what}: {procs}")),
        };
        if let Some(uid) = owner_uid.filter(|&u| u != 0 && meta.uid() != u) {
            return Err(crate::error::refusal(
                what,
                &format!("{procs} is not delegated to the image's owner (uid {uid})"),
            ));
        }
        std::fs::write(&procs, pid.as_raw().to_string())
            .with_context(|| format!("joining {what}: writing {procs}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let l = parse("11:name=zdtmtst:/sub\n4:memory:/a/b\n0::/user.slice\n").unwrap();
        assert_eq!(l[0], ("name=zdtmtst".into(), "/sub".into()));
        assert_eq!(l[2], ("".into(), "/user.slice".into()));
        assert!(parse("garbage\n").is_err());
    }
}
