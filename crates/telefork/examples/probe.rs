//! A probe for the cluster integration tests (crates/cli/tests/cluster.rs): small commands
//! that telefork, run remote closures and yo-yo, printing one machine-checkable line per
//! fact, `key value...`. Run on a testbed node, e.g.
//!
//!     telefork testbed exec node1 --user tfdemo -- target/release/examples/probe fork node2 --exit 7
//!
//! Commands:
//!
//! * `probe fork DEST [options]` — telefork to DEST. The parent prints `teleforking`, then
//!   `id NODE:PID` and `exit code N` / `exit signal S` (or `error MESSAGE` if telefork or
//!   wait fails; before it `refused node=NODE limit=KEY` if a node refused it, and `kind
//!   KIND` naming the variant of `telefork::Error`: `refused node=N limit=KEY`,
//!   `unreachable node=N`, `cannot-carry node=N`, `failed node=N stage=STAGE`, `lost node=N`,
//!   `protocol`, `other`), `elapsed_ms N` (time telefork took), and last `parent ok`; it
//!   exits 0.
//!   The child prints `host NAME`, `pid PID`, and what the options ask for, then exits.
//!   Options:
//!   - `--exit N`          the child's exit code (default 0)
//!   - `--big-mb N`        bring N MiB of patterned memory; parent prints `sum X` before,
//!     the child `child sum X` after recomputing it there
//!   - `--guarded-mb N`    also N MiB of patterned memory made PROT_NONE before the
//!     telefork (present pages nobody may read); parent prints
//!     `guarded sum X`, the child makes it readable and prints
//!     `child guarded sum X`
//!   - `--poked-pages N`   also N pages of this executable mapped read-only (private), a word
//!     of each changed through /proc/self/mem (as a debugger sets a
//!     breakpoint: pages of a mapping never writable, no longer the
//!     file's); parent prints `poked sum X`, the child `child poked sum X`
//!   - `--print-uid`       both print `ids uid=U gid=G groups=G1,G2` (parent: `parent ids`,
//!     child: `child ids`)
//!   - `--read-stdin`      the child reads its stdin: `stdin: eof` or `stdin: N bytes`
//!   - `--pass-stdin`      telefork with `Options { pass_stdin: true }`
//!   - `--background`      telefork with `Options { background: true }`: the parent prints
//!     `accepted NODE` when telefork returns, then waits until the child
//!     runs (`id ...`, or `error started: MESSAGE`)
//!   - `--lines N`         the child writes `line I` for I in 0..N, even I to stdout, odd
//!     I to stderr
//!   - `--interval-ms N`   pause between those lines
//!   - `--sleep-ms N`      the child sleeps before exiting
//!   - `--map FILE`        keep the first page of FILE mapped (private, read-only)
//!   - `--hold-eventfd`    hold an eventfd (which a telefork's child would share with its
//!     parent: refused)
//!   - `--kill-after-ms N` the parent sends `--kill-signal` (default 15) to the child after
//!     N ms
//! * `probe series DEST PAUSE_MS COUNT [--pass-stdin]` — COUNT (2 to 5) teleforks in a row
//!   (each after the first can use the connection and the sessions the last one kept; with
//!   `--pass-stdin` none is kept, and the next uses the spare connection): each child prints
//!   `first child: memory ok stdin eof` (`second child: …`, …) and a line on stderr; the
//!   parent prints `first exit N`, then `paused`, a pause, `second exit N`, … (children exit
//!   11, 12, …, or 3 if something they checked was wrong), or `error ...`; last `parent ok`.
//! * `probe drop-next DEST HOLD_MS` — a first telefork whose child exits 11 at once, waited
//!   for (`first exit 11`: its connection goes back to be the spare); a second on that
//!   connection whose child runs 1 s and exits 12, its handle dropped at once (`dropped`);
//!   then the parent holds the first handle for HOLD_MS and prints `parent ok`.
//! * `probe burst DEST N [SLEEP_MS]` — N processes forked at once each telefork to DEST
//!   (their children sleep SLEEP_MS and exit 0); each prints `burst ok`, `burst refused
//!   LIMIT` (a node refused it, naming the limit) or `burst error MESSAGE`; last `burst done`.
//! * `probe flood HOST:PORT N SECS` — N TCP connections that never say a word (a peer
//!   without a certificate), each opened again as it is closed, for SECS seconds: prints
//!   `flooding` once the first N are open, `flood opened K` at the end.
//! * `probe remote DEST` — `remote host=NAME sum=X expected=Y` (a sum computed there over
//!   memory from here).
//! * `probe yoyo DEST` — goes to DEST, modifies state there, comes back: prints
//!   `yoyo visited=NAME counter=N host=HOME expected_home=HOME`.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into())
}

