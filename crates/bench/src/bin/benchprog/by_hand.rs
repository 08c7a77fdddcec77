//! The small telefork's floor with its state moved: what a design like telefork's — a
//! daemon on each node, reading a stopped fork of the program from /proc — must do at least
//! to move it, done by hand with nothing else on the way.
//!
//! `move-latency` (the program, on node1) forks a child that stops itself, as a telefork's
//! child does, and hands its PID to `move-origin` (a relay on node1, root, as the daemon),
//! which checks that the PID is a stopped child of its peer (SO_PEERCRED) and reads what the
//! state needs and nothing more — the mappings with their VmFlags (/proc/PID/smaps: the kernel
//! tells the flags nowhere else), which pages the process wrote (PAGEMAP_SCAN) and those
//! pages (/proc/PID/mem) — sends them in one message over plain TCP to `move-dest` (a relay
//! on node2), kills the local copy, and waits for the status. The destination relay forks a
//! new process that creates every mapping (each file opened once and mapped again, at
//! addresses of the kernel's choosing), receives its pages from the socket straight into
//! them, sets the final protections and advice, and exits; the relay reaps it and sends its
//! exit status home.
//!
//! The message: `u32` header length, then the header — `u32` mapping count, per mapping
//! `u64` length, `u32` protection, `u8` shared, `u8` advice bits (`ADVICE`), `u64` file
//! offset, `u16` path length and the path (empty: anonymous); `u32` run count, per run `u32`
//! mapping, `u64` offset in it, `u64` length — then the runs' bytes in that order. All
//! little-endian.
//!
//! Left out, so that this stays below a real telefork: registers, signal state, file
//! descriptors, credentials and limits; encryption, and the checks of the peer and the image;
//! addresses kept as they were (and the new process's own mappings removed); shared anonymous
//! memory's contents, MAP_NORESERVE and grows-down; the process resuming as the program.
//! Written by hand: it measures the kernel's share, so it makes the system calls directly.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

// (PAGEMAP_SCAN as the engine's capture makes it: the floor measures the kernel's share.)
use telefork_engine::pagemap::{pagemap_scan, PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED};

use super::{
    arg, die, fast_exit, fork_stopped_child, listen_ready, one_fork, out, unix_listen_ready,
};

/// Madvise advice carried per mapping (the VmFlags a restore must give back).
const ADVICE: [(&str, libc::c_int); 5] = [
    ("hg", libc::MADV_HUGEPAGE),
    ("nh", libc::MADV_NOHUGEPAGE),
    ("dc", libc::MADV_DONTFORK),
    ("dd", libc::MADV_DONTDUMP),
    ("wf", libc::MADV_WIPEONFORK),
];

/// One mapping of the process (all but `start` travels).
struct Mapping {
    start: u64,
    len: u64,
    prot: u32,
    shared: bool,
    offset: u64,
    advice: u8,
    path: Option<String>,
}

/// The mappings of /proc/PID/smaps (the kernel's special ones left out: a new process has
/// its own; named anonymous memory, `[anon:…]` and `[anon_shmem:…]`, kept as anonymous).
fn read_mappings(pid: i32) -> std::io::Result<Vec<Mapping>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut maps: Vec<Mapping> = Vec::new();
    // The mapping the lines being read belong to (`None` after a special one).
    let mut current: Option<usize> = None;
    for line in text.lines() {
        let mut f = line.split_ascii_whitespace();
        let first = f.next().unwrap_or("");
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(m) = current.and_then(|i| maps.get_mut(i)) {
                for (i, (name, _)) in ADVICE.iter().enumerate() {
                    if flags.split_ascii_whitespace().any(|x| x == *name) {
                        m.advice |= 1 << i;
                    }
                }
            }
            continue;
        }
        if first.ends_with(':') {
            continue;
        }
        // A mapping's first line: start-end perms offset dev inode [path].
        current = None;
        let (Some((a, b)), Some(perms), Some(offset)) = (first.split_once('-'), f.next(), f.next())
        else {
            continue;
        };
        let (_dev, _inode) = (f.next(), f.next());
        let name = f.collect::<Vec<_>>().join(" ");
        if name.starts_with('[')
            && !matches!(name.as_str(), "[heap]" | "[stack]")
            && !name.starts_with("[anon")
        {
            continue;
        }
        let p = perms.as_bytes();
        if p.len() < 4 {
            continue;
        }
        let hex = |s: &str| u64::from_str_radix(s, 16).unwrap_or(0);
        let has = |i: usize, c: u8, prot: libc::c_int| if p[i] == c { prot as u32 } else { 0 };
        let prot = has(0, b'r', libc::PROT_READ)
            | has(1, b'w', libc::PROT_WRITE)
            | has(2, b'x', libc::PROT_EXEC);
        let path = if name.starts_with('/') { Some(name) } else { None };
        current = Some(maps.len());
        maps.push(Mapping {
            start: hex(a),
            len: hex(b).saturating_sub(hex(a)),
            prot,
            shared: p[3] == b's',
            offset: hex(offset),
            advice: 0,
            path,
        });
    }
    Ok(maps)
}

