//! Integration tests of issue 3, "telefork across machines": a 3-node testbed (prefix `tft-`,
//! 10.79.0.0/24, state in /run/telefork-testbed-ci, so it cannot collide with a developer's
//! testbed), real node daemons (`telefork daemon`), and the probe program
//! (crates/telefork/examples/probe.rs, built by `cargo build --release --examples`) run on
//! the nodes as the non-root user `tftest`. Everything is checked from the outside: what the
//! probe prints, exit statuses, daemon logs, and the processes left on each node.
//!
//! Each scenario is a test of its own (`cargo test --test cluster -- limits` runs one;
//! `-- --list` names them all), run one after another on one testbed: this file has its own
//! `main` (`harness = false`, with libtest-mimic for libtest's arguments and output). The
//! testbed comes up when the first selected scenario starts and goes down when the last has
//! ended, also when scenarios fail or panic; a failing scenario prints the daemons' last log
//! lines, and what it left of the test user's processes is killed before the next one runs.
//! Needs root, iproute2 and the probe (CI has them): without them every scenario fails,
//! naming what is missing.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use telefork_testbed as tb;

const PREFIX: &str = "tft-";
const DIR: &str = "/run/telefork-testbed-ci";
const SUBNET: &str = "10.79.0.0";
const USER: &str = "tftest";

struct Ctx {
    dir: PathBuf,
    probe: PathBuf,
    uid: u32,
    gid: u32,
}

/// Takes the testbed down when the test ends, however it ends.
struct Down(PathBuf);
impl Drop for Down {
    fn drop(&mut self) {
        if let Err(e) = tb::down_prefixed(&self.0, PREFIX) {
            eprintln!("cleanup: testbed down: {e:#}");
        }
    }
}

fn s(a: &[&str]) -> Vec<String> {
    a.iter().map(|x| x.to_string()).collect()
}

// ---------------------------------------------------------------------------------------
// Running programs on nodes.

/// A finished program: status and output lines.
struct Run {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: Vec<String>,
    elapsed: Duration,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "status {} after {:?}", self.status, self.elapsed)?;
        writeln!(f, "--- stdout:")?;
        for l in &self.stdout {
            writeln!(f, "{l}")?;
        }
        writeln!(f, "--- stderr:")?;
        for l in &self.stderr {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }
}

impl Run {
    /// The rest of the first stdout line starting with `key ` (or equal to `key`).
    fn get(&self, key: &str) -> Option<&str> {
        get(&self.stdout, key)
    }
    fn has(&self, line: &str) -> bool {
        self.stdout.iter().any(|l| l == line)
    }
    fn want(&self, key: &str) -> &str {
        self.get(key).unwrap_or_else(|| panic!("no {key:?} line in the output:\n{self}"))
    }
}

fn get<'a>(lines: &'a [String], key: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| {
        if l == key {
            Some("")
        } else {
            l.strip_prefix(key).and_then(|r| r.strip_prefix(' '))
        }
    })
}

/// A program running on a node, its stdout/stderr read line by line as they come.
struct Running {
    child: Child,
    what: String,
    started: Instant,
    lines: Receiver<(Instant, String)>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    stdin: Option<std::process::ChildStdin>,
}

fn reader(
    r: impl std::io::Read + Send + 'static,
    sink: Arc<Mutex<Vec<String>>>,
    tx: Option<std::sync::mpsc::Sender<(Instant, String)>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            sink.lock().unwrap().push(line.clone());
            if let Some(tx) = &tx {
                let _ = tx.send((Instant::now(), line));
            }
        }
    })
}

/// Where a program's stdout/stderr go: pipes read by the test, or files.
enum Out {
    Pipes,
    Files(File, File),
}

impl Ctx {
    fn probe_cmd(&self, args: &[&str]) -> Vec<String> {
        let mut v = vec![self.probe.display().to_string()];
        v.extend(s(args));
        v
    }

    /// Starts the probe on NODE (as the test user unless `as_root`).
    fn spawn_probe(
        &self,
        node: &str,
        as_root: bool,
        args: &[&str],
        stdin: Stdio,
        out: Out,
    ) -> Running {
        let cmd = self.probe_cmd(args);
        self.spawn(node, if as_root { None } else { Some(USER) }, &cmd, stdin, out)
    }

    fn spawn(
        &self,
        node: &str,
        user: Option<&str>,
        cmd: &[String],
        stdin: Stdio,
        out: Out,
    ) -> Running {
        let mut c = tb::command(&self.dir, node, user, cmd)
            .unwrap_or_else(|e| panic!("command on {node}: {e:#}"));
        c.stdin(stdin);
        let piped = matches!(out, Out::Pipes);
        match out {
            Out::Pipes => {
                c.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
            Out::Files(o, e) => {
                c.stdout(o).stderr(e);
            }
        }
        let what = format!("{cmd:?} on {node} as {}", user.unwrap_or("root"));
        let mut child = c.spawn().unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let (tx, rx) = channel();
        let stdout = Arc::new(Mutex::new(vec![]));
        let stderr = Arc::new(Mutex::new(vec![]));
        let mut readers = vec![];
        if piped {
            readers.push(reader(child.stdout.take().unwrap(), stdout.clone(), Some(tx)));
            readers.push(reader(child.stderr.take().unwrap(), stderr.clone(), None));
        }
        let stdin = child.stdin.take();
        Running { child, what, started: Instant::now(), lines: rx, stdout, stderr, readers, stdin }
    }

    /// Runs the probe to completion (bounded by `timeout`).
    fn probe(&self, node: &str, args: &[&str], timeout: Duration) -> Run {
        self.spawn_probe(node, false, args, Stdio::null(), Out::Pipes).finish(timeout)
    }

    /// Runs a shell command on NODE (as root) to completion.
    fn sh(&self, node: &str, user: Option<&str>, script: &str, timeout: Duration) -> Run {
        self.spawn(node, user, &s(&["sh", "-c", script]), Stdio::null(), Out::Pipes).finish(timeout)
    }
}

impl Running {
    fn snapshot(&self) -> String {
        format!(
            "{}\n--- stdout so far:\n{}\n--- stderr so far:\n{}",
            self.what,
            self.stdout.lock().unwrap().join("\n"),
            self.stderr.lock().unwrap().join("\n")
        )
    }

