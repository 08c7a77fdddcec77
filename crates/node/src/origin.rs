//! The origin side, one session process per local program connection.
//!
//! A program that calls `telefork` has forked a child that stopped itself (SIGSTOP). It
//! hands this daemon the child's PID and its own stdout/stderr (SCM_RIGHTS); the daemon checks
//! with SO_PEERCRED that the child really is the caller's own, stopped child, offers the
//! process to the destination, streams the capture straight into the TLS connection, and only
//! once the destination reports the restored PID kills the local copy. From then on it
//! writes the remote child's output to the program's stdout/stderr and passes kill requests
//! and the exit status between program and destination.
//!
//! When the child has ended and the program hands its connection back (`Again`), the same
//! session serves the program's next request: no new session process, /proc reader thread
//! and daemon connection per telefork. It hands its connection to the destination back the
//! same way (`ToDest::Again`): the destination's session serves the next offer, so a
//! telefork to the same node again needs no new connection, TLS handshake or destination
//! session either.
//!
//! The connection to the destination is the one kept from the last child if it goes to the
//! same node, else one made ahead of time when the program's spare connection names it
//! (`Prepare`), else one made by a thread while the child is captured: a small
//! image's offer and process record need it only once the capture has looked at the child.
//! The thread that reads the child's /proc files during the capture is started as soon as
//! the session knows a capture will come.
//!
//! The same socket serves the other local requests: `WhoAmI` and a restored process's
//! `Report` of its `remote` result.

use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    getsockopt, recvmsg, sockopt::PeerCredentials, ControlMessageOwned, MsgFlags,
};
use nix::unistd::Pid;
use telefork_engine::OutsideReader;

use crate::channel::{check_peer_name, connect, TlsChannel};
use crate::daemon::Shared;
use crate::proto::{
    self, Failure, FromDaemon, FromDest, Limit, LocalCommand, LocalRequest, Stage, ToDest, User,
};

pub fn serve(shared: &Shared, sock: UnixStream) -> Result<()> {
    let cred = getsockopt(&sock, PeerCredentials).context("SO_PEERCRED")?;
    let Some((mut req, mut fds)) = recv_first(&sock, &shared.cfg.node)? else {
        return Ok(()); // connected and left (a liveness probe): nothing to do
    };
    // A capture will follow: its /proc reader thread is started now, not on its path. (It
    // stays, idle, until the session ends: ending it before the relay competed with it.)
    let reader = matches!(req, LocalRequest::Prepare { .. } | LocalRequest::Telefork { .. })
        .then(OutsideReader::start)
        .and_then(Result::ok);
    let mut prepared = None;
    // One request after another: a program hands its connection back once a child has
    // ended (`LocalCommand::Again`), and this session serves its next telefork — no new
    // session process per telefork.
    loop {
        // A spare connection says where the next telefork will likely go: connect there now.
        if let LocalRequest::Prepare { dest } = &req {
            prepared = Connecting::ahead(shared, dest).ok();
            let Some(next) = recv_first(&sock, &shared.cfg.node)? else {
                return Ok(()); // not used after all (the prepared connection just closes)
            };
            (req, fds) = next;
            telefork_engine::timeline::stamp("origin next request");
        }
        // (The first answer to each request goes behind our hello.)
        let to_program = ToProgram::new(&sock);
        match req {
            LocalRequest::WhoAmI => {
                return to_program.send(&FromDaemon::Node { name: shared.cfg.node.clone() })
            }
            // (Only right after connecting or being handed back; a second one ends the session.)
            LocalRequest::Prepare { .. } => return Ok(()),
            LocalRequest::Report { value } => {
                let r = store_report(shared, Some(cred.pid()), &value);
                let reply = match &r {
                    Ok(()) => FromDaemon::Ok,
                    Err(e) => FromDaemon::Failed(Failure::Failed {
                        node: shared.cfg.node.clone(),
                        stage: Stage::Report,
                        message: format!("{e:#}"),
                    }),
                };
                return to_program.send(&reply);
            }
            LocalRequest::Telefork { dest, child_pid, pass_stdin } => {
                let user = User { uid: cred.uid(), gid: cred.gid() };
                // (Accepted, then Started as soon as the destination says so, before the local
                // copy is killed: the program is not held for that.)
                let tell = |msg: FromDaemon| to_program.send(&msg);
                let sent = send_away(
                    shared,
                    Some(cred.pid()),
                    &user,
                    child_pid,
                    &dest,
                    pass_stdin,
                    prepared.take(),
                    reader.as_ref(),
                    tell,
                );
                match sent {
                    Ok((ch, name, addr)) => {
                        match relay(ch, &name, &sock, std::mem::take(&mut fds), pass_stdin)? {
                            // The next telefork likely goes there too: the destination's session
                            // serves it on this connection.
                            AfterRelay::Again(ch) => {
                                prepared = Connecting::kept(name, addr, *ch).ok()
                            }
                            AfterRelay::End => return Ok(()),
                        }
                    }
                    Err(e) => {
                        tracing::warn!("telefork of process {child_pid} to {dest} failed: {e:#}");
                        let failure = crate::failure::of(&e, &shared.cfg.node, &dest, Stage::Send);
                        return to_program.send(&FromDaemon::Failed(failure));
                    }
                }
                let Some(next) = recv_first(&sock, &shared.cfg.node)? else {
                    return Ok(());
                };
                (req, fds) = next;
                telefork_engine::timeline::stamp("origin next request");
            }
        }
    }
}

