//! The program `telefork bench` runs on the testbed nodes (and on the host for dump/restore).
//! Every measurement is printed on stdout as one line `R KEY VALUE` (VALUE in nanoseconds or
//! bytes); `PID N`, `READY` (and `OK` from `hold`) lines let the bench follow along. Any failure exits non-zero
//! with a message on stderr.
//!
//! Modes:
//!
//! * `latency RUNS DEST [SETTLE_MS]` — a small program: per run `remote(DEST, now_ns)` minus
//!   the call time (`first_instr_ns`), a telefork whose child exits at once: time until
//!   telefork returns in the parent (`tf_pause_ns`) and until wait returns (`tf_rt_ns`), and
//!   the same for a local fork()+_exit(0)+waitpid (`fork_pause_ns`, `fork_rt_ns`); with
//!   SETTLE_MS, that long a sleep before each of them.
//! * `tfork MIB RESERVE_GIB RUNS DEST VERIFY` — MIB MiB of written anonymous memory (inside a
//!   MAP_NORESERVE reservation of RESERVE_GIB GiB if that is not 0), then per run the same
//!   telefork and local fork pairs as `latency`. With VERIFY=1 one more, untimed, telefork
//!   whose child checks every byte it brought.
//! * `populate MIB RUNS` — with MIB MiB written and kept (as a teleforked parent keeps its
//!   memory), per run MIB MiB more of fresh anonymous memory populated in bulk
//!   (MADV_POPULATE_WRITE): `populate_ns`, the destination's share of the physical limit.
//! * `hold MIB GOFILE` — MIB MiB written, `READY`, then waits until GOFILE exists, verifies
//!   the memory and exits 0 (3 if the memory is wrong).
//! * `tcp-sink PORT` / `tcp-send ADDR BYTES RUNS [CC]` — raw TCP: the sender sends BYTES from a
//!   pre-touched 64 MiB buffer, half-closes, and waits for the sink's 8-byte count
//!   (`tcp_ns`, from connected to acknowledged); CC: the sender's congestion control
//!   (TCP_CONGESTION) instead of the node's default.
//! * `tls-sink PORT PKI` / `tls-send ADDR BYTES RUNS PKI` — the same through the nodes' own
//!   TLS channel (`telefork_node::channel::TlsChannel`, the cluster configs from
//!   `telefork_node::tls`, node2's certificate on the sink, node1's on the sender), 1 MiB
//!   writes as the origin's BufWriter does (`tls_ns`, from handshake done to acknowledged).
//! * `fresh-sink PORT [ahead]` / `mem-send ADDR MIB RUNS` — the data path's floor: the sender
//!   writes MIB MiB of its own memory (written, as a parent's is) onto the socket after an
//!   8-byte length; the sink reads it straight into fresh anonymous memory of that length
//!   (what a destination must at least do: take the bytes off the wire into new pages) —
//!   with `ahead`, while a second thread populates that memory ahead of it
//!   (MADV_POPULATE_WRITE, 32 MiB at a time) — acknowledges the count and unmaps it
//!   (`mem_ns`, from connected to acknowledged).
//! * `relay-dest PORT` / `relay-origin SOCK DEST_ADDR` / `relay-latency RUNS SOCK` — the
//!   hand-overs' floor: the program writes one byte to a relay on its node (a Unix socket, as
//!   to its daemon), which passes it over TCP to a relay on the other node, which forks a
//!   child that exits at once, reaps it and sends its status back the same way; no state
//!   moves (`relay_rt_ns`, beside the local `fork_rt_ns` of the same program).
//! * `notify-latency RUNS` — the background pause's floor: per run a fork whose child stops
//!   itself, a pidfd of it, and one request (40 bytes with the program's stdout and stderr,
//!   SCM_RIGHTS) to a peer process waiting in recvmsg, as a background telefork does before it
//!   returns (`notify_pause_ns`, until the request is sent; the peer kills the child), beside
//!   the time a local fork() returns (`fork_pause_ns`).
//! * `move-dest PORT` / `move-origin SOCK DEST_ADDR` / `move-latency RUNS SOCK` — the same
//!   way with the state moved by hand: the stopped child's mappings (smaps), written pages
//!   (PAGEMAP_SCAN, /proc/PID/mem) to node2, where a new process maps them again, reads its
//!   pages into place and exits (`move_rt_ns`; see `by_hand.rs`).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::exit;
use std::time::{Duration, Instant};

