//! Sending the pages: the contents of every run `scan` found, in address order, as page
//! records of the image, each run one record. One entry, `send`, picks the route:
//!
//! * read here (`read`) — this process reads the stopped process's memory through
//!   /proc/PID/mem: every small image, and any image without a `PageRoute`;
//! * the process hands its big runs over itself (`channel`: it is given one end of a channel
//!   and made to put its runs into it, so no byte is read through /proc/PID/mem first, which
//!   copies it once more, in this process, page by page), in one of two ways (`PageRoute`):
//!   * `Socket` — the image travels unencrypted on a socket: the process gets a copy of it
//!     and writes its runs with injected sendto (`socket`); the kernel copies each byte once,
//!     from its pages into the socket.
//!   * `Pipe` — the image is encrypted here: the process vmsplices its runs into a pipe (the
//!     pipe takes references to its pages, no copy), and a forwarder reads them out straight
//!     into TLS records (`splice`). Its pages are shared copy-on-write with the parent that
//!     forked it; references taken by vmsplice do not unshare them (pinning would).
//!
//! A new way out (memory that follows lazily, one image for many nodes) is a new
//! `PageRoute` and a file of its own here.
//!
//! Before the pages, the image's page index (the runs, announced) goes out where the other
//! side can use it: on the socket route (the new process there can receive its pages straight
//! into place, the restore's `self_receive`) and for every big image (its restorer backs
//! fully carried blocks with huge pages).

mod channel;
mod read;
mod socket;
mod splice;

use std::os::fd::{AsRawFd, BorrowedFd};

use anyhow::{Context, Result};
use nix::unistd::Pid;
use telefork_image::{ImageWriter, Vma};

use crate::inject::Injector;
use crate::pages::scan::travelling_runs;
use channel::SelfSender;

/// How a process's pages leave it, when it hands them over itself (see the module text).
pub enum PageRoute<'a> {
    /// The process writes them onto this socket, which carries the (unencrypted) image.
    Socket(BorrowedFd<'a>),
    /// The process splices them into a pipe; `forward(pipe, len)` must take exactly `len`
    /// bytes from the pipe into the image stream (e.g. sealing them into TLS records).
    Pipe(&'a (dyn Fn(BorrowedFd<'_>, usize) -> std::io::Result<()> + Sync)),
}

/// Up to this many bytes of pages, capture reads and writes them in one thread.
const INLINE_MAX: u64 = 16 << 20;

/// Writes the contents of every page of process `pid` that must travel, in address order, as
/// page records. Returns the number of bytes written.
///
/// With a `route` (and the injector of the stopped process), a big image's large runs are
/// handed over by the process itself instead of being read here. On the socket route (a
/// stream to a restorer) the runs are announced first (the image's page index): the new
/// process there can then receive them straight into place. Every run is one record (runs
/// are at most `scan::CHUNK` long).
pub fn send<W: std::io::Write + Send>(
    pid: Pid,
    vmas: &[Vma],
    out: &mut ImageWriter<W>,
    route: Option<(&mut Injector, &PageRoute)>,
) -> Result<u64> {
    let runs = travelling_runs(pid, vmas)?;
    let total: u64 = runs.iter().map(|(_, len)| len).sum();
    // The page index: for the plain transport (the new process may receive its pages itself)
    // and for every big image (its restorer backs fully carried blocks with huge pages).
    if matches!(route, Some((_, PageRoute::Socket(_)))) || total > INLINE_MAX {
        out.write_page_index(&runs).context("writing the page index")?;
        // (A big image's on its way at once: a destination whose new process receives the
        // pages, or that prepares huge pages, waits for it. A small one's goes with the first
        // pages.)
        if total > INLINE_MAX {
            out.flush().context("sending the page index")?;
        }
    }
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    if let Some((inj, route)) = route {
        // (If the process cannot take the channel — a seccomp filter, its fd limit — its
        // memory is read here as usual.)
        if total > INLINE_MAX {
            match route {
                PageRoute::Socket(sock) => {
                    if let Ok(sender) = SelfSender::open_socket(inj, sock.as_raw_fd()) {
                        return socket::send(pid, &mem, vmas, &runs, out, inj, sender)
                            .map(|()| total);
                    }
                }
                PageRoute::Pipe(forward) => {
                    if let Ok((sender, pipe)) = SelfSender::open_pipe(inj) {
                        return splice::send(
                            pid, &mem, vmas, &runs, out, inj, sender, pipe, *forward,
                        )
                        .map(|()| total);
                    }
                }
            }
        }
    }
    if total <= INLINE_MAX {
        read::inline(pid, &mem, &runs, out)?;
        return Ok(total);
    }
    read::threaded(pid, &mem, &runs, out)
}
