//! Who gets a session process, and when: the daemon's main loop. A connection costs a
//! process only once it has earned one:
//!
//! - **From other nodes** (TCP), the mutual-TLS handshake runs here, in this single-threaded
//!   event loop, before any process exists for the connection: a peer without a valid
//!   certificate costs a file descriptor and a few milliseconds of CPU, for at most
//!   `PREAUTH_LIMIT`. At most `max_handshakes` run at once, `max_handshakes_per_source` of
//!   them from one source (an address; another daemon's connections, from a reserved port,
//!   are a source of their own); further connections wait in the order they came, served
//!   round the sources, so a flood from one source delays nobody else. An authenticated node
//!   gets a session (forked with the completed handshake in its memory) unless that node
//!   already has `max_sessions_per_peer` of them or the daemon `max_sessions`: then it is
//!   told so, on the authenticated connection, naming the limit.
//! - **From local programs** (the Unix socket), a user has at most `max_sessions_per_user`
//!   sessions; their further connections wait here, without a process, until one ends (in
//!   the order they came), for at most `LOCAL_WAIT`, at most `max_waiting_per_user` of them.
//!   Beyond that, or after that, the program is told which limit refused it.
//!
//! A refused connection gets its reason, and its peer's bytes are read and dropped for a
//! while (`DRAIN_LIMIT`), so the reason is read, not lost to a reset.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::channel::PendingServer;
use crate::daemon::{spawn_session, Shared};
use crate::proto::{Failure, FromDaemon, FromDest, Limit};

/// A connection from another node must have completed its handshake this long after it was
/// accepted (waiting for a handshake slot included) ...
pub const PREAUTH_LIMIT: Duration = Duration::from_secs(10);
/// ... and its handshake this long after it began: a short bound, since a handshake takes a
/// few milliseconds.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(5);
/// A client that has sent nothing this long after its handshake began (a real one sends its
/// hello as soon as it has connected) loses its slot.
pub const HELLO_LIMIT: Duration = Duration::from_secs(3);
/// A local connection waits at most this long for one of its user's sessions.
pub const LOCAL_WAIT: Duration = Duration::from_secs(60);
/// A refused connection's bytes are read and dropped for at most this long.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Connections waiting for a handshake in all, and refused connections being drained.
const MAX_WAITING_TCP: usize = 1024;
const MAX_DRAINING: usize = 256;
/// Local connections waiting in all (each user has `max_waiting_per_user`).
const MAX_WAITING_LOCAL: usize = 4096;

/// Where a connection comes from, for the limits and the turns: its address, and whether it
/// comes from a reserved port (below 1024, which only root may bind: another daemon's, see
/// `channel::connect`). A host's daemon and its other users are two sources, so a user who
/// floods us from that host delays only their own connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Source {
    ip: IpAddr,
    reserved_port: bool,
}

impl Source {
    fn of(peer: &SocketAddr) -> Source {
        Source { ip: peer.ip(), reserved_port: peer.port() < 1024 }
    }
}

/// What a session serves: a local user's program, or a peer node's connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Kind {
    Local(u32),
    Peer(String),
}

struct Handshaking {
    sock: TcpStream,
    peer: SocketAddr,
    tls: PendingServer,
    began: Instant,
    arrived: Instant,
    /// Whether the client has sent anything yet (a real one sends its hello at once).
    heard: bool,
}

struct Draining {
    fd: OwnedFd,
    until: Instant,
}

/// Counts of what was refused or failed since the last summary (a flood must not flood the
/// log: one line every `SUMMARY_EVERY`).
#[derive(Default)]
struct Tally {
    closed_waiting_full: u64,
    handshake_failed: u64,
    handshake_timed_out: u64,
    since: Option<Instant>,
}

const SUMMARY_EVERY: Duration = Duration::from_secs(5);
/// Failed handshakes logged one by one per summary period (the rest only counted).
const LOGGED_PER_SUMMARY: u64 = 10;