fn ids() -> String {
    let groups = nix::unistd::getgroups().unwrap_or_default();
    let mut g: Vec<u32> = groups.iter().map(|g| g.as_raw()).collect();
    g.sort_unstable();
    let g: Vec<String> = g.iter().map(|g| g.to_string()).collect();
    format!("uid={} gid={} groups={}", nix::unistd::getuid(), nix::unistd::getgid(), g.join(","))
}

/// N MiB of memory with a pattern that depends on position (no zero pages).
fn big(mb: usize) -> Vec<u64> {
    let n = mb << 17;
    (0..n as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555).collect()
}

fn checksum(v: &[u64]) -> u64 {
    v.iter().fold(0u64, |a, &x| a.rotate_left(5) ^ x)
}

/// The variant of a library error, for the `kind` line.
fn kind(e: &telefork::Error) -> String {
    use telefork::Error;
    match e {
        Error::Refused { node, limit, .. } => format!("refused node={node} limit={limit}"),
        Error::Unreachable { node, .. } => format!("unreachable node={node}"),
        Error::CannotCarry { node, .. } => format!("cannot-carry node={node}"),
        Error::Failed { node, stage, .. } => format!("failed node={node} stage={stage:?}"),
        Error::Lost { node, .. } => format!("lost node={node}"),
        Error::Protocol { .. } => "protocol".into(),
        _ => "other".into(),
    }
}

fn out(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

#[derive(Default)]
struct ForkOpts {
    exit: i32,
    big_mb: usize,
    guarded_mb: usize,
    poked_pages: usize,
    print_uid: bool,
    read_stdin: bool,
    pass_stdin: bool,
    background: bool,
    lines: usize,
    interval_ms: u64,
    sleep_ms: u64,
    kill_after_ms: Option<u64>,
    kill_signal: i32,
    map_file: Option<String>,
    hold_eventfd: bool,
}

fn usage() -> ! {
    eprintln!("usage: probe fork DEST [--exit N] [--big-mb N] [--guarded-mb N] [--poked-pages N] [--print-uid] [--read-stdin] [--pass-stdin] [--background] [--lines N] [--interval-ms N] [--sleep-ms N] [--kill-after-ms N] [--kill-signal S] [--map FILE] [--hold-eventfd] | probe burst DEST N [SLEEP_MS] | probe flood HOST:PORT N SECS | probe series DEST PAUSE_MS COUNT [--pass-stdin] | probe drop-next DEST HOLD_MS | probe fanout NODE,NODE,... [--background] | probe remote DEST | probe yoyo DEST");
    std::process::exit(2)
}

fn parse_fork(args: &[String]) -> ForkOpts {
    let mut o = ForkOpts { kill_signal: 15, ..Default::default() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num =
            || -> u64 { it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage()) };
        match a.as_str() {
            "--exit" => o.exit = num() as i32,
            "--big-mb" => o.big_mb = num() as usize,
            "--guarded-mb" => o.guarded_mb = num() as usize,
            "--poked-pages" => o.poked_pages = num() as usize,
            "--print-uid" => o.print_uid = true,
            "--read-stdin" => o.read_stdin = true,
            "--pass-stdin" => o.pass_stdin = true,
            "--background" => o.background = true,
            "--lines" => o.lines = num() as usize,
            "--interval-ms" => o.interval_ms = num(),
            "--sleep-ms" => o.sleep_ms = num(),
            "--kill-after-ms" => o.kill_after_ms = Some(num()),
            "--kill-signal" => o.kill_signal = num() as i32,
            "--map" => o.map_file = Some(it.next().cloned().unwrap_or_else(|| usage())),
            "--hold-eventfd" => o.hold_eventfd = true,
            _ => usage(),
        }
    }
    o
}

