//! The channel a captured process hands over its own memory through: one end of it (a copy
//! of the image's socket, or the write end of a pipe) is passed into the stopped process,
//! which is then made to put its big runs of pages into it itself (`SelfSender::send_runs`:
//! injected sendto or vmsplice). The routes that use it are `socket` and `splice`.
//!
//! Owns only the passed fd and a page of scratch memory in the process, both gone again when
//! the transfer ends. Runs in mappings the process cannot read (PROT_NONE) are read through
//! /proc/PID/mem instead (`sendable`).
//!
//! How the fd gets in: this process listens on a fresh abstract Unix socket; the stopped
//! process is made to connect to it (we accept only a peer whose SO_PEERCRED is that very
//! process), and receives the fd with SCM_RIGHTS through an injected recvmsg.
//!
//! While it holds the fd, the process's owner could take a copy of it (pidfd_getfd on their
//! own process): with a socket, write into the unencrypted image stream — an image of their
//! own making, which the destination checks like any other (owner, files opened with the
//! owner's rights), on a transport the configuration already trusts; with a pipe, feed their
//! own bytes to be encrypted as their own image. The TLS records stay unforgeable.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::unistd::pipe2;
use telefork_image::Vma;

use crate::inject::Injector;

const SCRATCH: u64 = 4096;

/// Runs at least this long are sent by the process itself (each costs an injected call).
const SELF_SEND_MIN: u64 = 1 << 20;

/// Whether the process itself can read `[addr, addr + len)` (its mapping is readable: a
/// PROT_NONE mapping's pages still travel, but only /proc/PID/mem can read them) and the run
/// is worth an injected call.
pub(crate) fn sendable(vmas: &[Vma], addr: u64, len: u64) -> bool {
    len >= SELF_SEND_MIN
        && vmas
            .iter()
            .any(|v| v.start <= addr && addr + len <= v.end && v.prot & libc::PROT_READ as u32 != 0)
}

/// A channel end inside the stopped process, ready for its pages.
pub struct SelfSender {
    scratch: u64,
    fd: u64,
    pipe: bool,
}

/// Bytes a pipe from the process holds, if allowed (beyond fs.pipe-max-size only with
/// CAP_SYS_RESOURCE).
const PIPE_BYTES: i32 = 4 << 20;

impl SelfSender {
    /// Passes `sock` into the process `inj` controls.
    pub fn open_socket(inj: &mut Injector, sock: RawFd) -> Result<SelfSender> {
        Self::open(inj, sock, false)
    }

    /// Makes a pipe and passes its write end into the process; returns the read end.
    pub fn open_pipe(inj: &mut Injector) -> Result<(SelfSender, OwnedFd)> {
        let (read_end, write_end) =
            pipe2(OFlag::O_CLOEXEC).context("creating a pipe for the process's pages")?;
        // Bigger is better (fewer wake-ups per byte): 4 MiB, or what the system allows
        // (fs.pipe-max-size, 1 MiB by default, unless we have CAP_SYS_RESOURCE).
        let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .unwrap_or(1 << 20);
        for size in [PIPE_BYTES, max.min(PIPE_BYTES)] {
            if fcntl(write_end.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(size)).is_ok() {
                break;
            }
        }
        // Our end never blocks: the reader polls it with a timeout, so a process that stops
        // handing over (or an owner holding a copy of the write end) cannot hang us.
        fcntl(read_end.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
            .context("making our end of the page pipe non-blocking")?;
        let sender = Self::open(inj, write_end.as_raw_fd(), true)?;
        drop(write_end); // only the process writes: when it closes its end, the reader sees the end
        Ok((sender, read_end))
    }

    fn open(inj: &mut Injector, fd: RawFd, pipe: bool) -> Result<SelfSender> {
        let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let scratch = inj.syscall(
            libc::SYS_mmap,
            &[0, SCRATCH, rw, anon, u64::MAX, 0],
            "mapping scratch memory to pass an fd",
        )?;
        inj.set_scratch(scratch, SCRATCH);
        let fd = match pass_fd(inj, fd) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = inj.syscall_raw(libc::SYS_munmap, &[scratch, SCRATCH]);
                return Err(e);
            }
        };
        Ok(SelfSender { scratch, fd, pipe })
    }

    /// Has the process hand over runs of its memory, all of them, in order: into a pipe
    /// with one vmsplice for many runs (one injected call moves many megabytes), onto a
    /// socket with a sendto per run.
    pub fn send_runs(&self, inj: &mut Injector, runs: &[(u64, u64)]) -> Result<()> {
        let mut runs = runs.to_vec();
        let mut first = 0usize;
        while first < runs.len() {
            let (a, n) = runs[first];
            let what = format_args!("process handing over its memory from {a:#x}");
            let mut sent = if self.pipe {
                inj.reset_scratch();
                let iov: Vec<u8> = runs[first..]
                    .iter()
                    .flat_map(|&(a, n)| a.to_ne_bytes().into_iter().chain(n.to_ne_bytes()))
                    .collect();
                let iov = inj.stage(&iov)?;
                inj.syscall(
                    libc::SYS_vmsplice,
                    &[self.fd, iov, (runs.len() - first) as u64, 0],
                    what,
                )?
            } else {
                inj.syscall(
                    libc::SYS_sendto,
                    &[self.fd, a, n, libc::MSG_NOSIGNAL as u64, 0, 0],
                    what,
                )?
            };
            if sent == 0 {
                bail!(
                    "process handing over its memory at {a:#x}: the channel accepts nothing more"
                );
            }
            while sent > 0 {
                let r = &mut runs[first];
                let k = sent.min(r.1);
                r.0 += k;
                r.1 -= k;
                sent -= k;
                if r.1 == 0 {
                    first += 1;
                }
            }
        }
        Ok(())
    }

    /// Closes the process's end and unmaps the scratch page.
    pub fn close(self, inj: &mut Injector) -> Result<()> {
        inj.syscall(libc::SYS_close, &[self.fd], "closing the process's end of the page channel")?;
        inj.syscall(libc::SYS_munmap, &[self.scratch, SCRATCH], "unmapping scratch memory")?;
        Ok(())
    }
}

