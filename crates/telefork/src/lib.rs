//! telefork: fork(), except the child appears on another machine of the cluster.
//!
//! ```no_run
//! match telefork::telefork("node2")? {
//!     telefork::Fork::Child => { println!("hello from node2"); std::process::exit(0) }
//!     telefork::Fork::Parent(mut child) => { let status = child.wait()?; println!("{status}") }
//! }
//! # Ok::<(), telefork::Error>(())
//! ```
//!
//! How: the calling thread forks a local child that stops itself at once (SIGSTOP) — that
//! stopped child *is* the snapshot, copy-on-write, so the parent goes on immediately. The
//! node's daemon (reached through a Unix socket, so the program needs no credentials) checks
//! that the child is the caller's, streams it to the destination's daemon over mutual TLS,
//! and kills the local copy once the destination runs it. The copy there returns from the
//! same `telefork` call with `Fork::Child`. The child's stdout/stderr are relayed to the
//! parent's, and its exit status comes back to `RemoteChild::wait`.
//!
//! State the library owns: the connection to the local daemon, held by `RemoteChild` (and
//! listed in `HELD_FDS`, so that a later telefork's child leaves it behind).
//!
//! Requirements: the program runs on a node whose daemon (`telefork daemon`) listens on
//! [`DEFAULT_SOCKET`] (or where [`SOCKET_ENV`] says), and the calling process is
//! single-threaded at the moment of the call in what it needs on the other side: only the
//! calling thread travels. Failures are values of [`Error`] to match on.
//!
//! The library speaks the daemon's protocol of version [`PROTOCOL_VERSION`]; a daemon of
//! another version is refused with [`Error::Protocol`] naming both. It reports what it does
//! as `tracing` events (debug), for a subscriber the program may install; it installs none.

#![deny(missing_docs)]

use std::io::{IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde::{de::DeserializeOwned, Serialize};
use telefork_engine::pidfd;
use telefork_engine::timeline::Timeline;
use telefork_proto::{self as proto, ExitInfo, Failure, FromDaemon, LocalCommand, LocalRequest};

pub use telefork_proto::{Limit, Stage, Uncarried, DEFAULT_SOCKET, PROTOCOL_VERSION, SOCKET_ENV};

/// Why a call of this library failed: a value to match on. Its `Display` is the message for a
/// person, naming the node and what happened there.
///
/// ```no_run
/// match telefork::telefork("node2") {
///     Ok(_) => {}
///     Err(telefork::Error::Refused { node, limit: telefork::Limit::MaxRestoresPerUser, .. }) => {
///         eprintln!("{node} is busy with our processes; trying later")
///     }
///     Err(telefork::Error::CannotCarry { what, .. }) => eprintln!("this process cannot travel: {what}"),
///     Err(e) => eprintln!("{e}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The local daemon cannot be reached at `path` (not running, or another socket: see
    /// [`SOCKET_ENV`]).
    #[error("cannot reach the local telefork daemon at {path}: {source} (is `telefork daemon` running? set {SOCKET_ENV} to use another socket)")]
    NoDaemon {
        /// The socket tried ([`daemon_socket`]).
        path: PathBuf,
        /// Why connecting failed.
        source: std::io::Error,
    },
    /// A node (this one or the destination) refused by one of its limits.
    #[error("telefork refused by node {node}: {reason}")]
    Refused {
        /// The node that refused.
        node: String,
        /// The limit of its config that refused ([`Limit::key`] is its key there).
        limit: Limit,
        /// Why, for a person (the limit and its value).
        reason: String,
    },
    /// The destination could not be reached (no connection, a failed TLS handshake, or not
    /// the node it should be).
    #[error("telefork failed: cannot reach node {node}: {reason}")]
    Unreachable {
        /// The destination.
        node: String,
        /// What failed.
        reason: String,
    },
    /// The process holds state the engine cannot carry (an open socket, a second thread, …);
    /// nothing was sent, and the local copy was ended.
    #[error("telefork refused: node {node} cannot carry the process: {what}")]
    CannotCarry {
        /// The node that found it (the origin's capture or the destination's restore).
        node: String,
        /// Which state: for a file descriptor, its number and kind.
        what: Uncarried,
    },
    /// The transfer failed at `stage`.
    #[error("telefork failed: {}", Failure::Failed { node: node.clone(), stage: *stage, message: message.clone() })]
    Failed {
        /// The node where it failed.
        node: String,
        /// Where in the transfer.
        stage: Stage,
        /// What failed, as that node said it.
        message: String,
    },
    /// The child ran, but its exit status never came: its node, or a daemon session between
    /// it and this program, died or the connection was cut. Its fate is unknown.
    #[error("lost track of the remote child on node {node}: {message}")]
    Lost {
        /// The child's node.
        node: String,
        /// What was lost.
        message: String,
    },
    /// The local daemon (`node` None) or the destination speaks another version of the
    /// telefork protocol; nothing was sent.
    #[error("{}", mismatch(node.as_deref(), *ours, *theirs))]
    Protocol {
        /// The destination of the other version; None for the local daemon.
        node: Option<String>,
        /// This side's version ([`PROTOCOL_VERSION`]).
        ours: u32,
        /// The other side's (0: a build from before protocol versions).
        theirs: u32,
    },
    /// A [`remote`] closure's process ended without reporting a value (it exited or was
    /// killed before its end).
    #[error("the remote closure ended without a result ({0})")]
    NoResult(ExitStatus),
    /// A [`remote`] closure's value could not be encoded or decoded.
    #[error("the remote closure's result: {0}")]
    BadResult(String),
    /// This handle is a copy made by a later telefork's fork: only the process that made it
    /// can use it.
    #[error("this handle belongs to the process that made it (here is a copy, made by a later telefork)")]
    NotOurs,
    /// The child has ended and this handle's connection serves the next telefork now.
    #[error("this handle's connection serves the next telefork now (its child has ended)")]
    HandedBack,
    /// fork() failed here.
    #[error("telefork: fork: {0}")]
    Fork(std::io::Error),
    /// Talking with the local daemon failed.
    #[error("telefork: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon answered something this library did not expect (a bug).
    #[error("telefork: the daemon answered {0} (unexpected: please report it)")]
    Unexpected(String),
}