/// The runs of pages the process wrote, by mapping (private anonymous: present or swapped;
/// private file: no longer the file's page; shared: none), from PAGEMAP_SCAN calls over the
/// range from the first mapping to the end of the last (one call here), cut at the
/// mappings' bounds here.
fn written_runs(
    pagemap: &std::fs::File,
    maps: &[Mapping],
) -> std::io::Result<Vec<(u32, u64, u64)>> {
    let (Some(first), Some(last)) = (maps.first(), maps.last()) else { return Ok(Vec::new()) };
    let mut found = Vec::new();
    let wanted = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
    if !pagemap_scan(
        pagemap,
        first.start,
        last.start + last.len,
        (0, 0, wanted, wanted | PAGE_IS_FILE),
        &mut found,
    ) {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("PAGEMAP_SCAN: {e}")));
    }
    // Each region cut at the mappings' bounds; file pages of file mappings stay home.
    let mut runs = Vec::new();
    for r in found {
        for (i, m) in maps.iter().enumerate() {
            let (s, e) = (r.start.max(m.start), r.end.min(m.start + m.len));
            let travels = !m.shared && (m.path.is_none() || r.categories & PAGE_IS_FILE == 0);
            if s < e && travels {
                runs.push((i as u32, s - m.start, e - s));
            }
        }
    }
    Ok(runs)
}

/// The message for the destination relay (see the module's doc), into `msg`.
fn state_message(pid: i32, msg: &mut Vec<u8>) -> std::io::Result<()> {
    let maps = read_mappings(pid)?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    msg.clear();
    msg.extend(0u32.to_le_bytes()); // the header's length, set below
    msg.extend((maps.len() as u32).to_le_bytes());
    for m in &maps {
        msg.extend(m.len.to_le_bytes());
        msg.extend(m.prot.to_le_bytes());
        msg.push(m.shared as u8);
        msg.push(m.advice);
        msg.extend(m.offset.to_le_bytes());
        let path = m.path.as_deref().unwrap_or("").as_bytes();
        msg.extend((path.len() as u16).to_le_bytes());
        msg.extend(path);
    }
    let runs = written_runs(&pagemap, &maps)?;
    msg.extend((runs.len() as u32).to_le_bytes());
    for &(i, off, len) in &runs {
        msg.extend(i.to_le_bytes());
        msg.extend(off.to_le_bytes());
        msg.extend(len.to_le_bytes());
    }
    let header_len = (msg.len() - 4) as u32;
    msg[..4].copy_from_slice(&header_len.to_le_bytes());
    for &(i, off, len) in &runs {
        let at = msg.len();
        msg.resize(at + len as usize, 0);
        mem.read_exact_at(&mut msg[at..], maps[i as usize].start + off)?;
    }
    Ok(())
}

/// The PID of the process at the other end of `sock`.
fn peer_pid(sock: &UnixStream) -> std::io::Result<i32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.pid)
}

/// Whether `pid` is a stopped child of `parent` (/proc/PID/stat: state and ppid follow the
/// command's closing parenthesis).
fn is_stopped_child_of(pid: i32, parent: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let Some((_, rest)) = stat.rsplit_once(')') else { return false };
    let mut f = rest.split_ascii_whitespace();
    matches!((f.next(), f.next().and_then(|p| p.parse::<i32>().ok())), (Some("T"), Some(pp)) if pp == parent)
}

/// The status the origin relay sends the program when it could not move the process.
const RELAY_FAILED: u8 = 254;