pub struct Admission<'a> {
    shared: &'a Shared,
    tcp: TcpListener,
    unix: UnixListener,
    sessions: HashMap<Pid, Kind>,
    handshaking: Vec<Handshaking>,
    /// Accepted, waiting for a handshake slot, per source (and the order sources are served in).
    waiting_tcp: HashMap<Source, VecDeque<(TcpStream, SocketAddr, Instant)>>,
    source_turns: VecDeque<Source>,
    /// Local connections waiting for a session of their user, in arrival order.
    waiting_local: VecDeque<(UnixStream, u32, Instant)>,
    draining: Vec<Draining>,
    tally: Tally,
}

impl<'a> Admission<'a> {
    pub fn new(shared: &'a Shared, tcp: TcpListener, unix: UnixListener) -> Result<Admission<'a>> {
        tcp.set_nonblocking(true).context("making the TCP listener non-blocking")?;
        unix.set_nonblocking(true).context("making the Unix listener non-blocking")?;
        raise_fd_limit();
        Ok(Admission {
            shared,
            tcp,
            unix,
            sessions: HashMap::new(),
            handshaking: Vec::new(),
            waiting_tcp: HashMap::new(),
            source_turns: VecDeque::new(),
            waiting_local: VecDeque::new(),
            draining: Vec::new(),
            tally: Tally::default(),
        })
    }

    /// Serves connections forever.
    pub fn run(&mut self) -> Result<()> {
        loop {
            self.reap();
            self.expire();
            self.start_local_sessions();
            self.start_handshakes();
            self.summarize();
            self.wait_and_serve()?;
        }
    }

    fn count(&self, kind: &Kind) -> usize {
        self.sessions.values().filter(|k| *k == kind).count()
    }

    fn reap(&mut self) {
        while let Ok(st) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            match st.pid() {
                Some(pid) if st != WaitStatus::StillAlive => {
                    let kind = self.sessions.remove(&pid);
                    if let WaitStatus::Signaled(_, sig, _) = st {
                        // (Its restored process, if any, dies with it: the parent-death signal.)
                        let what = match kind {
                            Some(Kind::Peer(node)) => format!("serving node {node}"),
                            Some(Kind::Local(uid)) => format!("serving a program of user {uid}"),
                            None => "unknown".into(),
                        };
                        tracing::warn!("session {pid} ({what}) was killed by {sig}; a process it restored was killed with it");
                    }
                }
                _ => break,
            }
        }
    }

    /// Drops what waited too long: handshakes and waiting connections past their bounds,
    /// local connections that waited `LOCAL_WAIT`, drained connections past `DRAIN_LIMIT`.
    fn expire(&mut self) {
        let now = Instant::now();
        let tally = &mut self.tally;
        self.handshaking.retain(|h| {
            let why = if now >= h.arrived + PREAUTH_LIMIT {
                "not done in time from its arrival (PREAUTH_LIMIT)"
            } else if now >= h.began + HANDSHAKE_LIMIT {
                "not done in time from its start (HANDSHAKE_LIMIT)"
            } else if !h.heard && now >= h.began + HELLO_LIMIT {
                "the client said nothing in time (HELLO_LIMIT)"
            } else {
                return true;
            };
            if tally.handshake_timed_out < LOGGED_PER_SUMMARY {
                tracing::warn!("dropped the handshake of {}: {why}", h.peer);
            }
            tally.handshake_timed_out += 1;
            false
        });
        for queue in self.waiting_tcp.values_mut() {
            let before = queue.len();
            queue.retain(|(_, _, arrived)| now < *arrived + PREAUTH_LIMIT);
            if before > queue.len() && self.tally.handshake_timed_out < LOGGED_PER_SUMMARY {
                tracing::warn!(
                    "dropped {} connections that waited {} s for a handshake slot",
                    before - queue.len(),
                    PREAUTH_LIMIT.as_secs()
                );
            }
            self.tally.handshake_timed_out += (before - queue.len()) as u64;
        }
        self.waiting_tcp.retain(|_, q| !q.is_empty());
        let mut kept = VecDeque::with_capacity(self.waiting_local.len());
        for (sock, uid, arrived) in std::mem::take(&mut self.waiting_local) {
            if now < arrived + LOCAL_WAIT {
                kept.push_back((sock, uid, arrived));
                continue;
            }
            let limits = &self.shared.cfg.limits;
            // (A program's spare connection that has said nothing is just closed, as an idle
            // one always was; one with a request waiting gets the reason.)
            if has_input(sock.as_raw_fd()) {
                let reason = format!(
                    "user {uid} has {} sessions on node {} (limits.max_sessions_per_user = {}) and this connection waited {} s for one of them to end",
                    self.count(&Kind::Local(uid)),
                    self.shared.cfg.node,
                    limits.max_sessions_per_user,
                    LOCAL_WAIT.as_secs()
                );
                self.refuse_local(sock, Limit::MaxSessionsPerUser, reason);
            }
        }
        self.waiting_local = kept;
        self.draining.retain(|d| now < d.until);
    }

