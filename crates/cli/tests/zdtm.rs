//! zdtm-style tests: each target program in `tests/zdtm/` owns one kind of state. The runner
//! starts it, waits for `READY`, runs `telefork dump` (which kills it), starts
//! `telefork restore`, creates the go file, and asserts the restored process printed `PASS`
//! and exited 0 (see `tests/zdtm/README.md`). One test per target.
//!
//! This file has its own `main` (`harness = false`, libtest-mimic for libtest's arguments and
//! output) so that a test that cannot run here for a reason it names — its target needs a CPU
//! feature this machine lacks — is reported as ignored with that reason, not as passed. Every
//! test is listed in `TESTS`.
//!
//! Every process a test starts is killed by PID on every exit path (a `Guard` also kills any
//! process whose environment carries this run's unique `ZDTM_GO`, which is how a restored
//! target is recognised). Images live in temporary directories that are removed.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const TELEFORK: &str = env!("CARGO_BIN_EXE_telefork");

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const DUMP_TIMEOUT: Duration = Duration::from_secs(120);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
const BIG_TIMEOUT: Duration = Duration::from_secs(400);

/// Tests that move a lot of memory run one at a time.
static HEAVY: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------
// paths, temp dirs, building targets

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn zdtm_src() -> PathBuf {
    repo_root().join("tests/zdtm")
}

fn build_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("zdtm");
    fs::create_dir_all(&d).unwrap();
    d
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique(name: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::SeqCst);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{name}-{}-{n}-{}", std::process::id(), t % 1_000_000_000)
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = build_dir().join(format!("run-{}", unique(name)));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A directory any user can reach (0755 under /tmp): for a target that gives up root,
    /// whose executable and working directory its new owner must still reach at restore
    /// (the build directory may sit in a checkout only root can enter).
    fn public(name: &str) -> TempDir {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("telefork-zdtm-{}", unique(name)));
        fs::create_dir(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Compiles `tests/zdtm/<src>` with gcc into `<build>/<out>` (a name per test, so a test's
/// processes are recognisable by their executable).
fn compile_c(src: &str, out: &str, extra: &[&str]) -> PathBuf {
    let dst = build_dir().join(out);
    let tmp = build_dir().join(format!(".{}", unique(out)));
    let res = Command::new("gcc")
        .args(["-O1", "-g", "-Wall", "-Wextra", "-Wno-format-truncation", "-pthread"])
        .args(extra)
        .arg("-o")
        .arg(&tmp)
        .arg(zdtm_src().join(src))
        .output()
        .unwrap_or_else(|e| panic!("cannot run gcc ({e}); run scripts/setup.sh"));
    assert!(res.status.success(), "gcc failed on {src}:\n{}", String::from_utf8_lossy(&res.stderr));
    fs::rename(&tmp, &dst).unwrap();
    dst
}

fn build_rust_target() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let tdir = build_dir().join("rust-target");
    let res = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(zdtm_src().join("rust-target/Cargo.toml"))
        .arg("--target-dir")
        .arg(&tdir)
        .env_remove("RUSTFLAGS")
        .output()
        .expect("cannot run cargo");
    assert!(
        res.status.success(),
        "building tests/zdtm/rust-target failed:\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    tdir.join("release/zdtm-rust-target")
}

thread_local! {
    /// Why the test running on this thread did not run (or not all of it), if it said so.
    static SKIPPED: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Records that the running test did not run (or not all of it) for a reason it names: the
/// runner reports it as ignored with that reason instead of passed.
fn skipped(why: &str) {
    eprintln!("skipped: {why}");
    SKIPPED.with(|s| *s.borrow_mut() = Some(why.to_string()));
}

fn warn_if_not_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "zdtm: NOTE: not running as root; telefork needs ptrace and prctl(PR_SET_MM) \
             (root, or CAP_SYS_PTRACE + CAP_CHECKPOINT_RESTORE): failures below may be that"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// processes

fn proc_starttime(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    // fields from 3 on; starttime is field 22
    rest.split(' ').nth(22 - 3)?.parse().ok()
}

fn proc_state(pid: i32) -> Option<char> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..].chars().next()
}

fn proc_ppid(pid: i32) -> Option<i32> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()
}

fn tracer_pid(pid: i32) -> Option<i32> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("TracerPid:")).and_then(|v| v.trim().parse().ok())
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// All live descendants of `pid` (children first found, then theirs).
fn descendants(pid: i32) -> Vec<i32> {
    let pairs: Vec<(i32, i32)> =
        all_pids().into_iter().filter_map(|p| Some((p, proc_ppid(p)?))).collect();
    let mut out = vec![];
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &(c, pp) in &pairs {
            if pp == p && !out.contains(&c) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// PIDs of processes whose environment holds `marker` (this run's `ZDTM_GO=...`).
fn pids_with_env(marker: &[u8]) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&p| p != me)
        .filter(|&p| {
            fs::read(format!("/proc/{p}/environ"))
                .map(|e| e.split(|&b| b == 0).any(|kv| kv == marker))
                .unwrap_or(false)
        })
        .filter(|&p| proc_state(p) != Some('Z'))
        .collect()
}