fn mismatch(node: Option<&str>, ours: u32, theirs: u32) -> String {
    let theirs = match theirs {
        0 => "is a build from before protocol versions".to_string(),
        v => format!("speaks version {v}"),
    };
    match node {
        None => format!("telefork: protocol version mismatch: this program's telefork library speaks version {ours}, the local daemon {theirs}"),
        Some(node) => format!("telefork failed: protocol version mismatch: this side speaks version {ours}, node {node} {theirs}"),
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        match f {
            Failure::Refused { node, limit, reason } => Error::Refused { node, limit, reason },
            Failure::Unreachable { node, reason } => Error::Unreachable { node, reason },
            Failure::CannotCarry { node, what } => Error::CannotCarry { node, what },
            Failure::Failed { node, stage, message } => Error::Failed { node, stage, message },
            Failure::Lost { node, message } => Error::Lost { node, message },
            Failure::Protocol { node, ours, theirs } => {
                Error::Protocol { node: Some(node), ours, theirs }
            }
            other => Error::Unexpected(format!("{other:?}")),
        }
    }
}

/// A failure to read the daemon's answer: a version mismatch as such, else `otherwise`.
fn read_error(e: proto::Error, otherwise: impl FnOnce(String) -> Error) -> Error {
    match e {
        proto::Error::Version { ours, theirs } => Error::Protocol { node: None, ours, theirs },
        e => otherwise(e.to_string()),
    }
}

/// Where [`telefork`] returns: in the parent with a handle, or in the child on the other
/// node (like the two returns of `fork()`).
pub enum Fork {
    /// In the calling process, which goes on here: the handle on the child.
    Parent(RemoteChild),
    /// In the child, now running on the destination node.
    Child,
}

/// A child running on another node: where, and its PID there. Displayed as `node:pid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteId {
    /// The node the child runs on.
    pub node: String,
    /// Its PID on that node (0 while a background transfer is under way).
    pub pid: i32,
}

impl std::fmt::Display for RemoteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.node, self.pid)
    }
}

/// The parent's handle on a remote child, like [`std::process::Child`]: its [`id`], and
/// [`wait`], [`try_wait`] and [`kill`]. The child's stdout and stderr are relayed to this
/// process's. Dropping the handle leaves the child running; only the process that made the
/// handle can use it (a copy taken along by a later telefork refuses with
/// [`Error::NotOurs`]).
///
/// [`id`]: RemoteChild::id
/// [`wait`]: RemoteChild::wait
/// [`try_wait`]: RemoteChild::try_wait
/// [`kill`]: RemoteChild::kill
pub struct RemoteChild {
    node: String,
    /// The PID on `node`; None while a background transfer is still under way.
    pid: Option<i32>,
    /// The stopped local copy, until the destination runs the child.
    local: Option<LocalCopy>,
    /// The local copy once ended (the daemon kills it as the child runs there): reaped
    /// without blocking when it can be, else by `wait` or on drop.
    dying: Option<Pid>,
    /// Its daemon connection; `None` once handed back for the next telefork (the child has
    /// ended: nothing more comes on it for this handle).
    conn: Option<Held<UnixStream>>,
    /// `GENERATION` when it was made (see `Held`).
    generation: u64,
    /// Its connection may serve the next telefork once the child has ended (not when the
    /// daemon relays this program's stdin: that is read to its end).
    reusable: bool,
    status: Option<ExitStatus>,
    result: Option<Vec<u8>>,
}