/// `move-origin SOCK DEST_ADDR`: per PID from the program (a stopped child of its own), the
/// child's state to the destination relay, the local copy killed, the status back — or
/// `RELAY_FAILED` (the reason on stderr), after which the connection is closed.
pub fn move_origin(args: &[String]) {
    let sock: PathBuf = arg(args, 2, "SOCK");
    let dest: String = arg(args, 3, "DEST_ADDR");
    let l = unix_listen_ready(&sock);
    let mut msg = Vec::new();
    loop {
        let (mut prog, _) = l.accept().unwrap_or_else(|e| die(format!("accept: {e}")));
        let served = (|| -> Result<(), String> {
            let peer = peer_pid(&prog).map_err(|e| format!("SO_PEERCRED: {e}"))?;
            let mut there =
                TcpStream::connect(&dest).map_err(|e| format!("connecting to {dest}: {e}"))?;
            there.set_nodelay(true).ok();
            let mut pid = [0u8; 4];
            while prog.read_exact(&mut pid).is_ok() {
                let pid = i32::from_le_bytes(pid);
                if !is_stopped_child_of(pid, peer) {
                    return Err(format!(
                        "process {pid} is not a stopped child of the program {peer}"
                    ));
                }
                state_message(pid, &mut msg).map_err(|e| format!("reading process {pid}: {e}"))?;
                there.write_all(&msg).map_err(|e| format!("to {dest}: {e}"))?;
                // SAFETY: a plain kill of the program's stopped child (its local copy, checked
                // above).
                if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                    return Err(format!(
                        "killing the local copy {pid}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                let mut status = [0u8; 1];
                there.read_exact(&mut status).map_err(|e| format!("from {dest}: {e}"))?;
                if prog.write_all(&status).is_err() {
                    break;
                }
            }
            Ok(())
        })();
        if let Err(e) = served {
            eprintln!("benchprog move-origin: {e}");
            let _ = prog.write_all(&[RELAY_FAILED]);
        }
    }
}

/// A mapping as the destination reads it from the header.
struct Wanted {
    len: u64,
    prot: i32,
    shared: bool,
    advice: u8,
    offset: u64,
    path: Option<std::ffi::CString>,
}

/// A run of pages: (mapping, offset in it, length).
type Run = (usize, u64, u64);

/// Reads the header (mappings, runs); `None` if it is malformed.
fn parse_header(h: &[u8]) -> Option<(Vec<Wanted>, Vec<Run>)> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = h.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let u32_ = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or([0; 4]));
    let u64_ = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let n = u32_(take(4)?) as usize;
    // (Counts bounded by what the header can hold: 24 bytes per mapping, 20 per run.)
    let mut maps = Vec::with_capacity(n.min(h.len() / 24));
    for _ in 0..n {
        let len = u64_(take(8)?);
        let prot = u32_(take(4)?) as i32;
        let flags = take(2)?;
        let offset = u64_(take(8)?);
        let plen = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        let path = take(plen)?;
        let path = if path.is_empty() { None } else { Some(std::ffi::CString::new(path).ok()?) };
        maps.push(Wanted { len, prot, shared: flags[0] != 0, advice: flags[1], offset, path });
    }
    let n = u32_(take(4)?) as usize;
    let mut runs = Vec::with_capacity(n.min(h.len() / 20));
    for _ in 0..n {
        let (i, off, len) = (u32_(take(4)?) as usize, u64_(take(8)?), u64_(take(8)?));
        // Into a private mapping (writable while it is filled), inside it.
        if maps.get(i).is_none_or(|m| m.shared || off.checked_add(len).is_none_or(|e| e > m.len)) {
            return None;
        }
        runs.push((i, off, len));
    }
    Some((maps, runs))
}

/// In the new process: every mapping made, the pages read into place from `sock`, the final
/// protections and advice set. Exits 0, or 1–3 naming the step that failed.
fn become_the_copy(sock: &mut TcpStream, maps: &[Wanted], runs: &[Run]) -> ! {
    let mut bases = Vec::with_capacity(maps.len());
    // Each file opened once (a library is mapped four or five times), closed at the exit.
    let mut files: Vec<(&std::ffi::CStr, i32)> = Vec::new();
    for m in maps {
        let fd = match &m.path {
            Some(p) => match files.iter().find(|(q, _)| *q == p.as_c_str()) {
                Some(&(_, fd)) => fd,
                None => {
                    // SAFETY: a NUL-terminated path.
                    let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                    if fd < 0 {
                        fast_exit(1);
                    }
                    files.push((p.as_c_str(), fd));
                    fd
                }
            },
            None => -1,
        };
        let (kind, prot) = match (m.shared, fd >= 0) {
            (true, true) => (libc::MAP_SHARED, m.prot & !libc::PROT_WRITE),
            (true, false) => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, m.prot),
            (false, true) => (libc::MAP_PRIVATE, m.prot | libc::PROT_WRITE),
            (false, false) => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, m.prot | libc::PROT_WRITE),
        };
        // SAFETY: a new mapping where the kernel chooses; nothing of ours is there.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                m.len as usize,
                prot,
                kind,
                fd,
                if fd >= 0 { m.offset as i64 } else { 0 },
            )
        };
        if p == libc::MAP_FAILED {
            fast_exit(1);
        }
        bases.push(p as *mut u8);
    }
    for &(i, off, len) in runs {
        // SAFETY: `off + len` lies inside mapping `i`, a private one (both checked with the
        // header), mapped writable above, and nothing else refers to it.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(bases[i].add(off as usize), len as usize) };
        if sock.read_exact(dst).is_err() {
            fast_exit(2);
        }
    }
    for (m, &base) in maps.iter().zip(&bases) {
        // SAFETY: changing the protection and advice of our own new mappings. (Advice is
        // best effort, as the engine's restore makes it; a protection that fails fails.)
        unsafe {
            if !m.shared
                && m.prot & libc::PROT_WRITE == 0
                && libc::mprotect(base as *mut libc::c_void, m.len as usize, m.prot) != 0
            {
                fast_exit(3);
            }
            for (bit, (_, advice)) in ADVICE.iter().enumerate() {
                if m.advice & (1 << bit) != 0 {
                    libc::madvise(base as *mut libc::c_void, m.len as usize, *advice);
                }
            }
        }
    }
    fast_exit(0)
}