/// Reads a request (behind its hello) and the fds passed with it.
fn recv_first(sock: &UnixStream, node: &str) -> Result<Option<(LocalRequest, Vec<OwnedFd>)>> {
    // A program may connect ahead of time (the library keeps one spare connection): wait a
    // while for its request, then close quietly.
    sock.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut len = [0u8; 4];
    let mut cmsg = nix::cmsg_space!([RawFd; 3]);
    let mut fds = Vec::new();
    let got = {
        let mut iov = [IoSliceMut::new(&mut len)];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e).context("reading a request"),
        };
        for c in msg.cmsgs().context("reading passed fds")? {
            if let ControlMessageOwned::ScmRights(list) = c {
                // SAFETY: the kernel just installed these fds in this process for us.
                fds.extend(list.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        msg.bytes
    };
    if got == 0 {
        return Ok(None);
    }
    // Once a request has begun, all of it within `REQUEST_LIMIT` (a program writes it at
    // once; a peer trickling bytes must not hold the session).
    let deadline = std::time::Instant::now() + REQUEST_LIMIT;
    read_by(sock, &mut len[got..], deadline)?;
    let mut body = vec![0u8; proto::frame_len(len).context("reading a request")?];
    read_by(sock, &mut body, deadline)?;
    // A request comes behind the program's hello (sent with it, so the fds came with the
    // hello's first bytes): a library of another protocol version is told so, in a form it
    // reads, and the session ends.
    if let Err(e) = proto::check_hello(&body) {
        refuse_version(sock, node, &e);
        return Err(e).context("a program's request");
    }
    read_by(sock, &mut len, deadline)?;
    let mut body = vec![0u8; proto::frame_len(len).context("reading a request")?];
    read_by(sock, &mut body, deadline)?;
    sock.set_read_timeout(None).ok();
    Ok(Some((proto::decode_body(&body).context("decoding a request")?, fds)))
}

/// Tells a program whose library speaks another protocol version (`e`) why it is refused.
fn refuse_version(mut sock: &UnixStream, node: &str, e: &proto::Error) {
    let proto::Error::Version { ours, theirs } = *e else { return };
    sock.set_write_timeout(Some(Duration::from_secs(1))).ok();
    let _ = if theirs == 0 {
        let text = format!(
            "node {node} speaks telefork protocol version {ours}; this program's telefork library is from before protocol versions (rebuild it with this release)"
        );
        proto::unversioned::to_program(&text).and_then(|f| {
            sock.write_all(&f).map_err(|source| proto::Error::Io { doing: "answering", source })
        })
    } else {
        // (Told from the program's side: its version is "ours" there.)
        let mismatch = Failure::Protocol { node: node.to_string(), ours: theirs, theirs: ours };
        proto::write_first(&mut sock, &FromDaemon::Failed(mismatch))
    };
}

/// Where a session's answers to one request go: the first behind this daemon's hello, the
/// rest as they are.
struct ToProgram<'a> {
    sock: &'a UnixStream,
    greeted: std::cell::Cell<bool>,
}

impl<'a> ToProgram<'a> {
    fn new(sock: &'a UnixStream) -> ToProgram<'a> {
        ToProgram { sock, greeted: std::cell::Cell::new(false) }
    }

    fn send(&self, msg: &FromDaemon) -> Result<()> {
        let mut w = self.sock;
        if self.greeted.replace(true) {
            proto::write_frame(&mut w, msg)?;
        } else {
            proto::write_first(&mut w, msg)?;
        }
        Ok(())
    }
}

/// How long a request may take to arrive once its first bytes have.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

/// Fills `buf` from `sock` by `deadline`.
fn read_by(mut sock: &UnixStream, buf: &mut [u8], deadline: std::time::Instant) -> Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            bail!("the request did not arrive within {} s", REQUEST_LIMIT.as_secs());
        }
        sock.set_read_timeout(Some(left)).ok();
        match sock.read(&mut buf[at..]) {
            Ok(0) => bail!("the connection ended inside a request"),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("the request did not arrive within {} s", REQUEST_LIMIT.as_secs())
            }
            Err(e) => return Err(e).context("reading a request"),
        }
    }
    Ok(())
}