/// Options of a telefork ([`telefork_with`]); the default is what [`telefork`] does.
///
/// ```no_run
/// let opts = telefork::Options { pass_stdin: true, ..Default::default() };
/// if let telefork::Fork::Parent(mut child) = telefork::telefork_with("node2", &opts)? {
///     child.wait()?;
/// }
/// # Ok::<(), telefork::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Pass this process's stdin to the child (default: the child reads end-of-file).
    pub pass_stdin: bool,
    /// Return right after the fork, as a local fork() would, while the daemon sends the
    /// child away. Every failure (destination down, refusal, transfer) is then reported by
    /// `wait`/`started` instead of by `telefork`, and the local copy is ended then.
    pub background: bool,
}

/// The daemon socket this program uses: `$TELEFORK_SOCKET` ([`SOCKET_ENV`]), else
/// [`DEFAULT_SOCKET`].
pub fn daemon_socket() -> PathBuf {
    std::env::var_os(SOCKET_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

fn connect_daemon() -> Result<UnixStream, Error> {
    let path = daemon_socket();
    UnixStream::connect(&path).map_err(|source| Error::NoDaemon { path, source })
}

/// A connection to the daemon ready for the next `telefork`, so that it does not pay for
/// connecting (and a session starting) while its caller is held: one handed back when a
/// child ended (its session serves the next request), or one made ahead of time. An fd in
/// an atomic, not a mutex: the forked child must drop it without taking any lock.
static SPARE_CONNECTION: AtomicI32 = AtomicI32::new(-1);

/// A connection for one telefork: the spare one if the daemon has not closed it meanwhile
/// (an idle connection is closed after a while), else a new one.
fn take_connection() -> Result<UnixStream, Error> {
    let fd = SPARE_CONNECTION.swap(-1, Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: the fd was stored by `make_spare_connection` or `hand_back_connection` and
        // is owned by nobody else (swap took it).
        let s = unsafe { UnixStream::from_raw_fd(fd) };
        let mut p = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }];
        // SAFETY: one valid pollfd, zero timeout. Nothing to read means still open.
        if unsafe { libc::poll(p.as_mut_ptr(), 1, 0) } == 0 {
            return Ok(s);
        }
    }
    connect_daemon()
}

/// The fds this program's live telefork handles hold: their daemon connections and the
/// pidfds of their local copies. A later telefork's child must not take them along (the
/// capture refuses sockets and pidfds, and they are the parent's), so it closes them before
/// it stops. Atomic slots, not a locked list: the child of a fork reads them without taking
/// a lock. Handles beyond the slots keep working, but a later child would carry their fds,
/// and its capture refuses them, naming the fd; so would a child forked by another thread in
/// the instant a handle is being made or dropped.
const HELD_FD_SLOTS: usize = 1024;
static HELD_FDS: [AtomicI32; HELD_FD_SLOTS] = [const { AtomicI32::new(-1) }; HELD_FD_SLOTS];

/// How many telefork forks this process descends from (bumped in each child): a handle
/// made in an earlier generation is a copy of the parent's, whose fd the child closed.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Whether something made in `generation` was made by this process (not a copy inherited
/// through a telefork's fork).
fn made_here(generation: u64) -> bool {
    generation == GENERATION.load(Ordering::SeqCst)
}

/// An fd-owning value listed in `HELD_FDS` while it lives (taken off before it is closed,
/// so a number reused meanwhile is never closed in a child by mistake). In a later
/// telefork's child it is an inert copy: its fd was closed at the fork and its number may
/// name something else by now, so it is neither used nor closed there.
struct Held<T: AsRawFd> {
    inner: std::mem::ManuallyDrop<T>,
    generation: u64,
    /// Its slot in `HELD_FDS` (none if all were taken).
    slot: Option<usize>,
}

impl<T: AsRawFd> Held<T> {
    fn new(inner: T) -> Held<T> {
        let fd = inner.as_raw_fd();
        let slot = HELD_FDS.iter().position(|slot| {
            slot.compare_exchange(-1, fd, Ordering::SeqCst, Ordering::SeqCst).is_ok()
        });
        Held {
            inner: std::mem::ManuallyDrop::new(inner),
            generation: GENERATION.load(Ordering::SeqCst),
            slot,
        }
    }

    /// Whether this process made it (not a copy inherited through a telefork's fork).
    fn is_ours(&self) -> bool {
        made_here(self.generation)
    }

    fn get(&self) -> Result<&T, Error> {
        self.is_ours().then_some(&*self.inner).ok_or_else(not_ours)
    }

    /// Takes the value out, off the list (only in the process that made it: `is_ours`). A
    /// child forked by another thread in this instant carries the fd, and its capture
    /// refuses it, naming it (as for a handle being made or dropped).
    fn into_inner(mut self) -> T {
        if let Some(i) = self.slot.take() {
            HELD_FDS[i].store(-1, Ordering::SeqCst);
        }
        // SAFETY: taken once, here; `self` is forgotten right after, so its Drop never
        // touches the value again.
        let inner = unsafe { std::mem::ManuallyDrop::take(&mut self.inner) };
        std::mem::forget(self);
        inner
    }
}

