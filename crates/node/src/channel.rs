//! A TLS connection between two daemons that several threads can use at once: one thread
//! waits for messages while others send output as it comes. rustls's own `StreamOwned` is
//! made for one thread; here the connection sits behind a mutex that is never held while
//! waiting for the network (the reader waits in poll(2) on the raw socket first), so a
//! blocked reader never delays a writer. Written by hand: no crate offers a split sync
//! rustls stream.
//!
//! The channel also carries the process image as raw bytes (`Read`/`Write` on `&TlsChannel`).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rustls::pki_types::ServerName;
use serde::{de::DeserializeOwned, Serialize};

use crate::proto;

pub struct TlsChannel {
    inner: Mutex<Inner>,
    sock: TcpStream,
    timeout: Mutex<Option<Duration>>,
}

struct Inner {
    conn: rustls::Connection,
    sock: TcpStream,
    /// Bytes received from the socket, not yet handed to rustls: one big non-blocking
    /// recv feeds many TLS records (rustls itself reads at most one record's worth per
    /// call, which would cost two system calls per 16 KiB of a large transfer).
    staged: Staged,
}

struct Staged {
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

const STAGE_BYTES: usize = 256 << 10;

impl Staged {
    fn new() -> Self {
        Staged { buf: vec![0; STAGE_BYTES], pos: 0, len: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos == self.len
    }
}

/// What rustls reads TLS bytes from: the staged bytes, refilled by a non-blocking recv
/// (MSG_DONTWAIT, so the socket itself stays blocking for anyone else using it).
struct StagedSocket<'a> {
    fd: i32,
    staged: &'a mut Staged,
}

impl Read for StagedSocket<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let st = &mut *self.staged;
        if st.is_empty() {
            // SAFETY: recv writes at most buf.len() bytes into `st.buf`, which we own.
            let n = unsafe { libc::recv(self.fd, st.buf.as_mut_ptr().cast(), st.buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            st.pos = 0;
            st.len = n as usize;
            if n == 0 {
                return Ok(0);
            }
        }
        let n = out.len().min(st.len - st.pos);
        out[..n].copy_from_slice(&st.buf[st.pos..st.pos + n]);
        st.pos += n;
        Ok(n)
    }
}

impl TlsChannel {
    /// Connects as a client and completes the handshake within `timeout`.
    pub fn client(cfg: Arc<rustls::ClientConfig>, name: ServerName<'static>, sock: TcpStream, timeout: Duration) -> Result<Self> {
        let conn = rustls::ClientConnection::new(cfg, name).context("starting TLS")?;
        Self::handshake(rustls::Connection::Client(conn), sock, timeout)
    }

    /// Accepts a client and completes the handshake (which verifies its certificate) within
    /// `timeout`. Returns the channel and the peer's certificate chain.
    pub fn server(cfg: Arc<rustls::ServerConfig>, sock: TcpStream, timeout: Duration) -> Result<Self> {
        let conn = rustls::ServerConnection::new(cfg).context("starting TLS")?;
        Self::handshake(rustls::Connection::Server(conn), sock, timeout)
    }

    fn handshake(mut conn: rustls::Connection, sock: TcpStream, timeout: Duration) -> Result<Self> {
        sock.set_nodelay(true).ok();
        deep_buffers(&sock);
        sock.set_read_timeout(Some(timeout)).ok();
        sock.set_write_timeout(Some(timeout)).ok();
        let mut s = sock.try_clone().context("cloning the socket")?;
        while conn.is_handshaking() {
            conn.complete_io(&mut s).context("TLS handshake failed")?;
        }
        sock.set_read_timeout(None).ok();
        let reader_sock = sock.try_clone().context("cloning the socket")?;
        Ok(TlsChannel { inner: Mutex::new(Inner { conn, sock, staged: Staged::new() }), sock: reader_sock, timeout: Mutex::new(Some(timeout)) })
    }

    /// The peer's certificate chain (verified during the handshake).
    pub fn peer_certificates(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.conn.peer_certificates().map(|c| c.iter().map(|c| c.clone().into_owned()).collect()).unwrap_or_default()
    }