/// `mb` MiB of patterned memory in a mapping of its own, then made PROT_NONE.
fn guarded(mb: usize) -> (*mut u64, usize, u64) {
    let words = mb << 17;
    let len = words * 8;
    // SAFETY: a fresh private anonymous mapping of `len` bytes, written only within it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            out("error guarded mmap");
            std::process::exit(1);
        }
        let p = p as *mut u64;
        let v = std::slice::from_raw_parts_mut(p, words);
        for (i, w) in v.iter_mut().enumerate() {
            *w = (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 0x77;
        }
        let sum = checksum(v);
        libc::mprotect(p.cast(), len, libc::PROT_NONE);
        (p, len, sum)
    }
}

/// `pages` pages of this executable, mapped read-only and private, the first word of each
/// changed through /proc/self/mem: (the mapping's words, their checksum).
fn poked(pages: usize) -> (&'static [u64], u64) {
    use std::os::unix::fs::FileExt;
    let fail = |what: &str| -> ! {
        out(&format!("error poked {what}: {}", std::io::Error::last_os_error()));
        std::process::exit(1)
    };
    let len = pages * 4096;
    let exe = std::fs::File::open("/proc/self/exe").unwrap_or_else(|_| fail("open"));
    if exe.metadata().map(|m| m.len() < len as u64).unwrap_or(true) {
        fail("executable too short");
    }
    // SAFETY: a fresh read-only private mapping of `len` bytes of a file at least that long.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            std::os::fd::AsRawFd::as_raw_fd(&exe),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        fail("mmap");
    }
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")
        .unwrap_or_else(|_| fail("open /proc/self/mem"));
    for page in 0..pages {
        let word = (page as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5E;
        mem.write_all_at(&word.to_ne_bytes(), p as u64 + (page * 4096) as u64)
            .unwrap_or_else(|_| fail("write"));
    }
    // SAFETY: the mapping just made, readable, never unmapped.
    let words = unsafe { std::slice::from_raw_parts(p as *const u64, len / 8) };
    (words, checksum(words))
}

fn guarded_sum(p: *mut u64, len: usize) -> u64 {
    // SAFETY: the mapping `guarded` made, readable again.
    unsafe {
        libc::mprotect(p.cast(), len, libc::PROT_READ);
        checksum(std::slice::from_raw_parts(p, len / 8))
    }
}