fn not_ours() -> Error {
    Error::NotOurs
}

impl<T: AsRawFd> Drop for Held<T> {
    fn drop(&mut self) {
        if !self.is_ours() {
            return; // (an inert copy: its fd was closed at the fork)
        }
        if let Some(i) = self.slot {
            HELD_FDS[i].store(-1, Ordering::SeqCst);
        }
        // SAFETY: dropped once, here, and never used again.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.inner) };
    }
}

/// In the child of a telefork's fork: closes the fds of the parent's telefork handles and
/// makes the copies of those handles inert.
fn close_held_fds_in_child() {
    for slot in &HELD_FDS {
        // (Read first: writing an empty slot would copy its page from the parent for nothing.)
        if slot.load(Ordering::Relaxed) < 0 {
            continue;
        }
        let fd = slot.swap(-1, Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: close is async-signal-safe; the fd is this process's copy of one a
            // handle of the parent holds; the copies of the handles here go inert below.
            unsafe { libc::close(fd) };
        }
    }
    GENERATION.fetch_add(1, Ordering::SeqCst);
}

/// Where the last telefork went: the spare connection asks the daemon to connect there ahead
/// of time (`LocalRequest::Prepare`). Only the parent touches it, never while forking.
static LAST_DEST: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn make_spare_connection() {
    if SPARE_CONNECTION.load(Ordering::SeqCst) >= 0 {
        return;
    }
    if let Ok(s) = connect_daemon() {
        let dest = LAST_DEST.try_lock().ok().and_then(|d| d.clone());
        if let Some(dest) = dest {
            // Best effort: a daemon that cannot prepare just connects later.
            let _ = send_request(&s, &LocalRequest::Prepare { dest });
        }
        let fd = s.into_raw_fd();
        if SPARE_CONNECTION.compare_exchange(-1, fd, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            // SAFETY: another thread stored one first; this fd is ours alone.
            unsafe { libc::close(fd) };
        }
    }
}

/// Forks the calling thread onto node `dest` (a node name from the cluster config, or
/// host:port of a configured peer). Returns [`Fork::Parent`] here and [`Fork::Child`] there,
/// in a process with this one's memory, open files (those the engine carries), credentials
/// and registers; its stdout and stderr are relayed here, its stdin is at its end.
///
/// It returns in the parent once the child runs on `dest` (the local copy is ended then);
/// with [`Options::background`], at once.
///
/// ```no_run
/// match telefork::telefork("node2")? {
///     telefork::Fork::Child => {
///         println!("running on {}", telefork::current_node()?);
///         std::process::exit(3)
///     }
///     telefork::Fork::Parent(mut child) => {
///         let status = child.wait()?;
///         assert_eq!(status.code(), Some(3));
///     }
/// }
/// # Ok::<(), telefork::Error>(())
/// ```
///
/// # Errors
///
/// Nothing ran on `dest` and the local copy was ended when it fails:
/// [`Error::NoDaemon`] if the local daemon cannot be reached; [`Error::Refused`] if this node
/// or `dest` refused by a limit (`dest` not a configured peer, root not allowed there, the
/// image too big, too many sessions or restored processes); [`Error::Unreachable`] if `dest`
/// cannot be reached; [`Error::CannotCarry`] if the process holds state the engine does not
/// carry (which fd, which kind); [`Error::Failed`] if capturing, sending or restoring failed
/// (at which stage); [`Error::Protocol`] if the daemon speaks another protocol version;
/// [`Error::Fork`] if fork() failed.
pub fn telefork(dest: &str) -> Result<Fork, Error> {
    telefork_with(dest, &Options::default())
}