/// A restored process reports its `remote` result; only children of this node's sessions may.
fn store_report(shared: &Shared, pid: Option<i32>, value: &[u8]) -> Result<()> {
    let pid = pid.context("caller has no PID")?;
    let status = telefork_engine::procfs::read_status(nix::unistd::Pid::from_raw(pid))
        .with_context(|| format!("process {pid} is gone"))?;
    let (ppid, uid) = (status.ppid, status.uid[0]);
    let marker = shared.sessions_dir().join(format!("{uid}.{ppid}"));
    if !marker.exists() {
        bail!("process {pid} is not a process this node restored");
    }
    // (Root's, 0600, created without following a link: `safe_file`.)
    crate::safe_file::write_file(&shared.results_dir().join(pid.to_string()), value, 0o600, true)
        .context("storing the result")
}

/// A connection to a destination (TCP connect, TLS handshake, the peer's name checked):
/// kept from the last child or made ahead of time for a telefork that may follow, or being
/// made by a thread of its own for a telefork whose capture begins meanwhile.
struct Connecting {
    name: String,
    addr: std::net::SocketAddr,
    /// Made ahead of time (a spare connection's `Prepare`) or kept from the last child, not
    /// for this telefork: it may have been dropped by the destination meanwhile.
    ahead: bool,
    began: std::time::Instant,
    made: Made,
}

enum Made {
    Done(Box<Result<TlsChannel>>),
    /// Being made by a thread of its own; the result comes on the channel.
    Pending(std::sync::mpsc::Receiver<Result<TlsChannel>>),
}

/// A destination drops a prepared connection left unused for `dest::OFFER_WAIT` (40 s); one
/// older than this is not trusted to be there for an image sent without waiting for the
/// answer.
const PREPARED_FRESH: Duration = Duration::from_secs(30);

impl Connecting {
    /// Connects now (a failure shows when the connection is used: then it connects anew).
    fn ahead(shared: &Shared, dest: &str) -> Result<Connecting> {
        let (name, addr) = shared.cfg.resolve(dest)?;
        let began = std::time::Instant::now();
        let made = Made::Done(Box::new(connect_tls(shared.client_tls.clone(), &name, addr)));
        Ok(Connecting { name, addr, ahead: true, began, made })
    }

    /// The connection to node `name` at `addr` whose last child has ended, handed back to
    /// the destination's session (`ToDest::Again`) for the next offer.
    fn kept(name: String, addr: std::net::SocketAddr, ch: TlsChannel) -> Result<Connecting> {
        // (An answer awaited on it is bounded as on a new connection.)
        ch.set_recv_timeout(Some(crate::dest::HANDSHAKE_TIMEOUT));
        ch.send(&ToDest::Again)?;
        Ok(Connecting {
            name,
            addr,
            ahead: true,
            began: std::time::Instant::now(),
            made: Made::Done(Box::new(Ok(ch))),
        })
    }

    /// Starts connecting to node `name` at `addr` in a thread of its own, for a telefork whose
    /// capture begins meanwhile.
    fn start(shared: &Shared, name: &str, addr: std::net::SocketAddr) -> Result<Connecting> {
        let (tls, node, name) = (shared.client_tls.clone(), name.to_string(), name.to_string());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("connecting".into())
            .spawn(move || {
                let _ = tx.send(connect_tls(tls, &node, addr));
            })
            .context("starting a thread to connect")?;
        Ok(Connecting {
            name,
            addr,
            ahead: false,
            began: std::time::Instant::now(),
            made: Made::Pending(rx),
        })
    }

    fn finish(self) -> Result<TlsChannel> {
        match self.made {
            Made::Done(r) => *r,
            Made::Pending(rx) => rx.recv().unwrap_or_else(|_| {
                Err(anyhow::anyhow!("the thread connecting to {} is gone", self.name))
            }),
        }
    }
}

/// Connects to node `name` at `addr` and authenticates it.
fn connect_tls(
    tls: Arc<rustls::ClientConfig>,
    name: &str,
    addr: std::net::SocketAddr,
) -> Result<TlsChannel> {
    // (Every failure here means the destination cannot be reached as itself.)
    let unreachable = |e: anyhow::Error| -> anyhow::Error {
        Failure::Unreachable { node: name.to_string(), reason: format!("{e:#}") }.into()
    };
    let sock = connect(addr, Duration::from_secs(5)).map_err(unreachable)?;
    let ch = TlsChannel::client(
        tls,
        crate::tls::server_name(name).map_err(unreachable)?,
        sock,
        crate::dest::HANDSHAKE_TIMEOUT,
    )
    .with_context(|| format!("connecting to node {name} at {addr}"))
    .map_err(unreachable)?;
    check_peer_name(&ch, Some(name)).map_err(unreachable)?;
    Ok(ch)
}

