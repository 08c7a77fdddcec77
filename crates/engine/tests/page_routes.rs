//! The page routes a daemon uses, driven without one (the cluster tests need network
//! namespaces; these need only root): a process of 96 MiB — more than a small image, so its
//! big runs take the route — is captured onto one end of a socket pair and restored from the
//! other, and must find every word of its memory as it was.
//!
//! * `self_sent_and_self_received`: the captured process writes its own pages onto the socket
//!   (`PageRoute::Socket`), and the new one receives them off it itself
//!   (`RestoreOptions::pages_socket`);
//! * `spliced_and_written`: the captured process vmsplices its pages into a pipe a forwarder
//!   empties onto the socket (`PageRoute::Pipe`), and the restorer writes them in.
//!
//! Each fails when its route did not happen: the bytes the capture wrote itself are counted
//! (the pages must not be among them), as are the bytes forwarded from the pipe, and the
//! restore says whether the process received its pages.

use std::io::{BufReader, BufWriter, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use telefork_engine::{DumpOptions, PageRoute, PagesSocket, RestoreOptions};

/// The target's memory: above the 16 MiB a capture reads itself, above the 64 MiB that make
/// a restore big.
const SIZE: usize = 96 << 20;

fn pattern(word: usize) -> u64 {
    (word as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1CE
}

/// Set in the target's environment: the file whose existence tells it to check its memory.
const TARGET_ENV: &str = "PAGE_ROUTES_GO";

/// The target, run from a copy of this test binary (a process whose executable is the
/// restorer's own could not be given it back: its file is mapped by the image), on its only
/// thread: fills `SIZE` bytes with the pattern, says READY, waits for the file `go`, and then
/// fails if a word is not as it was.
fn target_process(go: std::ffi::OsString) {
    // SAFETY: closes the fds above 2 this process inherited; nothing here uses them.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let mut memory = vec![0u64; SIZE / 8];
    for (i, w) in memory.iter_mut().enumerate() {
        *w = pattern(i);
    }
    println!("READY");
    std::io::stdout().flush().unwrap();
    while !std::path::Path::new(&go).exists() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let wrong = memory.iter().enumerate().find(|(i, w)| **w != pattern(*i));
    assert_eq!(wrong, None, "a word of the restored memory is not as it was");
}

/// The target process: killed (if still there) and reaped when dropped, however the test
/// ends.
struct Target(std::process::Child);

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the target from a copy of this binary in `dir` and waits for its READY.
fn spawn_target(dir: &std::path::Path, go: &std::path::Path) -> (Pid, Target) {
    let exe = dir.join("page-routes-target");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    let mut child = Target(
        std::process::Command::new(&exe)
            .env(TARGET_ENV, go)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0 {
        if line.trim() == "READY" {
            return (Pid::from_raw(child.0.id() as i32), child);
        }
        line.clear();
    }
    panic!("the target ended without READY");
}

/// A writer onto the socket that counts the bytes written through it.
struct Counting<'a>(&'a UnixStream, &'a AtomicU64);

impl Write for Counting<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = (&*self.0).write(b)?;
        self.1.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (&*self.0).flush()
    }
}

/// Takes exactly `len` bytes from the (non-blocking) `pipe` onto `out`, counting them.
fn forward(
    pipe: RawFd,
    len: usize,
    mut out: &UnixStream,
    forwarded: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(left);
        // SAFETY: reads at most `want` bytes into our own buffer of at least that size.
        let n = unsafe { libc::read(pipe, buf.as_mut_ptr().cast(), want) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(e);
            }
            let mut p = libc::pollfd { fd: pipe, events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd, ours, for the duration of the call.
            unsafe { libc::poll(&mut p, 1, 5000) };
            continue;
        }
        if n == 0 {
            return Err(std::io::Error::other("the pipe ended early"));
        }
        out.write_all(&buf[..n as usize])?;
        forwarded.fetch_add(n as u64, Ordering::Relaxed);
        left -= n as usize;
    }
    Ok(())
}