/// [`telefork`] with options: the child may read this process's stdin
/// ([`Options::pass_stdin`]), and the call may return at once while the child travels
/// ([`Options::background`]).
///
/// # Errors
///
/// As [`telefork`]; with [`Options::background`], only what fails before the daemon took the
/// request (the rest is reported by [`RemoteChild::started`] and [`RemoteChild::wait`]).
pub fn telefork_with(dest: &str, opts: &Options) -> Result<Fork, Error> {
    telefork_engine::timeline::stamp("lib call");
    // (Listed at once, so that a child forked meanwhile by another thread leaves it behind.)
    let conn = Held::new(take_connection()?);
    // Output buffered now would otherwise be printed twice, by both processes.
    std::io::stdout().flush().ok();
    std::io::stderr().flush().ok();
    // SAFETY: the child only makes async-signal-safe system calls (close, kill) before it is
    // captured; when it runs again it is a whole new single-threaded process on `dest`.
    match unsafe { fork() }.map_err(|e| Error::Fork(e.into()))? {
        ForkResult::Child => {
            // Closing our copy of the daemon connection (the snapshot must hold no socket);
            // then stop until captured. What runs after `kill` returns runs on `dest`.
            let (fd, listed) = (conn.inner.as_raw_fd(), conn.slot.is_some());
            let spare = SPARE_CONNECTION.swap(-1, Ordering::SeqCst);
            // (`conn` among them, if it found a slot.)
            close_held_fds_in_child();
            // SAFETY: close and kill are async-signal-safe; `fd` and `spare` are this
            // process's copies of fds no one else here uses (the handles are inert copies now).
            unsafe {
                if !listed {
                    libc::close(fd);
                }
                if spare >= 0 {
                    libc::close(spare);
                }
                libc::kill(libc::getpid(), libc::SIGSTOP);
            }
            // (With the program's TELEFORK_DEBUG, read before the fork; the stamp goes to the
            // child's stderr, relayed home into the program's.)
            telefork_engine::timeline::stamp("child runs");
            Ok(Fork::Child)
        }
        ForkResult::Parent { child } => match hand_over(conn, child, dest, opts) {
            Ok(rc) => Ok(Fork::Parent(rc)),
            Err(e) => {
                tracing::debug!("telefork of process {child} to {dest} failed: {e}");
                let _ = kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                Err(e)
            }
        },
    }
}

fn hand_over(
    conn: Held<UnixStream>,
    child: Pid,
    dest: &str,
    opts: &Options,
) -> Result<RemoteChild, Error> {
    let mut tl = Timeline::new();
    let local = LocalCopy::new(child);
    // The daemon waits until the child has stopped itself (only then is it a complete
    // snapshot), so the request goes out at once, while the child is still on its way to
    // the stop.
    if let Ok(mut last) = LAST_DEST.try_lock() {
        *last = Some(dest.to_string());
    }
    let req = LocalRequest::Telefork {
        dest: dest.to_string(),
        child_pid: child.as_raw(),
        pass_stdin: opts.pass_stdin,
    };
    let mut fds: Vec<RawFd> = vec![1, 2];
    if opts.pass_stdin {
        fds.push(0);
    }
    if let Err(e) = send_with_fds(conn.get()?, &req, &fds) {
        // A daemon that refuses a connection (a limit) says so and may close it before our
        // request went out: its word is the error, not our broken pipe.
        return Err(daemon_said(conn.get()?).unwrap_or(e));
    }
    tl.mark("request sent");
    tracing::debug!("asked the daemon to send process {child} to {dest}");
    // The daemon bounds every step with its own timeouts; this only guards against a hung
    // daemon while `telefork` waits (a background one returns now, and its later reads
    // wait as long as the child runs).
    if !opts.background {
        conn.get()?.set_read_timeout(Some(Duration::from_secs(600))).ok();
    }
    let generation = conn.generation;
    let mut rc = RemoteChild {
        node: dest.to_string(),
        pid: None,
        local: Some(local),
        dying: None,
        conn: Some(conn),
        generation,
        reusable: !opts.pass_stdin,
        status: None,
        result: None,
    };
    if opts.background {
        return Ok(rc);
    }
    loop {
        let mut r = rc.conn()?;
        let reply: FromDaemon =
            proto::expect_frame(&mut r, "the daemon's answer").map_err(|e| {
                read_error(e, |message| Error::Failed {
                    node: rc.node.clone(),
                    stage: Stage::Send,
                    message,
                })
            })?;
        match reply {
            FromDaemon::Accepted { node } => {
                tl.mark("accepted");
                tracing::debug!("node {node} accepted process {child}");
                rc.node = node;
                if opts.background {
                    break;
                }
            }
            FromDaemon::Started { node, pid } => {
                tl.mark("started");
                tracing::debug!("process {child} runs on node {node} as {pid}");
                rc.on_started(node, pid);
                tl.mark("local copy killed");
                break;
            }
            FromDaemon::Failed(failure) => return Err(failure.into()),
            other => return Err(Error::Unexpected(format!("{other:?}"))),
        }
    }
    rc.conn()?.set_read_timeout(None).ok();
    tl.report("telefork, in the program after its fork");
    Ok(rc)
}

/// Sends a message on a daemon connection without SIGPIPE if the session is gone (a program
/// may have restored SIGPIPE's default, which would end it).
fn send_frame<T: serde::Serialize>(conn: &UnixStream, msg: &T) -> std::io::Result<()> {
    send_all(conn, &proto::encode_frame(msg).map_err(std::io::Error::other)?)
}

/// Sends a request (behind this library's hello: the protocol version), as `send_frame`.
fn send_request(conn: &UnixStream, req: &LocalRequest) -> std::io::Result<()> {
    send_all(conn, &proto::encode_first(req).map_err(std::io::Error::other)?)
}