fn kill_pid(pid: i32) {
    // SAFETY: kill(2) of a PID this test started or identified as its own; no memory involved.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Kills, on drop, every process this test started that is still there: tracked PIDs (only if
/// still the same process, by start time), their descendants, and any process whose environment
/// carries the run's `ZDTM_GO` marker (the target and its restored self).
struct Guard {
    tracked: Mutex<Vec<(i32, u64)>>,
    marker: Vec<u8>,
}

impl Guard {
    fn new(marker: Vec<u8>) -> Guard {
        Guard { tracked: Mutex::new(vec![]), marker }
    }
    fn track(&self, pid: i32) {
        if let Some(st) = proc_starttime(pid) {
            self.tracked.lock().unwrap().push((pid, st));
        }
    }
    fn kill_all(&self) {
        for _ in 0..3 {
            let mut victims = vec![];
            for &(pid, st) in self.tracked.lock().unwrap().iter() {
                if proc_starttime(pid) == Some(st) && proc_state(pid) != Some('Z') {
                    victims.extend(descendants(pid));
                    victims.push(pid);
                }
            }
            victims.extend(pids_with_env(&self.marker));
            if victims.is_empty() {
                return;
            }
            for p in victims {
                kill_pid(p);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// A child with its stdout read line by line and its stderr collected, in threads.
struct Proc {
    child: Child,
    pid: i32,
    lines: Receiver<String>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    status: Option<ExitStatus>,
}

impl Proc {
    fn spawn(mut cmd: Command, guard: &Guard) -> Proc {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Only fds 0-2 go through exec: whatever the test harness inherited (a jobserver pipe,
        // a terminal's extra fds) is not the target's state. CLOSE_RANGE_CLOEXEC keeps std's
        // own exec-error pipe working.
        // SAFETY: the closure only makes a raw syscall (async-signal-safe, no allocation)
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let pid = child.id() as i32;
        guard.track(pid);
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, rx) = channel();
        let stdout = Arc::new(Mutex::new(vec![]));
        let stderr = Arc::new(Mutex::new(String::new()));
        let so = stdout.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                so.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let se = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                se.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Proc { child, pid, lines: rx, stdout, stderr, status: None }
    }

    /// Waits for a stdout line satisfying `pred`; None on timeout or end of output.
    fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return Some(l),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    /// Waits for exit; on timeout kills it (and its descendants) and returns None.
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        None
    }

    fn kill(&mut self) {
        if self.try_wait().is_none() {
            for d in descendants(self.pid) {
                kill_pid(d);
            }
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Output so far, for messages; waits a moment for the reader threads to drain.
    fn report(&self) -> String {
        thread::sleep(Duration::from_millis(100));
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout_lines().join("\n"),
            self.stderr.lock().unwrap()
        )
    }
}

/// Runs a command to completion with a timeout; returns (status, stdout, stderr).
fn run_cmd(args: &[&str], timeout: Duration, guard: &Guard) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]);
    let mut p = Proc::spawn(cmd, guard);
    let st = p.wait_timeout(timeout);
    let (out, err) = drain(&p);
    match st {
        Some(st) => (st, out, err),
        None => panic!(
            "{args:?} did not finish within {timeout:?} (killed)\nstdout:\n{out}\nstderr:\n{err}"
        ),
    }
}

/// Stdout and stderr of an exited process, once its reader threads are done (bounded wait).
fn drain(p: &Proc) -> (String, String) {
    let end = Instant::now() + Duration::from_secs(2);
    let busy = || Arc::strong_count(&p.stdout) > 1 || Arc::strong_count(&p.stderr) > 1;
    while busy() && Instant::now() < end {
        thread::sleep(Duration::from_millis(5));
    }
    (p.stdout_lines().join("\n"), p.stderr.lock().unwrap().clone())
}

fn describe(st: &ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{st:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// one zdtm run

struct Run {
    name: String,
    dir: TempDir,
    go: PathBuf,
    img: PathBuf,
    guard: Guard,
    target: Option<Proc>,
    exe: PathBuf,
    /// Environment of `telefork restore` (beyond the test's own).
    restore_env: Vec<(&'static str, &'static str)>,
}

impl Run {
    fn new(name: &str, exe: PathBuf) -> Run {
        Run::in_dir(name, exe, TempDir::new(name))
    }

    /// A run for a target that gives up root: it runs in, and from, a directory any user
    /// can reach (`TempDir::public`), with its executable copied there.
    fn reachable_by_anyone(name: &str, exe: PathBuf) -> Run {
        let dir = TempDir::public(name);
        let copy = dir.path().join(exe.file_name().unwrap());
        fs::copy(&exe, &copy).unwrap();
        Run::in_dir(name, copy, dir)
    }

    fn in_dir(name: &str, exe: PathBuf, dir: TempDir) -> Run {
        warn_if_not_root();
        let go = dir.path().join("go");
        let img = dir.path().join("image.img");
        let mut marker = b"ZDTM_GO=".to_vec();
        marker.extend_from_slice(go.as_os_str().as_encoded_bytes());
        Run {
            name: name.into(),
            dir,
            go,
            img,
            guard: Guard::new(marker),
            target: None,
            exe,
            restore_env: Vec::new(),
        }
    }

    /// Starts the target (`argv` after the executable) and waits for READY. Returns false if
    /// the target said `SKIP: ...`: it cannot run on this machine for a reason it names (a CPU
    /// feature it needs is absent), said on stderr as "skipped: ...". A test whose target has
    /// no such reason asserts that it started.
    fn start(&mut self, args: &[OsString]) -> bool {
        let mut cmd = Command::new(&self.exe);
        cmd.args(args)
            .env("ZDTM_GO", &self.go)
            .env("ZDTM_TMP", self.dir.path())
            .current_dir(self.dir.path());
        let mut t = Proc::spawn(cmd, &self.guard);
        let first = t.wait_line(READY_TIMEOUT, |l| {
            l == "READY" || l.starts_with("SKIP") || l.starts_with("FAIL")
        });
        match first.as_deref() {
            Some("READY") => {
                self.target = Some(t);
                true
            }
            Some(l) if l.starts_with("SKIP") => {
                skipped(&format!("zdtm {}: the target says {l:?}", self.name));
                t.wait_timeout(Duration::from_secs(5));
                false
            }
            _ => {
                t.kill();
                panic!(
                    "{}: target did not print READY within {READY_TIMEOUT:?}\n{}",
                    self.name,
                    t.report()
                );
            }
        }
    }

    fn target(&mut self) -> &mut Proc {
        self.target.as_mut().expect("target not started")
    }

    fn target_pid(&self) -> i32 {
        self.target.as_ref().unwrap().pid
    }

    /// `telefork dump` (extra args appended); returns (status, stderr).
    fn dump_raw(&mut self, extra: &[&str], timeout: Duration) -> (ExitStatus, String) {
        let pid = self.target_pid().to_string();
        let img = self.img.to_str().unwrap().to_string();
        let mut args = vec![TELEFORK, "dump", "--pid", &pid, "--out", &img];
        args.extend_from_slice(extra);
        let t0 = Instant::now();
        let (st, _out, err) = run_cmd(&args, timeout, &self.guard);
        eprintln!(
            "zdtm {}: dump took {:.3} s, image {} bytes",
            self.name,
            t0.elapsed().as_secs_f64(),
            fs::metadata(&self.img).map(|m| m.len()).unwrap_or(0)
        );
        (st, err)
    }

    /// Dumps and checks the contract: success, and the target is gone (reaped, so its PID is
    /// free for the restore).
    fn dump(&mut self, timeout: Duration) {
        let (st, err) = self.dump_raw(&[], timeout);
        if !st.success() {
            let rep = self.target().report();
            panic!(
                "{}: telefork dump failed ({}):\n{err}\ntarget output:\n{rep}",
                self.name,
                describe(&st)
            );
        }
        let name = self.name.clone();
        let t = self.target();
        match t.wait_timeout(Duration::from_secs(10)) {
            Some(_) => {}
            None => panic!("{name}: `telefork dump` without --leave-running left the target running (killed it)"),
        }
    }

    /// Starts `telefork restore IMG [extra]`, then creates the go file.
    fn start_restore(&mut self, extra: &[&str]) -> Proc {
        let mut cmd = Command::new(TELEFORK);
        cmd.arg("restore").arg(&self.img).args(extra).envs(self.restore_env.iter().copied());
        let p = Proc::spawn(cmd, &self.guard);
        fs::write(&self.go, b"go").unwrap();
        p
    }

    /// Restores (without --detach), waits with a timeout, and asserts PASS + exit 0.
    fn restore_and_check(&mut self, timeout: Duration) -> Vec<String> {
        self.restore_with_and_check(&[], timeout)
    }

    /// `restore_and_check` with more arguments for `telefork restore`.
    fn restore_with_and_check(&mut self, extra: &[&str], timeout: Duration) -> Vec<String> {
        let t0 = Instant::now();
        let mut r = self.start_restore(extra);
        let st = r.wait_timeout(timeout);
        let (out, err) = drain(&r);
        let Some(st) = st else {
            panic!("{}: telefork restore hung for {timeout:?} (killed)\nstdout:\n{out}\nstderr:\n{err}", self.name)
        };
        eprintln!("zdtm {}: restore + check took {:.3} s", self.name, t0.elapsed().as_secs_f64());
        let lines = r.stdout_lines();
        if let Some(i) = lines.iter().position(|l| l.starts_with("FAIL")) {
            // a FAIL message may go on over several lines
            let f = lines[i..].join("\n");
            panic!(
                "{}: the restored target says: {f}\n({})\nstderr:\n{err}",
                self.name,
                describe(&st)
            );
        }
        assert!(
            lines.iter().any(|l| l == "PASS") && st.success(),
            "{}: restored target did not PASS ({}).\nstdout:\n{out}\nstderr:\n{err}",
            self.name,
            describe(&st)
        );
        lines
    }

    /// Asserts nothing of this run is left: no process carries its ZDTM_GO.
    fn assert_nothing_left(&self, what: &str) {
        thread::sleep(Duration::from_millis(200));
        let left = pids_with_env(&self.guard.marker);
        assert!(left.is_empty(), "{}: {what}: processes left behind: {left:?}", self.name);
    }

    fn image_len(&self) -> u64 {
        fs::metadata(&self.img).map(|m| m.len()).unwrap_or(0)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // kill before the temp dir goes away
        self.guard.kill_all();
        if let Some(t) = self.target.as_mut() {
            t.kill();
        }
    }
}

/// The standard test: build, start, dump, restore, PASS.
fn zdtm(name: &str, exe: PathBuf, args: &[&str]) {
    zdtm_with(name, exe, args, DUMP_TIMEOUT, RESTORE_TIMEOUT, |_| {});
}

fn zdtm_with(
    name: &str,
    exe: PathBuf,
    args: &[&str],
    dump_timeout: Duration,
    restore_timeout: Duration,
    after_dump: impl FnOnce(&Run),
) {
    let mut run = Run::new(name, exe);
    let args: Vec<OsString> = args.iter().map(|a| a.into()).collect();
    if !run.start(&args) {
        return;
    }
    run.dump(dump_timeout);
    after_dump(&run);
    run.restore_and_check(restore_timeout);
}

fn c_test(name: &str) {
    let exe = compile_c(&format!("{name}.c"), name, &[]);
    zdtm(name, exe, &[]);
}

// ---------------------------------------------------------------------------------------------
// state targets

fn anon_memory() {
    c_test("anon_memory");
}

fn file_mappings() {
    c_test("file_mappings");
}

fn heap_brk() {
    c_test("heap_brk");
}

fn stack() {
    c_test("stack");
}

fn vdso() {
    c_test("vdso");
}

fn sparse() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let exe = compile_c("sparse.c", "sparse", &[]);
    zdtm_with("sparse", exe, &[], DUMP_TIMEOUT, RESTORE_TIMEOUT, |run| {
        let len = run.image_len();
        assert!(
            len < 20 << 20,
            "sparse: image is {len} bytes for 10 MiB touched in 64 GiB (limit 20 MiB)"
        );
    });
}

/// Restores `run`'s image with `env` set (and the restore's debug report on), waits for the
/// restored process and checks it said PASS; its stdout and the restore's stderr. `what`
/// names the run in failures.
fn restore_to_pass(
    run: &mut Run,
    env: (&'static str, &'static str),
    timeout: Duration,
    what: &str,
) -> (String, String) {
    run.restore_env.push(("TELEFORK_DEBUG", "1"));
    run.restore_env.push(env);
    let mut r = run.start_restore(&[]);
    let st = r.wait_timeout(timeout);
    let (out, err) = drain(&r);
    let st = st.unwrap_or_else(|| panic!("{what}: restore hung\nstdout:\n{out}\nstderr:\n{err}"));
    assert!(
        out.lines().any(|l| l == "PASS") && st.success(),
        "{what}: no PASS ({})\nstdout:\n{out}\nstderr:\n{err}",
        describe(&st)
    );
    (out, err)
}

/// The value of the restore's debug note `restore: VALUE{suffix}`, if it made one.
fn restore_report<'e>(err: &'e str, suffix: &str) -> Option<&'e str> {
    err.lines().find_map(|l| l.split_once("restore: ").and_then(|(_, n)| n.strip_suffix(suffix)))
}

/// Memory is placed through the new process's userfaultfd when the kernel allows (and the
/// process is big enough, or always: forced here), by populate + write otherwise: both ways
/// must give the same memory (anon_memory: patterns, guard and read-only pages, shared
/// memory; sparse: untouched pages read as zero afterwards, so nothing is left registered),
/// and the debug report says which way ran.
fn memory_with_and_without_userfaultfd() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    for (name, file) in [("anon_memory", "anon_memory.c"), ("sparse", "sparse.c")] {
        for (way, env) in [
            ("userfaultfd", ("TELEFORK_USERFAULTFD", "always")),
            ("writes", ("TELEFORK_USERFAULTFD", "never")),
        ] {
            let exe = compile_c(file, name, &[]);
            let mut run = Run::new(&format!("{name}_{way}"), exe);
            assert!(run.start(&[]), "{name}: the target skipped itself");
            run.dump(DUMP_TIMEOUT);
            let (_, err) =
                restore_to_pass(&mut run, env, RESTORE_TIMEOUT, &format!("{name} ({way})"));
            let placed = restore_report(&err, " page bytes placed through userfaultfd")
                .unwrap_or_else(|| panic!("{name} ({way}): no userfaultfd report in\n{err}"));
            let (by_uffd, total) =
                placed.split_once(" of ").unwrap_or_else(|| panic!("bad report {placed:?}"));
            let (by_uffd, total): (u64, u64) = (by_uffd.parse().unwrap(), total.parse().unwrap());
            assert!(total > 0, "{name}: no pages");
            match way {
                // (The rest: shared memory and written pages of private file mappings.)
                "userfaultfd" => assert!(
                    by_uffd * 2 >= total,
                    "{name}: only {by_uffd} of {total} bytes through userfaultfd"
                ),
                _ => assert_eq!(by_uffd, 0, "{name}: userfaultfd used although disabled"),
            }
        }
    }
}