fn fork(dest: &str, o: &ForkOpts) {
    let mem = big(o.big_mb);
    if o.big_mb > 0 {
        out(&format!("sum {}", checksum(&mem)));
    }
    let guard = (o.guarded_mb > 0).then(|| guarded(o.guarded_mb));
    if let Some((_, _, sum)) = guard {
        out(&format!("guarded sum {sum}"));
    }
    let poke = (o.poked_pages > 0).then(|| poked(o.poked_pages));
    if let Some((_, sum)) = poke {
        out(&format!("poked sum {sum}"));
    }
    if o.print_uid {
        out(&format!("parent ids {}", ids()));
    }
    // SAFETY: eventfd takes two integers; the fd it returns is kept open until exit.
    let _eventfd = o.hold_eventfd.then(|| unsafe { libc::eventfd(0, 0) });
    // (Kept mapped: the telefork carries the mapping, to be mapped again from the file there.)
    let _mapped = o.map_file.as_ref().map(|path| {
        let f = std::fs::File::open(path).unwrap_or_else(|e| {
            out(&format!("error opening {path}: {e}"));
            std::process::exit(1)
        });
        use std::os::fd::AsRawFd;
        // SAFETY: a private read-only mapping of one page of an open file; never written.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert!(p != libc::MAP_FAILED, "mmap {path}");
        p as usize
    });
    out(&format!("parent host {}", hostname()));
    out("teleforking");
    let t = Instant::now();
    let r = telefork::telefork_with(
        dest,
        &telefork::Options { pass_stdin: o.pass_stdin, background: o.background },
    );
    match r {
        Ok(telefork::Fork::Child) => {
            out(&format!("host {}", hostname()));
            out(&format!("pid {}", std::process::id()));
            if o.big_mb > 0 {
                out(&format!("child sum {}", checksum(&mem)));
            }
            if let Some((p, len, _)) = guard {
                out(&format!("child guarded sum {}", guarded_sum(p, len)));
            }
            if let Some((words, _)) = poke {
                out(&format!("child poked sum {}", checksum(words)));
            }
            if o.print_uid {
                out(&format!("child ids {}", ids()));
            }
            if o.read_stdin {
                let mut buf = Vec::new();
                match std::io::stdin().read_to_end(&mut buf) {
                    Ok(0) => out("stdin: eof"),
                    Ok(n) => out(&format!("stdin: {n} bytes")),
                    Err(e) => out(&format!("stdin: error {e}")),
                }
            }
            for i in 0..o.lines {
                if i % 2 == 0 {
                    out(&format!("line {i}"));
                } else {
                    let _ = writeln!(std::io::stderr(), "line {i}");
                }
                if o.interval_ms > 0 {
                    std::thread::sleep(Duration::from_millis(o.interval_ms));
                }
            }
            if o.sleep_ms > 0 {
                std::thread::sleep(Duration::from_millis(o.sleep_ms));
            }
            std::process::exit(o.exit);
        }
        Ok(telefork::Fork::Parent(mut child)) => {
            out(&format!("elapsed_ms {}", t.elapsed().as_millis()));
            if o.background {
                out(&format!("accepted {}", child.id().node));
                if let Err(e) = child.started() {
                    out(&format!("kind {}", kind(&e)));
                    out(&format!("error started: {}", e.to_string().replace('\n', " ")));
                    out("parent ok");
                    return;
                }
            }
            out(&format!("id {}", child.id()));
            if let Some(ms) = o.kill_after_ms {
                std::thread::sleep(Duration::from_millis(ms));
                match child.kill(o.kill_signal) {
                    Ok(()) => out(&format!("sent signal {}", o.kill_signal)),
                    Err(e) => out(&format!("error kill: {e}")),
                }
            }
            match child.wait() {
                Ok(st) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (st.code(), st.signal()) {
                        (Some(c), _) => out(&format!("exit code {c}")),
                        (None, Some(s)) => out(&format!("exit signal {s}")),
                        _ => out(&format!("exit other {st}")),
                    }
                }
                Err(e) => {
                    out(&format!("kind {}", kind(&e)));
                    out(&format!("error wait: {e}"))
                }
            }
        }
        Err(e) => {
            out(&format!("elapsed_ms {}", t.elapsed().as_millis()));
            if let telefork::Error::Refused { node, limit, .. } = &e {
                out(&format!("refused node={node} limit={limit}"));
            }
            out(&format!("kind {}", kind(&e)));
            out(&format!("error {}", e.to_string().replace('\n', " ")));
        }
    }
    out("parent ok");
}