/// Runs the two routes one after the other (a harness of its own: the target, a copy of
/// this binary, must have one thread only).
fn main() {
    if let Some(go) = std::env::var_os(TARGET_ENV) {
        return target_process(go);
    }
    // Not a skip: the test command runs as root, and a run that cannot capture has tested
    // nothing.
    assert!(
        nix::unistd::geteuid().is_root(),
        "page_routes needs root (ptrace of its target, prctl(PR_SET_MM) on restore)"
    );
    for (name, test) in [
        ("self_sent_and_self_received", self_sent_and_self_received as fn()),
        ("spliced_and_written", spliced_and_written),
    ] {
        test();
        println!("test {name} ... ok");
    }
}

/// Captures a fresh target onto one end of a socket pair with `route` (in a thread of its
/// own) while `restore` rebuilds it from the other end; lets the new process check its
/// memory. Returns the page bytes captured, how the restore placed them, the bytes the
/// capture wrote itself and those forwarded from the process's pipe.
fn carry(
    route: &str,
    restore: impl FnOnce(&UnixStream) -> anyhow::Result<telefork_engine::Restored>,
) -> (u64, telefork_engine::Placed, u64, u64) {
    let dir =
        std::env::temp_dir().join(format!("telefork-page-routes-{}-{route}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let go = dir.join(route);
    let _ = std::fs::remove_file(&go);
    let (target, target_child) = spawn_target(&dir, &go);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (written, forwarded) = (AtomicU64::new(0), AtomicU64::new(0));
    let captured = std::thread::scope(|scope| {
        let dumper = scope.spawn(|| {
            let out = &ours;
            let pipe_forward =
                |pipe: BorrowedFd<'_>, len: usize| forward(pipe.as_raw_fd(), len, out, &forwarded);
            let page_route = match route {
                "socket" => PageRoute::Socket(out.as_fd()),
                _ => PageRoute::Pipe(&pipe_forward),
            };
            let opts = DumpOptions {
                inherit_stdio: true,
                skip_page_checksums: true,
                page_route: Some(page_route),
                ..Default::default()
            };
            let w = BufWriter::with_capacity(1 << 20, Counting(out, &written));
            let r = telefork_engine::dump(target, w, &opts, |mut w| Ok(w.flush()?));
            // (A failed capture ends the stream: the restore is not left waiting for it.)
            if r.is_err() {
                let _ = out.shutdown(std::net::Shutdown::Both);
            }
            r
        });
        let restored = restore(&theirs);
        // (Nor is a capture left sending to a restore that failed.)
        if restored.is_err() {
            let _ = theirs.shutdown(std::net::Shutdown::Both);
        }
        let summary = dumper.join().expect("the capture panicked").expect("capture");
        (summary, restored.expect("restore"))
    });
    let (summary, restored) = captured;
    // (The captured target is gone: reaped here.)
    drop(target_child);
    std::fs::write(&go, b"go").unwrap();
    let status = waitpid(restored.pid, None).expect("waiting for the restored process");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        status,
        WaitStatus::Exited(restored.pid, 0),
        "the restored process did not find its memory as it was"
    );
    assert!(summary.page_bytes >= SIZE as u64, "only {} page bytes captured", summary.page_bytes);
    (summary.page_bytes, restored.pages, written.into_inner(), forwarded.into_inner())
}

fn self_sent_and_self_received() {
    let (captured, placed, written, _) = carry("socket", |s| {
        let opts = RestoreOptions {
            skip_page_checksums: true,
            pages_socket: Some(PagesSocket { fd: s.as_fd(), max_bytes: 1 << 30 }),
            ..Default::default()
        };
        telefork_engine::restore(s, &opts).map_err(telefork_engine::Error::into_chain)
    });
    assert!(
        written < captured / 4,
        "the capture wrote {written} of {captured} page bytes itself: the process did not send them"
    );
    assert!(placed.by_process, "the new process did not receive its pages itself: {placed:?}");
    assert_eq!(placed.bytes, captured);
}

fn spliced_and_written() {
    let (captured, placed, _, forwarded) = carry("pipe", |s| {
        let opts = RestoreOptions { skip_page_checksums: true, ..Default::default() };
        telefork_engine::restore(BufReader::with_capacity(1 << 20, s), &opts)
            .map_err(telefork_engine::Error::into_chain)
    });
    assert!(
        forwarded >= SIZE as u64,
        "only {forwarded} of {captured} page bytes came through the pipe: the process did not splice them"
    );
    assert!(!placed.by_process, "{placed:?}");
    assert_eq!(placed.bytes, captured);
}