    /// Starts sessions for waiting local connections whose user has room, oldest first.
    fn start_local_sessions(&mut self) {
        let limits = &self.shared.cfg.limits;
        let mut i = 0;
        while i < self.waiting_local.len() {
            if self.sessions.len() >= limits.max_sessions as usize {
                return;
            }
            let uid = self.waiting_local[i].1;
            if self.count(&Kind::Local(uid)) >= limits.max_sessions_per_user as usize {
                i += 1;
                continue;
            }
            let Some((sock, uid, _)) = self.waiting_local.remove(i) else { break };
            let shared = self.shared;
            let listeners = self.loop_fds();
            if let Some(pid) = spawn_session(&listeners, || crate::origin::serve(shared, sock)) {
                self.sessions.insert(pid, Kind::Local(uid));
            }
        }
    }

    /// Starts handshakes of waiting connections while there are slots: one address after
    /// another, so that each address's connections wait only behind their own.
    fn start_handshakes(&mut self) {
        let limits = &self.shared.cfg.limits;
        let mut passes = self.source_turns.len();
        while self.handshaking.len() < limits.max_handshakes as usize && passes > 0 {
            passes -= 1;
            let Some(source) = self.source_turns.pop_front() else { break };
            let Some(queue) = self.waiting_tcp.get_mut(&source) else { continue };
            let in_progress =
                self.handshaking.iter().filter(|h| Source::of(&h.peer) == source).count();
            if in_progress < limits.max_handshakes_per_source as usize {
                if let Some((sock, peer, arrived)) = queue.pop_front() {
                    match PendingServer::new(self.shared.server_tls.clone(), &sock, HANDSHAKE_LIMIT)
                    {
                        Ok(tls) => {
                            self.handshaking.push(Handshaking {
                                sock,
                                peer,
                                tls,
                                began: Instant::now(),
                                arrived,
                                heard: false,
                            });
                            passes = self.source_turns.len() + 1; // (progress: another round)
                        }
                        Err(e) => tracing::warn!("cannot start a TLS handshake with {peer}: {e:#}"),
                    }
                }
            }
            if self.waiting_tcp.get(&source).is_some_and(|q| !q.is_empty()) {
                self.source_turns.push_back(source);
            } else {
                self.waiting_tcp.remove(&source);
            }
        }
    }

    fn summarize(&mut self) {
        let since = *self.tally.since.get_or_insert_with(Instant::now);
        if since.elapsed() < SUMMARY_EVERY {
            return;
        }
        let t = std::mem::take(&mut self.tally);
        if t.closed_waiting_full + t.handshake_failed + t.handshake_timed_out > 0 {
            tracing::warn!(
                "in the last {} s: {} connections closed before their handshake (limits.max_waiting_per_source or too many waiting), {} handshakes failed, {} not done in time (limit {} s)",
                since.elapsed().as_secs(),
                t.closed_waiting_full,
                t.handshake_failed,
                t.handshake_timed_out,
                PREAUTH_LIMIT.as_secs()
            );
        }
        self.tally.since = Some(Instant::now());
    }