fn send_all(conn: &UnixStream, frame: &[u8]) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < frame.len() {
        match nix::sys::socket::send(conn.as_raw_fd(), &frame[sent..], MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What the daemon said on `conn` before it closed it, if it was a refusal or a failure.
fn daemon_said(conn: &UnixStream) -> Option<Error> {
    conn.set_read_timeout(Some(Duration::from_secs(1))).ok();
    let mut r = conn;
    match proto::read_frame::<_, FromDaemon>(&mut r) {
        Ok(Some(FromDaemon::Failed(failure))) => Some(failure.into()),
        Err(e @ proto::Error::Version { .. }) => Some(read_error(e, Error::Unexpected)),
        _ => None,
    }
}

fn send_with_fds(conn: &UnixStream, req: &LocalRequest, fds: &[RawFd]) -> Result<(), Error> {
    // (The hello and the request in one message: the fds travel with its first byte.)
    let frame = proto::encode_first(req).map_err(std::io::Error::other)?;
    let cmsg = [ControlMessage::ScmRights(fds)];
    let iov = [IoSlice::new(&frame)];
    let n = sendmsg::<()>(conn.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(|e| Error::Io(e.into()))?;
    if n < frame.len() {
        send_all(conn, &frame[n..])?;
    }
    Ok(())
}

impl RemoteChild {
    /// Node and PID of the child. During a background transfer (`Options::background`) the
    /// PID is 0 until the child runs; `started` waits for that.
    pub fn id(&self) -> RemoteId {
        RemoteId { node: self.node.clone(), pid: self.pid.unwrap_or(0) }
    }

    /// Waits until the child runs on its node (returns at once unless `background`).
    ///
    /// # Errors
    ///
    /// With [`Options::background`], why the transfer failed (as [`telefork`] would have
    /// said: the local copy is ended then); [`Error::Lost`] if the daemon's session went away.
    pub fn started(&mut self) -> Result<RemoteId, Error> {
        while self.pid.is_none() && self.status.is_none() {
            self.read_event()?;
        }
        Ok(self.id())
    }

    /// The destination runs the child: the daemon kills the local copy (and so do we, in
    /// case it has not yet); reap it if it is gone already, else later — the caller is not
    /// held for its teardown.
    fn on_started(&mut self, node: String, pid: i32) {
        self.node = node;
        self.pid = Some(pid);
        if let Some(local) = self.local.take() {
            local.kill();
            if !matches!(
                waitpid(local.pid, Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_)
            ) {
                self.dying = Some(local.pid);
            }
        }
    }

    /// Its daemon connection (an error in a copy made by a later telefork, or once handed
    /// back).
    fn conn(&self) -> Result<&UnixStream, Error> {
        match &self.conn {
            Some(c) => c.get(),
            None => Err(Error::HandedBack),
        }
    }

    /// The child has ended: its daemon session can serve the next telefork on this connection
    /// (no new session process), so it becomes the spare connection — unless there is one.
    /// (Else the session is told `Done` and ends now.) The connection leaves this handle: had
    /// it kept a copy, the session would not see the next handle's hang-up (it waits up to
    /// 30 s for a word after a child's end).
    fn hand_back_connection(&mut self) {
        if !self.reusable {
            return; // (the session ends by itself)
        }
        // (A copy's is not ours to give.)
        let Some(held) = self.conn.take_if(|c| c.is_ours()) else { return };
        let Ok(conn) = held.get() else { return };
        if SPARE_CONNECTION.load(Ordering::SeqCst) >= 0 {
            let _ = send_frame(conn, &LocalCommand::Done);
            return; // (closed as `held` goes: the session has ended)
        }
        if send_frame(conn, &LocalCommand::Again).is_err() {
            return;
        }
        // Made the spare while still listed, then taken off the list: a child forked by
        // another thread meanwhile finds the fd on one list or both (closing it twice there
        // is harmless), never on neither.
        let fd = conn.as_raw_fd();
        if SPARE_CONNECTION.compare_exchange(-1, fd, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            let _spare_owns_it = held.into_inner().into_raw_fd();
        }
        // (Else another thread stored a spare first, and `held` closes this one as it goes:
        // its session, told `Again`, sees the hang-up instead of a request and ends, and so
        // does its destination's, with the process it prepared to restore into.)
    }

    /// Reaps the killed local copy (blocking: it is dead or about to be).
    fn reap_local_copy(&mut self) {
        if let Some(local) = self.dying.take() {
            let _ = waitpid(local, None);
        }
    }

    /// Waits for the child to end, like [`std::process::Child::wait`], and returns how it
    /// ended (its exit code, or the signal that killed it). Once it has, it returns the same
    /// status again.
    ///
    /// ```no_run
    /// if let telefork::Fork::Parent(mut child) = telefork::telefork("node2")? {
    ///     let status = child.wait()?;
    ///     println!("{} ended: {status}", child.id());
    /// }
    /// # Ok::<(), telefork::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Lost`] if the exit status cannot come any more (the child's node, its
    /// session or the connection died; the child's fate is unknown); after a background
    /// telefork, why the transfer failed; [`Error::NotOurs`] in a copy of the handle.
    pub fn wait(&mut self) -> Result<ExitStatus, Error> {
        if self.status.is_none() {
            self.conn()?;
        }
        // (A reusable connection becomes the spare when the child ends, its session and its
        // connection to the destination ready for the next telefork.)
        if !self.reusable {
            make_spare_connection();
        }
        while self.status.is_none() {
            self.read_event()?;
        }
        self.reap_local_copy();
        Ok(self.status.unwrap_or_else(|| ExitStatus::from_raw(0)))
    }

    /// Returns the exit status if the child has ended, without blocking (`None` if it runs).
    ///
    /// # Errors
    ///
    /// As [`RemoteChild::wait`].
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        while self.status.is_none() {
            let mut fds =
                [libc::pollfd { fd: self.conn()?.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            // SAFETY: one valid pollfd, zero timeout.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
            if n <= 0 {
                return Ok(None);
            }
            self.read_event()?;
        }
        self.reap_local_copy();
        Ok(self.status)
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the remote child; nothing once it has ended.
    ///
    /// ```no_run
    /// if let telefork::Fork::Parent(mut child) = telefork::telefork("node2")? {
    ///     child.kill(libc::SIGKILL)?;
    ///     assert_eq!(std::os::unix::process::ExitStatusExt::signal(&child.wait()?), Some(9));
    /// }
    /// # Ok::<(), telefork::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Lost`] if the request cannot reach the daemon's session;
    /// [`Error::NotOurs`] in a copy of the handle.
    pub fn kill(&mut self, signal: i32) -> Result<(), Error> {
        if self.status.is_some() {
            return Ok(());
        }
        send_frame(self.conn()?, &LocalCommand::Kill { signal })
            .map_err(|e| Error::Lost { node: self.node.clone(), message: e.to_string() })
    }

    fn read_event(&mut self) -> Result<(), Error> {
        let mut r = self.conn()?;
        let ev: FromDaemon =
            proto::expect_frame(&mut r, "the child's exit status").map_err(|e| {
                read_error(e, |message| Error::Lost { node: self.node.clone(), message })
            })?;
        match ev {
            FromDaemon::Started { node, pid } => self.on_started(node, pid),
            FromDaemon::Failed(failure) => {
                // A background transfer failed (or the child was lost): a local copy still
                // stopped is ended.
                if let Some(local) = self.local.take() {
                    local.kill();
                    let _ = waitpid(local.pid, None);
                }
                return Err(failure.into());
            }
            FromDaemon::Accepted { node } => self.node = node,
            FromDaemon::Result { value } => self.result = Some(value),
            FromDaemon::Exited(info) => {
                telefork_engine::timeline::stamp("lib got Exited");
                tracing::debug!("the child on node {} ended: {info:?}", self.node);
                self.status = Some(match info {
                    ExitInfo::Code(c) => ExitStatus::from_raw((c & 0xff) << 8),
                    ExitInfo::Signal(s) => ExitStatus::from_raw(s & 0x7f),
                });
                self.hand_back_connection();
            }
            other => return Err(Error::Unexpected(format!("{other:?}"))),
        }
        Ok(())
    }
}

/// The stopped local copy of a telefork, and a pidfd on it: killed through the pidfd, never
/// by a number that could name another process by then (a program's own SIGCHLD handler may
/// reap children with waitpid(-1)).
struct LocalCopy {
    pid: Pid,
    pidfd: Option<Held<std::os::fd::OwnedFd>>,
}

impl LocalCopy {
    fn new(pid: Pid) -> LocalCopy {
        // (The child is ours and not reaped, so the PID is still its own. Without pidfds — a
        // kernel before 5.3 — it is killed by PID.)
        LocalCopy { pid, pidfd: pidfd::open(pid.as_raw()).ok().map(Held::new) }
    }

    fn kill(&self) {
        match &self.pidfd {
            Some(fd) => {
                if let Ok(fd) = fd.get() {
                    let _ = pidfd::send_signal(fd.as_fd(), libc::SIGKILL);
                }
            }
            None => {
                let _ = kill(self.pid, Signal::SIGKILL);
            }
        }
    }
}

impl Drop for RemoteChild {
    fn drop(&mut self) {
        // (A copy in a later telefork's child: the local copy is the parent's to reap.)
        if made_here(self.generation) {
            self.reap_local_copy();
        }
    }
}

/// Runs `f` on node `dest` and returns its value: the process teleforks there, `f` runs in
/// the child, and its value comes back (postcard-encoded) before the child exits.
///
/// ```no_run
/// let numbers: Vec<u64> = (1..=1000).collect();
/// let (node, sum) = telefork::remote("node2", || {
///     (telefork::current_node().unwrap_or_default(), numbers.iter().sum::<u64>())
/// })?;
/// println!("{sum} computed on {node}");
/// # Ok::<(), telefork::Error>(())
/// ```
///
/// # Errors
///
/// As [`telefork`] and [`RemoteChild::wait`]; [`Error::NoResult`] if the child ended without
/// reporting a value (it panicked, exited or was killed in `f`); [`Error::BadResult`] if the
/// value cannot be decoded.
pub fn remote<T, F>(dest: &str, f: F) -> Result<T, Error>
where
    F: FnOnce() -> T,
    T: Serialize + DeserializeOwned,
{
    match telefork(dest)? {
        Fork::Child => {
            let value = f();
            let code = match report(&value) {
                Ok(()) => 0,
                Err(e) => {
                    // (This process cannot return the error, it exits now: its stderr, relayed
                    // home, says why; not an event, which a program without a subscriber
                    // would lose.)
                    eprintln!("telefork: remote: cannot send the result home: {e}");
                    1
                }
            };
            exit_now(code)
        }
        Fork::Parent(mut child) => {
            let status = child.wait()?;
            let value = child.result.take().ok_or(Error::NoResult(status))?;
            postcard::from_bytes(&value).map_err(|e| Error::BadResult(format!("decoding it: {e}")))
        }
    }
}

fn report<T: Serialize>(value: &T) -> Result<(), Error> {
    let value = postcard::to_stdvec(value).map_err(|e| Error::BadResult(e.to_string()))?;
    let conn = connect_daemon()?;
    send_request(&conn, &LocalRequest::Report { value })?;
    match proto::expect_frame::<_, FromDaemon>(&mut &conn, "the daemon's answer")
        .map_err(|e| read_error(e, |m| Error::Io(std::io::Error::other(m))))?
    {
        FromDaemon::Ok => Ok(()),
        FromDaemon::Failed(failure) => Err(failure.into()),
        other => Err(Error::Unexpected(format!("{other:?}"))),
    }
}

/// The name of the node this process runs on (asks the local daemon).
///
/// ```no_run
/// println!("this is {}", telefork::current_node()?);
/// # Ok::<(), telefork::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::NoDaemon`] if the local daemon cannot be reached; [`Error::Protocol`] if it
/// speaks another protocol version; [`Error::Io`] if the connection to it fails.
pub fn current_node() -> Result<String, Error> {
    let conn = connect_daemon()?;
    send_request(&conn, &LocalRequest::WhoAmI)?;
    match proto::expect_frame::<_, FromDaemon>(&mut &conn, "the daemon's answer")
        .map_err(|e| read_error(e, |m| Error::Io(std::io::Error::other(m))))?
    {
        FromDaemon::Node { name } => Ok(name),
        FromDaemon::Failed(failure) => Err(failure.into()),
        other => Err(Error::Unexpected(format!("{other:?}"))),
    }
}

/// Goes to `dest`, runs `f` there, and comes back with the whole process state: `yoyo`
/// returns on the original node, in a process that has everything `f` did to its memory.
/// The original process waits meanwhile and exits with the status of the one that returns.
///
/// ```no_run
/// let mut visited = String::new();
/// telefork::yoyo("node2", || visited = telefork::current_node().unwrap_or_default())?;
/// println!("back home, having visited {visited}");
/// # Ok::<(), telefork::Error>(())
/// ```
///
/// # Errors
///
/// As [`current_node`] and [`telefork`], for the way there. (Should the way back fail, the
/// process on `dest` says why on its stderr, relayed here, and this process exits with 1.)
pub fn yoyo<F: FnOnce()>(dest: &str, f: F) -> Result<(), Error> {
    let home = current_node()?;
    match telefork(dest)? {
        Fork::Parent(mut child) => {
            let status = child.wait()?;
            exit_like(status)
        }
        Fork::Child => {
            f();
            match telefork(&home) {
                Ok(Fork::Child) => Ok(()),
                Ok(Fork::Parent(mut back)) => match back.wait() {
                    Ok(status) => exit_like(status),
                    Err(e) => {
                        // (As in `remote`: said on the stderr that goes home, then exit.)
                        eprintln!("telefork: yoyo: {e}");
                        exit_now(1)
                    }
                },
                Err(e) => {
                    eprintln!("telefork: yoyo: cannot come back to {home}: {e}");
                    exit_now(1)
                }
            }
        }
    }
}

fn exit_now(code: i32) -> ! {
    std::io::stdout().flush().ok();
    std::io::stderr().flush().ok();
    std::process::exit(code)
}

/// Ends this process the way `status` says another one ended.
fn exit_like(status: ExitStatus) -> ! {
    if let Some(sig) = status.signal() {
        std::io::stdout().flush().ok();
        // SAFETY: default disposition, then the same signal: we die of it like the child did.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
    exit_now(status.code().unwrap_or(1))
}