/// The connection an image goes out on, with its offer sent first, opened when first
/// needed: a small encrypted image's capture begins while the connection is still being made
/// and needs it only when the process record goes out (about a millisecond later).
struct Link<'a> {
    tls: &'a Arc<rustls::ClientConfig>,
    offer: &'a ToDest,
    /// Wait for the answer to the offer before anything else is sent.
    await_answer: bool,
    connecting: std::sync::Mutex<Option<Connecting>>,
    ch: std::sync::OnceLock<TlsChannel>,
    /// (How it was opened and when, for the log.)
    opened: std::sync::OnceLock<(&'static str, std::time::Instant)>,
    /// Why opening it failed, typed (opened inside the capture's writes, the error reaches
    /// the capture's caller as text).
    failed: std::sync::Mutex<Option<Failure>>,
}

impl Link<'_> {
    /// The connection, opened now if it is not yet (once: after a failure, only errors).
    /// Only the capture's thread opens it; a caller from another thread while it opens
    /// would get an error, not wait.
    fn channel(&self) -> Result<&TlsChannel> {
        if let Some(ch) = self.ch.get() {
            return Ok(ch);
        }
        let connecting = self
            .connecting
            .lock()
            .map_err(|_| anyhow::anyhow!("connection state poisoned"))?
            .take();
        let connecting = connecting.context("the connection to the destination failed")?;
        let ch = self.open(connecting).inspect_err(|e| {
            if let (Some(f), Ok(mut failed)) = (e.downcast_ref::<Failure>(), self.failed.lock()) {
                *failed = Some(f.clone());
            }
        })?;
        Ok(self.ch.get_or_init(|| ch))
    }

    fn open(&self, connecting: Connecting) -> Result<TlsChannel> {
        let (name, addr, ahead) = (connecting.name.clone(), connecting.addr, connecting.ahead);
        let offered = |ch: TlsChannel| -> Result<TlsChannel> {
            if self.await_answer {
                offer(&ch, &name, self.offer)?;
            } else {
                ch.send_first(self.offer)?;
            }
            Ok(ch)
        };
        // (A destination drops a connection made ahead of time and left unused for a while:
        // then connect anew — nothing was sent yet.)
        let ch = match connecting
            .finish()
            .and_then(
                |ch| if still_open(&ch) { Ok(ch) } else { bail!("closed by the destination") },
            )
            .and_then(offered)
        {
            Ok(ch) => {
                let _ = self.opened.set((
                    if ahead { "prepared connection" } else { "connected" },
                    std::time::Instant::now(),
                ));
                return Ok(ch);
            }
            // (Not when the destination answered: it would answer the same again.)
            Err(e) if ahead && !said_by_destination(&e) => {
                tracing::info!(
                    "the connection prepared to {name} is gone ({e:#}); connecting anew"
                );
                connect_tls(self.tls.clone(), &name, addr).and_then(offered)?
            }
            Err(e) => return Err(e),
        };
        let _ = self.opened.set(("connected anew", std::time::Instant::now()));
        Ok(ch)
    }
}

impl Write for &Link<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut ch = self.channel().map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        ch.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Offers the process on `ch`; true if accepted (an error if refused).
fn offer(ch: &TlsChannel, name: &str, offer: &ToDest) -> Result<()> {
    // (A request: behind our hello.)
    ch.send_first(offer)?;
    match ch.expect::<FromDest>("the destination's answer")? {
        FromDest::Accept => Ok(()),
        other => Err(dest_said(other)
            .unwrap_or_else(|other| anyhow::anyhow!("node {name} answered {other:?} to an offer"))),
    }
}

/// Images up to this size follow their offer without waiting for the answer.
const FOLLOWS_OFFER_MAX: u64 = 16 << 20;

/// Whether a connection made ahead of time or kept from the last child is still open:
/// nothing may have arrived on it since, so anything readable is its end (the destination
/// dropped it).
fn still_open(ch: &TlsChannel) -> bool {
    let mut p = [libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&ch.socket_fd()),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(p.as_mut_ptr(), 1, 0) == 0 }
}

/// Whether an error is the destination's answer (a refusal or a failure it reported, not
/// worth a retry on a fresh connection), rather than a connection that failed.
fn said_by_destination(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Failure>().is_some_and(|f| !matches!(f, Failure::Unreachable { .. }))
}

