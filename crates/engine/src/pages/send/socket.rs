//! The socket route: the image travels unencrypted on a socket, and the process writes its
//! big runs onto its own copy of that socket with injected sendto, one record at a time,
//! between the records this process writes (small runs, read here). The kernel copies each
//! byte once, from the process's pages into the socket.

use anyhow::{Context, Result};
use nix::unistd::Pid;
use telefork_image::{ImageWriter, Vma};

use super::channel::{sendable, SelfSender};
use super::read::read_remote;
use crate::inject::Injector;

/// Has the process send `runs` that are `sendable` through `sender`, reads and writes the
/// others here, in order; closes the process's end of the channel however it ends.
#[allow(clippy::too_many_arguments)]
pub(crate) fn send<W: std::io::Write>(
    pid: Pid,
    mem: &std::fs::File,
    vmas: &[Vma],
    runs: &[(u64, u64)],
    out: &mut ImageWriter<W>,
    inj: &mut Injector,
    sender: SelfSender,
) -> Result<()> {
    let sent = (|| -> Result<()> {
        let mut buf = Vec::new();
        for &(addr, len) in runs {
            if sendable(vmas, addr, len) {
                let mut failure = None;
                let r = out.write_pages_sent_by(addr, len as usize, |w| {
                    w.flush()?;
                    sender.send_runs(inj, &[(addr, len)]).map_err(|e| {
                        let io = std::io::Error::other(format!("{e:#}"));
                        failure = Some(e);
                        io
                    })
                });
                if let Some(e) = failure {
                    return Err(e);
                }
                r.context("writing the image")?;
            } else {
                buf.resize(len as usize, 0);
                read_remote(pid, mem, addr, &mut buf)?;
                out.write_pages(addr, &buf).context("writing the image")?;
            }
        }
        Ok(())
    })();
    let closed = sender.close(inj);
    sent?;
    closed
}