/// `move-dest PORT`: per message, a new process made from it (see `become_the_copy`),
/// reaped, its exit status sent back.
pub fn move_dest(args: &[String]) {
    let port: u16 = arg(args, 2, "PORT");
    let l: TcpListener = listen_ready(port);
    loop {
        let (mut s, _) = l.accept().unwrap_or_else(|e| die(format!("accept: {e}")));
        s.set_nodelay(true).ok();
        let mut len = [0u8; 4];
        while s.read_exact(&mut len).is_ok() {
            let len = u32::from_le_bytes(len) as usize;
            if len > 16 << 20 {
                eprintln!("benchprog move-dest: a header of {len} bytes is more than this relay takes (16 MiB)");
                break;
            }
            let mut header = vec![0u8; len];
            if s.read_exact(&mut header).is_err() {
                break;
            }
            let Some((maps, runs)) = parse_header(&header) else {
                eprintln!("benchprog move-dest: a malformed header");
                break;
            };
            // SAFETY: this relay is single-threaded; the child only maps, reads and exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                become_the_copy(&mut s, &maps, &runs);
            }
            let mut status = 0;
            // SAFETY: waiting for our own child.
            if pid < 0 || unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
                die(format!("move-dest: fork or waitpid: {}", std::io::Error::last_os_error()));
            }
            let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) as u8 } else { 255 };
            // (After a failed copy the stream may hold page bytes it did not read: no more
            // messages on it.)
            if s.write_all(&[code]).is_err() || code != 0 {
                break;
            }
        }
    }
}

/// `move-latency RUNS SOCK`: per run a fork whose child stops itself, moved by the relays;
/// `move_rt_ns` from the fork until the status is back and the local copy reaped, beside a
/// local fork+exit+waitpid (`fork_rt_ns`).
pub fn move_latency(args: &[String]) {
    let runs: usize = arg(args, 2, "RUNS");
    let sock: PathBuf = arg(args, 3, "SOCK");
    let mut relay = UnixStream::connect(&sock)
        .unwrap_or_else(|e| die(format!("connecting to {}: {e}", sock.display())));
    // One untimed round first: the relays connect to each other on the first one.
    for round in 0..=runs {
        let t0 = Instant::now();
        let pid = fork_stopped_child();
        // However this round fails, the stopped child is not left behind (it holds our
        // stdout, which the bench reads to the end).
        let fail = |why: String| -> ! {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            die(format!("move-latency: {why}"))
        };
        let mut status = 0;
        // SAFETY: waiting for our own child to stop.
        if unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) } != pid
            || !libc::WIFSTOPPED(status)
        {
            fail(format!("the child did not stop (status {status:#x})"));
        }
        relay.write_all(&pid.to_le_bytes()).unwrap_or_else(|e| fail(format!("to the relay: {e}")));
        let mut b = [0u8; 1];
        relay.read_exact(&mut b).unwrap_or_else(|e| fail(format!("no status from the relay: {e}")));
        match b[0] {
            0 => {}
            // (The relay may not have killed the child then: `fail` does.)
            RELAY_FAILED => fail("the relay on this node could not move the process (its stderr says why)".into()),
            code => fail(format!("the new process on the destination exited with {code} (1 mapping, 2 pages, 3 protections)")),
        }
        // SAFETY: reaping our own child (the relay killed it once it had moved it).
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let rt = t0.elapsed().as_nanos();
        if round > 0 {
            out("move_rt_ns", rt);
            out("fork_rt_ns", one_fork().1);
        }
    }
}