    /// Waits for a stdout line starting with `prefix`; returns it and when it arrived.
    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> (Instant, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, l)) if l.starts_with(prefix) => return (t, l),
                Ok(_) => continue,
                Err(_) => {
                    self.kill();
                    panic!(
                        "no line starting with {prefix:?} within {timeout:?}: {}",
                        self.snapshot()
                    );
                }
            }
        }
    }

    fn kill(&mut self) {
        // The process we started (nsenter/setpriv exec the program: same PID).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the program to exit (killing it after `timeout`) and for its output.
    fn finish(mut self, timeout: Duration) -> Run {
        drop(self.stdin.take());
        let deadline = self.started + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("did not finish within {timeout:?}: {}", self.snapshot());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let elapsed = self.started.elapsed();
        for r in self.readers.drain(..) {
            // A grandchild holding the pipes open must not hang the test.
            let t = Instant::now();
            while !r.is_finished() && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let stdout = self.stdout.lock().unwrap().clone();
        let stderr = self.stderr.lock().unwrap().clone();
        Run { status, stdout, stderr, elapsed }
    }
}

// ---------------------------------------------------------------------------------------
// Looking at nodes from the outside.

fn proc_status_field(pid: i32, key: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| {
        l.strip_prefix(key).and_then(|r| r.strip_prefix(':')).map(|v| v.trim().to_string())
    })
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

fn children(pid: i32) -> Vec<i32> {
    all_pids().into_iter().filter(|&p| ppid(p) == Some(pid)).collect()
}

fn netns_of(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()
}

fn describe(pid: i32) -> String {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default();
    let state = proc_status_field(pid, "State").unwrap_or_default();
    format!("{pid} [{state}] {cmd}")
}

impl Ctx {
    fn node(&self, name: &str) -> tb::NodeInfo {
        tb::load(&self.dir).unwrap().nodes.into_iter().find(|n| n.name == name).unwrap()
    }

    /// Processes of the test user in NODE's network namespace.
    fn user_procs(&self, node: &str) -> Vec<i32> {
        let holder = self.node(node).holder_pid;
        let ns = netns_of(holder).unwrap_or_else(|| panic!("{node}'s holder {holder} is gone"));
        all_pids()
            .into_iter()
            .filter(|&p| {
                proc_status_field(p, "Uid")
                    .and_then(|u| u.split_whitespace().next().map(|u| u == self.uid.to_string()))
                    .unwrap_or(false)
                    && netns_of(p).as_ref() == Some(&ns)
            })
            .collect()
    }

    /// Waits (bounded) until the test user has no process left on NODE.
    fn assert_no_user_procs(&self, node: &str, timeout: Duration, when: &str) {
        let t = Instant::now();
        loop {
            let left = self.user_procs(node);
            if left.is_empty() {
                return;
            }
            if t.elapsed() > timeout {
                let d: Vec<String> = left.iter().map(|&p| describe(p)).collect();
                panic!(
                    "{when}: processes of {USER} still on {node} after {timeout:?}:\n{}",
                    d.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.join(node).join("daemon.log")).unwrap_or_default()
    }

    /// Kills (by PID) what a failed scenario left of the test user's processes on the nodes,
    /// so that the next scenario starts clean.
    fn kill_leftovers(&self) {
        for n in ["node1", "node2", "node3"] {
            for p in self.user_procs(n) {
                eprintln!("(killing leftover on {n}: {})", describe(p));
                sigkill(p);
            }
        }
    }

    /// All daemons running (a failed scenario may have left one stopped).
    fn ensure_daemons(&self) {
        for n in tb::load(&self.dir).unwrap().nodes {
            if n.daemon_pid == 0 {
                eprintln!("(restarting the daemon of {} left stopped)", n.name);
                tb::restart_daemon(&self.dir, &n.name)
                    .unwrap_or_else(|e| panic!("restarting {}: {e:#}", n.name));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The scenarios.

/// 1. A child on another node: runs there, with the memory it brought (also memory nobody may
///    read: PROT_NONE, which the process cannot hand over itself); exit code comes back.
fn fork_to_node(c: &Ctx) {
    let r = c.probe(
        "node1",
        &["fork", "node2", "--big-mb", "64", "--guarded-mb", "3", "--exit", "7"],
        Duration::from_secs(60),
    );
    assert!(r.status.success(), "probe failed:\n{r}");
    assert_eq!(r.want("parent host"), "node1", "{r}");
    assert_eq!(r.want("host"), "node2", "the child must run on node2:\n{r}");
    assert_eq!(r.want("child sum"), r.want("sum"), "the memory the child brought differs:\n{r}");
    assert_eq!(
        r.want("child guarded sum"),
        r.want("guarded sum"),
        "the PROT_NONE memory the child brought differs:\n{r}"
    );
    let id = r.want("id");
    let pid = r.want("pid");
    assert_eq!(
        id,
        format!("node2:{pid}"),
        "RemoteId must name node2 and the child's PID there:\n{r}"
    );
    assert_eq!(r.want("exit code"), "7", "{r}");
    assert!(r.has("parent ok"), "{r}");
    c.assert_no_user_procs("node2", Duration::from_secs(5), "after the child exited");
    c.assert_no_user_procs("node1", Duration::from_secs(5), "after the parent exited");
}

fn check_lines(n: usize, stdout: &[String], stderr: &[String], ctx: &str) {
    let got_out: Vec<&str> =
        stdout.iter().filter(|l| l.starts_with("line ")).map(String::as_str).collect();
    let got_err: Vec<&str> =
        stderr.iter().filter(|l| l.starts_with("line ")).map(String::as_str).collect();
    let want_out: Vec<String> =
        (0..n).filter(|i| i % 2 == 0).map(|i| format!("line {i}")).collect();
    let want_err: Vec<String> =
        (0..n).filter(|i| i % 2 == 1).map(|i| format!("line {i}")).collect();
    assert_eq!(got_out, want_out, "{ctx}: stdout lines (all, in order)");
    assert_eq!(got_err, want_err, "{ctx}: stderr lines (all, in order)");
}

/// 2. The child's stdout/stderr arrive at the parent's, complete and in order: pipes, files.
fn output(c: &Ctx) {
    const N: usize = 400;
    let n = N.to_string();
    let r = c.probe("node1", &["fork", "node2", "--lines", &n], Duration::from_secs(60));
    assert!(r.status.success() && r.has("parent ok"), "{r}");
    assert_eq!(r.want("exit code"), "0", "{r}");
    check_lines(N, &r.stdout, &r.stderr, &format!("pipes\n{r}"));

    let tmp = PathBuf::from(format!("/tmp/tft-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let (po, pe) = (tmp.join("out"), tmp.join("err"));
    let run = c.spawn_probe(
        "node1",
        false,
        &["fork", "node2", "--lines", &n, "--interval-ms", "1"],
        Stdio::null(),
        Out::Files(File::create(&po).unwrap(), File::create(&pe).unwrap()),
    );
    let r = run.finish(Duration::from_secs(60));
    let out: Vec<String> =
        std::fs::read_to_string(&po).unwrap().lines().map(String::from).collect();
    let err: Vec<String> =
        std::fs::read_to_string(&pe).unwrap().lines().map(String::from).collect();
    std::fs::remove_dir_all(&tmp).ok();
    let ctx = format!(
        "files: status {}\n--- out file:\n{}\n--- err file:\n{}",
        r.status,
        out.join("\n"),
        err.join("\n")
    );
    assert!(r.status.success(), "{ctx}");
    assert_eq!(get(&out, "exit code"), Some("0"), "{ctx}");
    assert!(out.iter().any(|l| l == "parent ok"), "{ctx}");
    check_lines(N, &out, &err, &ctx);
}

/// 3. The child's stdin: end-of-file at once by default, even if the parent's stdin stays
///    open with data waiting; with `pass_stdin` it gets the parent's stdin.
fn stdin(c: &Ctx) {
    let mut run = c.spawn_probe(
        "node1",
        false,
        &["fork", "node2", "--read-stdin"],
        Stdio::piped(),
        Out::Pipes,
    );
    run.stdin.as_mut().unwrap().write_all(b"not for the child\n").unwrap();
    // The parent's stdin stays open until the child has answered.
    let (_, l) = run.wait_line("stdin:", Duration::from_secs(30));
    assert_eq!(l, "stdin: eof", "{}", run.snapshot());
    let r = run.finish(Duration::from_secs(30));
    assert_eq!(r.want("exit code"), "0", "{r}");

    let mut run = c.spawn_probe(
        "node1",
        false,
        &["fork", "node2", "--read-stdin", "--pass-stdin"],
        Stdio::piped(),
        Out::Pipes,
    );
    run.stdin.as_mut().unwrap().write_all(b"hello child\n").unwrap();
    let r = run.finish(Duration::from_secs(30));
    assert_eq!(
        r.want("stdin:"),
        "12 bytes",
        "pass_stdin: the child must read the parent's stdin:\n{r}"
    );
    assert_eq!(r.want("exit code"), "0", "{r}");
}

/// 4. Kill: by the parent (SIGTERM) and by someone on the destination node (kill -9).
fn kill(c: &Ctx) {
    let r = c.probe(
        "node1",
        &["fork", "node2", "--sleep-ms", "30000", "--kill-after-ms", "500", "--kill-signal", "15"],
        Duration::from_secs(25),
    );
    assert!(r.has("sent signal 15"), "{r}");
    assert_eq!(r.want("exit signal"), "15", "wait must report SIGTERM:\n{r}");
    assert!(r.has("parent ok") && r.status.success(), "{r}");

    let mut run = c.spawn_probe(
        "node1",
        false,
        &["fork", "node2", "--sleep-ms", "30000"],
        Stdio::null(),
        Out::Pipes,
    );
    let (_, id) = run.wait_line("id ", Duration::from_secs(30));
    let pid: i32 = id
        .strip_prefix("id node2:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad id line {id:?}: {}", run.snapshot()));
    // It is the test user's process, and it lives on node2.
    assert_eq!(
        proc_status_field(pid, "Uid").and_then(|u| u.split_whitespace().next().map(String::from)),
        Some(c.uid.to_string()),
        "{}",
        describe(pid)
    );
    assert!(c.user_procs("node2").contains(&pid), "pid {pid} is not in node2: {}", describe(pid));
    let k = c.sh("node2", None, &format!("kill -9 {pid}"), Duration::from_secs(10));
    assert!(k.status.success(), "kill -9 on node2:\n{k}");
    let r = run.finish(Duration::from_secs(20));
    assert_eq!(r.want("exit signal"), "9", "wait must report SIGKILL:\n{r}");
    assert!(r.has("parent ok") && r.status.success(), "{r}");
    c.assert_no_user_procs("node2", Duration::from_secs(5), "after the kills");
}

/// 5. The child runs as the parent's user; root's telefork is refused, the parent goes on.
fn user(c: &Ctx) {
    let r = c.probe("node1", &["fork", "node2", "--print-uid"], Duration::from_secs(30));
    let parent = r.want("parent ids").to_string();
    let child = r.want("child ids").to_string();
    assert_eq!(child, parent, "the child's credentials differ from the parent's:\n{r}");
    assert!(
        parent.starts_with(&format!("uid={} gid={} ", c.uid, c.gid)),
        "the probe must run as {USER}:\n{r}"
    );
    assert_eq!(r.want("exit code"), "0", "{r}");

    let restored_before = c.log("node2").matches("restored process").count();
    let r = c
        .spawn_probe("node1", true, &["fork", "node2"], Stdio::null(), Out::Pipes)
        .finish(Duration::from_secs(30));
    let err = r.want("error").to_string();
    assert!(
        r.get("refused") == Some("node=node2 limit=limits.allow_root") && err.contains("root"),
        "the refusal must say root is not allowed on node2:\n{r}"
    );
    assert!(r.get("host").is_none(), "a child ran anyway:\n{r}");
    let last = r.stdout.last().map(String::as_str);
    assert_eq!(last, Some("parent ok"), "{r}");
    assert!(r.status.success(), "{r}");
    assert_eq!(
        c.log("node2").matches("restored process").count(),
        restored_before,
        "node2 restored a process of root"
    );
    // The refused child does not linger on node1 (as root: look at all root processes whose
    // parent is gone is too broad; the probe is gone, so any stopped probe would be an orphan).
    let stopped: Vec<String> = all_pids()
        .into_iter()
        .filter(|&p| proc_status_field(p, "State").is_some_and(|s| s.starts_with('T')))
        .filter(|&p| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == c.probe))
        .map(describe)
        .collect();
    assert!(stopped.is_empty(), "stopped probe processes left: {stopped:?}");
}

/// 6. remote() returns a value computed there; yoyo() comes back with state changed there.
fn remote_and_yoyo(c: &Ctx) {
    let r = c.probe("node1", &["remote", "node3"], Duration::from_secs(60));
    let line = r.want("remote").to_string();
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!(f.first().copied(), Some("host=node3"), "{r}");
    let sum = f.iter().find_map(|x| x.strip_prefix("sum=")).unwrap_or_else(|| panic!("{r}"));
    let expected =
        f.iter().find_map(|x| x.strip_prefix("expected=")).unwrap_or_else(|| panic!("{r}"));
    assert_eq!(sum, expected, "{r}");
    assert_eq!(sum, "500000500000", "{r}");
    assert!(r.status.success() && r.has("parent ok"), "{r}");

    let r = c.probe("node1", &["yoyo", "node2"], Duration::from_secs(60));
    assert_eq!(
        r.want("yoyo"),
        "visited=node2 counter=42 host=node1 expected_home=node1 same_pid=false",
        "yoyo must come back to node1 with what it did on node2:\n{r}"
    );
    assert!(r.status.success() && r.has("parent ok"), "{r}");
    c.assert_no_user_procs("node2", Duration::from_secs(5), "after yoyo");
    c.assert_no_user_procs("node1", Duration::from_secs(5), "after yoyo");
}

/// 7. A peer without a certificate: TLS without client cert, and plain garbage, are dropped.
fn peer_without_cert(c: &Ctx) {
    let node2 = c.node("node2");
    let addr = node2.addr;
    let before = c.log("node2");
    let rejected_before = before.matches("rejected connection").count();
    let restored_before = before.matches("restored process").count();

    let have_openssl =
        c.sh("node1", None, "command -v openssl", Duration::from_secs(10)).status.success();
    let mut expected = 1;
    if have_openssl {
        let r = c.sh(
            "node1",
            Some(USER),
            &format!("timeout 20 openssl s_client -connect {addr}:7077 -servername node2 </dev/null; echo rc $?"),
            Duration::from_secs(30),
        );
        let rc = r.want("rc");
        assert_ne!(rc, "124", "openssl s_client was not disconnected within 20 s:\n{r}");
        expected += 1;
    } else {
        eprintln!("(openssl missing: only the garbage peer is tried)");
    }
    // Plain TCP, garbage: the daemon must close the connection (cat sees EOF or a reset).
    // (/dev/tcp is a bash feature.)
    let script = format!("exec 3<>/dev/tcp/{addr}/7077 || exit 3; printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3; timeout 20 cat <&3 >/dev/null; echo rc $?");
    let r = c
        .spawn("node1", Some(USER), &s(&["bash", "-c", &script]), Stdio::null(), Out::Pipes)
        .finish(Duration::from_secs(30));
    let rc = r.want("rc");
    assert_ne!(rc, "124", "the daemon kept a garbage connection open for 20 s:\n{r}");

    let t = Instant::now();
    let log = loop {
        let log = c.log("node2");
        if log.matches("rejected connection").count() >= rejected_before + expected
            || t.elapsed() > Duration::from_secs(5)
        {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let new = &log[before.len().min(log.len())..];
    assert_eq!(
        log.matches("rejected connection").count(),
        rejected_before + expected,
        "node2's log must say 'rejected connection' for each peer; new log:\n{new}"
    );
    assert_eq!(
        log.matches("restored process").count(),
        restored_before,
        "node2 restored something:\n{new}"
    );
    assert!(c.user_procs("node2").is_empty(), "processes of {USER} on node2");
    // The daemon is still alive and serves real nodes.
    let r = c.probe("node1", &["fork", "node2"], Duration::from_secs(30));
    assert_eq!(r.want("exit code"), "0", "node2 no longer works after the bad peers:\n{r}");
}

/// SIGKILL to pid.
fn sigkill(pid: i32) {
    // SAFETY: plain kill(2) of a PID we identified as the daemon or one of its sessions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// 8. The destination daemon and its sessions killed mid-transfer of a 1 GiB process:
///    telefork fails in bounded time, the parent goes on, nothing is left on either node. Done
///    twice: a plain telefork (the error comes from `telefork`), and `Options::background`
///    (telefork returns once accepted; the error comes from `started`).
fn dest_killed_mid_transfer(c: &Ctx) {
    kill_dest_mid_transfer(c, false);
    kill_dest_mid_transfer(c, true);
}

fn kill_dest_mid_transfer(c: &Ctx, background: bool) {
    let mode = if background { "background" } else { "plain" };
    let daemon = c.node("node2").daemon_pid;
    assert!(daemon > 0);
    let sessions_before: HashSet<i32> = children(daemon).into_iter().collect();
    let mut args = vec!["fork", "node2", "--big-mb", "1024", "--sleep-ms", "2000"];
    if background {
        args.push("--background");
    }
    let mut run = c.spawn_probe("node1", false, &args, Stdio::null(), Out::Pipes);
    let (t0, _) = run.wait_line("teleforking", Duration::from_secs(60));
    // Wait for the destination session of this transfer, then kill ~150 ms in; if the
    // session has not yet made the process it restores into, wait (bounded) for that, so
    // that a half-restored process exists when the session dies.
    let mut session: Vec<i32>;
    loop {
        session = children(daemon).into_iter().filter(|p| !sessions_before.contains(p)).collect();
        let restoring = session.iter().any(|&s| !children(s).is_empty());
        if (restoring && t0.elapsed() >= Duration::from_millis(150))
            || (!session.is_empty() && t0.elapsed() > Duration::from_secs(3))
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            run.kill();
            panic!(
                "{mode}: no session process appeared under node2's daemon {daemon} within 10 s: {}",
                run.snapshot()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sessions = children(daemon);
    let restorees: Vec<String> = session.iter().flat_map(|&s| children(s)).map(describe).collect();
    sigkill(daemon);
    for &s in &sessions {
        sigkill(s);
    }
    let killed_at = Instant::now();
    eprintln!("{mode}: killed node2's daemon {daemon} and sessions {sessions:?} (this transfer's: {session:?}) {:?} after 'teleforking'; being restored then: {restorees:?}", killed_at - t0);
    let r = run.finish(Duration::from_secs(90));
    assert!(
        r.stdout.last().map(String::as_str) == Some("parent ok"),
        "{mode}: the parent did not go on:\n{r}"
    );
    assert!(
        r.get("host").is_none() && r.get("id").is_none(),
        "{mode}: the transfer cannot have succeeded:\n{r}"
    );
    let elapsed_ms: u64 = r.want("elapsed_ms").parse().unwrap();
    if background {
        assert_eq!(
            r.want("accepted"),
            "node2",
            "{mode}: telefork must return once node2 accepted:\n{r}"
        );
        assert!(
            r.get("error started:").is_some(),
            "{mode}: started() must fail when the destination dies mid-transfer:\n{r}"
        );
    } else {
        assert!(
            r.get("error").is_some(),
            "{mode}: telefork must fail when the destination dies mid-transfer:\n{r}"
        );
        assert!(elapsed_ms < 30_000, "{mode}: telefork took {elapsed_ms} ms to fail:\n{r}");
    }
    let after_kill = killed_at.elapsed();
    assert!(
        after_kill < Duration::from_secs(30),
        "{mode}: the parent needed {after_kill:?} after the kill:\n{r}"
    );
    assert!(r.status.success(), "{r}");
    eprintln!(
        "{mode}: telefork returned after {elapsed_ms} ms; probe done {after_kill:?} after the kill"
    );
    c.assert_no_user_procs(
        "node2",
        Duration::from_secs(10),
        &format!("{mode}: after the destination died mid-transfer"),
    );
    c.assert_no_user_procs(
        "node1",
        Duration::from_secs(10),
        &format!("{mode}: after the failed telefork (the stopped local child)"),
    );
    tb::kill_daemon(&c.dir, "node2").unwrap();
    tb::restart_daemon(&c.dir, "node2").unwrap_or_else(|e| panic!("restarting node2: {e:#}"));
    let r = c.probe("node1", &["fork", "node2"], Duration::from_secs(30));
    assert_eq!(r.want("exit code"), "0", "node2 after its restart:\n{r}");
}

/// 9. Destination down: an error, quickly, naming the node.
fn dest_down(c: &Ctx) {
    tb::kill_daemon(&c.dir, "node3").unwrap();
    let r = c.probe("node1", &["fork", "node3"], Duration::from_secs(30));
    let restart = tb::restart_daemon(&c.dir, "node3");
    let err = r.want("error").to_string();
    let names_node =
        err.contains("node3") || err.contains(&format!("{}:7077", c.node("node3").addr));
    assert!(
        names_node && err.contains("connect") && r.get("kind") == Some("unreachable node=node3"),
        "the error must name node3 (or its address) and the connection:\n{r}"
    );
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}:\n{r}", r.elapsed);
    assert!(r.has("parent ok") && r.status.success(), "{r}");
    c.assert_no_user_procs("node1", Duration::from_secs(5), "after the failed telefork");
    restart.unwrap_or_else(|e| panic!("restarting node3: {e:#}"));
    let r = c.probe("node1", &["fork", "node3"], Duration::from_secs(30));
    assert_eq!(r.want("exit code"), "0", "node3 after its restart:\n{r}");
}

/// 10. Restarting the destination's daemon leaves its running children (and their relays) be.
fn daemon_restart_keeps_children(c: &Ctx) {
    let old = c.node("node2").daemon_pid;
    let mut run = c.spawn_probe(
        "node1",
        false,
        &["fork", "node2", "--lines", "30", "--interval-ms", "100"],
        Stdio::null(),
        Out::Pipes,
    );
    run.wait_line("line 2", Duration::from_secs(30));
    tb::restart_daemon(&c.dir, "node2").unwrap_or_else(|e| panic!("restarting node2: {e:#}"));
    let new = c.node("node2").daemon_pid;
    assert!(new > 0 && new != old, "node2's daemon was not restarted ({old} -> {new})");
    let r = run.finish(Duration::from_secs(30));
    assert!(r.get("line 28").is_some(), "the child's output stopped with the daemon:\n{r}");
    check_lines(30, &r.stdout, &r.stderr, &format!("{r}"));
    assert_eq!(r.want("exit code"), "0", "{r}");
}

/// Restores a node's config (and restarts its daemon) when dropped.
struct RestoreConfig<'a> {
    c: &'a Ctx,
    node: &'static str,
    text: String,
}
impl Drop for RestoreConfig<'_> {
    fn drop(&mut self) {
        std::fs::write(self.c.dir.join(self.node).join("node.toml"), &self.text).ok();
        if let Err(e) = tb::restart_daemon(&self.c.dir, self.node) {
            eprintln!("restoring {}'s config: {e:#}", self.node);
        }
    }
}

/// 11. max_restores_per_user = 1: a second concurrent telefork to the node is refused.
fn limits(c: &Ctx) {
    let path = c.dir.join("node3").join("node.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let _restore = RestoreConfig { c, node: "node3", text };
    let mut cfg = telefork_node::config::Config::load(&path).unwrap();
    cfg.limits.max_restores_per_user = 1;
    std::fs::write(&path, cfg.to_toml()).unwrap();
    tb::restart_daemon(&c.dir, "node3").unwrap_or_else(|e| panic!("restarting node3: {e:#}"));

    let mut first = c.spawn_probe(
        "node1",
        false,
        &["fork", "node3", "--sleep-ms", "4000"],
        Stdio::null(),
        Out::Pipes,
    );
    first.wait_line("id node3:", Duration::from_secs(30));
    let r = c.probe("node2", &["fork", "node3"], Duration::from_secs(30));
    let err = r.want("error").to_string();
    assert!(
        r.get("refused") == Some("node=node3 limit=limits.max_restores_per_user")
            && err.contains("node3"),
        "the refusal must name the limit:\n{r}"
    );
    assert!(r.get("host").is_none() && r.has("parent ok") && r.status.success(), "{r}");
    let r1 = first.finish(Duration::from_secs(30));
    assert_eq!(r1.want("exit code"), "0", "the first child:\n{r1}");
    // Once the first is gone, there is room again.
    let r = c.probe("node2", &["fork", "node3"], Duration::from_secs(30));
    assert_eq!(r.want("exit code"), "0", "after the first child ended:\n{r}");

    // The largest image: 16 MiB on node3; a process of 64 MiB is refused before it is sent.
    let mut cfg = telefork_node::config::Config::load(&path).unwrap();
    cfg.limits.max_image_bytes = 16 << 20;
    std::fs::write(&path, cfg.to_toml()).unwrap();
    tb::restart_daemon(&c.dir, "node3").unwrap_or_else(|e| panic!("restarting node3: {e:#}"));
    let r = c.probe("node1", &["fork", "node3", "--big-mb", "64"], Duration::from_secs(30));
    let err = r.want("error").to_string();
    assert!(
        r.get("refused") == Some("node=node3 limit=limits.max_image_bytes")
            && err.contains("exceeds"),
        "the refusal must name the size limit:\n{r}"
    );
    assert!(r.get("host").is_none() && r.has("parent ok") && r.status.success(), "{r}");
}

/// 12. transport.image = "plain" on node1 and node2: the memory travels unencrypted (and is
///     written onto the socket by the frozen process itself) and arrives intact, PROT_NONE memory
///     too (read by the daemon instead), and changed pages of a read-only mapping (placed by the
///     restorer): received by the new process itself (node2 set to do so for any size), and
///     read and placed by the restorer (node2's default for images up to 2 GiB); node3, still
///     "tls", refuses it.
fn plain_transport(c: &Ctx) {
    let default_min = telefork_node::config::Transport::default().self_receive_min_bytes;
    let plain = |n: &str, min: u64| {
        tb::reconfigure(&c.dir, n, |cfg| {
            cfg.transport.image = telefork_node::config::ImageTransport::Plain;
            cfg.transport.self_receive_min_bytes = min;
        })
    };
    let tls = |n: &str| {
        tb::reconfigure(&c.dir, n, |cfg| {
            cfg.transport = telefork_node::config::Transport::default()
        })
    };
    struct Back<'a>(&'a dyn Fn(&str) -> anyhow::Result<()>);
    impl Drop for Back<'_> {
        fn drop(&mut self) {
            for n in ["node1", "node2"] {
                if let Err(e) = (self.0)(n) {
                    eprintln!("putting {n} back on tls: {e:#}");
                }
            }
        }
    }
    let _back = Back(&tls);
    // The line node2's daemon logs for the process the probe's child is.
    let restored_line = |r: &Run| {
        let restored = format!("restored process {} of user", r.want("pid"));
        let log = c.log("node2");
        log.lines()
            .rev()
            .find(|l| l.contains(&restored))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no {restored:?} in node2's log:\n{log}"))
    };
    plain("node1", default_min).unwrap_or_else(|e| panic!("{e:#}"));
    for (min, big) in [(0, "256"), (default_min, "64")] {
        plain("node2", min).unwrap_or_else(|e| panic!("{e:#}"));
        let r = c.probe(
            "node1",
            &[
                "fork",
                "node2",
                "--big-mb",
                big,
                "--guarded-mb",
                "3",
                "--poked-pages",
                "3",
                "--exit",
                "5",
            ],
            Duration::from_secs(120),
        );
        assert_eq!(r.want("host"), "node2", "{r}");
        assert_eq!(r.want("child sum"), r.want("sum"), "memory sent in plain differs:\n{r}");
        assert_eq!(
            r.want("child guarded sum"),
            r.want("guarded sum"),
            "PROT_NONE memory sent in plain differs:\n{r}"
        );
        assert_eq!(
            r.want("child poked sum"),
            r.want("poked sum"),
            "changed pages of a read-only mapping sent in plain differ:\n{r}"
        );
        assert_eq!(r.want("exit code"), "5", "{r}");
        // (The way it went: not the fallback where the socket cannot be passed, which would
        // pass the above too.)
        let line = restored_line(&r);
        assert_eq!(line.ends_with("(it received its pages itself)"), min == 0, "{line}");
        // A small process (no userfaultfd: its pages are faulted in by its own reads).
        let r = c.probe(
            "node1",
            &["fork", "node2", "--poked-pages", "2", "--exit", "6"],
            Duration::from_secs(60),
        );
        assert_eq!((r.want("host"), r.want("exit code")), ("node2", "6"), "{r}");
        assert_eq!(r.want("child poked sum"), r.want("poked sum"), "{r}");
        assert_eq!(restored_line(&r).ends_with("(it received its pages itself)"), min == 0, "{r}");
    }
    let r = c.probe("node1", &["fork", "node3"], Duration::from_secs(60));
    let err = r.want("error").to_string();
    assert!(
        r.get("refused") == Some("node=node3 limit=transport.image") && err.contains("encrypted"),
        "node3 (tls) must refuse a plain image:\n{r}"
    );
    assert!(r.has("parent ok"), "{r}");
}

/// 13. Once a child has ended, its daemon keeps the connection to that child's node for the
///     next telefork: the second of two teleforks uses it; and when the destination has
///     dropped it meanwhile (its idle session killed here), the telefork connects anew and
///     still works. A child whose program's stdin is relayed gives no connection back: the
///     next telefork goes through the spare connection, whose new session connected to
///     that node ahead of time.
fn prepared_connections(c: &Ctx) {
    let count = |log: &str, what: &str| {
        log.lines().filter(|l| l.contains("now runs on node2") && l.contains(what)).count()
    };
    let before = count(&c.log("node1"), "(prepared connection;");
    let r = c.probe("node1", &["series", "node2", "300", "2"], Duration::from_secs(60));
    assert_eq!(r.want("first exit"), "11", "{r}");
    assert_eq!(r.want("second exit"), "12", "{r}");
    assert!(r.has("parent ok") && r.get("error").is_none(), "{r}");
    let used = count(&c.log("node1"), "(prepared connection;") - before;
    assert!(
        used >= 1,
        "the second telefork did not use the prepared connection; node1's log:\n{}",
        c.log("node1")
    );

    // With stdin relayed: two origin sessions, the second one's connection made ahead.
    let runs_before = c.log("node1").lines().filter(|l| l.contains("now runs on node2")).count();
    let r =
        c.probe("node1", &["series", "node2", "300", "2", "--pass-stdin"], Duration::from_secs(60));
    assert_eq!(r.want("second exit"), "12", "{r}");
    assert_eq!(r.want("second child:"), "memory ok stdin eof", "{r}");
    let log = c.log("node1");
    let runs: Vec<&str> =
        log.lines().filter(|l| l.contains("now runs on node2")).skip(runs_before).collect();
    let session = |l: &str| {
        l.split("telefork-daemon[").nth(1).and_then(|r| r.split(']').next()).map(str::to_string)
    };
    assert_eq!(runs.len(), 2, "two teleforks expected in node1's log:\n{log}");
    assert_ne!(
        session(runs[0]),
        session(runs[1]),
        "a relayed-stdin connection was handed back; node1's log:\n{log}"
    );
    assert!(
        runs[1].contains("(prepared connection;"),
        "the spare connection's session did not connect ahead; node1's log:\n{log}"
    );

    // The prepared connection gone: kill node2's idle sessions during the pause.
    let gone_before = c.log("node1").matches("; connecting anew").count();
    let daemon = c.node("node2").daemon_pid;
    let mut run =
        c.spawn_probe("node1", false, &["series", "node2", "1500", "2"], Stdio::null(), Out::Pipes);
    run.wait_line("paused", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500)); // (the kept connection, its next stub made)
                                                    // An idle session holds only the process it prepared to restore into (stopped under
                                                    // its ptrace); a busy one, a restored process that runs (and the next prepared one).
    let traced = |p: i32| proc_status_field(p, "State").is_some_and(|s| s.starts_with('t'));
    let idle: Vec<i32> =
        children(daemon).into_iter().filter(|&s| children(s).into_iter().all(traced)).collect();
    assert!(!idle.is_empty(), "no idle session on node2 to kill (was the connection prepared?)");
    let stubs: Vec<i32> = idle.iter().flat_map(|&s| children(s)).collect();
    assert!(!stubs.is_empty(), "the idle sessions on node2 prepared no process to restore into");
    for s in &idle {
        sigkill(*s);
    }
    // Their prepared processes die with them (PTRACE_O_EXITKILL): nothing left behind.
    // (A dead one may stay a zombie of whoever inherited it.)
    let alive = |p: &i32| {
        proc_status_field(*p, "State").is_some_and(|s| !s.starts_with('Z') && !s.starts_with('X'))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while stubs.iter().any(alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<String> = stubs.iter().filter(|p| alive(p)).map(|&p| describe(p)).collect();
    assert!(left.is_empty(), "prepared processes outlived their killed sessions: {left:?}");
    let (_, second) = run.wait_line("second exit", Duration::from_secs(60));
    assert_eq!(second, "second exit 12", "{}", run.snapshot());
    let gone = c.log("node1").matches("; connecting anew").count() - gone_before;
    assert!(
        gone >= 1,
        "node1 did not notice the prepared connection was gone:\n{}",
        c.log("node1")
    );
}

/// 14. Fan-out: one program starts a child on each of several nodes before it waits for any
///     (default and background teleforks). Each later child leaves the earlier handles'
///     daemon connections and pidfds behind (the capture would refuse them); each child
///     checks the memory it brought, that its copies of the earlier handles refuse to act,
///     and that dropping them does not close a file of its own that took their fd number.
fn fan_out(c: &Ctx) {
    for mode in [None, Some("--background")] {
        let mut args = vec!["fanout", "node2,node3,node2,node3"];
        args.extend(mode);
        let r = c.probe("node1", &args, Duration::from_secs(60));
        for i in 0..4 {
            assert_eq!(
                r.want(&format!("child {i} exit")),
                (20 + i).to_string(),
                "mode {mode:?}:\n{r}"
            );
        }
        assert!(
            r.has("parent ok") && r.get("error").is_none() && r.status.success(),
            "mode {mode:?}:\n{r}"
        );
        c.assert_no_user_procs("node1", Duration::from_secs(5), "after the fan-out");
    }
}

/// 15. One session on each side serves a program's teleforks one after another: once a child
///     has ended, the program hands its connection back and the same origin session serves
///     the next telefork, over the same connection to the same destination session (which
///     restores all three); each child checks its memory and stdio — the third is the first
///     a destination session restores into a fork of its stub template, so a broken fork
///     shows here (checked by breaking its stdio); when the program ends, so do both
///     sessions (nothing left behind on either node).
fn session_reuse(c: &Ctx) {
    // The session PIDs of the log lines that contain `what`.
    let sessions_of = |log: &str, what: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(what))
            .filter_map(|l| {
                l.split("telefork-daemon[")
                    .nth(1)
                    .and_then(|r| r.split(']').next())
                    .map(str::to_string)
            })
            .collect()
    };
    let (sent, restored) = ("now runs on node2", "from node1");
    let before =
        (sessions_of(&c.log("node1"), sent).len(), sessions_of(&c.log("node2"), restored).len());
    let r = c.probe("node1", &["series", "node2", "100", "3"], Duration::from_secs(60));
    assert_eq!(r.want("first exit"), "11", "{r}");
    assert_eq!(r.want("second exit"), "12", "{r}");
    assert_eq!(r.want("third exit"), "13", "{r}");
    assert!(r.has("parent ok") && r.get("error").is_none(), "{r}");
    for what in ["first", "second", "third"] {
        assert_eq!(r.want(&format!("{what} child:")), "memory ok stdin eof", "{r}");
        assert!(
            r.stderr.iter().any(|l| l == &format!("{what} child on stderr")),
            "the {what} child's stderr did not come home:\n{r}"
        );
    }
    for (node, what, skip, side) in
        [("node1", sent, before.0, "origin"), ("node2", restored, before.1, "destination")]
    {
        let log = c.log(node);
        let sessions: Vec<String> = sessions_of(&log, what).into_iter().skip(skip).collect();
        assert_eq!(sessions.len(), 3, "three teleforks expected in {node}'s log:\n{log}");
        assert!(sessions.iter().all(|s| *s == sessions[0]), "the later teleforks were not served by the first one's {side} session; {node}'s log:\n{log}");
    }
    // The program is gone: its sessions end too (neither waits for another request).
    for node in ["node1", "node2"] {
        let left = sessions_left(c, node, Instant::now() + Duration::from_secs(5));
        assert!(left.is_empty(), "sessions outlived their program on {node}: {left:?}");
    }
}

/// The sessions (children of its daemon) still on `node` once there are none or `deadline`
/// has passed, described.
fn sessions_left(c: &Ctx, node: &str, deadline: Instant) -> Vec<String> {
    let daemon = c.node(node).daemon_pid;
    while !children(daemon).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    children(daemon).into_iter().map(describe).collect()
}

/// 16. A handle dropped while its child runs lets its origin session end once the child has ended,
///     even if the program keeps the handle whose connection it was given back: that handle
///     let go of it (had it kept a copy, the origin session would not see the hang-up and
///     would wait up to 30 s for a word after the child's end).
fn dropped_handle_ends_its_session(c: &Ctx) {
    let mut run =
        c.spawn_probe("node1", false, &["drop-next", "node2", "11000"], Stdio::null(), Out::Pipes);
    run.wait_line("first exit 11", Duration::from_secs(30));
    let (dropped, _) = run.wait_line("dropped", Duration::from_secs(30));
    // The second child runs 1 s; its sessions then end, long before the program does.
    let left = sessions_left(c, "node1", dropped + Duration::from_secs(8));
    let ended_after = dropped.elapsed();
    let r = run.finish(Duration::from_secs(40));
    assert!(left.is_empty(), "the origin session outlived its dropped handle's child by {ended_after:?} while the program still held the first handle: {left:?}\n{r}");
    assert!(r.has("parent ok") && r.get("error").is_none(), "{r}");
}

// ---------------------------------------------------------------------------------------
// Attacks (issue 18): what a peer without a certificate, a local user or a burst can do.

/// A python3 script run as root on NODE in the background; stopped (by its PID) on drop.
struct Background(Running);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.kill();
    }
}

impl Ctx {
    fn python(&self, node: &str, script: &str) -> Running {
        self.spawn(node, None, &s(&["python3", "-u", "-c", script]), Stdio::null(), Out::Pipes)
    }

    fn listen_addr(&self, node: &str) -> std::net::SocketAddr {
        telefork_node::config::Config::load(&self.dir.join(node).join("node.toml")).unwrap().listen
    }

    /// Session processes of NODE's daemon (its children).
    fn sessions(&self, node: &str) -> usize {
        children(self.node(node).daemon_pid).len()
    }
}

/// 17. A peer without a certificate — a user on node1, so from the very address node1's
///     daemon connects from — opens 600 connections to node2 (more than may wait from one
///     source) and re-opens each as it is
///     closed: node2 makes no process for them, and serves node1's telefork and its own
///     programs meanwhile.
fn unauthenticated_flood(c: &Ctx) {
    let target = c.listen_addr("node2");
    let before = c.sessions("node2");
    let target = target.to_string();
    let mut flood = Background(c.spawn_probe(
        "node1",
        false,
        &["flood", &target, "600", "60"],
        Stdio::null(),
        Out::Pipes,
    ));
    flood.0.wait_line("flooding", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    let during = c.sessions("node2").saturating_sub(before);
    let r = c.probe("node1", &["fork", "node2", "--exit", "5"], Duration::from_secs(40));
    assert_eq!(r.get("exit code"), Some("5"), "node1's telefork into node2 during the flood:\n{r}");
    let r = c.probe("node2", &["fork", "node1", "--exit", "6"], Duration::from_secs(40));
    assert_eq!(r.get("exit code"), Some("6"), "node2's own program during the flood:\n{r}");
    drop(flood);
    assert!(
        during <= 2,
        "node2 made {during} session processes for connections that never authenticated"
    );
    eprintln!("flood: 600 unauthenticated connections from node1's address held on node2; {during} sessions meanwhile; both teleforks served");
}

/// 18. A local user opens 300 idle connections to node1's daemon, asking each for a
///     connection to node2 made ahead of time (`Prepare`) and trickling nothing more: at
///     most `max_sessions_per_user` sessions on node1 (and connections to node2), the rest
///     wait without a process or are refused naming the limit; another user's telefork from
///     node1 to node2 is served meanwhile.
fn idle_local_flood(c: &Ctx) {
    let limits = telefork_node::config::Limits::default();
    let before = (c.sessions("node1"), c.sessions("node2"));
    let script = r#"
import socket, time
# A hello (protocol version 1), then LocalRequest::Prepare { dest: "node2" }: each a u32
# length, then the body (the hello's magic and version; postcard: variant 3, string).
prepare = bytes([8, 0, 0, 0, 0xff]) + b"TFK" + bytes([1, 0, 0, 0, 7, 0, 0, 0, 3, 5]) + b"node2"
conns = []
for i in range(300):
    s = socket.socket(socket.AF_UNIX)
    s.connect("/run/telefork/daemon.sock")
    s.sendall(prepare)
    conns.append(s)
print("holding", flush=True)
time.sleep(3)
refused = 0
for s in conns:
    try:
        d = s.recv(4096, socket.MSG_DONTWAIT)
        if b"max_waiting_per_user" in d: refused += 1
    except BlockingIOError:
        pass
print("refused", refused, flush=True)
time.sleep(60)
"#;
    let mut flood = Background(c.python("node1", script));
    flood.0.wait_line("holding", Duration::from_secs(20));
    let (_, refused) = flood.0.wait_line("refused", Duration::from_secs(20));
    let refused: usize = refused.trim_start_matches("refused ").parse().unwrap();
    let (node1_sessions, node2_sessions) = (
        c.sessions("node1").saturating_sub(before.0),
        c.sessions("node2").saturating_sub(before.1),
    );
    let r = c.probe("node1", &["fork", "node2", "--exit", "4"], Duration::from_secs(40));
    assert_eq!(
        r.get("exit code"),
        Some("4"),
        "another user's telefork while root holds 300 idle connections:\n{r}"
    );
    drop(flood);
    let expect_refused =
        300 - (limits.max_sessions_per_user + limits.max_waiting_per_user) as usize;
    assert_eq!(refused, expect_refused, "connections beyond the waiting limit must be told so");
    assert!(
        node1_sessions <= limits.max_sessions_per_user as usize + 2,
        "node1 runs {node1_sessions} sessions for one user's idle connections"
    );
    assert!(
        node2_sessions <= limits.max_sessions_per_user as usize + 2,
        "node2 runs {node2_sessions} sessions for one user's prepared connections"
    );
    eprintln!("idle flood: 300 connections; sessions node1 {node1_sessions}, node2 {node2_sessions}; {refused} refused naming the limit; another user served");
}

/// 19. 200 teleforks into node2 at once (one user's 200 processes on node1): each succeeds or
///     is refused naming a limit — none fails by accident (handshake timeouts, resets).
fn burst(c: &Ctx) {
    let t = Instant::now();
    let r = c.probe("node1", &["burst", "node2", "200", "300"], Duration::from_secs(240));
    let lines: Vec<&String> =
        r.stdout.iter().filter(|l| l.starts_with("burst ") && *l != "burst done").collect();
    let ok = lines.iter().filter(|l| l.as_str() == "burst ok").count();
    let refused: Vec<&&String> = lines.iter().filter(|l| l.starts_with("burst refused ")).collect();
    let failed: Vec<&&String> = lines.iter().filter(|l| l.starts_with("burst error")).collect();
    assert!(r.has("burst done") && lines.len() == 200, "every one of the 200 must report:\n{r}");
    let admission: Vec<String> = ["node1", "node2"]
        .iter()
        .flat_map(|n| {
            c.log(n)
                .lines()
                .filter(|l| {
                    l.contains("in the last")
                        || l.contains("rejected")
                        || l.contains("refused a connection")
                })
                .map(|l| format!("{n}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 200 failed by accident (not a limit):\n{}\nthe daemons on admission:\n{}",
        failed.len(),
        failed.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n"),
        admission.join("\n")
    );
    assert!(
        refused.iter().all(|l| l.starts_with("burst refused limits.")),
        "a refusal must name the limit: {refused:?}"
    );
    assert!(ok >= 16, "only {ok} of 200 succeeded");
    eprintln!("burst: 200 concurrent teleforks node1 -> node2: {ok} ok, {} refused by a limit, 0 failed, in {:?}", refused.len(), t.elapsed());
}

/// 20. The destination's session is killed while its child runs: the child dies with it
///     (nobody could wait for it), and the parent hears that it lost track of it.
fn killed_session(c: &Ctx) {
    let mut run = c.spawn_probe(
        "node1",
        false,
        &["fork", "node2", "--sleep-ms", "30000"],
        Stdio::null(),
        Out::Pipes,
    );
    let (_, id) = run.wait_line("id node2:", Duration::from_secs(30));
    let pid: i32 = id.rsplit(':').next().unwrap().parse().unwrap();
    let session = ppid(pid).expect("the remote child's session");
    assert_eq!(
        ppid(session),
        Some(c.node("node2").daemon_pid),
        "{pid}'s parent {session} is not a session of node2's daemon"
    );
    sigkill(session);
    c.assert_no_user_procs("node2", Duration::from_secs(3), "after its session was killed");
    let said = format!("session {session} (serving node node1) was killed by SIGKILL");
    let t = Instant::now();
    while !c.log("node2").contains(&said) && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(c.log("node2").contains(&said), "node2's log must say {said:?}");
    let r = run.finish(Duration::from_secs(30));
    assert!(
        r.get("kind") == Some("lost node=node2")
            && r.get("error").is_some_and(|e| e.contains("lost track")),
        "the parent must hear it lost its child:\n{r}"
    );
}

/// 21. Refusals reach the caller with their reason: an fd the child would share with its
///     parent (refused on node1), and, while the image is still arriving, a mapped file
///     missing on the destination and a state directory that cannot record the session.
fn refusal_reasons(c: &Ctx) {
    // Each node has its own /run/telefork: a file there exists on node1 only.
    let file = "/run/telefork/only-on-node1";
    let r = c.sh(
        "node1",
        None,
        &format!("echo data > {file} && chmod 644 {file}"),
        Duration::from_secs(10),
    );
    assert!(r.status.success(), "{r}");
    // (12 MiB of memory: still following its offer at once, and still arriving when node2
    // finds the file missing.)
    let r = c.probe(
        "node1",
        &["fork", "node2", "--map", file, "--big-mb", "12"],
        Duration::from_secs(40),
    );
    c.sh("node1", None, &format!("rm -f {file}"), Duration::from_secs(10));
    let err = r.want("error").to_string();
    assert!(
        r.get("kind") == Some("failed node=node2 stage=Restore") && err.contains("only-on-node1"),
        "the caller must hear which file node2 lacks:\n{r}"
    );

    // An eventfd the child would share with its parent: refused by name, before anything
    // leaves node1.
    let r = c.probe("node1", &["fork", "node2", "--hold-eventfd"], Duration::from_secs(40));
    let err = r.want("error").to_string();
    assert!(
        r.get("kind") == Some("cannot-carry node=node1")
            && err.contains("anon_inode:[eventfd]")
            && err.contains("share it with its parent"),
        "the caller must hear which fd cannot travel, and why:\n{r}"
    );
    assert!(r.get("host").is_none() && r.has("parent ok"), "{r}");

    // node2's sessions directory replaced by a file: it cannot record a session.
    let sessions = c.dir.join("node2").join("state").join("sessions");
    let aside = sessions.with_extension("aside");
    std::fs::rename(&sessions, &aside).unwrap();
    std::fs::write(&sessions, b"not a directory").unwrap();
    let r = c.probe("node1", &["fork", "node2"], Duration::from_secs(40));
    std::fs::remove_file(&sessions).unwrap();
    std::fs::rename(&aside, &sessions).unwrap();
    let err = r.want("error").to_string();
    assert!(
        r.get("kind") == Some("failed node=node2 stage=Restore")
            && err.contains("cannot record the session"),
        "the caller must hear why node2 refused:\n{r}"
    );
    assert!(r.get("host").is_none() && r.has("parent ok"), "{r}");
}

/// 22. A daemon connects only to the peers in its config: a program naming any other
///     address is refused before a socket is opened.
fn configured_peers_only(c: &Ctx) {
    let script = r#"
import socket
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 5555)); l.listen(16); l.settimeout(15)
print("listening", flush=True)
try:
    l.accept(); print("connected", flush=True)
except socket.timeout:
    print("nobody", flush=True)
"#;
    let mut listener = Background(c.python("node1", script));
    listener.0.wait_line("listening", Duration::from_secs(10));
    let r = c.probe("node1", &["fork", "127.0.0.1:5555"], Duration::from_secs(30));
    assert_eq!(r.get("refused"), Some("node=node1 limit=peers"), "{r}");
    assert!(r.want("error").contains("not a node of this cluster"), "{r}");
    let other_port = format!("{}:5555", c.listen_addr("node2").ip());
    let r = c.probe("node1", &["fork", &other_port], Duration::from_secs(30));
    assert_eq!(r.get("refused"), Some("node=node1 limit=peers"), "{r}");
    // The listener saw nobody (it waits 15 s from its start).
    let (_, said) = listener.0.wait_line("", Duration::from_secs(20));
    assert_eq!(said, "nobody", "node1's daemon connected to an address outside its config");
}

// ---------------------------------------------------------------------------------------
// The tests: one per scenario, in this order, on one testbed.

/// A scenario: its name (the test's) and the function that runs it.
type Scenario = (&'static str, fn(&Ctx));

/// The scenarios, each a test named after its function.
const SCENARIOS: &[Scenario] = &[
    ("fork_to_node", fork_to_node),
    ("output", output),
    ("stdin", stdin),
    ("kill", kill),
    ("user", user),
    ("remote_and_yoyo", remote_and_yoyo),
    ("peer_without_cert", peer_without_cert),
    ("dest_killed_mid_transfer", dest_killed_mid_transfer),
    ("dest_down", dest_down),
    ("daemon_restart_keeps_children", daemon_restart_keeps_children),
    ("limits", limits),
    ("plain_transport", plain_transport),
    ("prepared_connections", prepared_connections),
    ("fan_out", fan_out),
    ("session_reuse", session_reuse),
    ("dropped_handle_ends_its_session", dropped_handle_ends_its_session),
    ("unauthenticated_flood", unauthenticated_flood),
    ("idle_local_flood", idle_local_flood),
    ("burst", burst),
    ("killed_session", killed_session),
    ("refusal_reasons", refusal_reasons),
    ("configured_peers_only", configured_peers_only),
];

/// The testbed the scenarios share, once the first of them has brought it up: dropped (taken
/// down) at the end of `main`.
struct Testbed {
    c: Ctx,
    // (Dropped in this order: the testbed goes down, then the lock is released.)
    _down: Down,
    _serial: tb::TestbedLock,
}

/// `None` until the first scenario runs; then the testbed, or why it could not be made (the
/// later scenarios fail with that at once instead of trying again).
static TESTBED: Mutex<Option<Result<Testbed, String>>> = Mutex::new(None);

fn main() {
    let mut args = libtest_mimic::Arguments::from_args();
    // One testbed, one scenario at a time: they restart daemons, change configs and count
    // processes on the nodes.
    args.test_threads = Some(1);
    let trials = SCENARIOS
        .iter()
        .map(|&(name, f)| libtest_mimic::Trial::test(name, move || scenario(name, f)))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // Down, also after failures (a panic inside a scenario is caught by the runner).
    drop(TESTBED.lock().unwrap_or_else(|e| e.into_inner()).take());
    conclusion.exit();
}

/// Runs one scenario on the testbed (brought up first if this is the first scenario). On
/// failure: the daemons' last log lines, and the test user's leftovers killed.
fn scenario(name: &str, f: fn(&Ctx)) -> Result<(), libtest_mimic::Failed> {
    let mut bed = TESTBED.lock().unwrap_or_else(|e| e.into_inner());
    let bed = bed.get_or_insert_with(|| {
        catch_unwind(set_up)
            .map_err(|e| format!("the testbed could not be set up: {}", panic_text(&e)))
    });
    let c = match bed {
        Ok(bed) => &bed.c,
        Err(why) => return Err(why.as_str().into()),
    };
    let t = Instant::now();
    let res = catch_unwind(AssertUnwindSafe(|| {
        c.ensure_daemons();
        f(c)
    }));
    match res {
        Ok(()) => {
            // (Before the runner's "ok", on the same line.)
            eprint!("({:.2} s) ", t.elapsed().as_secs_f64());
            Ok(())
        }
        Err(e) => {
            eprintln!("== scenario {name}: FAILED ({:?})", t.elapsed());
            for n in ["node1", "node2", "node3"] {
                let log = c.log(n);
                let lines: Vec<&str> = log.lines().collect();
                eprintln!(
                    "--- {n}/daemon.log (last lines):\n{}",
                    lines[lines.len().saturating_sub(12)..].join("\n")
                );
            }
            c.kill_leftovers();
            Err(panic_text(&e).into())
        }
    }
}

fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(a panic without a message)".into())
}

/// Brings the testbed up (panics, naming what is missing or failed, if it cannot).
fn set_up() -> Testbed {
    tb::check_host().unwrap_or_else(|e| panic!("cannot run here: {e:#}"));
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_telefork"));
    let probe = bin.parent().unwrap().join("examples").join("probe");
    assert!(probe.exists(), "{} is missing: run `cargo build --release --examples` (or without --release for a debug test build) first", probe.display());
    let serial = tb::lock(PREFIX).unwrap_or_else(|e| panic!("{e:#}"));
    let (uid, gid) = tb::ensure_test_user(USER).unwrap_or_else(|e| panic!("{e:#}"));
    let dir = PathBuf::from(DIR);
    let down = Down(dir.clone());
    let opts = tb::TestbedOptions {
        nodes: 3,
        dir: dir.clone(),
        telefork_bin: bin,
        prefix: PREFIX.into(),
        subnet: SUBNET.parse().unwrap(),
        ..Default::default()
    };
    tb::up(&opts).unwrap_or_else(|e| panic!("testbed up: {e:#}"));
    // The test user must be able to run the probe, wherever this checkout lives (a CI clone
    // may sit in a private temporary directory): run a copy kept in the testbed's directory.
    let staged = dir.join("probe");
    std::fs::copy(&probe, &staged)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", probe.display(), staged.display()));
    let probe = staged;
    let c = Ctx { dir, probe, uid, gid };
    check_access(&c);
    Testbed { c, _down: down, _serial: serial }
}

/// The test user must be able to run the probe (target/ readable and searchable).
fn check_access(c: &Ctx) {
    let r = c.sh(
        "node1",
        Some(USER),
        &format!("test -x {} && id -u", c.probe.display()),
        Duration::from_secs(10),
    );
    assert!(
        r.status.success() && r.stdout.first().map(String::as_str) == Some(&c.uid.to_string()),
        "{USER} cannot run {}:\n{r}",
        c.probe.display()
    );
}
