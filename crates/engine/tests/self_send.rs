//! A captured process hands over its own memory (`PageRoute`): onto the image's socket (the
//! plain transport: the process writes its runs itself) or into a pipe it vmsplices into (the
//! TLS transport: the pipe is read into records). Either way the capture must not read those
//! pages itself — had the engine quietly fallen back to reading them through /proc/PID/mem,
//! the image would arrive just the same, so these tests look at what this process read: its
//! read bytes (`rchar` in /proc/self/io) grow by less than a quarter of the memory, where
//! reading the pages would add all of it. The image that arrives is checked page by page.
//!
//! The target is a python3 process holding 64 MiB of patterned memory (one thread, only fds
//! 0-2). Needs root (ptrace of a process that is not our child) and python3, which CI has:
//! without them the tests fail, naming what is missing.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::Pid;
use telefork_engine::{dump, DumpOptions, PageRoute};
use telefork_image::ImageReader;

/// The memory the target holds: byte i of it is `i % 251`.
const MEMORY: usize = 64 << 20;

/// One capture at a time: each measures this whole process's reads.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const TARGET: &str = r#"
import sys, time
m = bytes(range(251)) * (64 * 1024 * 1024 // 251 + 1)
m = m[:64 * 1024 * 1024]
print("READY", flush=True)
time.sleep(600)
"#;

/// The target, started with fds >= 3 closed (the capture would refuse what this test process
/// inherited), killed on drop if the capture did not.
struct Target(Child);

impl Target {
    fn start() -> Target {
        assert!(
            nix::unistd::geteuid().is_root(),
            "these tests capture a process that is not their child (ptrace): run them as root"
        );
        let mut cmd = Command::new("python3");
        cmd.args(["-c", TARGET]).stdin(Stdio::null()).stdout(Stdio::piped());
        // SAFETY: the closure only makes a raw syscall (async-signal-safe, no allocation)
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3 ({e}): scripts/setup.sh installs it"));
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "READY", "the python3 target did not start");
        Target(child)
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.0.id() as i32)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bytes read so far (`rchar` in /proc/`what`/io): by this process (`self`: all its threads,
/// those that ended too) or this thread (`thread-self`).
fn rchar(what: &str) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{what}/io")).expect("/proc/…/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("rchar in /proc/…/io")
}

/// Reads a whole image from `input` and returns how many bytes of it are the target's
/// patterned memory: runs of 1 MiB or more whose bytes (past the first page, which may hold
/// the buffer's header) follow the pattern.
fn check_image(input: impl Read) -> u64 {
    let (mut r, _) = ImageReader::new(input).expect("the image's header");
    r.skip_page_checksums();
    r.process().expect("the process record");
    let mut found = 0u64;
    while let Some(run) = r.next_pages().expect("the pages") {
        if run.data.len() < 1 << 20 {
            continue;
        }
        // Where the pattern would start, going by the byte at 4096.
        let start = run.addr + 4096 - run.data[4096] as u64;
        if run
            .data
            .iter()
            .enumerate()
            .skip(4096)
            .step_by(4093)
            .all(|(i, &b)| (run.addr + i as u64 - start) % 251 == b as u64)
        {
            found += run.data.len() as u64;
        }
    }
    found
}

/// Captures a fresh target with `route`, its image going to `ours` (one end of a socket pair
/// whose other end a thread reads and checks). Returns what this process read meanwhile, less
/// what it read on the route's behalf (`forwarded`: the pages the process handed over, which
/// it must pass on) and what the image's reader read.
fn capture(ours: &UnixStream, theirs: UnixStream, route: PageRoute, forwarded: &AtomicU64) -> u64 {
    // (What the reader reads is taken off: it says how much its thread read.)
    let reader = std::thread::spawn(move || {
        let before = rchar("thread-self");
        let found = check_image(BufReader::with_capacity(1 << 20, theirs));
        (found, rchar("thread-self") - before)
    });
    let target = Target::start();
    let opts = DumpOptions {
        inherit_stdio: true,
        skip_page_checksums: true,
        page_route: Some(route),
        ..Default::default()
    };
    let before = rchar("self");
    let summary = dump(target.pid(), BufWriter::with_capacity(1 << 20, ours), &opts, |mut w| {
        w.flush()?;
        // (The end of the image for the reader, whoever else holds the socket.)
        ours.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    })
    .unwrap_or_else(|e| panic!("the capture failed: {e:#}"));
    let (found, received) = reader.join().expect("the image reader");
    let read = rchar("self") - before;
    assert!(summary.page_bytes >= MEMORY as u64, "{} page bytes captured", summary.page_bytes);
    // (All of it but the runs holding its ends.)
    assert!(
        found >= MEMORY as u64 - (2 << 20),
        "the image holds {found} bytes of the target's memory"
    );
    let read = read.saturating_sub(received + forwarded.load(Ordering::SeqCst));
    eprintln!("the capture read {read} bytes itself; {found} bytes of the memory arrived");
    read
}

/// The socket route: the process writes its memory onto the image's socket itself.
#[test]
fn the_process_writes_its_own_memory_onto_the_socket() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (ours, theirs) = UnixStream::pair().unwrap();
    let read = capture(&ours, theirs, PageRoute::Socket(ours.as_raw_fd()), &AtomicU64::new(0));
    assert!(
        read < MEMORY as u64 / 4,
        "the capture read {read} bytes itself for {MEMORY} bytes of memory: the process did \
         not write its memory onto the socket"
    );
}

/// The pipe route: the process vmsplices its memory into a pipe, passed on here to the image
/// stream (as telefork's forwarder seals it into TLS records).
#[test]
fn the_process_splices_its_own_memory_into_a_pipe() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (ours, theirs) = UnixStream::pair().unwrap();
    let forwarded = AtomicU64::new(0);
    let forward = |pipe: RawFd, len: usize| -> std::io::Result<()> {
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match nix::unistd::read(pipe, &mut buf[got..]) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                // (The pipe does not block: wait for the process to put more in.)
                Err(nix::errno::Errno::EAGAIN) => {
                    // SAFETY: the engine lends us the pipe's fd for the length of this call.
                    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(pipe) };
                    let mut p = [PollFd::new(fd, PollFlags::POLLIN)];
                    poll(&mut p, PollTimeout::from(10_000u16))?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        forwarded.fetch_add(len as u64, Ordering::SeqCst);
        (&ours).write_all(&buf)
    };
    let read = capture(&ours, theirs, PageRoute::Pipe(&forward), &forwarded);
    assert!(
        read < MEMORY as u64 / 4,
        "the capture read {read} bytes itself for {MEMORY} bytes of memory: the process did \
         not splice its memory into the pipe"
    );
}
