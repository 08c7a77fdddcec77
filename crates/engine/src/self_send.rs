//! The captured process sends its own memory: for an image that travels unencrypted on a
//! socket, the stopped process is handed a copy of that socket and made to write its big
//! runs of pages into it itself (injected sendto). The kernel then copies each byte once,
//! from the process's pages into the socket — where reading them through /proc/PID/mem first
//! would copy every byte once more, in this process. Owns only the passed fd and a page of
//! scratch memory in the process, both gone again when the transfer ends.
//!
//! How the fd gets in: this process listens on a fresh abstract Unix socket; the stopped
//! process is made to connect to it (we accept only a peer whose SO_PEERCRED is that very
//! process), and receives the socket with SCM_RIGHTS through an injected recvmsg.
//!
//! While it holds the fd, the process's owner could take a copy of it (pidfd_getfd on their
//! own process) and write into the image stream — an image of their own making, which the
//! destination checks like any other (owner, files opened with the owner's rights), on a
//! transport the configuration already trusts. The TLS records around the image stay
//! unforgeable.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use crate::inject::Injector;

const SCRATCH: u64 = 4096;

/// A copy of the socket inside the stopped process, ready to send its pages.
pub struct SelfSender {
    scratch: u64,
    fd: u64,
}

impl SelfSender {
    /// Passes `sock` into the process `inj` controls.
    pub fn open(inj: &mut Injector, sock: RawFd) -> Result<SelfSender> {
        let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let scratch = inj.syscall(libc::SYS_mmap, &[0, SCRATCH, rw, anon, u64::MAX, 0], "mapping scratch memory to pass the socket")?;
        inj.set_scratch(scratch, SCRATCH);
        let fd = match pass_fd(inj, sock) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = inj.syscall_raw(libc::SYS_munmap, &[scratch, SCRATCH]);
                return Err(e);
            }
        };
        Ok(SelfSender { scratch, fd })
    }

    /// Has the process send `[addr, addr + len)` of its memory, all of it.
    pub fn send(&self, inj: &mut Injector, addr: u64, len: u64) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let n = inj.syscall(
                libc::SYS_sendto,
                &[self.fd, addr + done, len - done, libc::MSG_NOSIGNAL as u64, 0, 0],
                format_args!("process sending its memory {:#x}-{:#x}", addr + done, addr + len),
            )?;
            if n == 0 {
                bail!("process sending its memory at {:#x}: the connection accepts nothing more", addr + done);
            }
            done += n;
        }
        Ok(())
    }

    /// Closes the process's copy of the socket and unmaps the scratch page.
    pub fn close(self, inj: &mut Injector) -> Result<()> {
        inj.syscall(libc::SYS_close, &[self.fd], "closing the process's copy of the socket")?;
        inj.syscall(libc::SYS_munmap, &[self.scratch, SCRATCH], "unmapping scratch memory")?;
        Ok(())
    }
}

/// Hands `sock` to the process through an abstract Unix socket; returns its fd number there.
fn pass_fd(inj: &mut Injector, sock: RawFd) -> Result<u64> {
    let name = format!("telefork-pass-{}-{:x}", std::process::id(), nonce());
    let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?).context("listening to pass the socket")?;
    listener.set_nonblocking(true)?;

    // struct sockaddr_un: family, then the name (abstract: a leading NUL, no terminator).
    let mut sun = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
    sun.push(0);
    sun.extend_from_slice(name.as_bytes());
    let sun_addr = inj.stage(&sun)?;
    let s = inj.syscall(libc::SYS_socket, &[libc::AF_UNIX as u64, (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64, 0], "creating a socket in the process")?;
    let result = (|| {
        inj.syscall(libc::SYS_connect, &[s, sun_addr, sun.len() as u64], "connecting the process to us")?;
        let conn = accept_from(&listener, inj.pid().as_raw())?;
        let fds = [sock];
        sendmsg::<()>(conn.as_raw_fd(), &[IoSlice::new(b"s")], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)
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
                let cred = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)?;
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
    let n = inj.syscall(libc::SYS_recvmsg, &[s, msg, libc::MSG_CMSG_CLOEXEC as u64], "receiving the socket in the process")?;
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

/// Varies the listening name between transfers (collisions only fail a bind: the peer check,
/// not the name, is what keeps strangers out).
fn nonce() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}