fn fpu_xstate() {
    let exe = compile_c("fpu_xstate.c", "fpu_xstate", &["-mavx512f", "-mavx512bw"]);
    zdtm("fpu_xstate", exe, &[]);
}

fn mm_fields() {
    let exe = compile_c("mm_fields.c", "mm_fields", &[]);
    zdtm("mm_fields", exe, &["first-arg", "second arg with spaces", "", "último"]);
}

fn signals() {
    c_test("signals");
}

fn identity() {
    c_test("identity");
}

fn misc() {
    c_test("misc");
}

fn timers() {
    c_test("timers");
}

fn attrs() {
    c_test("attrs");
}

fn mem_flags() {
    c_test("mem_flags");
}

fn locks() {
    c_test("locks");
}

fn anon_fds() {
    c_test("anon_fds");
}

fn pipes() {
    c_test("pipes");
}

fn epoll() {
    c_test("epoll");
}

fn ghost() {
    c_test("ghost");
}

fn fifo() {
    c_test("fifo");
}

/// Capabilities a non-root process kept are not granted from an image on its owner's word
/// (restore refuses, naming them), and are given exactly with `--trust-image`.
fn caps() {
    let exe = compile_c("caps.c", "caps", &[]);
    let mut run = Run::reachable_by_anyone("caps", exe);
    assert!(run.start(&[]));
    run.dump(DUMP_TIMEOUT);
    let err = restore_must_fail(&mut run, "capabilities its owner does not have");
    assert!(err.contains("capabilities 0x401"), "caps: the refusal must name them: {err}");
    fs::remove_file(&run.go).unwrap();
    run.restore_with_and_check(&["--trust-image"], RESTORE_TIMEOUT);
}

