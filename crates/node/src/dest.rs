//! The destination side of a telefork, one session process per connection from an origin:
//! authenticate the sending node (the TLS handshake verifies its certificate before a single
//! image byte is read), check the offer against this node's limits, restore the image as a
//! child of this session running as its owner, then relay its stdout/stderr and finally its
//! exit status (and a `remote` result) back to the origin, while obeying kill requests.
//! Once a child has ended, the origin may keep the connection for its program's next
//! telefork (`ToDest::Again`): the session then serves the next offer the same way.
//!
//! The session's restorer thread makes the process to restore into ahead of time: for a
//! first process as soon as the connection is up, for a next one while the last one runs.
//!
//! If the origin goes away, the child is killed: nobody could wait for it any more.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::wait::{waitpid, WaitStatus};

use crate::channel::{PendingServer, TlsChannel};
use crate::daemon::{live_sessions, Shared};
use crate::proto::{self, ExitInfo, Failure, FromDest, Limit, Stage, ToDest, User};
use telefork_engine::{restore_into, Stub, StubTemplate};

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may wait for its offer (one made ahead of time, or kept after a
/// child's end), and for the origin's word after a child's end.
pub const OFFER_WAIT: Duration = Duration::from_secs(40);

/// Serves the connection of node `origin`, whose handshake the daemon's main loop completed
/// (`admission`) before this session was forked.
pub fn serve(
    shared: &Shared,
    tls: PendingServer,
    sock: TcpStream,
    peer: SocketAddr,
    origin: String,
) -> Result<()> {
    let ch = tls
        .finish(sock, HANDSHAKE_TIMEOUT)
        .with_context(|| format!("the connection from {origin} ({peer})"))?;
    telefork_engine::timeline::stamp("dest handshake done");
    let ch = Arc::new(ch);
    // The process to restore into is made at once, while the offer and image are on their
    // way; it is killed unused if no process comes.
    let restorer = Restorer::start()?;
    let mut next = restorer.prepare(None)?;
    // One process after another: once a child has ended, its origin may keep the connection
    // for its program's next telefork (`ToDest::Again`), and this session serves that one
    // too — no session process and no TLS handshake per telefork.
    while let AfterChild::Again(prepared) = serve_one(shared, &ch, &origin, &restorer, next)? {
        telefork_engine::timeline::stamp("dest again");
        next = match prepared {
            Some(p) => p,
            None => restorer.prepare(None)?, // (it could not be made while the last one ran)
        };
    }
    ch.close();
    Ok(())
}

/// The thread that restores this session's processes, one after another, each into a
/// process it made ahead of time (ptrace binds a traced process to the thread that traces
/// it): half of a small restore's work, done while the offer is answered and the image is on
/// its way — or, after a first process, while that one runs. From the third on they are
/// forked from a template (`StubTemplate`, made once per session), which is cheap: made
/// while a child runs, a process forked from the session and emptied took 0.5-0.8 ms and
/// still disturbed a program that teleforked again at once.
struct Restorer {
    orders: std::sync::mpsc::Sender<Order>,
    results: std::sync::mpsc::Receiver<Result<telefork_engine::Restored>>,
}

enum Order {
    /// Make the next process to restore into, with these as its fds 0, 1, 2 (the child's
    /// ends of its pipes: this thread keeps them until that process is restored); then look
    /// up the groups of the user it is likely for.
    Prepare([OwnedFd; 3], Option<User>),
    Restore(RestoreJob),
}

/// A restore job, run by the restorer thread with the process it prepared (if it could), the
/// fds that process has (or a process made now must get) as its 0, 1, 2, and the groups it
/// looked up for the likely owner.
type RestoreJob = Box<
    dyn FnOnce(
            Option<Stub>,
            [BorrowedFd<'_>; 3],
            Option<Likely>,
        ) -> Result<telefork_engine::Restored>
        + Send,
>;

/// A user and their groups on this node, and when they were looked up (a lookup took
/// ~0.1 ms here: not on a telefork's path, nor beside a program's next fork).
type Likely = (User, Vec<u32>, std::time::Instant);

/// How old a lookup of groups may be when a restore uses it (else it looks them up again).
const GROUPS_FRESH: Duration = Duration::from_secs(1);

impl Restorer {
    fn start() -> Result<Restorer> {
        let (orders, next_order) = std::sync::mpsc::channel::<Order>();
        let (done, results) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("restorer".into())
            .spawn(move || {
                let mut next: Option<(Option<Stub>, [OwnedFd; 3], Option<Likely>)> = None;
                let mut stubs = StubMaker::default();
                // (Ends when the session drops its `Restorer`; a stub left unused is killed.)
                for order in next_order {
                    match order {
                        Order::Prepare(stdio, user) => {
                            let stub = stubs.make(stdio.each_ref().map(|fd| fd.as_fd()));
                            let likely = user.map(|u| {
                                let groups = groups_of(u.uid, u.gid);
                                (u, groups, std::time::Instant::now())
                            });
                            next = Some((stub, stdio, likely));
                        }
                        Order::Restore(job) => {
                            let result = match next.take() {
                                // (The child's ends of its pipes close here: the restored
                                // process holds its own.)
                                Some((stub, stdio, likely)) => {
                                    job(stub, stdio.each_ref().map(|fd| fd.as_fd()), likely)
                                }
                                None => Err(anyhow::anyhow!(
                                    "no pipes were made for the process to restore"
                                )),
                            };
                            let _ = done.send(result);
                        }
                    }
                }
            })
            .context("starting the restoring thread")?;
        Ok(Restorer { orders, results })
    }

    /// Has the next process to restore into made, with new pipes for its stdio (and the
    /// groups of `likely_user` looked up); returns the session's ends of the pipes.
    fn prepare(&self, likely_user: Option<User>) -> Result<Pipes> {
        let ((stdin_r, stdin_w), (stdout_r, stdout_w), (stderr_r, stderr_w)) =
            (pipe()?, pipe()?, pipe()?);
        self.orders
            .send(Order::Prepare([stdin_r, stdout_w, stderr_w], likely_user))
            .map_err(|_| anyhow::anyhow!("the restoring thread is gone"))?;
        Ok(Pipes { stdin: stdin_w, stdout: stdout_r, stderr: stderr_r })
    }

    fn restore(&self, job: RestoreJob) -> Result<telefork_engine::Restored> {
        self.orders
            .send(Order::Restore(job))
            .map_err(|_| anyhow::anyhow!("the restoring thread is gone"))?;
        self.results.recv().unwrap_or_else(|_| Err(anyhow::anyhow!("the restoring thread is gone")))
    }
}

/// Makes the restorer thread's processes to restore into: forked from the session and
/// emptied for a session's first two, then forked from a template (made then: a session
/// that has served two likely serves more), unless making or forking that failed once.
#[derive(Default)]
struct StubMaker {
    made: usize,
    template: Template,
}

#[derive(Default)]
enum Template {
    #[default]
    NotYet,
    Ready(Box<StubTemplate>),
    Failed,
}

impl StubMaker {
    /// A process to restore into with `stdio` as its fds 0, 1, 2; `None` if none could be
    /// made now (the restore makes one then).
    fn make(&mut self, stdio: [BorrowedFd<'_>; 3]) -> Option<Stub> {
        telefork_engine::timeline::stamp("dest stub begin");
        self.made += 1;
        if self.made >= 3 && matches!(self.template, Template::NotYet) {
            self.template = match StubTemplate::new() {
                Ok(t) => Template::Ready(Box::new(t)),
                Err(e) => {
                    tracing::warn!("could not make a stub template ({e:#}); forking each process from the session");
                    Template::Failed
                }
            };
        }
        let forked = match &mut self.template {
            Template::Ready(t) => match Stub::fork_from(t, stdio) {
                Ok(stub) => Some(stub),
                Err(e) => {
                    tracing::warn!("forking the stub template failed ({e:#}); forking each process from the session from now on");
                    self.template = Template::Failed;
                    None
                }
            },
            Template::NotYet | Template::Failed => None,
        };
        let stub = forked.or_else(|| {
            Stub::prepare(Some(stdio))
                .inspect_err(|e| tracing::warn!("could not prepare a process to restore into ({e:#}); making it when the image arrives"))
                .ok()
        });
        telefork_engine::timeline::stamp("dest stub end");
        stub
    }
}

/// The session's ends of a restored process's stdin, stdout and stderr pipes.
struct Pipes {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// What the origin does with the connection once a child's end was sent.
enum AfterChild {
    /// It sent `ToDest::Again`: its next offer comes on this connection, to be restored with
    /// these pipes if they could be made.
    Again(Option<Pipes>),
    /// It closed the connection, said nothing for `OFFER_WAIT`, or no child came.
    End,
}

/// Receives one process into the process `restorer` prepared with `pipes`, relays its output
/// and fate, and learns whether the origin keeps the connection for another.
fn serve_one(
    shared: &Shared,
    ch: &Arc<TlsChannel>,
    origin: &str,
    restorer: &Restorer,
    pipes: Pipes,
) -> Result<AfterChild> {
    let Some(received) = receive(shared, ch, origin, restorer)? else {
        return Ok(AfterChild::End); // no process came, or it was refused or failed (and the origin told)
    };
    let pid = received.restored.pid; // (the origin was told it runs: `receive`)
    let how = match received.restored.pages {
        p if p.by_process => " (it received its pages itself)".to_string(),
        p if p.in_huge_pages > 0 => {
            format!(" ({} MiB of its memory in huge pages)", p.in_huge_pages >> 20)
        }
        _ => String::new(),
    };
    tracing::info!("restored process {pid} of user {} from {origin}{how}", received.user.uid);
    // (Should anything fail before its end is known, the child is killed: nobody would be
    // told of it any more.)
    let pidfd = telefork_engine::pidfd::open(pid.as_raw())
        .context("pidfd_open")
        .inspect_err(|_| telefork_engine::kill_quietly(pid))?;
    let supervised = supervise(ch, origin, restorer, pipes, &received, &pidfd);
    let (status, verdict, next) = supervised.inspect_err(|_| {
        // (By its pidfd: the child may have been reaped already.)
        let _ = telefork_engine::pidfd::send_signal(pidfd.as_fd(), libc::SIGKILL);
    })?;
    // (No longer among its owner's restored processes: `limits.max_restores_per_user`.)
    drop(received);
    let result_file = shared.results_dir().join(pid.as_raw().to_string());
    if let Ok(value) = std::fs::read(&result_file) {
        std::fs::remove_file(&result_file).ok();
        ch.send(&FromDest::Result { value })?;
    }
    ch.send(&FromDest::Exited(status))?;
    telefork_engine::timeline::stamp("dest sent Exited");
    tracing::info!("process {pid} ended: {status:?}");
    // The origin answers once its program has heard of the end (`AGAIN_WAIT` there); if it
    // does not, the connection is closed, which ends the command thread.
    Ok(match verdict.recv_timeout(OFFER_WAIT) {
        Ok(true) => AfterChild::Again(next),
        Ok(false) | Err(_) => AfterChild::End,
    })
}

/// Watches restored process `child` (`pidfd`) until it ends: its output (`pipes`) goes to the
/// origin, the origin's commands to it (a thread of its own, which says on the receiver
/// returned whether the origin keeps the connection for another process once the end was
/// sent). Meanwhile `restorer` prepares the next process to restore into, with the pipes
/// returned (none when the origin cannot keep the connection: its program's stdin is relayed).
#[allow(clippy::type_complexity)]
fn supervise(
    ch: &Arc<TlsChannel>,
    origin: &str,
    restorer: &Restorer,
    pipes: Pipes,
    child: &Received,
    pidfd: &OwnedFd,
) -> Result<(ExitInfo, std::sync::mpsc::Receiver<bool>, Option<Pipes>)> {
    let (pid, user, pass_stdin) = (child.restored.pid, &child.user, child.pass_stdin);
    let Pipes { stdin: stdin_w, stdout: stdout_r, stderr: stderr_r } = pipes;
    // Without pass_stdin the write end must close now, or the child's reads never see EOF.
    let stdin_w = if pass_stdin {
        Some(File::from(stdin_w))
    } else {
        drop(stdin_w);
        None
    };
    // The next one's process is made while this one runs (if it fails, after it).
    let next = if pass_stdin {
        None
    } else {
        restorer
            .prepare(Some(user.clone()))
            .inspect_err(|e| tracing::warn!("preparing the next process to restore into: {e:#}"))
            .ok()
    };
    let exited = Arc::new(AtomicBool::new(false));

    // Commands from the origin: kill, stdin; after the child's end, `Again` or the end of the
    // connection. Losing the origin kills the child.
    let (verdict_tx, verdict) = std::sync::mpsc::sync_channel(1);
    {
        let (ch, exited, origin) = (ch.clone(), exited.clone(), origin.to_string());
        let pidfd = pidfd.try_clone().context("duplicating the pidfd")?;
        std::thread::Builder::new()
            .name("origin-commands".into())
            .spawn(move || {
                telefork_engine::timeline::stamp("dest commands thread");
                let again = origin_commands(&ch, &origin, pid, &pidfd, &exited, stdin_w);
                let _ = verdict_tx.send(again);
            })
            .context("starting the thread that reads the origin's commands")?;
    }
    let status = relay_output(ch, pid, pidfd, File::from(stdout_r), File::from(stderr_r))?;
    exited.store(true, Ordering::SeqCst);
    Ok((status, verdict, next))
}

/// Reads the origin's commands about process `pid` until the connection ends (the child is
/// killed if it still runs: nobody could wait for it any more) or, after the child's end,
/// the origin says `Again` (its next offer follows: this thread must not read it). True on
/// `Again`.
fn origin_commands(
    ch: &TlsChannel,
    origin: &str,
    pid: nix::unistd::Pid,
    pidfd: &OwnedFd,
    exited: &AtomicBool,
    mut stdin_w: Option<File>,
) -> bool {
    loop {
        match ch.recv::<ToDest>() {
            Ok(Some(ToDest::Kill { signal })) => {
                let _ = telefork_engine::pidfd::send_signal(pidfd.as_fd(), signal);
            }
            Ok(Some(ToDest::Stdin { data })) => {
                if let Some(w) = stdin_w.as_mut() {
                    let _ = w.write_all(&data);
                }
            }
            Ok(Some(ToDest::StdinEof)) => stdin_w = None,
            // (Only ever sent after the child's end was: anything else breaks the protocol.)
            Ok(Some(ToDest::Again)) if exited.load(Ordering::SeqCst) => return true,
            Ok(Some(other @ (ToDest::Again | ToDest::Offer { .. }))) => {
                tracing::warn!(
                    "origin {origin} sent {} while process {pid} runs: killing it",
                    if matches!(other, ToDest::Again) { "Again" } else { "an offer" }
                );
                let _ = telefork_engine::pidfd::send_signal(pidfd.as_fd(), libc::SIGKILL);
                ch.close();
                return false;
            }
            Ok(None) | Err(_) => {
                if !exited.load(Ordering::SeqCst) {
                    tracing::warn!("origin {origin} is gone: killing process {pid}");
                    let _ = telefork_engine::pidfd::send_signal(pidfd.as_fd(), libc::SIGKILL);
                }
                return false;
            }
        }
    }
}

/// The child's output and its end, in the calling thread: one poll over its two output
/// pipes and its pidfd (no pump threads to wake and join before the exit status can go).
/// Output goes to the origin as it comes; returns the child's exit status once what it wrote
/// last has gone too.
fn relay_output(
    ch: &TlsChannel,
    pid: nix::unistd::Pid,
    pidfd: &OwnedFd,
    stdout: File,
    stderr: File,
) -> Result<ExitInfo> {
    let mut pipes = [Some((stdout, true)), Some((stderr, false))];
    let mut buf = vec![0u8; 64 << 10];
    let mut child_ended = false;
    // (After the child's end, a grandchild may keep a pipe open: don't wait for it forever.)
    let mut drain_until = None;
    loop {
        let mut fds: Vec<libc::pollfd> = pipes
            .iter()
            .flatten()
            .map(|(f, _)| libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 })
            .collect();
        if !child_ended {
            fds.push(libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        if fds.is_empty() {
            break; // both pipes at their end and the child gone
        }
        let timeout = match drain_until {
            Some(t) => {
                let left =
                    std::time::Instant::saturating_duration_since(&t, std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
            None => -1,
        };
        // SAFETY: `fds` is a valid array of pollfd for the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(std::io::Error::last_os_error())
                .context("waiting for the restored process's output");
        }
        for p in fds.iter().filter(|p| p.revents != 0) {
            if p.fd == pidfd.as_raw_fd() {
                telefork_engine::timeline::stamp("dest child ended");
                child_ended = true;
                drain_until = Some(std::time::Instant::now() + Duration::from_secs(2));
                continue;
            }
            let Some(slot) =
                pipes.iter_mut().find(|s| s.as_ref().is_some_and(|(f, _)| f.as_raw_fd() == p.fd))
            else {
                continue;
            };
            let Some((f, is_out)) = slot.as_mut() else { continue };
            match f.read(&mut buf) {
                Ok(0) | Err(_) => *slot = None, // its end
                Ok(n) => {
                    let data = buf[..n].to_vec();
                    let msg =
                        if *is_out { FromDest::Stdout { data } } else { FromDest::Stderr { data } };
                    if ch.send(&msg).is_err() {
                        *slot = None; // the origin is gone (the command thread kills the child)
                    }
                }
            }
        }
    }
    // (Without __WALL: a restored process ends with SIGCHLD — one forked from a stub
    // template too, which gets its exit signal from the template, made with SIGCHLD.)
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(ExitInfo::Code(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(ExitInfo::Signal(sig as i32)),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("waiting for the restored process"),
        }
    }
}

/// A process restored here for an origin.
struct Received {
    restored: telefork_engine::Restored,
    user: User,
    pass_stdin: bool,
    /// Counts this session among its owner's (`limits.max_restores_per_user`) while it lives.
    _counted: RemoveOnDrop,
}

/// Takes the offer, answers it, has `restorer` restore the image that follows (into the
/// process it prepared, with the pipes it was given) and tell the origin it runs, at once;
/// `None` if no offer came or it was refused or failed (the origin was told).
fn receive(
    shared: &Shared,
    ch: &Arc<TlsChannel>,
    origin: &str,
    restorer: &Restorer,
) -> Result<Option<Received>> {
    let Some(Accepted { user, pass_stdin, plain_image, image_bytes, counted }) =
        answer_offer(shared, ch, origin)?
    else {
        return Ok(None);
    };
    let t_accepted = std::time::Instant::now();
    telefork_engine::timeline::stamp("dest offer answered");
    let max = shared.cfg.limits.max_image_bytes.saturating_add(1 << 20);
    let self_receive_min = shared.cfg.transport.self_receive_min_bytes;
    ch.set_recv_timeout(Some(Duration::from_secs(30)));
    let ch_for_job = ch.clone();
    let owner = user.clone();
    let job: RestoreJob = Box::new(move |stub, stdio, likely| {
        let ch = &*ch_for_job;
        let groups = match likely {
            Some((u, groups, at)) if u == owner && at.elapsed() < GROUPS_FRESH => groups,
            _ => groups_of(owner.uid, owner.gid),
        };
        let mut opts = telefork_engine::RestoreOptions {
            stdio: Some(stdio),
            expect_owner: Some((owner.uid, owner.gid)),
            allowed_groups: Some(groups),
            // TLS authenticates every record; the plain transport is trusted by configuration.
            skip_page_checksums: true,
            pages_socket: None,
            // The process comes from another node: its cgroups are that node's.
            join_cgroups: false,
            // Should this session die (killed, crashed) while its process runs, the process
            // dies too: nobody could wait for it, relay its output or tell its origin.
            parent_death_signal: Some(libc::SIGKILL),
        };
        telefork_engine::timeline::stamp("dest job begins");
        // A plain image over `transport.self_receive_min_bytes` (by the offer) is received by
        // the new process itself (the engine's self_receive): one copy off the wire, into
        // memory populated ahead. Smaller ones the restorer reads into a buffer that stays in
        // cache and places with UFFDIO_COPY, which writes each page once, where populating
        // and then receiving writes it twice — faster up to 1 GiB on our VM, slower at 4 GiB
        // where fresh memory is dear (README "Performance", "4 GiB").
        let restored = if plain_image && image_bytes > self_receive_min {
            // The image arrives on the TCP socket beneath TLS, with a page index.
            // Read unbuffered, so the stream is where the reader stopped when it takes over
            // (and nothing past the image's end, which would be the origin's next TLS record,
            // is taken from the channel).
            let raw = ch.raw_socket()?;
            raw.set_read_timeout(Some(Duration::from_secs(30))).ok();
            opts.pages_socket =
                Some(telefork_engine::PagesSocket { fd: raw.as_fd(), max_bytes: max });
            let r = restore_into(stub, LimitedReader { inner: raw, left: max }, &opts)
                .map_err(telefork_engine::Error::into_chain);
            raw.set_read_timeout(None).ok();
            r
        } else if plain_image {
            // The image arrives on the TCP socket beneath TLS (its page index is checked
            // against the records as they come). The origin sends nothing after it until we
            // answer, so nothing the buffer reads ahead can belong to TLS.
            let raw = ch.raw_socket()?;
            raw.set_read_timeout(Some(Duration::from_secs(30))).ok();
            let mut input =
                std::io::BufReader::with_capacity(1 << 20, LimitedReader { inner: raw, left: max });
            let r = restore_into(stub, &mut input, &opts)
                .map_err(telefork_engine::Error::into_chain)
                .and_then(|r| {
                    if input.buffer().is_empty() {
                        Ok(r)
                    } else {
                        telefork_engine::kill_quietly(r.pid);
                        bail!(
                            "the origin sent {} bytes past the end of the image",
                            input.buffer().len()
                        )
                    }
                });
            raw.set_read_timeout(None).ok();
            r
        } else {
            // (No buffer in between: the channel keeps the opened records itself.)
            restore_into(stub, LimitedReader { inner: ch, left: max }, &opts)
                .map_err(telefork_engine::Error::into_chain)
        }?;
        // Told from here, as soon as it runs (not after this job's result is read).
        let pid = restored.pid;
        ch.set_recv_timeout(None);
        telefork_engine::timeline::stamp("dest restored");
        let r = ch.send(&FromDest::Started { pid: pid.as_raw() });
        telefork_engine::timeline::stamp("dest sent Started");
        if let Err(e) = r {
            // Nobody would hear of it again: it must not run on.
            telefork_engine::kill_quietly(pid);
            return Err(e)
                .context(format!("telling the origin that process {pid} runs (it was killed)"));
        }
        Ok(restored)
    });
    let restored = restorer.restore(job);
    tracing::debug!(
        "restore done {:.2} ms after accepting",
        t_accepted.elapsed().as_secs_f64() * 1e3
    );
    match restored {
        Ok(r) => Ok(Some(Received { restored: r, user, pass_stdin, _counted: counted })),
        Err(e) => {
            tracing::warn!("restoring a process from {origin} failed: {e:#}");
            let node = &shared.cfg.node;
            let failure = crate::failure::of(&e, node, origin, Stage::Restore);
            ch.send(&FromDest::Failed(failure)).ok();
            // The restore may have stopped early (a mapped file missing here, say) while the
            // image is still arriving: read the rest, so that the origin, which reads our
            // answer once it has sent the image, gets the reason instead of a reset.
            if plain_image {
                if let Ok(raw) = ch.raw_socket() {
                    raw.set_read_timeout(Some(DROP_LIMIT)).ok();
                    drop_image(raw);
                }
            } else {
                ch.set_recv_timeout(Some(DROP_LIMIT));
                drop_image(&**ch);
            }
            Ok(None)
        }
    }
}

/// Waits for the offer (an origin may connect ahead of its telefork, or keep the connection
/// after a child's end — so a while, leaving quietly if it never comes), checks it against this
/// node's limits and accepts it, or `None` if refused.
fn answer_offer(shared: &Shared, ch: &TlsChannel, origin: &str) -> Result<Option<Accepted>> {
    ch.set_recv_timeout(Some(OFFER_WAIT));
    let node = &shared.cfg.node;
    // (Behind the origin's hello: a peer of another protocol version is told so, in a form it
    // reads, and the session ends.)
    let offer: ToDest = match ch.recv_first() {
        Ok(Some(o)) => o,
        Ok(None) => return Ok(None),
        Err(e) => {
            if let Some(proto::Error::Version { ours, theirs }) = e.downcast_ref::<proto::Error>() {
                tracing::warn!("refused the connection of {origin}: {e:#}");
                let (ours, theirs) = (*ours, *theirs);
                let text = Failure::Protocol { node: origin.to_string(), ours, theirs }.to_string();
                let _ = if theirs == 0 {
                    proto::unversioned::to_origin(&text)
                        .map_err(anyhow::Error::from)
                        .and_then(|f| Ok((&*ch).write_all(&f)?))
                } else {
                    let mismatch =
                        Failure::Protocol { node: node.clone(), ours: theirs, theirs: ours };
                    ch.send_first(&FromDest::Failed(mismatch))
                };
                // (What follows the offer, an image perhaps, is read and dropped until the
                // origin, having read why, closes: so it is not cut off by a reset.)
                ch.set_recv_timeout(Some(DROP_LIMIT));
                drop_image(ch);
            }
            return Ok(None);
        }
    };
    telefork_engine::timeline::stamp("dest offer read");
    ch.set_recv_timeout(Some(HANDSHAKE_TIMEOUT));
    let ToDest::Offer {
        user,
        origin: claimed,
        image_bytes,
        pass_stdin,
        plain_image,
        image_follows,
    } = offer
    else {
        bail!("node {origin} sent something other than an offer");
    };
    if claimed != origin {
        bail!("node {origin} claims to be {claimed:?}");
    }
    let limits = &shared.cfg.limits;
    let refusal = if user.uid == 0 && !limits.allow_root {
        Some((
            Limit::AllowRoot,
            format!("node {node} does not run processes of root (limits.allow_root = false)"),
        ))
    } else if image_bytes > limits.max_image_bytes {
        Some((Limit::MaxImageBytes, format!("image of {image_bytes} bytes exceeds node {node}'s limit of {} bytes (limits.max_image_bytes)", limits.max_image_bytes)))
    } else if plain_image && shared.cfg.transport.image != crate::config::ImageTransport::Plain {
        Some((
            Limit::TransportImage,
            format!("node {node} accepts only encrypted images (its transport.image is \"tls\")"),
        ))
    } else if live_sessions(shared, user.uid) >= limits.max_restores_per_user {
        Some((
            Limit::MaxRestoresPerUser,
            format!("user {} already has {} processes restored on node {node} (limits.max_restores_per_user)", user.uid, limits.max_restores_per_user),
        ))
    } else {
        None
    };
    // Counted among its owner's restored processes from here (a file in the state
    // directory: a full or broken one refuses the offer, naming why).
    let marker = shared.sessions_dir().join(format!("{}.{}", user.uid, std::process::id()));
    let refusal =
        refusal.map(|(limit, reason)| Failure::Refused { node: node.clone(), limit, reason });
    let refusal = refusal.or_else(|| {
        File::create(&marker).err().map(|e| Failure::Failed {
            node: node.clone(),
            stage: Stage::Restore,
            message: format!(
                "cannot record the session in {}: {e}",
                shared.sessions_dir().display()
            ),
        })
    });
    if let Some(failure) = refusal {
        tracing::warn!("refused a process from {origin}: {failure}");
        // (The first answer to the offer: behind our hello.)
        ch.send_first(&FromDest::Failed(failure))?;
        if image_follows {
            drop_image(ch);
        }
        return Ok(None);
    }
    let counted = RemoveOnDrop(marker);
    ch.send_first(&FromDest::Accept)?;
    Ok(Some(Accepted { user, pass_stdin, plain_image, image_bytes, counted }))
}

/// An offer accepted.
struct Accepted {
    user: User,
    pass_stdin: bool,
    plain_image: bool,
    /// The size the origin gave (its process's resident memory): a hint only.
    image_bytes: u64,
    /// Counts this session among its owner's (`limits.max_restores_per_user`).
    counted: RemoveOnDrop,
}

/// How long a refused or failed image is read and dropped at most.
const DROP_LIMIT: Duration = Duration::from_secs(30);

/// Reads and drops an image sent with its (refused) offer, or the rest of one whose restore
/// failed, until the origin, having read why, closes the connection (so it is not cut off
/// mid-send and gets the reason); for at most `DROP_LIMIT`. `input`: the channel, or the
/// socket beneath it for an image sent unencrypted.
fn drop_image(mut input: impl Read) {
    let deadline = std::time::Instant::now() + DROP_LIMIT;
    let mut buf = vec![0u8; 64 << 10];
    while std::time::Instant::now() < deadline {
        match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The groups `uid` has on this node (its primary group and the supplementary groups of
/// its name here); just the primary group for a user this node does not know.
pub(crate) fn groups_of(uid: u32, gid: u32) -> Vec<u32> {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten();
    let mut groups = match user {
        Some(u) => match std::ffi::CString::new(u.name) {
            Ok(name) => nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
                .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_default(),
            Err(_) => vec![],
        },
        None => vec![],
    };
    groups.push(gid);
    groups
}

/// Counts image bytes so a peer cannot send more than the node's limit.
struct LimitedReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("the image exceeds this node's size limit"));
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")
}