/// Hands `sock` to the process through an abstract Unix socket; returns its fd number there.
fn pass_fd(inj: &mut Injector, sock: RawFd) -> Result<u64> {
    let name = format!("telefork-pass-{:x}", nonce());
    let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)
        .context("listening to pass the socket")?;
    listener.set_nonblocking(true)?;

    // struct sockaddr_un: family, then the name (abstract: a leading NUL, no terminator).
    let mut sun = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
    sun.push(0);
    sun.extend_from_slice(name.as_bytes());
    let sun_addr = inj.stage(&sun)?;
    // Non-blocking: a listener whose backlog a stranger filled makes connect fail (EAGAIN)
    // instead of sleeping with all signals blocked; the fd message is queued before recvmsg
    // runs, so recvmsg never needs to wait either.
    let s = inj.syscall(
        libc::SYS_socket,
        &[
            libc::AF_UNIX as u64,
            (libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u64,
            0,
        ],
        "creating a socket in the process",
    )?;
    let result = (|| {
        inj.syscall(
            libc::SYS_connect,
            &[s, sun_addr, sun.len() as u64],
            "connecting the process to us",
        )?;
        let conn = accept_from(&listener, inj.pid().as_raw())?;
        let fds = [sock];
        sendmsg::<()>(
            conn.as_raw_fd(),
            &[IoSlice::new(b"s")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .context("passing the socket")?;
        receive_fd(inj, s)
    })();
    let _ = inj.syscall_raw(libc::SYS_close, &[s]);
    result
}

/// Accepts the connection of process `pid` (others are turned away), within a second.
fn accept_from(listener: &UnixListener, pid: i32) -> Result<std::os::unix::net::UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                let cred = nix::sys::socket::getsockopt(
                    &conn,
                    nix::sys::socket::sockopt::PeerCredentials,
                )?;
                if cred.pid() == pid {
                    return Ok(conn);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("process {pid} did not connect to receive the socket");
                }
                std::thread::sleep(Duration::from_micros(20));
            }
            Err(e) => return Err(e).context("accepting the process's connection"),
        }
    }
}

/// An injected recvmsg on `s`; returns the fd number the process received.
fn receive_fd(inj: &mut Injector, s: u64) -> Result<u64> {
    // A 1-byte buffer, an iovec, room for one SCM_RIGHTS control message, and the msghdr
    // (the x86-64 / arm64 layouts: pointers and sizes are 8 bytes).
    let data = inj.alloc_zeroed(8)?;
    let mut iov = data.to_ne_bytes().to_vec();
    iov.extend_from_slice(&1u64.to_ne_bytes());
    let iov = inj.stage(&iov)?;
    const CONTROL: u64 = 24; // CMSG_SPACE(sizeof(int))
    let control = inj.alloc_zeroed(CONTROL)?;
    let mut msg = Vec::with_capacity(56);
    msg.extend_from_slice(&0u64.to_ne_bytes()); // msg_name
    msg.extend_from_slice(&0u64.to_ne_bytes()); // msg_namelen + padding
    msg.extend_from_slice(&iov.to_ne_bytes()); // msg_iov
    msg.extend_from_slice(&1u64.to_ne_bytes()); // msg_iovlen
    msg.extend_from_slice(&control.to_ne_bytes()); // msg_control
    msg.extend_from_slice(&CONTROL.to_ne_bytes()); // msg_controllen
    msg.extend_from_slice(&0u64.to_ne_bytes()); // msg_flags + padding
    let msg = inj.stage(&msg)?;
    let n = inj.syscall(
        libc::SYS_recvmsg,
        &[s, msg, (libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) as u64],
        "receiving the fd in the process",
    )?;
    let mut cmsg = [0u8; CONTROL as usize];
    inj.read_mem(control, &mut cmsg)?;
    let word = |i: usize| u64::from_ne_bytes(cmsg[i..i + 8].try_into().unwrap_or([0; 8]));
    let len = word(0);
    let level = i32::from_ne_bytes(cmsg[8..12].try_into().unwrap_or([0; 4]));
    let kind = i32::from_ne_bytes(cmsg[12..16].try_into().unwrap_or([0; 4]));
    if n != 1 || len != 20 || level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS {
        bail!("the process did not receive the socket (recvmsg returned {n}, control message {len}/{level}/{kind})");
    }
    let fd = i32::from_ne_bytes(cmsg[16..20].try_into().unwrap_or([0; 4]));
    if fd < 0 {
        bail!("the process received a bad fd {fd}");
    }
    Ok(fd as u64)
}

/// A random listening name (the name is visible in /proc/net/unix; the peer check, not the
/// name, keeps strangers out — a guessed name could only fill the backlog, which fails the
/// transfer instead of hanging it).
fn nonce() -> u64 {
    let mut b = [0u8; 8];
    let n = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).unwrap_or(0);
    if n != 8 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ (std::process::id() as u64).rotate_left(32);
    }
    u64::from_ne_bytes(b)
}