fn fds() {
    c_test("fds");
}

fn big_1g() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let exe = compile_c("big_1g.c", "big_1g", &[]);
    zdtm_with("big_1g", exe, &[], BIG_TIMEOUT, BIG_TIMEOUT, |run| {
        let len = run.image_len();
        assert!(len >= 1 << 30, "big_1g: image is {len} bytes, less than the 1 GiB written");
    });
}

/// A big image restored with its fully carried memory in huge pages (forced for 1 GiB here:
/// by default only images over 2 GiB get them): every word is right, the memory is still one
/// mapping (no seam left where parts were taken out of the userfaultfd), and the huge pages
/// the restorer reports are huge pages the process finds in its own smaps.
fn big_memory_in_huge_pages() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let exe = compile_c("big_1g.c", "big_1g", &[]);
    let mut run = Run::new("big_1g_huge_pages", exe);
    assert!(run.start(&[]), "big_1g: the target skipped itself");
    run.dump(BIG_TIMEOUT);
    let (out, err) = restore_to_pass(
        &mut run,
        ("TELEFORK_HUGE_PAGES", "always"),
        BIG_TIMEOUT,
        "big_1g (huge pages)",
    );
    let reported: u64 = restore_report(&err, " page bytes in huge pages")
        .map_or(0, |n| n.parse().unwrap_or_else(|_| panic!("bad report {n:?}")));
    let found_kib: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("ANON_HUGE_KB "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("big_1g: no ANON_HUGE_KB line in\n{out}"));
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.is_empty() || thp.contains("[never]") {
        // (A kernel without transparent huge pages: the memory is right, the rest cannot be.)
        assert_eq!(reported, 0, "huge pages reported where the kernel has none");
        skipped(&format!("big_memory_in_huge_pages: this kernel has no transparent huge pages ({:?}): only the memory was checked", thp.trim()));
        return;
    }
    // (How many: as many as the preparing thread made before the pages reached them. None
    // is a failure: the restore did not do what this test is named after.)
    if reported == 0 {
        let refusal = err.lines().find(|l| l.contains("huge pages stopped: "));
        panic!(
            "big_1g: no memory was placed in huge pages ({}); stderr:\n{err}",
            refusal.unwrap_or("the restorer names no refusal")
        );
    }
    assert!(
        found_kib * 1024 >= reported,
        "the restorer reports {reported} bytes in huge pages, the process finds {found_kib} KiB"
    );
    eprintln!("big_memory_in_huge_pages: {reported} bytes in huge pages, {found_kib} KiB found by the process");
}

fn rust_target() {
    let exe = build_rust_target();
    zdtm("rust_target", exe, &[]);
}

fn count_of(line: &str) -> Option<u64> {
    line.strip_prefix("COUNT ")?.split(' ').next()?.parse().ok()
}