use telefork::Fork;

mod by_hand;

const PATTERN: u64 = 0x9E37_79B9_7F4A_7C15;

fn now_ns() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("benchprog: {msg}");
    std::io::stdout().flush().ok();
    exit(2)
}

fn out(key: &str, v: impl std::fmt::Display) {
    println!("R {key} {v}");
    std::io::stdout().flush().ok();
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        die(format!("missing or bad argument {i} ({what}); see the source for usage"))
    })
}

/// A private anonymous mapping of `reserve` bytes (MAP_NORESERVE), of which the first `len`
/// are written with the pattern.
struct Region {
    ptr: *mut u64,
    words: usize,
}

impl Region {
    fn new(len: usize, reserve: usize) -> Region {
        let size = reserve.max(len).max(4096);
        let flags = libc::MAP_PRIVATE
            | libc::MAP_ANONYMOUS
            | if reserve > len { libc::MAP_NORESERVE } else { 0 };
        // SAFETY: a fresh anonymous mapping.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0)
        };
        if p == libc::MAP_FAILED {
            die(format!("mmap of {size} bytes: {}", std::io::Error::last_os_error()));
        }
        let r = Region { ptr: p as *mut u64, words: len / 8 };
        for i in 0..r.words {
            // SAFETY: i < words, inside the mapping.
            unsafe { r.ptr.add(i).write((i as u64).wrapping_mul(PATTERN) ^ 0x5a5a) };
        }
        r
    }

    fn verify(&self) -> bool {
        (0..self.words).all(|i| {
            // SAFETY: i < words, inside the mapping (which lives as long as `self`).
            let word = unsafe { self.ptr.add(i).read() };
            word == (i as u64).wrapping_mul(PATTERN) ^ 0x5a5a
        })
    }
}

fn fast_exit(code: i32) -> ! {
    // SAFETY: leave at once, as a child that "exits at once" should.
    unsafe { libc::_exit(code) }
}

/// One telefork whose child exits at once (or verifies first): (pause, round trip) in ns.
fn one_telefork(dest: &str, check: Option<&Region>) -> (u128, u128) {
    let t0 = Instant::now();
    match telefork::telefork(dest) {
        Ok(Fork::Child) => fast_exit(match check {
            Some(r) if !r.verify() => 3,
            _ => 0,
        }),
        Ok(Fork::Parent(mut c)) => {
            let pause = t0.elapsed().as_nanos();
            let st = c.wait().unwrap_or_else(|e| die(format!("waiting for the remote child: {e}")));
            let rt = t0.elapsed().as_nanos();
            if !st.success() {
                die(format!(
                    "the remote child ended with {st}{}",
                    if check.is_some() { " (memory check failed?)" } else { "" }
                ));
            }
            (pause, rt)
        }
        Err(e) => die(format!("telefork to {dest} failed: {e}")),
    }
}

/// One telefork with `Options::background` (returns right after the fork): its pause in ns.
fn one_background_telefork(dest: &str) -> u128 {
    let t0 = Instant::now();
    let opts = telefork::Options { background: true, ..Default::default() };
    match telefork::telefork_with(dest, &opts) {
        Ok(Fork::Child) => fast_exit(0),
        Ok(Fork::Parent(mut c)) => {
            let pause = t0.elapsed().as_nanos();
            let st = c
                .wait()
                .unwrap_or_else(|e| die(format!("waiting for the remote child (background): {e}")));
            if !st.success() {
                die(format!("the remote child (background) ended with {st}"));
            }
            pause
        }
        Err(e) => die(format!("background telefork to {dest} failed: {e}")),
    }
}

/// One round of the telefork measurements beside their local-fork baselines.
fn measure_round(dest: &str, settle: Duration) {
    std::thread::sleep(settle);
    let (p, rt) = one_telefork(dest, None);
    out("tf_pause_ns", p);
    out("tf_rt_ns", rt);
    std::thread::sleep(settle);
    out("tf_bg_pause_ns", one_background_telefork(dest));
    std::thread::sleep(settle);
    let (p, rt) = one_fork();
    out("fork_pause_ns", p);
    out("fork_rt_ns", rt);
}