/// Checks the child, offers it to `dest`, streams it, and returns once it runs there.
#[allow(clippy::too_many_arguments)]
fn send_away(
    shared: &Shared,
    caller: Option<i32>,
    user: &User,
    child: i32,
    dest: &str,
    pass_stdin: bool,
    prepared: Option<Connecting>,
    reader: Option<&OutsideReader>,
    mut tell: impl FnMut(FromDaemon) -> Result<()>,
) -> Result<(TlsChannel, String, std::net::SocketAddr)> {
    let t0 = std::time::Instant::now();
    telefork_engine::timeline::stamp("origin request");
    let ms = |t: std::time::Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    // (What the checks of the request find is a failure of that stage.)
    let node = &shared.cfg.node;
    let check = |e: anyhow::Error| -> anyhow::Error {
        Failure::Failed { node: node.clone(), stage: Stage::Check, message: format!("{e:#}") }
            .into()
    };
    let caller = caller.context("caller has no PID").map_err(check)?;
    let status = if child > 0 {
        telefork_engine::procfs::read_status(nix::unistd::Pid::from_raw(child)).ok()
    } else {
        None
    };
    if status.as_ref().map(|s| s.ppid) != Some(caller) {
        let e = anyhow::anyhow!("process {child} is not a child of the calling process {caller}");
        return Err(check(e));
    }
    if status.as_ref().map(|s| s.uid[0]) != Some(user.uid) {
        let e = anyhow::anyhow!("process {child} does not belong to the calling user {}", user.uid);
        return Err(check(e));
    }
    // The connection: the one made ahead of time if it goes there, else one made now by a
    // thread of its own while the child is checked and captured. Only to configured peers.
    let (name, addr) = shared.cfg.resolve(dest).map_err(|e| Failure::Refused {
        node: node.clone(),
        limit: Limit::Peers,
        reason: e.to_string(),
    })?;
    let connecting = match prepared.filter(|c| c.name == name) {
        Some(c) => c,
        None => Connecting::start(shared, &name, addr)?,
    };
    wait_self_stopped(child).map_err(check)?;
    let t_stopped = std::time::Instant::now();
    telefork_engine::timeline::stamp("origin stopped");
    // (Resident and swapped out: swapped pages travel too. Read once the child is stopped.)
    let stopped_status = telefork_engine::procfs::read_status(nix::unistd::Pid::from_raw(child));
    let image_bytes = stopped_status
        .map(|s| (s.vm_rss_kib.unwrap_or(0) + s.vm_swap_kib.unwrap_or(0)) * 1024)
        .unwrap_or(0);
    let plain_image = shared.cfg.transport.image == crate::config::ImageTransport::Plain;
    // A small encrypted image follows its offer at once: one round trip less, and the capture
    // begins while the connection is still being made. A big one waits for the answer (a
    // refused one would be sent for nothing), and so does a plain one (its raw bytes must not
    // reach the destination while it still reads TLS records ahead). So does one on a
    // prepared connection near its destination's idle limit: if it has just been dropped,
    // that shows before any image byte is sent, and we connect anew.
    let stale = connecting.ahead && connecting.began.elapsed() >= PREPARED_FRESH;
    let image_follows = !plain_image && image_bytes <= FOLLOWS_OFFER_MAX && !stale;
    let the_offer = ToDest::Offer {
        user: user.clone(),
        origin: shared.cfg.node.clone(),
        image_bytes,
        pass_stdin,
        plain_image,
        image_follows,
    };
    let link = Link {
        tls: &shared.client_tls,
        offer: &the_offer,
        await_answer: !image_follows,
        connecting: std::sync::Mutex::new(Some(connecting)),
        ch: std::sync::OnceLock::new(),
        opened: std::sync::OnceLock::new(),
        failed: std::sync::Mutex::new(None),
    };
    if !image_follows {
        link.channel()?;
        // (A program that went away meanwhile is noticed by the relay.)
        let _ = tell(FromDaemon::Accepted { node: name.clone() });
    }
    // A plain image goes straight onto the TCP socket beneath TLS (its connection is open:
    // a plain image never follows its offer).
    let plain_socket = if plain_image { Some(link.channel()?) } else { None };
    // Where the frozen process hands over its own memory (images over the engine's inline
    // size; used only after the process record went out, so on a connection opened by
    // then): onto the socket (plain), or into a pipe whose bytes are read straight into TLS
    // records.
    let forward = |pipe: std::os::fd::BorrowedFd<'_>, len: usize| {
        link.channel()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?
            .send_from(std::os::fd::AsRawFd::as_raw_fd(&pipe), len)
    };
    let page_route = Some(match plain_socket {
        Some(ch) => telefork_engine::PageRoute::Socket(ch.socket_fd()),
        None => telefork_engine::PageRoute::Pipe(&forward),
    });
    let opts = telefork_engine::DumpOptions {
        leave_running: false,
        inherit_stdio: true,
        // TLS authenticates every byte; the plain transport is trusted by configuration.
        skip_page_checksums: true,
        page_route,
        outside_reader: reader,
        // (A fresh fork of the caller: it has no children; were one there, refuse.)
        ignore_children: false,
        // It shares its open files with the caller, which runs on.
        fork_copy: true,
    };
    let mut started = None;
    let mut t_sent = t_stopped;
    // The capture streams into the connection; the local copy dies only after the
    // destination says the process runs there.
    let sink: Box<dyn Write + Send + '_> = match plain_socket {
        Some(ch) => Box::new(ch.raw_socket()?),
        None => Box::new(&link),
    };
    let dumped = telefork_engine::dump(
        Pid::from_raw(child),
        std::io::BufWriter::with_capacity(1 << 20, sink),
        &opts,
        |mut w| {
            w.flush().context("sending the image")?;
            t_sent = std::time::Instant::now();
            telefork_engine::timeline::stamp("origin image flushed");
            let ch = link.channel()?;
            ch.set_recv_timeout(Some(Duration::from_secs(60)));
            if image_follows {
                // The answer to the offer, sent while the image was on its way.
                match ch.expect::<FromDest>("the destination's answer")? {
                    FromDest::Accept => {
                        let _ = tell(FromDaemon::Accepted { node: name.clone() });
                    }
                    other => {
                        return Err(dest_said(other).unwrap_or_else(|other| {
                            anyhow::anyhow!("node {name} answered {other:?} to an offer")
                        }))
                    }
                }
            }
            match ch.expect::<FromDest>("the destination's restore result")? {
                FromDest::Started { pid } => {
                    started = Some(pid);
                    telefork_engine::timeline::stamp("origin got Started");
                    let _ = tell(FromDaemon::Started { node: name.clone(), pid });
                    telefork_engine::timeline::stamp("origin told Started");
                    Ok(())
                }
                other => Err(dest_said(other).unwrap_or_else(|other| {
                    anyhow::anyhow!("node {name} answered {other:?} after the image")
                })),
            }
        },
    );
    // Sending failed before the destination's answer was read: it may have stopped reading
    // and said why (a refusal, or a restore that failed while the image was arriving). Its
    // word is the error, not our broken pipe.
    let dumped = dumped.map_err(|e| {
        let e = e.into_chain();
        if e.downcast_ref::<Failure>().is_some() {
            return e;
        }
        if let Some(word) = link.ch.get().and_then(|ch| last_word(ch, &name)) {
            return word;
        }
        // (A connection opened inside the capture's writes, typed.)
        match link.failed.lock().ok().and_then(|mut f| f.take()) {
            Some(f) => f.into(),
            None => e,
        }
    });
    dumped.with_context(|| format!("sending process {child} to node {name}"))?;
    let pid = started.context("destination gave no PID")?;
    let t_end = std::time::Instant::now();
    let (how, t_offered) = link.opened.get().copied().unwrap_or(("connected", t_end));
    let ch = link.ch.into_inner().context("no connection to the destination")?;
    ch.set_recv_timeout(None);
    tracing::info!(
        "process {child} of user {} now runs on {name} as {pid} ({how}; ms since request: stopped {:.2}, offered {:.2}, image sent {:.2}, running {:.2})",
        user.uid,
        ms(t_stopped),
        ms(t_offered),
        ms(t_sent),
        ms(t_end)
    );
    Ok((ch, name, addr))
}

