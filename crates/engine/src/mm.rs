//! The mm fields: where code, data, heap (brk), stack, arguments and environment live, the
//! auxiliary vector and the /proc/PID/exe link. They are what /proc/PID/cmdline, environ,
//! auxv and exe show, and what brk()/sbrk() grow from.
//!
//! Captured from /proc/PID/stat (fields 26–28, 45–51), /proc/PID/auxv, /proc/PID/exe and an
//! injected brk(0) (the current break is in no /proc file). Restored in one
//! prctl(PR_SET_MM, PR_SET_MM_MAP) — setting brk from outside any other way is unreliable.

use std::os::unix::fs::MetadataExt;

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;
use telefork_image::{FileId, MmFields, ProcessImage};

use crate::inject::{Call, Injector};
use crate::state::{Proc, State};

/// The injected call whose result is the current break (brk(0)), for the capture's batch.
pub fn brk_call() -> Call {
    Call::new(libc::SYS_brk, &[0], "reading the program break (brk(0))")
}

/// The mm fields, as one kind of state (`State`). Captured from /proc but for the break,
/// which the capture's batch reads (`brk_call`) and the capture sets.
pub(crate) struct Mm;

impl State for Mm {
    type Image = MmFields;
    type Source<'a> = Proc<'a>;

    fn capture(from: Proc<'_>) -> Result<MmFields> {
        capture(from.pid, from.stat)
    }

    fn restore(inj: &mut Injector, img: &ProcessImage) -> Result<()> {
        set(inj, &img.mm)
    }
}

/// The mm fields of stopped process `pid` that /proc shows (`stat`: its /proc/PID/stat, read
/// by the caller): all but `brk`, left 0 for the caller to set from what `brk_call` returned.
fn capture(pid: Pid, stat: &crate::procfs::Stat) -> Result<MmFields> {
    let auxv = crate::procfs::read_auxv(pid)?;
    let (exe, st) = crate::procfs::read_exe(pid)?;
    if exe.ends_with(" (deleted)") {
        let what = format!("the executable of process {pid} ({exe})");
        return Err(crate::error::refusal(what, "was deleted; it cannot be restored"));
    }
    Ok(MmFields {
        start_code: stat.num(26)?,
        end_code: stat.num(27)?,
        start_stack: stat.num(28)?,
        start_data: stat.num(45)?,
        end_data: stat.num(46)?,
        start_brk: stat.num(47)?,
        brk: 0,
        arg_start: stat.num(48)?,
        arg_end: stat.num(49)?,
        env_start: stat.num(50)?,
        env_end: stat.num(51)?,
        auxv,
        exe_id: Some(FileId {
            path: exe.clone(),
            dev: st.dev(),
            ino: st.ino(),
            size: st.size(),
            mtime_sec: st.mtime(),
            mtime_nsec: st.mtime_nsec(),
        }),
        exe,
    })
}

/// The bytes of a `struct prctl_mm_map` (<linux/prctl.h>): eleven addresses, the auxv's
/// address, then its size and the exe fd as 32-bit words — 104 bytes, no padding.
fn prctl_mm_map(mm: &MmFields, auxv: u64, auxv_size: u32, exe_fd: u32) -> Vec<u8> {
    let words = [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv,
    ];
    let mut b: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    b.extend_from_slice(&auxv_size.to_ne_bytes());
    b.extend_from_slice(&exe_fd.to_ne_bytes());
    b
}

/// Sets all mm fields at once; must run while the process still has CAP_SYS_ADMIN (before
/// credentials are dropped) and after its mappings exist.
fn set(inj: &mut Injector, mm: &MmFields) -> Result<()> {
    if mm.auxv.len() > 64 || mm.auxv.is_empty() {
        bail!("image is corrupt: auxiliary vector of {} words", mm.auxv.len());
    }
    inj.reset_scratch();
    let exe_fd = match &mm.exe_id {
        Some(id) => {
            crate::pages::layout::check_file(id, "executable")?;
            let path = inj.stage_cstr(&id.path)?;
            let open = Call::new(
                libc::SYS_openat,
                &[libc::AT_FDCWD as u64, path, (libc::O_RDONLY | libc::O_CLOEXEC) as u64],
                format!("opening the executable {:?}", id.path),
            );
            // (A batch of one: the calls deferred before run with it.)
            inj.run_batch(&[open])?
                .first()
                .copied()
                .context("internal error: no result of opening the executable")?
        }
        None => u32::MAX as u64,
    };
    let auxv_bytes: Vec<u8> = mm.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
    let auxv = inj.stage(&auxv_bytes)?;
    let map = prctl_mm_map(mm, auxv, auxv_bytes.len() as u32, exe_fd as u32);
    let bytes = map.as_slice();
    let addr = inj.stage(bytes)?;
    let mut calls = vec![Call::new(
        libc::SYS_prctl,
        &[libc::PR_SET_MM as u64, libc::PR_SET_MM_MAP as u64, addr, bytes.len() as u64, 0],
        "setting the mm fields (prctl PR_SET_MM_MAP)",
    )];
    if exe_fd != u32::MAX as u64 {
        // (If the prctl fails the fd stays open: the half-made process is killed anyway.)
        calls.push(Call::new(libc::SYS_close, &[exe_fd], "closing the executable"));
    }
    // (Nothing waits for them: they run with the next batch.)
    inj.defer(calls);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes are `struct prctl_mm_map` as the kernel reads it: 104 bytes, the auxv
    /// pointer at 88, its size at 96 and the exe fd at 100.
    #[test]
    fn prctl_mm_map_layout() {
        let mm = MmFields {
            start_code: 1,
            end_code: 2,
            start_data: 3,
            end_data: 4,
            start_brk: 5,
            brk: 6,
            start_stack: 7,
            arg_start: 8,
            arg_end: 9,
            env_start: 10,
            env_end: 11,
            auxv: vec![],
            exe: String::new(),
            exe_id: None,
        };
        let b = prctl_mm_map(&mm, 0xabc, 24, 7);
        assert_eq!(b.len(), 104);
        // (prctl_mm_map's order: code, data, brk, stack, args, env.)
        let at = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!((0..11).map(at).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(u64::from_ne_bytes(b[88..96].try_into().unwrap()), 0xabc);
        assert_eq!(u32::from_ne_bytes(b[96..100].try_into().unwrap()), 24);
        assert_eq!(u32::from_ne_bytes(b[100..104].try_into().unwrap()), 7);
    }
}