/// `flood`: holds N TCP connections to `addr` that never say a word (a peer without a
/// certificate), opening each again as it is closed, for `secs` seconds; prints `flooding`
/// once the first N are open, then `flood opened K` at the end.
fn flood(addr: &str, n: usize, secs: u64) {
    let addr: std::net::SocketAddr = addr.parse().unwrap_or_else(|_| usage());
    let open = || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok();
    let mut conns: Vec<Option<std::net::TcpStream>> = (0..n).map(|_| open()).collect();
    let mut opened = n;
    out("flooding");
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        for c in conns.iter_mut() {
            let closed = match c {
                Some(s) => {
                    s.set_nonblocking(true).ok();
                    let mut b = [0u8; 1];
                    !matches!(s.peek(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
                }
                None => true,
            };
            if closed {
                *c = open();
                opened += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    out(&format!("flood opened {opened}"));
}

/// `burst`: N processes telefork to `dest` at once; each prints one line of its outcome.
fn burst(dest: &str, n: usize, sleep_ms: u64) {
    let mut kids = vec![];
    for _ in 0..n {
        // SAFETY: the probe is single-threaded here; the child only teleforks and exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let line = match telefork::telefork(dest) {
                    Ok(telefork::Fork::Child) => {
                        std::thread::sleep(Duration::from_millis(sleep_ms));
                        std::process::exit(0);
                    }
                    Ok(telefork::Fork::Parent(mut child)) => match child.wait() {
                        Ok(st) if st.success() => "burst ok".to_string(),
                        Ok(st) => format!("burst error child ended {st}"),
                        Err(e) => format!("burst error wait: {e}"),
                    },
                    Err(telefork::Error::Refused { limit, .. }) => format!("burst refused {limit}"),
                    Err(e) => format!("burst error {}", e.to_string().replace('\n', " ")),
                };
                out(&line);
                std::process::exit(0);
            }
            nix::unistd::ForkResult::Parent { child } => kids.push(child),
        }
    }
    for k in kids {
        let _ = nix::sys::wait::waitpid(k, None);
    }
    out("burst done");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        usage();
    }
    let dest = args[1].as_str();
    match args[0].as_str() {
        "fork" => fork(dest, &parse_fork(&args[2..])),
        "flood" => {
            let n = args.get(2).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let secs = args.get(3).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            flood(dest, n, secs);
        }
        "burst" => {
            let n = args.get(2).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            let sleep_ms = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(0);
            burst(dest, n, sleep_ms);
        }
        "remote" => {
            let numbers: Vec<u64> = (1..=1_000_000u64).collect();
            let expected: u64 = numbers.iter().sum();
            match telefork::remote(dest, || (hostname(), numbers.iter().sum::<u64>())) {
                Ok((host, sum)) => {
                    out(&format!("remote host={host} sum={sum} expected={expected}"))
                }
                Err(e) => out(&format!("error {e}")),
            }
            out("parent ok");
        }
        "series" => {
            let pause: u64 = args.get(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| usage());
            let count: usize = args
                .get(3)
                .and_then(|v| v.parse().ok())
                .filter(|n| (2..=5).contains(n))
                .unwrap_or_else(|| usage());
            let opts = telefork::Options {
                pass_stdin: args.get(4).is_some_and(|a| a == "--pass-stdin"),
                ..Default::default()
            };
            let numbers: Vec<u64> = (1..=100_000u64).collect();
            let expected: u64 = numbers.iter().sum();
            for (i, what) in (11..).zip(["first", "second", "third", "fourth", "fifth"]).take(count)
            {
                match telefork::telefork_with(dest, &opts) {
                    Ok(telefork::Fork::Child) => {
                        // What it brought, and its stdio: memory, stdin at its end, a line on
                        // stdout and one on stderr (relayed home). Exit 3 if anything is off.
                        let memory = numbers.iter().sum::<u64>() == expected;
                        let mut byte = [0u8; 1];
                        let eof = matches!(std::io::stdin().read(&mut byte), Ok(0));
                        out(&format!(
                            "{what} child: memory {} stdin {}",
                            if memory { "ok" } else { "WRONG" },
                            if eof { "eof" } else { "NOT at its end" }
                        ));
                        eprintln!("{what} child on stderr");
                        std::process::exit(if memory && eof { i } else { 3 })
                    }
                    Ok(telefork::Fork::Parent(mut child)) => match child.wait() {
                        Ok(st) => out(&format!("{what} exit {}", st.code().unwrap_or(-1))),
                        Err(e) => out(&format!("error {what}: {e}")),
                    },
                    Err(e) => out(&format!("error {what}: {}", e.to_string().replace('\n', " "))),
                }
                if i == 11 {
                    out("paused");
                    std::thread::sleep(Duration::from_millis(pause));
                }
            }
            out("parent ok");
        }
        "drop-next" => {
            let hold: u64 = args.get(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| usage());
            let first = match telefork::telefork(dest) {
                Ok(telefork::Fork::Child) => std::process::exit(11),
                Ok(telefork::Fork::Parent(mut child)) => {
                    match child.wait() {
                        Ok(st) => out(&format!("first exit {}", st.code().unwrap_or(-1))),
                        Err(e) => out(&format!("error first: {e}")),
                    }
                    child
                }
                Err(e) => {
                    out(&format!("error first: {e}"));
                    std::process::exit(1)
                }
            };
            match telefork::telefork(dest) {
                Ok(telefork::Fork::Child) => {
                    std::thread::sleep(Duration::from_millis(1000));
                    std::process::exit(12)
                }
                Ok(telefork::Fork::Parent(child)) => drop(child),
                Err(e) => out(&format!("error second: {e}")),
            }
            out("dropped");
            std::thread::sleep(Duration::from_millis(hold));
            drop(first);
            out("parent ok");
        }
        "fanout" => {
            // DEST is a comma-separated list: one child on each, all started before any is
            // waited for; each checks the memory it brought and the copies of the earlier
            // children's handles, and exits with 20 + its index (3: memory, 4: a copied
            // handle acted, 5: dropping the copies closed a file of the child's).
            let background = args.get(2).is_some_and(|a| a == "--background");
            let numbers: Vec<u64> = (1..=100_000u64).collect();
            let expected: u64 = numbers.iter().sum();
            let mut children = Vec::new();
            for (i, node) in dest.split(',').enumerate() {
                let opts = telefork::Options { background, ..Default::default() };
                match telefork::telefork_with(node, &opts) {
                    Ok(telefork::Fork::Child) => {
                        // The earlier children's handles are the parent's: here they must
                        // refuse to act, and dropping them must not close a file of ours
                        // that took one of their old fd numbers.
                        let ours = std::fs::File::open("/proc/self/stat");
                        let inert = children.iter_mut().all(
                            |(_, c): &mut (usize, telefork::RemoteChild)| {
                                matches!(c.wait(), Err(telefork::Error::NotOurs))
                            },
                        );
                        drop(std::mem::take(&mut children));
                        let still_open = ours.is_ok_and(|f| f.metadata().is_ok());
                        std::process::exit(
                            match (numbers.iter().sum::<u64>() == expected, inert, still_open) {
                                (true, true, true) => 20 + i as i32,
                                (false, _, _) => 3,
                                (_, false, _) => 4,
                                (_, _, false) => 5,
                            },
                        )
                    }
                    Ok(telefork::Fork::Parent(child)) => children.push((i, child)),
                    Err(e) => {
                        out(&format!("error child {i}: {}", e.to_string().replace('\n', " ")))
                    }
                }
            }
            for (i, mut child) in children {
                match child.wait() {
                    Ok(st) => out(&format!("child {i} exit {}", st.code().unwrap_or(-1))),
                    Err(e) => out(&format!(
                        "error waiting for child {i}: {}",
                        e.to_string().replace('\n', " ")
                    )),
                }
            }
            out("parent ok");
        }
        "yoyo" => {
            let home = hostname();
            let mut visited = String::from("nowhere");
            let mut counter: u64 = 41;
            let before = std::process::id();
            let r = telefork::yoyo(dest, || {
                visited = hostname();
                counter += 1;
            });
            match r {
                Ok(()) => out(&format!(
                    "yoyo visited={visited} counter={counter} host={} expected_home={home} same_pid={}",
                    hostname(),
                    std::process::id() == before
                )),
                Err(e) => out(&format!("error {e}")),
            }
            out("parent ok");
        }
        _ => usage(),
    }
}