/// What the destination said last, if it said anything within a moment: read after sending
/// to it failed.
fn last_word(ch: &TlsChannel, name: &str) -> Option<anyhow::Error> {
    ch.set_recv_timeout(Some(Duration::from_secs(2)));
    loop {
        match ch.recv::<FromDest>() {
            Ok(Some(FromDest::Accept)) => continue, // (the answer to an offer the image followed)
            Ok(Some(msg)) => return dest_said(msg).ok(),
            // (A destination of another protocol version says so by its hello.)
            Err(e) if matches!(e.downcast_ref(), Some(proto::Error::Version { .. })) => {
                return Some(crate::failure::of(&e, "", name, Stage::Send).into())
            }
            _ => return None,
        }
    }
}

/// The destination's refusal or failure (typed: the error the program gets); any other
/// message back, for the caller to name.
fn dest_said(msg: FromDest) -> std::result::Result<anyhow::Error, FromDest> {
    match msg {
        FromDest::Failed(failure) => Ok(failure.into()),
        other => Err(other),
    }
}

/// Waits until the child has stopped itself (its SIGSTOP right after fork): capturing it
/// any earlier would catch it before the stop, which it would then perform on the
/// destination.
fn wait_self_stopped(child: i32) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut spins = 0;
    loop {
        let stat = telefork_engine::procfs::read_stat(nix::unistd::Pid::from_raw(child))
            .with_context(|| format!("process {child} is gone"))?;
        match stat.state() {
            Some('T' | 't') => return Ok(()),
            Some('Z' | 'X') => bail!("process {child} exited before it could be sent"),
            _ if std::time::Instant::now() > deadline => {
                bail!("process {child} did not stop within 10 s")
            }
            // (The program asks right after its fork: the child is usually a few system
            // calls away from its stop. Give it the CPU a few times before sleeping.)
            _ if spins < 20 => {
                spins += 1;
                std::thread::yield_now();
            }
            _ => std::thread::sleep(Duration::from_micros(50)),
        }
    }
}

