//! The files `telefork` creates and reads, tried as another user of the machine would (issue
//! 18): symlinks planted where `dump` and `cluster init` write (in a world-writable sticky
//! directory; this matters where fs.protected_symlinks = 0), the image's mode and owner, a
//! dump that fails or is killed, and `check-image` / `restore` given a device, a FIFO, or a
//! huge or garbage file under a memory limit smaller than the file.
//!
//! Needs root (it dumps another user's process and creates a system user `telefork-test`)
//! and gcc (the target program). Every process a test starts is a child of the test, killed
//! and reaped by PID on every exit path; the directories are removed.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const TELEFORK: &str = env!("CARGO_BIN_EXE_telefork");
const USER: &str = "telefork-test";
/// The address space `check-image` and `restore` get when reading hostile files: below every
/// file they are given, above one image record (64 MiB at most) and the program itself.
const READER_AS: u64 = 256 << 20;

fn need_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root: they dump another user's process"
    );
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A fresh directory under /tmp with `mode` (1777: world-writable and sticky, like /tmp),
/// removed on drop (remove_dir_all does not follow the symlinks planted in it).
struct Dir(PathBuf);

impl Dir {
    fn new(what: &str, mode: u32) -> Dir {
        let n = UNIQUE.fetch_add(1, Ordering::SeqCst);
        let p = PathBuf::from(format!("/tmp/telefork-hostile-{what}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        Dir(p)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// The names in it, sorted.
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The unprivileged user of the tests: (uid, gid).
fn test_user() -> (u32, u32) {
    telefork_testbed::ensure_test_user(USER).unwrap()
}

/// A root-owned 0600 file another user would like overwritten: the attack's target.
struct Victim {
    path: PathBuf,
}

const PRECIOUS: &str = "root's precious 0600 file\n";

impl Victim {
    fn new(dir: &Dir, name: &str) -> Victim {
        let path = dir.join(name);
        fs::write(&path, PRECIOUS).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        Victim { path }
    }
    fn assert_untouched(&self, after: &str) {
        let md = fs::symlink_metadata(&self.path).unwrap();
        let now = fs::read_to_string(&self.path).unwrap_or_else(|e| format!("<unreadable: {e}>"));
        assert!(
            now == PRECIOUS && md.is_file() && md.uid() == 0 && md.mode() & 0o7777 == 0o600,
            "{after}: the victim {} was changed (uid {}, mode {:o}, {} bytes, starts {:?})",
            self.path.display(),
            md.uid(),
            md.mode() & 0o7777,
            md.len(),
            &now[..now.len().min(16)]
        );
    }
}

/// Plants `at` → `target` as the test user would (a symlink owned by them).
fn plant_symlink(target: &Path, at: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::symlink(target, at).unwrap();
    std::os::unix::fs::lchown(at, Some(uid), Some(gid)).unwrap();
}

/// A program that fills `MIB` MiB of memory (its first argument), says "ready" and waits;
/// with a second argument "thread" it starts a second thread first. Built once.
fn holder() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        // (Readable by every user, so the test user's process of it is dumpable — and in a
        // directory every user can reach: a CI clone may sit in a private one. Ours is named
        // by our PID; those of earlier runs, whose PIDs are gone, are removed.)
        let tmp = std::env::temp_dir();
        for e in fs::read_dir(&tmp).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("telefork-hostile-files-") {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp.join(format!("telefork-hostile-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let src = dir.join("holder.c");
        fs::write(
            &src,
            r#"#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
static void *idle(void *a) { for (;;) pause(); return a; }
int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 0;
    if (mib) {
        char *p = mmap(0, mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return 1;
        memset(p, 0x5a, mib << 20);
    }
    pthread_t t;
    if (argc > 2 && pthread_create(&t, 0, idle, 0)) return 1;
    puts("ready");
    fflush(stdout);
    for (;;) pause();
}
"#,
        )
        .unwrap();
        let exe = dir.join("holder");
        let out = Command::new("gcc")
            .args(["-O1", "-pthread", "-o"])
            .arg(&exe)
            .arg(&src)
            .output()
            .expect("running gcc");
        assert!(out.status.success(), "gcc failed:\n{}", String::from_utf8_lossy(&out.stderr));
        exe
    })
}

/// A running holder (killed and reaped on drop; it is our child, so its PID stays ours).
struct Target {
    child: Child,
}

impl Target {
    /// Starts the holder as `user` (None: root) with `mib` MiB filled, fds above 2 closed.
    fn start(user: Option<(u32, u32)>, mib: u64, thread: bool) -> Target {
        let mut cmd = Command::new(holder());
        cmd.arg(mib.to_string());
        if thread {
            cmd.arg("thread");
        }
        cmd.current_dir("/").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        // SAFETY: close_range is async-signal-safe; only fds 0-2 reach the target (whatever the
        // harness inherited is not the target's state). CLOEXEC keeps std's exec-error pipe.
        unsafe {
            cmd.pre_exec(|| {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("starting the holder");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        let mut t = Target { child };
        assert_eq!(
            line.trim(),
            "ready",
            "the holder did not start (status {:?})",
            t.child.try_wait()
        );
        t.child.stdout.take();
        t
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs telefork with `args`, killed after `limit`; with `address_space`, under that
/// RLIMIT_AS. Returns (status, stderr, how long it took).
fn telefork(
    args: &[&str],
    address_space: Option<u64>,
    limit: Duration,
) -> (ExitStatus, String, Duration) {
    let mut cmd = Command::new(TELEFORK);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    if let Some(bytes) = address_space {
        // SAFETY: setrlimit is a plain system call, async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_AS, bytes, bytes)
                    .map_err(std::io::Error::from)
            });
        }
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("starting telefork");
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("telefork {args:?} did not finish within {limit:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = start.elapsed();
    (status, reader.join().unwrap(), took)
}

fn dump(pid: u32, out: &Path) -> (ExitStatus, String) {
    let (st, err, _) = telefork(
        &["dump", "--pid", &pid.to_string(), "--out", out.to_str().unwrap()],
        None,
        Duration::from_secs(120),
    );
    (st, err)
}

/// The PIDs the next processes will get, from the last one given out, wrapping like the kernel.
fn next_pids(n: u32) -> Vec<u32> {
    let last: u32 =
        fs::read_to_string("/proc/sys/kernel/ns_last_pid").unwrap().trim().parse().unwrap();
    let max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    (1..=n)
        .map(|i| if last + i < max { last + i } else { 300 + (last + i - max) % (max - 300) })
        .collect()
}

/// (a) Symlinks planted by another user at the image's name, at every temporary name the
/// dump could predict (`.NAME.partial.<pid>` for the next thousands of PIDs) and at other
/// likely ones, all pointing at root-owned 0600 files: a root dump overwrites none of them,
/// and the image replaces the symlink at its name.
#[test]
fn dump_follows_no_planted_symlink() {
    need_root();
    let (uid, gid) = test_user();
    let safe = Dir::new("victims", 0o755);
    let victim = Victim::new(&safe, "victim");
    let at_name = Victim::new(&safe, "victim-at-name");
    let shared = Dir::new("sticky", 0o1777);
    let target = Target::start(Some((uid, gid)), 1, false);

    plant_symlink(&at_name.path, &shared.join("img"), uid, gid);
    for name in [".img.partial", ".img.tmp", "img.tmp", "img.partial", ".img.swp", "img~"] {
        plant_symlink(&victim.path, &shared.join(name), uid, gid);
    }
    for pid in next_pids(3000) {
        plant_symlink(&victim.path, &shared.join(&format!(".img.partial.{pid}")), uid, gid);
    }
    let planted = shared.names();

    let (st, err) = dump(target.pid(), &shared.join("img"));
    assert!(st.success(), "dump failed ({st}):\n{err}");
    victim.assert_untouched("dump into a directory with planted symlinks");
    at_name.assert_untouched("dump over a symlink at the image's name");
    let md = fs::symlink_metadata(shared.join("img")).unwrap();
    assert!(
        md.is_file(),
        "the image's name is not a regular file after the dump: {:?}",
        md.file_type()
    );
    // Nothing else was added or left: the planted names and the image.
    assert_eq!(shared.names(), planted, "the dump added or removed names besides the image");
    let (st, err, _) = telefork(
        &["check-image", shared.join("img").to_str().unwrap()],
        None,
        Duration::from_secs(60),
    );
    assert!(st.success(), "the image does not check ({st}):\n{err}");
}

/// (b) The image holds the process's memory: mode 0600, owned by the process's owner (root
/// dumping a user's process gives the image to that user), whatever the umask.
#[test]
fn image_is_private_to_the_process_owner() {
    need_root();
    let (uid, gid) = test_user();
    let dir = Dir::new("owner", 0o755);
    for (who, user, want) in
        [("the test user", Some((uid, gid)), (uid, gid)), ("root", None, (0, 0))]
    {
        let target = Target::start(user, 1, false);
        let out = dir.join(&format!("img-{}", want.0));
        let (st, err) = dump(target.pid(), &out);
        assert!(st.success(), "dump of {who}'s process failed ({st}):\n{err}");
        let md = fs::symlink_metadata(&out).unwrap();
        assert_eq!(
            md.mode() & 0o7777,
            0o600,
            "image of {who}'s process: mode {:o}, not 0600",
            md.mode() & 0o7777
        );
        assert_eq!((md.uid(), md.gid()), want, "image of {who}'s process: wrong owner");
    }
}

/// (c) A refused dump leaves no file, and neither does a dump killed while it writes (SIGKILL:
/// no chance to clean up) — so no half image ever sits at a name.
#[test]
fn failed_or_killed_dump_leaves_nothing() {
    need_root();
    let (uid, gid) = test_user();
    let dir = Dir::new("failed", 0o1777);

    let two_threads = Target::start(Some((uid, gid)), 1, true);
    let (st, err) = dump(two_threads.pid(), &dir.join("img"));
    assert!(
        !st.success() && err.contains("threads"),
        "a two-threaded process was not refused ({st}):\n{err}"
    );
    assert_eq!(dir.names(), Vec::<String>::new(), "a refused dump left files");

    // 1 GiB to write: killed as soon as it has the process stopped, long before the end.
    let big = Target::start(Some((uid, gid)), 1024, false);
    let mut cmd = Command::new(TELEFORK);
    cmd.args(["dump", "--pid", &big.pid().to_string(), "--out", dir.join("img").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut dumper = cmd.spawn().unwrap();
    let traced = |pid: u32| {
        fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("TracerPid:")).map(|v| v.trim() != "0")
            })
            .unwrap_or(false)
    };
    let start = Instant::now();
    while !traced(big.pid()) {
        assert!(
            dumper.try_wait().unwrap().is_none(),
            "the dump ended before it stopped the process"
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the dump did not stop the process within 30 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    dumper.kill().unwrap();
    let st = dumper.wait().unwrap();
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "the dump finished before it was killed ({st}): make the process bigger"
    );
    assert_eq!(dir.names(), Vec::<String>::new(), "a dump killed while writing left files");
}

/// Runs a reader (`check-image` or `restore`) on `file` under `READER_AS`, asserting it ends
/// within 20 s with exit status 1 and an error containing `want` (not killed by a signal).
fn refused(verb: &str, file: &Path, want: &str) {
    let (st, err, took) =
        telefork(&[verb, file.to_str().unwrap()], Some(READER_AS), Duration::from_secs(20));
    assert_eq!(
        st.code(),
        Some(1),
        "{verb} {}: exit {st}, expected the error {want:?}:\n{err}",
        file.display()
    );
    assert!(
        err.contains(want),
        "{verb} {}: expected an error containing {want:?}, got:\n{err}",
        file.display()
    );
    assert!(took < Duration::from_secs(20), "{verb} {} took {took:?}", file.display());
}

/// A sparse file of `len` bytes starting with `head`.
fn sparse_file(path: &Path, head: &[u8], len: u64) {
    let mut f = fs::File::create(path).unwrap();
    f.write_all(head).unwrap();
    f.set_len(len).unwrap();
}

/// (d) Reading images takes bounded memory and refuses what is not one, clearly and at once:
/// under an address-space limit (256 MiB) smaller than every file, /dev/zero, a FIFO, a
/// directory, 1 GiB of garbage behind a valid magic, a header claiming the biggest record
/// allowed, and a truncated image each get their error; a valid 400 MiB image checks.
#[test]
fn reading_hostile_files_is_bounded() {
    need_root();
    let dir = Dir::new("reading", 0o755);
    for verb in ["check-image", "restore"] {
        refused(
            verb,
            Path::new("/dev/zero"),
            "/dev/zero is a character device, not a regular file",
        );
        let fifo = dir.join(&format!("fifo-{verb}"));
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        refused(verb, &fifo, "is a FIFO, not a regular file");
        refused(verb, &dir.0, "is a directory, not a regular file");
    }

    let gig = 1u64 << 30;
    let mut head = b"TELEFORK".to_vec();
    head.extend(3u32.to_le_bytes());
    let zeros = dir.join("zeros-after-magic");
    sparse_file(&zeros, &head, gig);
    let mut big_record = head.clone();
    big_record.extend(1u32.to_le_bytes()); // a header record ...
    big_record.extend((64u32 << 20).to_le_bytes()); // ... of the largest size allowed
    let big_claim = dir.join("biggest-header");
    sparse_file(&big_claim, &big_record, gig);
    let no_magic = dir.join("no-magic");
    sparse_file(&no_magic, b"not an image at all", gig);
    for verb in ["check-image", "restore"] {
        refused(verb, &zeros, "expected a header record, found record kind 0");
        refused(verb, &big_claim, "checksum mismatch in a header record");
        refused(verb, &no_magic, "not a telefork image (bad magic)");
    }

    // A real image bigger than the limit streams through; cut short, it says so.
    let target = Target::start(None, 400, false);
    let image = dir.join("big.img");
    let (st, err) = dump(target.pid(), &image);
    assert!(st.success(), "dump failed ({st}):\n{err}");
    assert!(
        fs::metadata(&image).unwrap().len() > READER_AS,
        "the image is not bigger than the memory limit"
    );
    let (st, err, _) = telefork(
        &["check-image", image.to_str().unwrap()],
        Some(READER_AS),
        Duration::from_secs(60),
    );
    assert!(
        st.success(),
        "check-image of a valid image bigger than its memory limit failed ({st}):\n{err}"
    );
    let cut = dir.join("cut.img");
    fs::copy(&image, &cut).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(fs::metadata(&image).unwrap().len() - 100)
        .unwrap();
    refused("check-image", &cut, "image is truncated");
}

/// (e) `cluster init` in a directory others may write: keys 0600 and certificates 0644
/// whatever the umask, regular files owned by root; symlinks and a directory planted at the
/// names it writes and at its old temporary names change nothing and stop nothing; `add-node`
/// refuses a name taken by a planted symlink without following it.
#[test]
fn cluster_keys_are_private_and_follow_no_symlink() {
    need_root();
    let (uid, gid) = test_user();
    let safe = Dir::new("cluster-victims", 0o755);
    let victim = Victim::new(&safe, "victim");
    let dir = Dir::new("cluster", 0o1777);
    for name in [
        "n1.key",
        "n1.pem",
        "ca.pem",
        ".ca.key.tmp",
        ".ca.pem.tmp",
        ".n2.key.tmp",
        ".n2.pem.tmp",
        "n3.pem",
    ] {
        plant_symlink(&victim.path, &dir.join(name), uid, gid);
    }
    fs::create_dir(dir.join(".n1.key.tmp")).unwrap();
    std::os::unix::fs::lchown(dir.join(".n1.key.tmp"), Some(uid), Some(gid)).unwrap();

    let mut cmd = Command::new(TELEFORK);
    cmd.args(["cluster", "init", "--dir", dir.0.to_str().unwrap(), "--nodes", "n1,n2"]);
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "cluster init failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    victim.assert_untouched("cluster init");
    for (name, mode) in [
        ("ca.key", 0o600),
        ("n1.key", 0o600),
        ("n2.key", 0o600),
        ("ca.pem", 0o644),
        ("n1.pem", 0o644),
        ("n2.pem", 0o644),
    ] {
        let md = fs::symlink_metadata(dir.join(name)).unwrap();
        assert!(md.is_file(), "{name} is not a regular file");
        assert_eq!(md.mode() & 0o7777, mode, "{name}: mode {:o}", md.mode() & 0o7777);
        assert_eq!(md.uid(), 0, "{name} is not root's");
    }

    let out = Command::new(TELEFORK)
        .args(["cluster", "add-node", "--dir", dir.0.to_str().unwrap(), "n3"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("n3.pem already exists"),
        "add-node over a planted symlink ({}):\n{err}",
        out.status
    );
    victim.assert_untouched("cluster add-node");
    assert!(fs::symlink_metadata(dir.join("n3.key")).is_err(), "add-node refused but left n3.key");
}

/// (f) The testbed's lock lives in /run/lock, which everyone may write: a symlink planted at
/// its name is not followed (nothing is created where it points) and a FIFO there does not
/// hang it; each is refused, naming the file.
#[test]
fn testbed_lock_follows_no_symlink() {
    need_root();
    let (uid, gid) = test_user();
    let safe = Dir::new("lock-victims", 0o755);
    // (A prefix of this test's own: no testbed uses it.)
    let prefix = "hostile9";
    let path = PathBuf::from(format!("/run/lock/telefork-testbed-{prefix}.lock"));
    let _ = fs::remove_file(&path);
    let created = safe.join("created-by-root");
    plant_symlink(&created, &path, uid, gid);
    let res = telefork_testbed::lock(prefix).map(|_| ());
    let _ = fs::remove_file(&path);
    let err = format!("{:#}", res.expect_err("the lock was taken through a planted symlink"));
    assert!(
        err.contains(&path.display().to_string()),
        "the error does not name the lock file: {err}"
    );
    assert!(
        fs::symlink_metadata(&created).is_err(),
        "the lock created {} through the symlink",
        created.display()
    );

    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(telefork_testbed::lock(prefix).map(|_| ()).map_err(|e| format!("{e:#}")));
    });
    let res = rx.recv_timeout(Duration::from_secs(10));
    let _ = fs::remove_file(&path);
    let err = res
        .expect("taking the lock hung on a FIFO planted at its name")
        .expect_err("a FIFO was taken as the lock");
    assert!(
        err.contains(&path.display().to_string()),
        "the error does not name the lock file: {err}"
    );
}
