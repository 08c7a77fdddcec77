//! The processes of a testbed node: the *holder* (`sleep infinity` that owns the node's UTS
//! and mount namespaces, inside its network namespace; hostname set, private tmpfs on
//! /run/telefork) and the *daemon* (started by `nsenter` into the holder's namespaces, so
//! it can be killed and restarted while the node stays up). Also: identifying processes by
//! PID + start time, and stopping them (SIGTERM, then SIGKILL after a grace period).

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

use crate::state::ProcId;

/// Start time of PID (clock ticks since boot), None if there is no such process.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields after the command name start at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Is this exact process (same PID, same start time) still running (not a zombie)?
pub fn alive(p: ProcId) -> bool {
    start_time(p.pid) == Some(p.start) && !is_zombie(p.pid)
}

/// Reads `pid:start` of a running PID.
pub fn proc_id(pid: i32) -> Result<ProcId> {
    let start = start_time(pid).with_context(|| format!("process {pid} vanished"))?;
    Ok(ProcId { pid, start })
}

/// Gone = no such process, or a zombie (reaped here if it is our child).
fn gone(pid: i32) -> bool {
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH)) || is_zombie(pid)
}

/// SIGTERM to each, SIGKILL to those still there after `grace`, then waits (bounded) for
/// them to go. Only the given PIDs are signalled.
pub fn stop_all(pids: &[i32], grace: Duration) {
    let signal_all = |sig| {
        for &p in pids {
            if p > 1 && !gone(p) {
                let _ = kill(Pid::from_raw(p), sig);
            }
        }
    };
    let wait_all = |d: Duration| {
        let t = Instant::now();
        while pids.iter().any(|&p| !gone(p)) && t.elapsed() < d {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    signal_all(Signal::SIGTERM);
    wait_all(grace);
    signal_all(Signal::SIGKILL);
    wait_all(Duration::from_secs(2));
}

fn log_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log {}", path.display()))
}

/// Spawns `cmd` detached (own session), stdin from /dev/null, stdout/stderr appended to `log`.
fn spawn_detached(mut cmd: Command, log: &Path) -> Result<Child> {
    let out = log_file(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err).current_dir("/");
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("spawning {cmd:?}"))
}

/// Waits until the started script wrote its PID to `pid_file` (it does so only once its
/// setup succeeded and right before it execs), failing early if it exited.
fn wait_pid_file(
    child: &mut Child,
    pid_file: &Path,
    log: &Path,
    what: &str,
    timeout: Duration,
) -> Result<ProcId> {
    let t = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(pid_file) {
            if let Ok(pid) = s.trim().parse::<i32>() {
                return proc_id(pid).with_context(|| {
                    format!("{what} exited right after starting; see {}", log.display())
                });
            }
        }
        if let Some(st) = child.try_wait()? {
            bail!("{what} failed to start ({st}); see {}:\n{}", log.display(), tail(log));
        }
        if t.elapsed() > timeout {
            bail!("{what} did not start within {timeout:?}; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The last lines of a log file, for error messages.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Starts the holder of node `hostname`: in network namespace `netns`, new UTS and mount
/// namespaces (all mounts private), hostname set, a fresh tmpfs on /run/telefork.
pub fn start_holder(netns: &str, hostname: &str, node_dir: &Path) -> Result<ProcId> {
    let pid_file = node_dir.join("holder.pid");
    let log = node_dir.join("holder.log");
    let _ = std::fs::remove_file(&pid_file);
    let script = r#"hostname "$2" && mkdir -p /run/telefork && mount -t tmpfs -o mode=0755 tmpfs /run/telefork && echo $$ > "$1.tmp" && mv "$1.tmp" "$1" && exec sleep infinity"#;
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        netns,
        "unshare",
        "--uts",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        script,
        "sh",
    ])
    .arg(&pid_file)
    .arg(hostname);
    let mut child = spawn_detached(cmd, &log)?;
    wait_pid_file(
        &mut child,
        &pid_file,
        &log,
        &format!("holder of {hostname}"),
        Duration::from_secs(10),
    )
}

/// The path `p` (absolute, inside the node) as seen from here through the holder.
pub fn in_node(holder: ProcId, p: &Path) -> PathBuf {
    Path::new(&format!("/proc/{}/root", holder.pid)).join(p.strip_prefix("/").unwrap_or(p))
}

/// Starts a daemon (`argv`) inside the holder's namespaces; its output goes to `log`.
pub fn start_daemon(
    holder: ProcId,
    argv: &[String],
    node_dir: &Path,
    log: &Path,
    what: &str,
) -> Result<ProcId> {
    if !alive(holder) {
        bail!("{what}: the node's namespace holder (pid {}) is gone; bring the testbed down and up again", holder.pid);
    }
    let pid_file = node_dir.join("daemon.pid");
    let _ = std::fs::remove_file(&pid_file);
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--target={}", holder.pid))
        .args([
            "--net",
            "--uts",
            "--mount",
            "--",
            "sh",
            "-c",
            r#"p="$1"; shift; echo $$ > "$p.tmp" && mv "$p.tmp" "$p" && exec "$@""#,
            "sh",
        ])
        .arg(&pid_file)
        .args(argv)
        .env_remove(telefork_node::config::SOCKET_ENV);
    let mut child = spawn_detached(cmd, log)?;
    wait_pid_file(&mut child, &pid_file, log, what, Duration::from_secs(10))
}

/// Waits until `sock` (path inside the node) exists and, if it is a socket, accepts a
/// connection; fails early if the daemon died.
pub fn wait_ready(
    holder: ProcId,
    daemon: ProcId,
    sock: &Path,
    log: &Path,
    what: &str,
    deadline: Instant,
) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let p = in_node(holder, sock);
    loop {
        if let Ok(md) = std::fs::metadata(&p) {
            // A regular file is accepted from stand-in daemons (tests); a socket must answer.
            if !md.file_type().is_socket() || std::os::unix::net::UnixStream::connect(&p).is_ok() {
                return Ok(());
            }
        }
        if !alive(daemon) {
            bail!(
                "{what} (pid {}) exited before creating its socket {}; see {}:\n{}",
                daemon.pid,
                sock.display(),
                log.display(),
                tail(log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{what} (pid {}) did not create its socket {} in time; see {}:\n{}",
                daemon.pid,
                sock.display(),
                log.display(),
                tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