/// One local fork()+_exit(0)+waitpid: (pause, round trip) in ns.
fn one_fork() -> (u128, u128) {
    let t0 = Instant::now();
    let (pause, status) = one_fork_status();
    if status != 0 {
        die(format!("local child: status {status}"));
    }
    (pause, t0.elapsed().as_nanos())
}

/// fork()+_exit(0)+waitpid: (time until fork returned in ns, the child's exit code, 255 if
/// it did not exit normally).
fn one_fork_status() -> (u128, u8) {
    let t0 = Instant::now();
    // SAFETY: the child only calls _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        fast_exit(0);
    }
    let pause = t0.elapsed().as_nanos();
    if pid < 0 {
        die(format!("fork: {}", std::io::Error::last_os_error()));
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        die(format!("waitpid: {}", std::io::Error::last_os_error()));
    }
    (pause, if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) as u8 } else { 255 })
}

/// Fresh private anonymous memory, unmapped when dropped.
struct FreshMemory {
    ptr: *mut u8,
    len: usize,
}

impl FreshMemory {
    fn new(len: usize) -> FreshMemory {
        let len = len.max(1);
        // SAFETY: a fresh anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            die(format!("mmap of {len} bytes: {}", std::io::Error::last_os_error()));
        }
        FreshMemory { ptr: p as *mut u8, len }
    }
}

impl Drop for FreshMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in new().
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// A Unix socket listener at `sock` anyone may connect to; says `READY` once it listens.
fn unix_listen_ready(sock: &Path) -> std::os::unix::net::UnixListener {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(sock);
    let l = std::os::unix::net::UnixListener::bind(sock)
        .unwrap_or_else(|e| die(format!("listening on {}: {e}", sock.display())));
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o666))
        .unwrap_or_else(|e| die(format!("chmod {}: {e}", sock.display())));
    println!("READY");
    std::io::stdout().flush().ok();
    l
}

