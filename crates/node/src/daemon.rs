//! The node daemon: one per node. It owns two listeners — TCP for other nodes (mutual TLS),
//! a Unix socket for local programs — and forks one *session process* per connection, like
//! sshd. A session process lives as long as its connection and its child: it restores an
//! incoming process as its child and relays its output and fate home (`dest`), or sends a
//! local program's child away and relays what comes back (`origin`). Once a child has
//! ended, a program's connection, and with it both sessions and the connection between
//! them, serves that program's next telefork to the same node. Because sessions are
//! separate processes, restarting or upgrading the daemon does not take running children
//! down.
//!
//! The main loop (`admission`: TLS handshakes before any process, limits and queues) never
//! creates a thread, so forking from it is safe; sessions are free to use threads.
//!
//! Events go through `tracing` (info: what happened to each process; warn: refusals and
//! failures; debug: timings); the binary that runs the daemon installs the subscriber.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use nix::unistd::{fork, ForkResult};

use crate::config::Config;

/// What every session needs, loaded once at start.
pub struct Shared {
    pub cfg: Config,
    pub server_tls: Arc<rustls::ServerConfig>,
    pub client_tls: Arc<rustls::ClientConfig>,
}

impl Shared {
    pub fn sessions_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("sessions")
    }
    pub fn results_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("results")
    }
}

pub fn run(cfg: Config) -> Result<()> {
    let shared = Shared {
        server_tls: crate::tls::server_config(&cfg.tls)?,
        client_tls: crate::tls::client_config(&cfg.tls)?,
        cfg,
    };
    for d in [shared.sessions_dir(), shared.results_dir()] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        // (Root's alone: sessions and results are recorded there by name.)
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private (0700)", d.display()))?;
    }
    // Load the name service modules (passwd/group lookups) once here: every destination
    // session asks for its process owner's groups, and a session forked before they were
    // loaded would load them itself, each time (about 5 % of a small telefork's page faults).
    let _ = crate::dest::groups_of(0, 0);
    // (Closing what the lookups may have left open, so no session shares it.)
    // SAFETY: plain libc calls without arguments; no other thread exists yet.
    unsafe {
        libc::endpwent();
        libc::endgrent();
    }
    // Likewise what the CPU offers (the engine's and std's caches: CPUID traps in a VM).
    // (aws-lc reads the CPU's features in a constructor when the program loads, so the
    // sessions inherit them: nothing to warm there.)
    telefork_engine::learn_cpu();
    // And what captures and restores compare a process against (this daemon's namespaces,
    // cgroups, …: its sessions share them).
    telefork_engine::learn_host();
    let tcp = TcpListener::bind(shared.cfg.listen)
        .with_context(|| format!("listening on {}", shared.cfg.listen))?;
    let unix = bind_unix(&shared.cfg.socket)?;
    tracing::info!(
        "node {} listening on {} (nodes, mutual TLS) and {} (local programs)",
        shared.cfg.node,
        shared.cfg.listen,
        shared.cfg.socket.display()
    );
    crate::admission::Admission::new(&shared, tcp, unix)?.run()
}

fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket left by a previous daemon: remove it if nobody answers on it.
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!("another daemon is already listening on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    // Anyone may connect: the daemon identifies each program by SO_PEERCRED.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).ok();
    Ok(l)
}

/// Runs `session` in a forked process; `loop_fds` (the main loop's listeners and the
/// connections not this session's) are closed there. Its PID if it started.
pub(crate) fn spawn_session(
    loop_fds: &[i32],
    session: impl FnOnce() -> Result<()>,
) -> Option<nix::unistd::Pid> {
    // SAFETY: the daemon's main loop is single-threaded (no thread was ever started in it),
    // so the child may run arbitrary code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            for fd in loop_fds {
                // SAFETY: these fds belong to the main loop's objects, which this process
                // never uses nor drops (it ends with _exit).
                unsafe { libc::close(*fd) };
            }
            let code = match session() {
                Ok(()) => 0,
                Err(e) => {
                    tracing::warn!("session {}: {e:#}", std::process::id());
                    1
                }
            };
            std::io::stderr().flush().ok();
            // SAFETY: _exit skips destructors of state copied from the parent on purpose.
            unsafe { libc::_exit(code) };
        }
        Ok(ForkResult::Parent { child }) => Some(child),
        Err(e) => {
            tracing::error!("cannot fork a session: {e}");
            None
        }
    }
}

/// Counts live sessions of `uid` (files `sessions/<uid>.<session pid>`), removing stale ones.
pub fn live_sessions(shared: &Shared, uid: u32) -> u32 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(shared.sessions_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((u, p)) = name.split_once('.') else { continue };
            let (Ok(u), Ok(p)) = (u.parse::<u32>(), p.parse::<i32>()) else { continue };
            if Path::new(&format!("/proc/{p}")).exists() {
                if u == uid {
                    n += 1;
                }
            } else {
                std::fs::remove_file(e.path()).ok();
            }
        }
    }
    n
}
