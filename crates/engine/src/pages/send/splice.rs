//! The pipe route: the image is encrypted here. The process vmsplices its big runs into a
//! pipe (the pipe takes references to its pages, no copy: pages it shares copy-on-write with
//! the parent that forked it stay shared, where pinning would unshare them), and a writer
//! thread here reads them out straight into the image's records with `forward` (e.g. sealing
//! them into TLS records). If the pipe's reader fails, vmsplice fails with EPIPE and leaves a
//! SIGPIPE pending (blocked) in the process; telefork discards a process whose transfer
//! failed, so it is not consumed.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;
use telefork_image::{ImageWriter, Vma};

use super::channel::{sendable, SelfSender};
use super::read::read_remote;
use crate::inject::Injector;

/// Runs handed over per injected vmsplice.
const SPLICE_BATCH: usize = 64;

/// A page record for the writer thread of `send`.
enum Record {
    /// `len` bytes at `addr`, coming through the pipe.
    Spliced(u64, u64),
    /// Bytes read here (small runs).
    Read(u64, Vec<u8>),
}

/// The pipe route: this (tracer) thread has the process vmsplice its big runs into a pipe,
/// in order, and reads the small ones itself; a writer thread writes the records, taking each
/// big run's bytes from the pipe with `forward`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn send<W: std::io::Write + Send>(
    pid: Pid,
    mem: &std::fs::File,
    vmas: &[Vma],
    runs: &[(u64, u64)],
    out: &mut ImageWriter<W>,
    inj: &mut Injector,
    sender: SelfSender,
    pipe: OwnedFd,
    forward: &(dyn Fn(BorrowedFd<'_>, usize) -> std::io::Result<()> + Sync),
) -> Result<()> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Record>(256);
        let writer = scope.spawn(move || -> Result<()> {
            // (Dropping the read end on failure makes the process's vmsplice fail: EPIPE.)
            let pipe = pipe;
            for rec in rx {
                match rec {
                    Record::Spliced(addr, len) => out
                        .write_pages_sent_by(addr, len as usize, |w| {
                            w.flush()?;
                            forward(pipe.as_fd(), len as usize)
                        })
                        .with_context(|| format!("sending memory {addr:#x}-{:#x}", addr + len))?,
                    Record::Read(addr, buf) => out.write_pages(addr, &buf).context("writing the image")?,
                }
            }
            // Exactly the process's memory came through: more would be someone else's bytes.
            let extra = rustix::io::ioctl_fionread(&pipe).unwrap_or(0);
            if extra > 0 {
                bail!("the process's pipe held {extra} bytes beyond its memory (written by someone else)");
            }
            Ok(())
        });
        let handed = (|| -> Result<()> {
            // Big runs go in batches: one injected vmsplice each.
            let mut batch: Vec<(u64, u64)> = Vec::with_capacity(SPLICE_BATCH);
            for (i, &(addr, len)) in runs.iter().enumerate() {
                if sendable(vmas, addr, len) {
                    if tx.send(Record::Spliced(addr, len)).is_err() {
                        return Ok(()); // the writer stopped: its error says why
                    }
                    batch.push((addr, len));
                    let next_is_big = runs.get(i + 1).is_some_and(|&(a, l)| sendable(vmas, a, l));
                    if batch.len() == SPLICE_BATCH || !next_is_big {
                        sender.send_runs(inj, &batch)?;
                        batch.clear();
                    }
                } else {
                    let mut buf = vec![0u8; len as usize];
                    read_remote(pid, mem, addr, &mut buf)?;
                    if tx.send(Record::Read(addr, buf)).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })();
        drop(tx);
        // The process closes its end now: a writer still waiting for bytes sees the end.
        let closed = sender.close(inj);
        let written =
            writer.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the page writer panicked")));
        match (written, handed) {
            // The process could not hand over (its error is the cause; the writer then saw
            // its pipe end early).
            (Err(w), Err(h)) if format!("{w:#}").contains("ended early") => Err(h),
            (Err(w), _) => Err(w),
            (Ok(()), Err(h)) => Err(h),
            (Ok(()), Ok(())) => closed,
        }
    })
}