fn python3() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let py =
        match Command::new("python3").arg("-c").arg("import sys; print(sys.executable)").output() {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            _ => panic!("python3: python3 is not installed; run scripts/setup.sh"),
        };
    let mut run = Run::new("python3", PathBuf::from(&py));
    let script = zdtm_src().join("python_target.py");
    assert!(run.start(&[script.into_os_string()]), "python3: the target skipped itself");
    // capture in the middle of counting
    let t = run.target();
    assert!(
        t.wait_line(READY_TIMEOUT, |l| count_of(l).is_some_and(|n| n >= 30)).is_some(),
        "python3: the target did not count to 30\n{}",
        t.report()
    );
    run.dump(DUMP_TIMEOUT);
    let before: Vec<u64> = run.target().stdout_lines().iter().filter_map(|l| count_of(l)).collect();
    let last_before = *before.last().unwrap();

    // Here the go file is created only once the restored process has printed a COUNT line, so
    // the test sees it carrying on.
    let mut cmd = Command::new(TELEFORK);
    cmd.arg("restore").arg(&run.img);
    let mut r = Proc::spawn(cmd, &run.guard);
    let first = r.wait_line(RESTORE_TIMEOUT, |l| count_of(l).is_some() || l.starts_with("FAIL"));
    fs::write(&run.go, b"go").unwrap();
    let st = r.wait_timeout(RESTORE_TIMEOUT);
    let (out, err) = drain(&r);
    let st = st.unwrap_or_else(|| panic!("python3: telefork restore hung (killed)\n{out}\n{err}"));
    let first =
        first.unwrap_or_else(|| panic!("python3: restored process printed no COUNT\n{out}\n{err}"));
    let first_n = count_of(&first).unwrap_or_else(|| panic!("python3: {first}"));
    assert!(
        first_n > last_before,
        "python3: counting restarted: last COUNT before capture {last_before}, first after restore {first_n}"
    );
    let lines = r.stdout_lines();
    if let Some(f) = lines.iter().find(|l| l.starts_with("FAIL")) {
        panic!("python3: the restored target says: {f}\nstderr:\n{err}");
    }
    assert!(
        lines.iter().any(|l| l == "PASS") && st.success(),
        "python3: restored target did not PASS ({})\nstdout:\n{out}\nstderr:\n{err}",
        describe(&st)
    );
    eprintln!("zdtm python3: counted to {last_before} before capture, continued at {first_n}");
}

// ---------------------------------------------------------------------------------------------
// refusals

/// True if `s` names the number `n` as a number of its own (not inside a larger number).
fn names_number(s: &str, n: u32) -> bool {
    let n = n.to_string();
    s.match_indices(&n).any(|(i, _)| {
        let before = s[..i].chars().next_back();
        let after = s[i + n.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_digit()) && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

fn refuse_fd(kind: &str) {
    let name = format!("refuse_{kind}");
    let exe = compile_c("refuse_fd.c", &name, &[]);
    let mut run = Run::new(&name, exe);
    assert!(run.start(&[kind.into()]));
    let (st, err) = run.dump_raw(&[], DUMP_TIMEOUT);
    assert!(!st.success(), "{name}: telefork dump accepted a process holding a {kind} on fd 5");
    assert_eq!(st.code(), Some(3), "{name}: a refusal exits with 3");
    let low = err.to_lowercase();
    assert!(
        low.contains(kind) && names_number(&low, 5),
        "{name}: the error must name fd 5 and its kind ({kind}); it was:\n{err}"
    );
    // the target must be alive, running, and no longer traced
    let pid = run.target_pid();
    thread::sleep(Duration::from_millis(100));
    let t = run.target();
    if let Some(s) = t.try_wait() {
        panic!("{name}: the refused dump killed the target ({})", describe(&s));
    }
    let state = proc_state(pid);
    assert!(
        matches!(state, Some('S') | Some('R')),
        "{name}: after the refused dump the target is in state {state:?} (stopped or traced?)"
    );
    assert_eq!(
        tracer_pid(pid),
        Some(0),
        "{name}: the target is still traced after the refused dump"
    );
    // it carries on: go, and it checks its fds and passes
    carries_on(&mut run);
}

/// After a refused dump: go, and the target finishes its own checks with PASS.
fn carries_on(run: &mut Run) {
    fs::write(&run.go, b"go").unwrap();
    let name = run.name.clone();
    let t = run.target();
    let st = t.wait_timeout(Duration::from_secs(30));
    let rep = t.report();
    assert!(
        st.is_some_and(|s| s.success()) && t.stdout_lines().iter().any(|l| l == "PASS"),
        "{name}: the target did not carry on after the refused dump\n{rep}"
    );
}

/// A process under seccomp is refused (restoring it without its filters would lift its
/// sandbox), and carries on untouched.
fn refuse_seccomp() {
    let exe = compile_c("seccomp.c", "refuse_seccomp", &[]);
    let mut run = Run::new("refuse_seccomp", exe);
    assert!(run.start(&[]));
    let (st, err) = run.dump_raw(&[], DUMP_TIMEOUT);
    assert!(!st.success(), "refuse_seccomp: telefork dump accepted a process under seccomp");
    assert!(err.contains("seccomp"), "refuse_seccomp: the error must name seccomp; it was:\n{err}");
    let pid = run.target_pid();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(
        tracer_pid(pid),
        Some(0),
        "refuse_seccomp: the target is still traced after the refused dump"
    );
    carries_on(&mut run);
}

/// State `refuse_state.c` holds for `kind` is refused at dump, exit status 3, by a message
/// containing `needle`; the target carries on untouched.
fn refuse_state(kind: &str, needle: &str) {
    let name = format!("refuse_{kind}_state");
    let exe = compile_c("refuse_state.c", &name, &[]);
    let mut run = Run::new(&name, exe);
    assert!(run.start(&[kind.into()]));
    let (st, err) = run.dump_raw(&[], DUMP_TIMEOUT);
    assert_eq!(st.code(), Some(3), "{name}: the dump must refuse (exit 3): {err}");
    assert!(err.contains(needle), "{name}: the error must say {needle:?}; it was:\n{err}");
    thread::sleep(Duration::from_millis(100));
    assert_eq!(tracer_pid(run.target_pid()), Some(0), "{name}: still traced after the refusal");
    carries_on(&mut run);
}

fn refuse_own_namespace() {
    refuse_state("uts", "uts namespace of its own");
}

fn refuse_aliased_memory() {
    refuse_state("alias", "show the same shared memory");
}

fn refuse_stale_epoll_entry() {
    refuse_state("epoll", "was closed or replaced since it was added");
}

/// A process with children (one running, one a zombie) is refused, naming both, and carries
/// on with them: it reaps both after the refused dump.
fn refuse_children() {
    let exe = compile_c("children.c", "refuse_children", &[]);
    let mut run = Run::new("refuse_children", exe);
    assert!(run.start(&["refused".into()]));
    let children = announced_children(&mut run);
    let (st, err) = run.dump_raw(&[], DUMP_TIMEOUT);
    assert!(!st.success(), "refuse_children: telefork dump accepted a process with children");
    assert!(
        err.contains("child process") && children.iter().all(|&c| names_number(&err, c)),
        "refuse_children: the error must name the children {children:?}; it was:\n{err}"
    );
    assert_eq!(
        tracer_pid(run.target_pid()),
        Some(0),
        "refuse_children: the target is still traced after the refused dump"
    );
    carries_on(&mut run);
}

/// `dump --ignore-children` captures a process with children alone, and the restored process
/// has none, as the option says (wait() gives ECHILD).
fn children_ignored() {
    let exe = compile_c("children.c", "children_ignored", &[]);
    let mut run = Run::new("children_ignored", exe);
    assert!(run.start(&["alone".into()]));
    announced_children(&mut run);
    let (st, err) = run.dump_raw(&["--ignore-children"], DUMP_TIMEOUT);
    assert!(
        st.success(),
        "children_ignored: dump --ignore-children failed ({}):\n{err}",
        describe(&st)
    );
    run.restore_and_check(RESTORE_TIMEOUT);
}

/// The PIDs the children target printed (`CHILDREN a b`) before READY.
fn announced_children(run: &mut Run) -> Vec<u32> {
    let name = run.name.clone();
    let lines = run.target().stdout_lines();
    let line = lines.iter().find_map(|l| l.strip_prefix("CHILDREN "));
    let line = line.unwrap_or_else(|| panic!("{name}: the target named no children"));
    line.split_whitespace().map(|n| n.parse().unwrap()).collect()
}

fn refuse_inotify() {
    refuse_fd("inotify");
}

fn refuse_socket() {
    refuse_fd("socket");
}

fn refuse_namespace() {
    refuse_fd("namespace");
}

fn refuse_lease() {
    refuse_fd("lease");
}

/// Starts `simple` under a test-specific name and dumps it.
fn simple_dumped(name: &str) -> Run {
    c_dumped("simple.c", name)
}

/// Target `source` (a C file of tests/zdtm) built, started and dumped, as run `name`.
fn c_dumped(source: &str, name: &str) -> Run {
    let exe = compile_c(source, name, &[]);
    let mut run = Run::new(name, exe);
    assert!(run.start(&[]));
    run.dump(DUMP_TIMEOUT);
    run
}

/// Restore must fail; its stderr is returned. Also checks nothing is left behind.
fn restore_must_fail(run: &mut Run, what: &str) -> String {
    let mut r = run.start_restore(&[]);
    let st = r.wait_timeout(RESTORE_TIMEOUT);
    let (out, err) = drain(&r);
    let st =
        st.unwrap_or_else(|| panic!("{}: restore of {what} hung (killed)\n{out}\n{err}", run.name));
    assert!(
        !st.success() && !out.lines().any(|l| l == "PASS"),
        "{}: telefork restore accepted {what} ({})\nstdout:\n{out}\nstderr:\n{err}",
        run.name,
        describe(&st)
    );
    assert!(!err.trim().is_empty(), "{}: restore of {what} failed without a message", run.name);
    run.assert_nothing_left(&format!("after the failed restore of {what}"));
    err
}

/// An fd opened before the process dropped root is not reopened with the restorer's
/// privilege: the restore fails naming the fd and the reason.
fn refuse_fd_before_setuid() {
    let exe = compile_c("fd_before_setuid.c", "refuse_fd_before_setuid", &[]);
    let mut run = Run::reachable_by_anyone("refuse_fd_before_setuid", exe);
    assert!(run.start(&[]));
    run.dump(DUMP_TIMEOUT);
    let err = restore_must_fail(&mut run, "an fd its owner may not open");
    assert!(
        names_number(&err, 5) && err.contains("before giving up privileges"),
        "refuse_fd_before_setuid: the error must name fd 5 and the reason; it was:\n{err}"
    );
}

/// A cgroup directory for a test: in the v1 `pids` hierarchy where it is mounted, else the
/// v2 one; removed on drop (once its processes are gone).
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = |fstype: &str, opt: &str| {
            mounts.lines().find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let mut r = right.split_whitespace();
                let (t, _, o) = (r.next()?, r.next()?, r.next()?);
                if t == fstype && (opt.is_empty() || o.split(',').any(|x| x == opt)) {
                    Some(PathBuf::from(left.split_whitespace().nth(4)?))
                } else {
                    None
                }
            })
        };
        let root = mount("cgroup", "pids")
            .or_else(|| mount("cgroup2", ""))
            .expect("no cgroup hierarchy is mounted");
        let dir = root.join(unique(name));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("{name}: mkdir {}: {e}", dir.display()));
        TestCgroup(dir)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // (A process that just left it may still be counted for a moment.)
        for _ in 0..200 {
            if fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!("could not remove the test cgroup {}", self.0.display());
    }
}