/// A listener on `port` of every address; says `READY` once it listens.
fn listen_ready(port: u16) -> TcpListener {
    let l = TcpListener::bind(("0.0.0.0", port))
        .unwrap_or_else(|e| die(format!("listening on {port}: {e}")));
    println!("READY");
    std::io::stdout().flush().ok();
    l
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:").and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    match mode {
        "latency" => {
            let runs: usize = arg(&args, 2, "RUNS");
            let dest: String = arg(&args, 3, "DEST");
            let settle = Duration::from_millis(if args.len() > 4 { arg(&args, 4, "SETTLE_MS") } else { 0 });
            println!("PID {}", std::process::id());
            out("rss_bytes", rss_kb() * 1024);
            for _ in 0..runs {
                std::thread::sleep(settle);
                let t0 = now_ns();
                let there = telefork::remote(&dest, now_ns).unwrap_or_else(|e| die(format!("remote on {dest} failed: {e}")));
                out("first_instr_ns", there - t0);
                measure_round(&dest, settle);
            }
        }
        "tfork" => {
            let mib: usize = arg(&args, 2, "MIB");
            let reserve_gib: usize = arg(&args, 3, "RESERVE_GIB");
            let runs: usize = arg(&args, 4, "RUNS");
            let dest: String = arg(&args, 5, "DEST");
            let verify: u32 = arg(&args, 6, "VERIFY");
            let region = Region::new(mib << 20, reserve_gib << 30);
            println!("PID {}", std::process::id());
            out("rss_bytes", rss_kb() * 1024);
            println!("READY");
            std::io::stdout().flush().ok();
            for _ in 0..runs {
                measure_round(&dest, Duration::ZERO);
            }
            if verify != 0 {
                one_telefork(&dest, Some(&region));
                out("verified", 1);
            }
        }
        "populate" => {
            // The destination's share of the physical limit: fresh memory placed in bulk.
            let mib: usize = arg(&args, 2, "MIB");
            let runs: usize = arg(&args, 3, "RUNS");
            // As during a telefork, the parent's MIB stay resident meanwhile (memory is one
            // pool for all nodes of the testbed).
            let _parent = Region::new(mib << 20, 0);
            for _ in 0..runs {
                let fresh = FreshMemory::new(mib << 20);
                let t0 = Instant::now();
                // SAFETY: madvise on the mapping just made.
                if unsafe { libc::madvise(fresh.ptr as *mut libc::c_void, fresh.len, libc::MADV_POPULATE_WRITE) } != 0 {
                    die(format!("MADV_POPULATE_WRITE: {}", std::io::Error::last_os_error()));
                }
                out("populate_ns", t0.elapsed().as_nanos());
            }
        }
        "hold" => {
            let mib: usize = arg(&args, 2, "MIB");
            let go: PathBuf = arg(&args, 3, "GOFILE");
            let region = Region::new(mib << 20, 0);
            println!("PID {}", std::process::id());
            println!("READY");
            std::io::stdout().flush().ok();
            while !go.exists() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if !region.verify() {
                eprintln!("benchprog hold: memory is WRONG after restore");
                exit(3);
            }
            println!("OK");
            std::io::stdout().flush().ok();
        }
        "tcp-sink" => {
            let port: u16 = arg(&args, 2, "PORT");
            let l = listen_ready(port);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let (mut s, _) = l.accept().unwrap_or_else(|e| die(format!("accept: {e}")));
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(e) => die(format!("tcp-sink read: {e}")),
                    }
                }
                let _ = s.write_all(&n.to_le_bytes());
            }
        }
        "tcp-send" => {
            let addr: String = arg(&args, 2, "ADDR");
            let bytes: u64 = arg(&args, 3, "BYTES");
            let runs: usize = arg(&args, 4, "RUNS");
            // Optional: the sender's congestion control for these connections (e.g. "reno",
            // to measure the link without the pacing of the node's default).
            let congestion: Option<String> = args.get(5).cloned();
            let buf = vec![0x5au8; 64 << 20];
            for _ in 0..runs {
                let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| die(format!("connecting to {addr}: {e}")));
                if let Some(cc) = &congestion {
                    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::TcpCongestion, &std::ffi::OsString::from(cc))
                        .unwrap_or_else(|e| die(format!("TCP_CONGESTION {cc}: {e}")));
                }
                let t0 = Instant::now();
                let mut left = bytes;
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    s.write_all(&buf[..k]).unwrap_or_else(|e| die(format!("tcp-send: {e}")));
                    left -= k as u64;
                }
                s.shutdown(Shutdown::Write).ok();
                let mut ack = [0u8; 8];
                s.read_exact(&mut ack).unwrap_or_else(|e| die(format!("tcp-send: no acknowledgement: {e}")));
                let ns = t0.elapsed().as_nanos();
                if u64::from_le_bytes(ack) != bytes {
                    die(format!("tcp-sink received {} bytes, not {bytes}", u64::from_le_bytes(ack)));
                }
                out("tcp_ns", ns);
            }
        }
        "tls-sink" => {
            let port: u16 = arg(&args, 2, "PORT");
            let pki: PathBuf = arg(&args, 3, "PKI");
            let cfg = telefork_node::tls::server_config(&files(&pki, "node2")).unwrap_or_else(|e| die(format!("{e:#}")));
            let l = listen_ready(port);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let (s, _) = l.accept().unwrap_or_else(|e| die(format!("accept: {e}")));
                let ch = telefork_node::channel::TlsChannel::server(cfg.clone(), s, Duration::from_secs(10)).unwrap_or_else(|e| die(format!("tls-sink: {e:#}")));
                ch.set_recv_timeout(Some(Duration::from_secs(120)));
                let mut r = &ch;
                let mut len = [0u8; 8];
                r.read_exact(&mut len).unwrap_or_else(|e| die(format!("tls-sink: {e}")));
                let mut left = u64::from_le_bytes(len);
                let mut n = 0u64;
                while left > 0 {
                    let want = left.min(buf.len() as u64) as usize;
                    match r.read(&mut buf[..want]) {
                        Ok(0) => break,
                        Ok(k) => {
                            n += k as u64;
                            left -= k as u64;
                        }
                        Err(e) => die(format!("tls-sink read: {e}")),
                    }
                }
                let mut w = &ch;
                let _ = w.write_all(&n.to_le_bytes());
                let _ = w.flush();
                ch.close();
            }
        }
        "tls-send" => {
            let addr: String = arg(&args, 2, "ADDR");
            let bytes: u64 = arg(&args, 3, "BYTES");
            let runs: usize = arg(&args, 4, "RUNS");
            let pki: PathBuf = arg(&args, 5, "PKI");
            let cfg = telefork_node::tls::client_config(&files(&pki, "node1")).unwrap_or_else(|e| die(format!("{e:#}")));
            let buf = vec![0x5au8; 64 << 20];
            for _ in 0..runs {
                let s = TcpStream::connect(&addr).unwrap_or_else(|e| die(format!("connecting to {addr}: {e}")));
                let name = telefork_node::tls::server_name("node2").unwrap_or_else(|e| die(format!("{e:#}")));
                let ch = telefork_node::channel::TlsChannel::client(cfg.clone(), name, s, Duration::from_secs(10)).unwrap_or_else(|e| die(format!("tls-send: {e:#}")));
                ch.set_recv_timeout(Some(Duration::from_secs(120)));
                let t0 = Instant::now();
                let mut w = &ch;
                w.write_all(&bytes.to_le_bytes()).unwrap_or_else(|e| die(format!("tls-send: {e}")));
                let mut left = bytes;
                let mut off = 0usize;
                while left > 0 {
                    // 1 MiB writes, like the origin's BufWriter into the channel.
                    let k = left.min(1 << 20) as usize;
                    if off + k > buf.len() {
                        off = 0;
                    }
                    w.write_all(&buf[off..off + k]).unwrap_or_else(|e| die(format!("tls-send: {e}")));
                    off += k;
                    left -= k as u64;
                }
                w.flush().unwrap_or_else(|e| die(format!("tls-send: {e}")));
                let mut ack = [0u8; 8];
                let mut r = &ch;
                r.read_exact(&mut ack).unwrap_or_else(|e| die(format!("tls-send: no acknowledgement: {e}")));
                let ns = t0.elapsed().as_nanos();
                if u64::from_le_bytes(ack) != bytes {
                    die(format!("tls-sink received {} bytes, not {bytes}", u64::from_le_bytes(ack)));
                }
                out("tls_ns", ns);
                ch.close();
            }
        }
        "fresh-sink" => {
            let port: u16 = arg(&args, 2, "PORT");
            let ahead = args.get(3).is_some_and(|a| a == "ahead");
            let l = listen_ready(port);
            loop {
                // (A bad connection is told on stderr and dropped; the sink serves the next.)
                let (mut s, _) = l.accept().unwrap_or_else(|e| die(format!("accept: {e}")));
                let mut len = [0u8; 8];
                if let Err(e) = s.read_exact(&mut len) {
                    eprintln!("benchprog fresh-sink: no length: {e}");
                    continue;
                }
                let len = u64::from_le_bytes(len);
                if len > 64 << 30 {
                    eprintln!("benchprog fresh-sink: a length of {len} bytes is more than this sink takes (64 GiB)");
                    continue;
                }
                let len = len as usize;
                let fresh = FreshMemory::new(len);
                let (at, len) = (fresh.ptr as usize, fresh.len);
                let stop = std::sync::atomic::AtomicBool::new(false);
                // (Scoped: the populating thread ends before `fresh` is unmapped.)
                let (n, populated) = std::thread::scope(|scope| {
                    let populating = ahead.then(|| {
                        scope.spawn(|| -> std::io::Result<()> {
                            let mut off = 0;
                            while off < len && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                                let n = (len - off).min(32 << 20);
                                // SAFETY: populating part of our own mapping; MADV_POPULATE_WRITE
                                // leaves pages already there (and the bytes read into them) alone.
                                if unsafe { libc::madvise((at + off) as *mut libc::c_void, n, libc::MADV_POPULATE_WRITE) } != 0 {
                                    return Err(std::io::Error::last_os_error());
                                }
                                off += n;
                            }
                            Ok(())
                        })
                    });
                    // SAFETY: the mapping is `len` bytes, readable and writable, and only this
                    // thread touches its bytes (the populating one only has pages placed).
                    let dst = unsafe { std::slice::from_raw_parts_mut(at as *mut u8, len) };
                    let mut n = 0usize;
                    while n < len {
                        match s.read(&mut dst[n..]) {
                            Ok(0) => break,
                            Ok(k) => n += k,
                            Err(e) => {
                                eprintln!("benchprog fresh-sink read: {e}");
                                break;
                            }
                        }
                    }
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    let populated = populating.map(|t| t.join().unwrap_or_else(|_| Err(std::io::Error::other("the populating thread panicked"))));
                    (n, populated)
                });
                // (A receiver that could not populate ahead would measure the faulting one.)
                if let Some(Err(e)) = populated {
                    die(format!("fresh-sink: MADV_POPULATE_WRITE: {e}"));
                }
                let _ = s.write_all(&(n as u64).to_le_bytes());
            }
        }
        "mem-send" => {
            let addr: String = arg(&args, 2, "ADDR");
            let mib: usize = arg(&args, 3, "MIB");
            let runs: usize = arg(&args, 4, "RUNS");
            let region = Region::new(mib << 20, 0);
            // SAFETY: the region's first words*8 bytes are mapped and written.
            let src = unsafe { std::slice::from_raw_parts(region.ptr as *const u8, region.words * 8) };
            for _ in 0..runs {
                let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| die(format!("connecting to {addr}: {e}")));
                let t0 = Instant::now();
                s.write_all(&(src.len() as u64).to_le_bytes()).unwrap_or_else(|e| die(format!("mem-send: {e}")));
                s.write_all(src).unwrap_or_else(|e| die(format!("mem-send: {e}")));
                let mut ack = [0u8; 8];
                s.read_exact(&mut ack).unwrap_or_else(|e| die(format!("mem-send: no acknowledgement: {e}")));
                let ns = t0.elapsed().as_nanos();
                if u64::from_le_bytes(ack) != src.len() as u64 {
                    die(format!("fresh-sink received {} bytes, not {}", u64::from_le_bytes(ack), src.len()));
                }
                out("mem_ns", ns);
                // (Untimed: the sink closes once it has unmapped the memory, which must not
                // fall into the next run's time.)
                let _ = s.read_to_end(&mut Vec::new());
            }
        }
        "relay-dest" => {
            let port: u16 = arg(&args, 2, "PORT");
            let l = listen_ready(port);
            loop {
                let (mut s, _) = l.accept().unwrap_or_else(|e| die(format!("accept: {e}")));
                s.set_nodelay(true).ok();
                let mut req = [0u8; 1];
                while s.read_exact(&mut req).is_ok() {
                    let (_, status) = one_fork_status();
                    if s.write_all(&[status]).is_err() {
                        break;
                    }
                }
            }
        }
        "relay-origin" => {
            let sock: PathBuf = arg(&args, 2, "SOCK");
            let dest: String = arg(&args, 3, "DEST_ADDR");
            let l = unix_listen_ready(&sock);
            loop {
                let (mut prog, _) = l.accept().unwrap_or_else(|e| die(format!("accept: {e}")));
                let mut there = TcpStream::connect(&dest).unwrap_or_else(|e| die(format!("connecting to {dest}: {e}")));
                there.set_nodelay(true).ok();
                let mut b = [0u8; 1];
                while prog.read_exact(&mut b).is_ok() {
                    there.write_all(&b).unwrap_or_else(|e| die(format!("relay-origin: to {dest}: {e}")));
                    there.read_exact(&mut b).unwrap_or_else(|e| die(format!("relay-origin: from {dest}: {e}")));
                    if prog.write_all(&b).is_err() {
                        break;
                    }
                }
            }
        }
        "relay-latency" => {
            use std::os::unix::net::UnixStream;
            let runs: usize = arg(&args, 2, "RUNS");
            let sock: PathBuf = arg(&args, 3, "SOCK");
            let mut relay = UnixStream::connect(&sock).unwrap_or_else(|e| die(format!("connecting to {}: {e}", sock.display())));
            // One untimed round first: the relays connect to each other on the first one.
            for round in 0..=runs {
                let t0 = Instant::now();
                let mut b = [1u8];
                relay.write_all(&b).unwrap_or_else(|e| die(format!("relay-latency: {e}")));
                relay.read_exact(&mut b).unwrap_or_else(|e| die(format!("relay-latency: no status: {e}")));
                let rt = t0.elapsed().as_nanos();
                if b[0] != 0 {
                    die(format!("relay-latency: the remote child's status was {}", b[0]));
                }
                if round > 0 {
                    out("relay_rt_ns", rt);
                    out("fork_rt_ns", one_fork().1);
                }
            }
        }
        "notify-latency" => notify_latency(&args),
        "move-dest" => by_hand::move_dest(&args),
        "move-origin" => by_hand::move_origin(&args),
        "move-latency" => by_hand::move_latency(&args),
        _ => die("usage: benchprog latency|tfork|populate|hold|tcp-sink|tcp-send|tls-sink|tls-send|fresh-sink|mem-send|relay-dest|relay-origin|relay-latency|move-dest|move-origin|move-latency|notify-latency ... (see the source)"),
    }
}

