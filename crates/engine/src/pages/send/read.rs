//! The plain route out: this process reads the stopped process's memory through
//! /proc/PID/mem and writes it as page records. A small image is read and written by one
//! thread; a big one by two, a reader thread filling buffers while this one writes (encrypts,
//! sends) the previous one. Also the way for the runs the process cannot hand over itself
//! (too small to be worth an injected call, or in a mapping it cannot read).

use std::os::unix::fs::FileExt;

use anyhow::{Context, Result};
use nix::unistd::Pid;
use telefork_image::ImageWriter;

use crate::pages::scan::CHUNK;

/// Buffers in flight between the thread that reads memory and the one that writes records.
const BUFFERS: usize = 3;

/// Reads `len` bytes at `addr` of a stopped process into `buf`, through /proc/PID/mem.
///
/// Not process_vm_readv: it *pins* the pages, and pinning an anonymous page that is shared
/// copy-on-write (every page of a frozen fork is shared with its parent) makes the kernel
/// unshare it first — it copies every page, doubling the memory of a telefork and halving
/// its speed. /proc/PID/mem only takes references: no copies.
pub(crate) fn read_remote(pid: Pid, mem: &std::fs::File, addr: u64, buf: &mut [u8]) -> Result<()> {
    let len = buf.len();
    mem.read_exact_at(buf, addr).with_context(|| {
        format!("reading memory {addr:#x}-{:#x} of process {pid}", addr + len as u64)
    })
}

/// Reads and writes `runs` in turn, in this thread.
pub(crate) fn inline<W: std::io::Write>(
    pid: Pid,
    mem: &std::fs::File,
    runs: &[(u64, u64)],
    out: &mut ImageWriter<W>,
) -> Result<()> {
    // Small: one thread, one buffer (a second thread costs more than it saves here),
    // sent on every 64 KiB so the other end places pages while we read the next.
    let mut buf = Vec::new();
    let mut unsent = 0u64;
    for &(addr, len) in runs {
        buf.resize(len as usize, 0);
        read_remote(pid, mem, addr, &mut buf)?;
        out.write_pages(addr, &buf).context("writing the image")?;
        unsent += len;
        if unsent >= 64 << 10 {
            out.flush().context("sending the image")?;
            unsent = 0;
        }
    }
    Ok(())
}

/// Reads `runs` in a reader thread while this one writes them. Returns the bytes written.
pub(crate) fn threaded<W: std::io::Write>(
    pid: Pid,
    mem: &std::fs::File,
    runs: &[(u64, u64)],
    out: &mut ImageWriter<W>,
) -> Result<u64> {
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<(u64, Vec<u8>)>>(BUFFERS);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        let _ = empty_tx.send(Vec::with_capacity(CHUNK as usize));
    }
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for &(addr, len) in runs {
                let Ok(mut buf) = empty_rx.recv() else { return };
                buf.resize(len as usize, 0);
                let r = read_remote(pid, mem, addr, &mut buf).map(|_| (addr, buf));
                let failed = r.is_err();
                if full_tx.send(r).is_err() || failed {
                    return;
                }
            }
        });
        let mut total = 0u64;
        for _ in 0..runs.len() {
            let (addr, buf) = full_rx.recv().context("the memory reader stopped")??;
            out.write_pages(addr, &buf).context("writing the image")?;
            total += buf.len() as u64;
            let _ = empty_tx.send(buf);
        }
        drop(empty_tx);
        Ok(total)
    })
}
