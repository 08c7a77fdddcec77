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
use telefork_image::{FileId, MmFields};

use crate::inject::{Call, Injector};

/// The injected call whose result is the current break (brk(0)), for the capture's batch.
pub fn brk_call() -> Call {
    Call::new(libc::SYS_brk, &[0], "reading the program break (brk(0))")
}

/// The mm fields of stopped process `pid` that /proc shows (`stat`: its /proc/PID/stat, read
/// by the caller): all but `brk`, left 0 for the caller to set from what `brk_call` returned.
pub fn capture(pid: Pid, stat: &crate::procfs::Stat) -> Result<MmFields> {
    let auxv_bytes = crate::procfs::read_file(&format!("/proc/{pid}/auxv"))
        .with_context(|| format!("reading /proc/{pid}/auxv"))?;
    let auxv = auxv_bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let exe_link = format!("/proc/{pid}/exe");
    let exe = std::fs::read_link(&exe_link)
        .with_context(|| format!("reading {exe_link}"))?
        .to_string_lossy()
        .into_owned();
    if exe.ends_with(" (deleted)") {
        bail!("the executable of process {pid} ({exe}) was deleted; it cannot be restored");
    }
    let st = std::fs::metadata(&exe_link).with_context(|| format!("stat {exe_link}"))?;
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

/// Mirrors `struct prctl_mm_map` of <linux/prctl.h>.
#[repr(C)]
struct PrctlMmMap {
    start_code: u64,
    end_code: u64,
    start_data: u64,
    end_data: u64,
    start_brk: u64,
    brk: u64,
    start_stack: u64,
    arg_start: u64,
    arg_end: u64,
    env_start: u64,
    env_end: u64,
    auxv: u64,
    auxv_size: u32,
    exe_fd: u32,
}

/// Sets all mm fields at once; must run while the process still has CAP_SYS_ADMIN (before
/// credentials are dropped) and after its mappings exist.
pub fn restore(inj: &mut Injector, mm: &MmFields) -> Result<()> {
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
    let map = PrctlMmMap {
        start_code: mm.start_code,
        end_code: mm.end_code,
        start_data: mm.start_data,
        end_data: mm.end_data,
        start_brk: mm.start_brk,
        brk: mm.brk,
        start_stack: mm.start_stack,
        arg_start: mm.arg_start,
        arg_end: mm.arg_end,
        env_start: mm.env_start,
        env_end: mm.env_end,
        auxv,
        auxv_size: auxv_bytes.len() as u32,
        exe_fd: exe_fd as u32,
    };
    // SAFETY: PrctlMmMap is repr(C) plain data without padding (13 u64-sized slots); viewing
    // it as bytes for the copy into the process is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            &map as *const PrctlMmMap as *const u8,
            std::mem::size_of::<PrctlMmMap>(),
        )
    };
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