/// A child of ours that stops itself at once, as a telefork's child does (it never runs on:
/// whoever takes it kills it). Its PID.
fn fork_stopped_child() -> i32 {
    // SAFETY: the child only raises SIGSTOP and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: raise and _exit only.
        unsafe { libc::raise(libc::SIGSTOP) };
        fast_exit(0);
    }
    if pid < 0 {
        die(format!("fork: {}", std::io::Error::last_os_error()));
    }
    pid
}

/// `notify-latency RUNS` (see the module's doc).
fn notify_latency(args: &[String]) {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::io::IoSliceMut;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    let runs: usize = arg(args, 2, "RUNS");
    let (ours, theirs) = UnixStream::pair().unwrap_or_else(|e| die(format!("socketpair: {e}")));
    // SAFETY: the peer only receives, kills and closes (single-threaded program).
    let peer = unsafe { libc::fork() };
    if peer == 0 {
        drop(ours);
        let mut buf = [0u8; 64];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 2]);
        loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let Ok(msg) = recvmsg::<()>(
                theirs.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                fast_exit(0)
            };
            if msg.bytes < 4 {
                fast_exit(0);
            }
            for c in msg.cmsgs().into_iter().flatten() {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for fd in fds {
                        let _ = nix::unistd::close(fd);
                    }
                }
            }
            let pid = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
            // SAFETY: killing the sender's stopped child, as the origin ends the local copy.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    drop(theirs);
    for _ in 0..runs {
        let t0 = Instant::now();
        let pid = fork_stopped_child();
        // SAFETY: pidfd_open of our own child.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        let mut frame = [0u8; 40];
        frame[..4].copy_from_slice(&pid.to_le_bytes());
        // (The message built by hand: nix's sendmsg took ~7 µs more in this program — medians of 200,
        // three interleaved pairs — which would raise a floor.)
        let fds = [1i32, 2];
        let mut cmsg = [0u64; 8];
        let mut iov =
            libc::iovec { iov_base: frame.as_mut_ptr() as *mut libc::c_void, iov_len: frame.len() };
        // SAFETY: a msghdr with our iovec and a control buffer big enough for two fds.
        let sent = unsafe {
            let mut m: libc::msghdr = std::mem::zeroed();
            m.msg_iov = &mut iov;
            m.msg_iovlen = 1;
            m.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
            m.msg_controllen = libc::CMSG_SPACE(std::mem::size_of_val(&fds) as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&m);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(&fds) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut i32, 2);
            libc::sendmsg(ours.as_raw_fd(), &m, libc::MSG_NOSIGNAL)
        };
        let sent: Result<usize, i32> = if sent < 0 { Err(sent as i32) } else { Ok(sent as usize) };
        let pause = t0.elapsed().as_nanos();
        if sent != Ok(frame.len()) {
            // SAFETY: ending our own child before giving up.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            die(format!("notify-latency: sendmsg: {sent:?}"));
        }
        let mut status = 0;
        // SAFETY: reaping our own child (the peer killed it); closing our pidfd.
        unsafe {
            libc::waitpid(pid, &mut status, 0);
            if pidfd >= 0 {
                libc::close(pidfd);
            }
        }
        out("notify_pause_ns", pause);
        out("fork_pause_ns", one_fork_status().0);
    }
    drop(ours);
    let mut status = 0;
    // SAFETY: reaping the peer (it exits when the socket closes).
    unsafe { libc::waitpid(peer, &mut status, 0) };
}

fn files(pki: &Path, node: &str) -> telefork_node::config::TlsFiles {
    let (cert, key) = telefork_node::cluster::node_files(pki, node);
    telefork_node::config::TlsFiles { ca: pki.join(telefork_node::cluster::CA_CERT), cert, key }
}