/// What the program says on `sock` while its child runs and once it has ended: kill requests
/// go to the destination (a program that goes away leaves its child be). The child's end is
/// a byte on `ended` — 1: wait up to `AGAIN_WAIT` for `Again` or `Done`; 2: give up at once.
/// True if the program handed the connection back (`Again`).
fn program_commands(sock: &UnixStream, ended: &OwnedFd, ch: &TlsChannel, pass_stdin: bool) -> bool {
    let mut deadline = None;
    loop {
        let mut fds = [
            libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: ended.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let watched = if deadline.is_some() { 1 } else { 2 };
        let timeout = deadline.map_or(-1, |d: std::time::Instant| {
            d.saturating_duration_since(std::time::Instant::now())
                .as_millis()
                .clamp(1, i32::MAX as u128) as i32
        });
        // SAFETY: `fds` holds `watched` valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), watched as libc::nfds_t, timeout) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            return false; // (no answer after the end, or poll failed)
        }
        if watched == 2 && fds[1].revents != 0 {
            let mut byte = [0u8];
            if !matches!(nix::unistd::read(ended.as_raw_fd(), &mut byte), Ok(1)) || byte[0] != 1 {
                return false;
            }
            deadline = Some(std::time::Instant::now() + AGAIN_WAIT);
            continue;
        }
        let mut r = sock;
        match proto::read_frame::<_, LocalCommand>(&mut r) {
            Ok(Some(LocalCommand::Kill { signal })) => {
                if deadline.is_none() {
                    let _ = ch.send(&ToDest::Kill { signal }); // (a dead link shows in the relay)
                }
            }
            Ok(Some(LocalCommand::Waiting)) => {}
            // (The library sends it once it has read the child's end.)
            Ok(Some(LocalCommand::Again)) if !pass_stdin => return true,
            Ok(Some(LocalCommand::Again | LocalCommand::Done)) | Ok(None) | Err(_) => return false,
        }
    }
}

/// What the program does with its connection once its child's fate is known.
enum AfterRelay {
    /// It sent `LocalCommand::Again`: its next request comes on this connection. With the
    /// connection to the destination, whose session can serve the next offer.
    Again(Box<TlsChannel>),
    /// It said `Done`, closed the connection or said nothing within `AGAIN_WAIT`; or the
    /// child's fate could not be told, or the program's stdin was relayed (read to its end).
    End,
}

/// How long a session waits, after the child's end, for its program to hand the connection
/// back (the library answers at once when it reads the end).
const AGAIN_WAIT: Duration = Duration::from_secs(30);