    /// How long a receive may wait for data (None: forever). Sends always time out after
    /// the handshake timeout, so a vanished peer cannot hang us.
    pub fn set_recv_timeout(&self, t: Option<Duration>) {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    pub fn send<T: Serialize>(&self, msg: &T) -> Result<()> {
        let mut w = self;
        proto::write_frame(&mut w, msg)
    }

    pub fn recv<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        let mut r = self;
        proto::read_frame(&mut r)
    }

    pub fn expect<T: DeserializeOwned>(&self, what: &str) -> Result<T> {
        let mut r = self;
        proto::expect_frame(&mut r, what)
    }

    /// Sends close_notify and shuts the socket down.
    pub fn close(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.conn.send_close_notify();
        let Inner { conn, sock, .. } = &mut *g;
        while conn.wants_write() {
            if conn.write_tls(sock).is_err() {
                break;
            }
        }
        let _ = sock.shutdown(std::net::Shutdown::Both);
    }

    fn wait_readable(&self, deadline: Option<Instant>) -> io::Result<()> {
        loop {
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out waiting for the peer"));
                    }
                    PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) => continue,
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Read for &TlsChannel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self.timeout.lock().unwrap_or_else(|e| e.into_inner()).map(|t| Instant::now() + t);
        let fd = self.sock.as_raw_fd();
        loop {
            {
                let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                let Inner { conn, sock, staged } = &mut *g;
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                // More TLS bytes, without blocking (the lock is never held while waiting).
                match conn.read_tls(&mut StagedSocket { fd, staged }) {
                    Ok(n) => {
                        conn.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        while conn.wants_write() {
                            conn.write_tls(sock)?;
                        }
                        if n == 0 {
                            // The peer closed TCP; what plaintext is left is still readable.
                            return match conn.reader().read(buf) {
                                Ok(n) => Ok(n),
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                                Err(e) => Err(e),
                            };
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            self.wait_readable(deadline)?;
        }
    }
}

impl Write for &TlsChannel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Inner { conn, sock, .. } = &mut *g;
        let n = conn.writer().write(buf)?;
        while conn.wants_write() {
            conn.write_tls(sock)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Inner { conn, sock, .. } = &mut *g;
        while conn.wants_write() {
            conn.write_tls(sock)?;
        }
        Ok(())
    }
}

impl TlsChannel {
    pub fn raw_fd(&self) -> i32 {
        self.sock.as_raw_fd()
    }

    /// The TCP socket under the TLS session, for bytes that travel unencrypted between two
    /// TLS records (`ImageTransport::Plain`). Only while neither side has TLS data in flight:
    /// an error if bytes beyond the last TLS record were already received.
    pub fn raw_socket(&self) -> io::Result<&TcpStream> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !g.staged.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the peer sent data before its turn"));
        }
        Ok(&self.sock)
    }
}

/// Gives the socket deep kernel buffers (32 MiB each way; the daemon runs as root, so
/// SO_*BUFFORCE may exceed net.core.[rw]mem_max): while the receiving process is busy
/// faulting in the memory for one chunk of an image, the sender keeps streaming the next
/// into the buffer instead of stalling. Best effort.
fn deep_buffers(sock: &TcpStream) {
    let size: libc::c_int = 32 << 20;
    for opt in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE] {
        // SAFETY: setsockopt reads one c_int from `size`, which outlives the call.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Connects to `addr` within `timeout`.
pub fn connect(addr: std::net::SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    Ok(s)
}

/// Fails unless the peer certificate names `node`.
pub fn check_peer_name(ch: &TlsChannel, expect: Option<&str>) -> Result<String> {
    let certs = ch.peer_certificates();
    let name = crate::tls::peer_node_name(&certs).context("peer certificate carries no node name")?;
    if let Some(e) = expect {
        if e != name {
            bail!("peer is {name:?}, expected {e:?}");
        }
    }
    Ok(name)
}