    /// Every descriptor of this loop, for a new session to close: the listeners and the
    /// connections not its own (a session must not hold other users' connections, nor keep
    /// one open that this loop closes).
    fn loop_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.tcp.as_raw_fd(), self.unix.as_raw_fd()];
        fds.extend(self.handshaking.iter().map(|h| h.sock.as_raw_fd()));
        fds.extend(self.waiting_tcp.values().flatten().map(|(s, _, _)| s.as_raw_fd()));
        fds.extend(self.waiting_local.iter().map(|(s, _, _)| s.as_raw_fd()));
        fds.extend(self.draining.iter().map(|d| d.fd.as_raw_fd()));
        fds
    }

    /// Waits (at most a second) for anything to do, and does it.
    fn wait_and_serve(&mut self) -> Result<()> {
        let mut fds = vec![pollin(self.tcp.as_raw_fd()), pollin(self.unix.as_raw_fd())];
        fds.extend(self.handshaking.iter().map(|h| pollin(h.sock.as_raw_fd())));
        fds.extend(self.draining.iter().map(|d| pollin(d.fd.as_raw_fd())));
        // (Also woken each second for the time limits, and more often while local connections
        // wait: their turns come when sessions end, which this loop learns by looking.)
        let timeout_ms = if self.waiting_local.is_empty() { 1000 } else { 50 };
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e).context("waiting for connections");
        }
        if n == 0 {
            return Ok(());
        }
        let ready = |i: usize| fds[i].revents != 0;
        let handshakes_ready: Vec<bool> =
            (0..self.handshaking.len()).map(|i| ready(2 + i)).collect();
        let drains_ready: Vec<bool> =
            (0..self.draining.len()).map(|i| ready(2 + self.handshaking.len() + i)).collect();
        if ready(0) {
            self.accept_tcp();
        }
        if ready(1) {
            self.accept_local();
        }
        self.serve_drains(&drains_ready);
        self.serve_handshakes(&handshakes_ready);
        Ok(())
    }

    fn accept_tcp(&mut self) {
        let limits = &self.shared.cfg.limits;
        // (A bounded number per wake-up: the rest stay in the kernel's backlog meanwhile.)
        for _ in 0..256 {
            let (sock, peer) = match self.tcp.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    return;
                }
            };
            let waiting_all: usize = self.waiting_tcp.values().map(VecDeque::len).sum();
            let source = Source::of(&peer);
            let from_source = self.waiting_tcp.get(&source).map_or(0, VecDeque::len);
            if from_source >= limits.max_waiting_per_source as usize
                || waiting_all >= MAX_WAITING_TCP
            {
                // Unauthenticated: closed at once, nothing said (it could not be read as ours).
                self.tally.closed_waiting_full += 1;
                continue;
            }
            if sock.set_nonblocking(false).is_err() {
                continue;
            }
            if !self.waiting_tcp.contains_key(&source) {
                self.source_turns.push_back(source);
            }
            self.waiting_tcp.entry(source).or_default().push_back((sock, peer, Instant::now()));
        }
    }

    fn accept_local(&mut self) {
        let limits = &self.shared.cfg.limits;
        for _ in 0..256 {
            let sock = match self.unix.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("accepting a local connection: {e}");
                    return;
                }
            };
            if sock.set_nonblocking(false).is_err() {
                continue;
            }
            let Ok(cred) = getsockopt(&sock, PeerCredentials) else { continue };
            let uid = cred.uid();
            let waiting = self.waiting_local.iter().filter(|(_, u, _)| *u == uid).count();
            if waiting >= limits.max_waiting_per_user as usize
                || self.waiting_local.len() >= MAX_WAITING_LOCAL
            {
                let reason = format!(
                    "user {uid} has {} sessions on node {} and {waiting} connections waiting for one (limits.max_waiting_per_user = {})",
                    self.count(&Kind::Local(uid)),
                    self.shared.cfg.node,
                    limits.max_waiting_per_user
                );
                self.refuse_local(sock, Limit::MaxWaitingPerUser, reason);
                continue;
            }
            self.waiting_local.push_back((sock, uid, Instant::now()));
        }
    }

    /// Tells a local program why its connection is refused, then drains it.
    fn refuse_local(&mut self, sock: UnixStream, limit: Limit, reason: String) {
        let node = self.shared.cfg.node.clone();
        let msg = FromDaemon::Failed(Failure::Refused { node, limit, reason });
        sock.set_write_timeout(Some(Duration::from_millis(100))).ok();
        let mut w = &sock;
        // (The first answer on the connection: behind our hello.)
        let _ = crate::proto::write_first(&mut w, &msg);
        self.drain(OwnedFd::from(sock));
    }

    fn drain(&mut self, fd: OwnedFd) {
        if self.draining.len() < MAX_DRAINING {
            self.draining.push(Draining { fd, until: Instant::now() + DRAIN_LIMIT });
        }
    }

    fn serve_drains(&mut self, ready: &[bool]) {
        let mut buf = [0u8; 16 << 10];
        let mut done = vec![];
        for (i, (d, &r)) in self.draining.iter().zip(ready).enumerate() {
            if r {
                // SAFETY: recv writes at most buf.len() bytes into `buf`.
                let n = unsafe {
                    libc::recv(
                        d.fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n == 0
                    || (n < 0
                        && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock)
                {
                    done.push(i);
                }
            }
        }
        for i in done.into_iter().rev() {
            self.draining.swap_remove(i);
        }
    }

    fn serve_handshakes(&mut self, ready: &[bool]) {
        let mut finished = vec![];
        for (i, (h, &r)) in self.handshaking.iter_mut().zip(ready).enumerate() {
            if !r {
                continue;
            }
            h.heard = true;
            match h.tls.progress(&h.sock) {
                Ok(false) => {}
                Ok(true) => finished.push((i, true)),
                Err(e) => {
                    if self.tally.handshake_failed < LOGGED_PER_SUMMARY {
                        // (The first few of each summary period, with their reasons; then counted.)
                        tracing::warn!("rejected connection from {}: {e:#}", h.peer);
                    }
                    self.tally.handshake_failed += 1;
                    finished.push((i, false));
                }
            }
        }
        for (i, ok) in finished.into_iter().rev() {
            let h = self.handshaking.swap_remove(i);
            if ok {
                self.admit_peer(h);
            }
        }
    }

    /// An authenticated node: a session for it, or a refusal naming the limit.
    fn admit_peer(&mut self, h: Handshaking) {
        let Some(origin) = crate::tls::peer_node_name(&h.tls.peer_certificates()) else {
            tracing::warn!(
                "rejected connection from {}: its certificate carries no node name",
                h.peer
            );
            return;
        };
        let limits = &self.shared.cfg.limits;
        let node = &self.shared.cfg.node;
        let from_peer = self.count(&Kind::Peer(origin.clone()));
        let refusal = if from_peer >= limits.max_sessions_per_peer as usize {
            Some((Limit::MaxSessionsPerPeer, format!("node {node} already serves {from_peer} connections from node {origin} (limits.max_sessions_per_peer)")))
        } else if self.sessions.len() >= limits.max_sessions as usize {
            Some((
                Limit::MaxSessions,
                format!(
                    "node {node} already runs {} sessions (limits.max_sessions)",
                    self.sessions.len()
                ),
            ))
        } else {
            None
        };
        let Handshaking { sock, peer, tls, .. } = h;
        if let Some((limit, reason)) = refusal {
            tracing::warn!("refused a connection from {origin} ({peer}): {reason}");
            // (On the authenticated connection: the origin reads it as the answer to its offer.)
            match tls.finish(sock, Duration::from_millis(200)) {
                Ok(ch) => {
                    let node = node.clone();
                    let refused = Failure::Refused { node, limit, reason };
                    let _ = ch.send_first(&FromDest::Failed(refused));
                    if let Ok(sock) = ch.into_socket() {
                        self.drain(OwnedFd::from(sock));
                    }
                }
                Err(e) => tracing::warn!("refusing {origin}: {e:#}"),
            }
            return;
        }
        let shared = self.shared;
        let listeners = self.loop_fds();
        let name = origin.clone();
        if let Some(pid) =
            spawn_session(&listeners, move || crate::dest::serve(shared, tls, sock, peer, name))
        {
            self.sessions.insert(pid, Kind::Peer(origin));
        }
    }
}

fn pollin(fd: RawFd) -> libc::pollfd {
    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
}

/// Whether bytes wait to be read on `fd` (without taking them).
fn has_input(fd: RawFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: recv writes at most one byte into `b`.
    unsafe { libc::recv(fd, b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) > 0 }
}

/// Every waiting connection holds a descriptor: the soft limit goes up to the hard one (at
/// most 65536), so that a flood meets our limits, not EMFILE.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(65536);
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want, hard);
        }
    }
}