/// A process in a cgroup of its own is in it again after a local restore.
fn cgroup() {
    let cg = TestCgroup::new("cgroup");
    let exe = compile_c("cgroup.c", "cgroup", &[]);
    zdtm("cgroup", exe, &[cg.0.to_str().unwrap()]);
}

/// A process whose cgroup is gone at restore is refused, naming the cgroup.
fn refuse_missing_cgroup() {
    let cg = TestCgroup::new("refuse_missing_cgroup");
    let exe = compile_c("cgroup.c", "refuse_missing_cgroup", &[]);
    let mut run = Run::new("refuse_missing_cgroup", exe);
    assert!(run.start(&[cg.0.clone().into()]));
    run.dump(DUMP_TIMEOUT);
    drop(cg);
    let err = restore_must_fail(&mut run, "a process whose cgroup is gone");
    assert!(
        err.contains("cgroup") && err.contains("does not exist here"),
        "refuse_missing_cgroup: the error must name the cgroup: {err}"
    );
}

fn refuse_changed_file() {
    let mut run = c_dumped("file_mappings.c", "refuse_changed_file");
    // rewrite the privately mapped file: same size, other contents, a later mtime
    let f = run.dir.path().join("private.bin");
    let mut data = fs::read(&f).unwrap();
    for b in data.iter_mut() {
        *b = !*b;
    }
    thread::sleep(Duration::from_millis(20));
    fs::write(&f, &data).unwrap();
    let err = restore_must_fail(&mut run, "an image whose privately mapped file changed");
    assert!(
        err.contains("private.bin"),
        "refuse_changed_file: the error must name the changed file ({}); it was:\n{err}",
        f.display()
    );
}