/// Relays between the program and the remote child until the child's fate is known; then
/// learns whether the program hands the connection back for another telefork.
fn relay(
    ch: TlsChannel,
    name: &str,
    sock: &UnixStream,
    fds: Vec<OwnedFd>,
    pass_stdin: bool,
) -> Result<AfterRelay> {
    let ch = Arc::new(ch);
    let mut fds = fds.into_iter();
    let mut stdout = fds.next().map(File::from);
    let mut stderr = fds.next().map(File::from);
    let stdin = if pass_stdin { fds.next().map(File::from) } else { None };
    let (ended_r, ended_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    let again = std::thread::scope(|scope| -> Result<bool> {
        // Program → destination: kill requests; after the child's end, the program's answer.
        let commands = scope.spawn(|| {
            telefork_engine::timeline::stamp("origin commands thread");
            program_commands(sock, &ended_r, &ch, pass_stdin)
        });
        if let Some(mut input) = stdin {
            let ch = ch.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match input.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = ch.send(&ToDest::StdinEof);
                            return;
                        }
                        Ok(n) => {
                            if ch.send(&ToDest::Stdin { data: buf[..n].to_vec() }).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
        // Destination → program: output, result, exit.
        let mut to_program = sock;
        let ended = loop {
            match ch.recv::<FromDest>() {
                Ok(Some(FromDest::Stdout { data })) => {
                    if let Some(f) = stdout.as_mut() {
                        let _ = f.write_all(&data);
                    }
                }
                Ok(Some(FromDest::Stderr { data })) => {
                    if let Some(f) = stderr.as_mut() {
                        let _ = f.write_all(&data);
                    }
                }
                Ok(Some(FromDest::Result { value })) => {
                    let _ = proto::write_frame(&mut to_program, &FromDaemon::Result { value });
                }
                Ok(Some(FromDest::Exited(info))) => {
                    telefork_engine::timeline::stamp("origin got Exited");
                    break proto::write_frame(&mut to_program, &FromDaemon::Exited(info)).is_ok();
                }
                Ok(Some(other)) => {
                    tracing::warn!("unexpected message from the destination: {other:?}")
                }
                Ok(None) => {
                    let lost = Failure::Lost {
                        node: name.to_string(),
                        message: "the destination closed the connection".into(),
                    };
                    let _ = proto::write_frame(&mut to_program, &FromDaemon::Failed(lost));
                    break false;
                }
                Err(e) => {
                    let lost = Failure::Lost { node: name.to_string(), message: format!("{e:#}") };
                    let _ = proto::write_frame(&mut to_program, &FromDaemon::Failed(lost));
                    break false;
                }
            }
        };
        // The child's end went to the program: its answer decides. Else give up at once: the
        // program heard why (or is gone).
        let _ = nix::unistd::write(&ended_w, &[if ended && !pass_stdin { 1 } else { 2 }]);
        // (An `Again` read before the end was told counts only if the end was told.)
        Ok(commands.join().unwrap_or(false) && ended)
    })?;
    // (Only this function held the connection then: no stdin was relayed.)
    Ok(match Arc::try_unwrap(ch) {
        Ok(ch) if again => AfterRelay::Again(Box::new(ch)),
        _ => AfterRelay::End,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a session makes of a program's request, as the program sends it.
    fn session_reads(bytes: &[u8]) -> (Result<Option<LocalRequest>>, Vec<u8>) {
        let (program, session) = UnixStream::pair().unwrap();
        (&program).write_all(bytes).unwrap();
        program.shutdown(std::net::Shutdown::Write).unwrap();
        let got = recv_first(&session, "node1").map(|r| r.map(|(req, _)| req));
        drop(session);
        // (Read to the end, or to the reset the unread request causes: after what was said.)
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = (&program).read(&mut buf) {
            answer.extend_from_slice(&buf[..n]);
        }
        (got, answer)
    }

    #[test]
    fn a_request_behind_our_hello_is_served() {
        let (got, answer) = session_reads(&proto::encode_first(&LocalRequest::WhoAmI).unwrap());
        assert_eq!(got.unwrap(), Some(LocalRequest::WhoAmI));
        assert!(answer.is_empty(), "{answer:?}");
    }

    /// A library of the next version: the session stops, and the program reads our hello and
    /// a typed mismatch naming both versions (from its side).
    #[test]
    fn a_library_of_the_next_version_is_refused_naming_both() {
        let next = proto::PROTOCOL_VERSION + 1;
        let mut bytes = proto::encode_first(&LocalRequest::WhoAmI).unwrap();
        bytes[8..12].copy_from_slice(&next.to_le_bytes());
        let (got, answer) = session_reads(&bytes);
        let e = got.unwrap_err();
        assert!(
            matches!(e.downcast_ref::<proto::Error>(), Some(proto::Error::Version { ours, theirs })
                if (*ours, *theirs) == (proto::PROTOCOL_VERSION, next)),
            "{e:#}"
        );
        assert_eq!(hello_version_of(&answer), Some(proto::PROTOCOL_VERSION));
        let told: FromDaemon = proto::decode_body(&answer[16..]).unwrap();
        assert_eq!(
            told,
            FromDaemon::Failed(Failure::Protocol {
                node: "node1".into(),
                ours: next,
                theirs: proto::PROTOCOL_VERSION
            })
        );
    }

    /// A library from before versions sends no hello: it is told in the form it reads (its
    /// `FromDaemon::Failed { error }`, variant 2).
    #[test]
    fn a_library_from_before_versions_is_told_in_its_own_words() {
        let (got, answer) = session_reads(&proto::encode_frame(&LocalRequest::WhoAmI).unwrap());
        assert!(got.is_err());
        let (variant, text): (u32, String) = proto::decode_body(&answer[4..]).unwrap();
        assert_eq!(variant, 2);
        assert!(text.contains("before protocol versions"), "{text}");
    }

    fn hello_version_of(answer: &[u8]) -> Option<u32> {
        answer.get(4..12).and_then(proto::hello_version)
    }
}