/// A file the process had open has become a FIFO by restore time: the restore must fail,
/// naming it, not wait forever for a writer.
fn refuse_file_that_became_a_fifo() {
    let mut run = c_dumped("fds.c", "refuse_fifo");
    // (high.txt is open read-only: a blocking open of a FIFO that way waits for a writer)
    let f = run.dir.path().join("high.txt");
    fs::remove_file(&f).unwrap();
    let path = std::ffi::CString::new(f.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0, "mkfifo {}", f.display());
    let err = restore_must_fail(&mut run, "an image whose open file became a FIFO");
    assert!(
        err.contains("high.txt") && err.contains("FIFO"),
        "refuse_fifo: the error must name the file and say what it is now; it was:\n{err}"
    );
}

/// An image may only reach files its owner can open: the image of a root process whose
/// executable lives in a root-only (0700) directory, given to another owner (nobody), must
/// be refused — the restorer (root) could open that file, the owner cannot.
fn refuse_file_the_owner_cannot_open() {
    use std::os::unix::fs::PermissionsExt;
    let exe = compile_c("simple.c", "refuse_file_the_owner_cannot_open", &[]);
    let mut run = Run::new("refuse_file_the_owner_cannot_open", exe.clone());
    let private = run.dir.path().join("root-only");
    fs::create_dir_all(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    let copy = private.join("simple");
    fs::copy(&exe, &copy).unwrap();
    run.exe = copy.clone();
    assert!(run.start(&[]));
    run.dump(DUMP_TIMEOUT);
    // The same image, owned by nobody (65534).
    let bytes = fs::read(&run.img).unwrap();
    let (mut r, header) = telefork_image::ImageReader::new(&bytes[..]).unwrap();
    let mut process = r.process().unwrap();
    process.creds.uid = [65534; 4];
    process.creds.gid = [65534; 4];
    process.creds.groups = vec![];
    let mut w = telefork_image::ImageWriter::new(Vec::new(), &header).unwrap();
    w.write_process(&process).unwrap();
    while let Some(run) = r.next_pages().unwrap() {
        w.write_pages(run.addr, run.data).unwrap();
    }
    fs::write(&run.img, w.finish().unwrap()).unwrap();
    let err = restore_must_fail(&mut run, "an image owned by nobody that maps a root-only file");
    assert!(
        err.contains("Permission denied") && err.contains(&copy.display().to_string()),
        "refuse_file_the_owner_cannot_open: the error must name {} and say permission denied:\n{err}",
        copy.display()
    );
}

fn refuse_truncated_image() {
    let mut run = simple_dumped("refuse_truncated_image");
    let len = run.image_len();
    fs::OpenOptions::new().write(true).open(&run.img).unwrap().set_len(len / 2).unwrap();
    let err = restore_must_fail(&mut run, "a truncated image");
    assert!(
        err.to_lowercase().contains("truncat"),
        "refuse_truncated_image: message does not say truncated:\n{err}"
    );
}

fn refuse_corrupt_image() {
    let mut run = simple_dumped("refuse_corrupt_image");
    let mut data = fs::read(&run.img).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x40;
    fs::write(&run.img, &data).unwrap();
    let err = restore_must_fail(&mut run, "a corrupted image");
    let low = err.to_lowercase();
    assert!(
        low.contains("corrupt") || low.contains("checksum"),
        "refuse_corrupt_image: message does not say corrupt/checksum:\n{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// CLI modes

/// The dumped process's zombie holds its PID until its parent reaps it (here: this test, a
/// second after the restore started): the restore waits for it and keeps the PID.
fn pid_freed_by_a_late_reap() {
    let exe = compile_c("simple.c", "pid_freed_by_a_late_reap", &[]);
    let mut run = Run::new("pid_freed_by_a_late_reap", exe);
    assert!(run.start(&[]));
    let pid = run.target_pid();
    let (st, err) = run.dump_raw(&[], DUMP_TIMEOUT);
    assert!(st.success(), "pid_freed_by_a_late_reap: dump failed ({}):\n{err}", describe(&st));
    thread::sleep(Duration::from_millis(100));
    assert_eq!(proc_state(pid), Some('Z'), "pid_freed_by_a_late_reap: the target is not a zombie");
    let mut r = run.start_restore(&[]);
    thread::sleep(Duration::from_secs(1));
    assert!(run.target().wait_timeout(Duration::from_secs(5)).is_some(), "reaping the target");
    let st = r.wait_timeout(RESTORE_TIMEOUT);
    let (out, err) = drain(&r);
    assert!(
        st.is_some_and(|s| s.success()) && r.stdout_lines().iter().any(|l| l == "PASS"),
        "pid_freed_by_a_late_reap: the restored target did not PASS\n{out}\n{err}"
    );
    assert!(
        err.contains("same PID"),
        "pid_freed_by_a_late_reap: the restore did not keep PID {pid} once it was freed:\n{err}"
    );
}

fn leave_running() {
    let exe = compile_c("simple.c", "leave_running", &[]);
    let mut run = Run::new("leave_running", exe);
    assert!(run.start(&[]));
    let (st, err) = run.dump_raw(&["--leave-running"], DUMP_TIMEOUT);
    assert!(
        st.success(),
        "leave_running: telefork dump --leave-running failed ({}):\n{err}",
        describe(&st)
    );
    let pid = run.target_pid();
    thread::sleep(Duration::from_millis(100));
    if let Some(s) = run.target().try_wait() {
        panic!("leave_running: dump --leave-running ended the target ({})", describe(&s));
    }
    let state = proc_state(pid);
    assert!(
        matches!(state, Some('S') | Some('R')),
        "leave_running: original is in state {state:?} after the dump"
    );
    assert_eq!(tracer_pid(pid), Some(0), "leave_running: original still traced after the dump");
    // The original carries on and passes its own check ...
    fs::write(&run.go, b"go").unwrap();
    let t = run.target();
    let st = t.wait_timeout(Duration::from_secs(30));
    let rep = t.report();
    assert!(
        st.is_some_and(|s| s.success()) && t.stdout_lines().iter().any(|l| l == "PASS"),
        "leave_running: the original did not carry on after the dump\n{rep}"
    );
    // ... and, its PID free again, the image restores and passes too (go already exists).
    fs::remove_file(&run.go).unwrap();
    run.restore_and_check(RESTORE_TIMEOUT);
}

/// Fd 2 was inherited stdio (a pipe) at capture; the restoring command is started with its
/// fd 2 closed (Rust's runtime puts /dev/null there, which the process then inherits): the
/// restore goes on, the restored process's fd 2 is that /dev/null, and the process passes.
fn restore_without_an_inherited_stdio_fd() {
    let run = simple_dumped("restore_without_stderr");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg("exec \"$0\" restore \"$1\" 2>&-").arg(TELEFORK).arg(&run.img);
    let mut r = Proc::spawn(cmd, &run.guard);
    // The restored process, once it runs on its own (no tracer: the restore is done).
    let untraced = |p: i32| tracer_pid(p) == Some(0);
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    let restored = loop {
        let found = descendants(r.pid).into_iter().find(|&p| {
            fs::read_link(format!("/proc/{p}/exe")).ok().as_deref() == Some(run.exe.as_path())
                && untraced(p)
        });
        match found {
            Some(p) => break p,
            None if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            None => panic!("restore_without_stderr: no restored process appeared\n{}", r.report()),
        }
    };
    let fd2 = fs::read_link(format!("/proc/{restored}/fd/2")).ok();
    assert_eq!(
        fd2.as_deref(),
        Some(Path::new("/dev/null")),
        "restore_without_stderr: the restored process's fd 2\n{}",
        r.report()
    );
    fs::write(&run.go, b"go").unwrap();
    let st = r.wait_timeout(RESTORE_TIMEOUT);
    let rep = r.report();
    let st = st.unwrap_or_else(|| panic!("restore_without_stderr: the restore hung\n{rep}"));
    assert!(
        st.success() && r.stdout_lines().iter().any(|l| l == "PASS"),
        "restore_without_stderr: the restored target did not PASS ({})\n{rep}",
        describe(&st)
    );
}

fn restore_detach() {
    let run = simple_dumped("restore_detach");
    let mut cmd = Command::new(TELEFORK);
    cmd.arg("restore").arg(&run.img).arg("--detach");
    let mut r = Proc::spawn(cmd, &run.guard);
    let st = r.wait_timeout(RESTORE_TIMEOUT);
    let st = st.unwrap_or_else(|| {
        panic!("restore_detach: restore --detach did not return\n{}", r.report())
    });
    assert!(
        st.success(),
        "restore_detach: restore --detach failed ({})\n{}",
        describe(&st),
        r.report()
    );
    // The restored process keeps restore's stdout open, so read what is there, not to EOF.
    let end = Instant::now() + Duration::from_secs(5);
    while r.stdout_lines().is_empty() && Instant::now() < end {
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(200));
    let lines = r.stdout_lines();
    let last = lines.last().cloned().unwrap_or_default();
    let pid: i32 = last.trim().parse().unwrap_or_else(|_| {
        panic!("restore_detach: last stdout line is not a PID: {last:?}\n{}", r.report())
    });
    run.guard.track(pid);
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "restore_detach: PID {pid} does not exist"
    );
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
    assert_eq!(
        exe.as_deref(),
        Some(run.exe.as_path()),
        "restore_detach: PID {pid} is not the restored target"
    );
    fs::write(&run.go, b"go").unwrap();
    let got = r.wait_line(RESTORE_TIMEOUT, |l| l == "PASS" || l.starts_with("FAIL"));
    assert_eq!(
        got.as_deref(),
        Some("PASS"),
        "restore_detach: the detached process did not PASS\n{}",
        r.report()
    );
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end && !matches!(proc_state(pid), None | Some('Z')) {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(
        matches!(proc_state(pid), None | Some('Z')),
        "restore_detach: PID {pid} did not exit after PASS"
    );
}

fn names_number_works() {
    assert!(names_number("fd 5 is a pipe", 5));
    assert!(names_number("fd=5", 5));
    assert!(!names_number("fd 15", 5));
    assert!(!names_number("fd 51", 5));
}

// ---------------------------------------------------------------------------------------------
// the runner

/// Every test, by name.
const TESTS: &[(&str, fn())] = &[
    ("anon_memory", anon_memory),
    ("file_mappings", file_mappings),
    ("heap_brk", heap_brk),
    ("stack", stack),
    ("vdso", vdso),
    ("sparse", sparse),
    ("memory_with_and_without_userfaultfd", memory_with_and_without_userfaultfd),
    ("fpu_xstate", fpu_xstate),
    ("mm_fields", mm_fields),
    ("signals", signals),
    ("identity", identity),
    ("misc", misc),
    ("timers", timers),
    ("attrs", attrs),
    ("mem_flags", mem_flags),
    ("locks", locks),
    ("anon_fds", anon_fds),
    ("pipes", pipes),
    ("epoll", epoll),
    ("ghost", ghost),
    ("fifo", fifo),
    ("caps", caps),
    ("fds", fds),
    ("big_1g", big_1g),
    ("big_memory_in_huge_pages", big_memory_in_huge_pages),
    ("rust_target", rust_target),
    ("python3", python3),
    ("refuse_seccomp", refuse_seccomp),
    ("refuse_inotify", refuse_inotify),
    ("refuse_children", refuse_children),
    ("children_ignored", children_ignored),
    ("pid_freed_by_a_late_reap", pid_freed_by_a_late_reap),
    ("refuse_socket", refuse_socket),
    ("refuse_namespace", refuse_namespace),
    ("refuse_lease", refuse_lease),
    ("refuse_fd_before_setuid", refuse_fd_before_setuid),
    ("cgroup", cgroup),
    ("refuse_own_namespace", refuse_own_namespace),
    ("refuse_aliased_memory", refuse_aliased_memory),
    ("refuse_stale_epoll_entry", refuse_stale_epoll_entry),
    ("refuse_missing_cgroup", refuse_missing_cgroup),
    ("refuse_changed_file", refuse_changed_file),
    ("refuse_file_that_became_a_fifo", refuse_file_that_became_a_fifo),
    ("refuse_file_the_owner_cannot_open", refuse_file_the_owner_cannot_open),
    ("refuse_truncated_image", refuse_truncated_image),
    ("refuse_corrupt_image", refuse_corrupt_image),
    ("leave_running", leave_running),
    ("restore_without_an_inherited_stdio_fd", restore_without_an_inherited_stdio_fd),
    ("restore_detach", restore_detach),
    ("names_number_works", names_number_works),
];

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let trials = TESTS
        .iter()
        .map(|&(name, f)| {
            libtest_mimic::Trial::ignorable_test(name, move || {
                SKIPPED.with(|s| s.borrow_mut().take());
                f();
                Ok(match SKIPPED.with(|s| s.borrow_mut().take()) {
                    Some(why) => libtest_mimic::Completion::ignored_with(why),
                    None => libtest_mimic::Completion::Completed,
                })
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
