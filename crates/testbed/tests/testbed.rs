//! End-to-end test of the testbed on this host (needs root, iproute2 and python3, which CI
//! has: without them the tests fail, naming what is missing): three nodes under prefix `tfx-`
//! in 10.78.0.0/24 (so it cannot collide with a real testbed using `tf-` / 10.77.0.0/24),
//! each running a stand-in daemon (python3: the unix socket at /run/telefork/daemon.sock,
//! plus a TCP listener on NODEADDR:7077 that answers its hostname). Checks hostnames, node-to-node TCP, user exec,
//! daemon kill/restart, re-`up` over leftovers, and that `down` leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use telefork_testbed as tb;

const PREFIX: &str = "tfx-";

const STAND_IN: &str = r#"
import socket, sys
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((sys.argv[1], 7077)); t.listen(16)
u = socket.socket(socket.AF_UNIX); u.bind("/run/telefork/daemon.sock"); u.listen(16)
while True:
    c, _ = t.accept(); c.sendall(socket.gethostname().encode() + b"\n"); c.close()
"#;

/// The real python3 executable (not a pyenv shim, which needs its environment), if any.
fn python3() -> Option<String> {
    let out =
        Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().ok()?;
    let p = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !p.is_empty()).then_some(p)
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Runs CMD on NODE, returns (success, trimmed stdout).
fn run(dir: &Path, node: &str, user: Option<&str>, cmd: &[&str]) -> (bool, String) {
    let out =
        tb::command(dir, node, user, &strings(cmd)).unwrap().stdin(Stdio::null()).output().unwrap();
    if !out.status.success() {
        eprintln!("{cmd:?} on {node}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn ours_left() -> Vec<String> {
    let ns = String::from_utf8(Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
        .unwrap();
    let links =
        String::from_utf8(Command::new("ip").args(["-o", "link", "show"]).output().unwrap().stdout)
            .unwrap();
    ns.lines().chain(links.lines()).filter(|l| l.contains(PREFIX)).map(String::from).collect()
}

/// Removes the test testbed even if an assertion fails.
struct Guard(PathBuf);
impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = tb::down_prefixed(&self.0, PREFIX) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

#[test]
fn three_nodes() {
    tb::check_host().unwrap_or_else(|e| panic!("cannot run here: {e:#}"));
    // The tests share the prefix and subnet: one at a time, also across processes.
    let _serial = tb::lock(PREFIX).unwrap();
    let dir = PathBuf::from(format!("/run/telefork-testbed-test-{}", std::process::id()));
    let _guard = Guard(dir.clone());
    let py = python3().expect("python3 is missing (scripts/setup.sh installs it): the stand-in daemon is a python3 script");
    let stand_in = vec![py, "-c".into(), STAND_IN.into(), "{addr}".into()];
    let opts = tb::TestbedOptions {
        nodes: 3,
        dir: dir.clone(),
        prefix: PREFIX.into(),
        subnet: "10.78.0.0".parse().unwrap(),
        daemon_cmd_override: Some(stand_in),
        ..Default::default()
    };
    let t = tb::up(&opts).unwrap_or_else(|e| panic!("up: {e:#}"));
    assert_eq!(t.nodes.len(), 3);
    assert_eq!(t.nodes[1].addr.to_string(), "10.78.0.2");
    assert!(t.nodes.iter().all(|n| n.daemon_pid > 0 && n.holder_pid > 0));
    assert_eq!(tb::load(&dir).unwrap().nodes[2].daemon_pid, t.nodes[2].daemon_pid);
    let cfg = std::fs::read_to_string(dir.join("node1/node.toml")).unwrap();
    assert!(cfg.contains("10.78.0.1:7077") && cfg.contains("10.78.0.3:7077"), "{cfg}");
    assert!(dir.join("pki/node3.key").exists());

    // Hostnames and the per-node /run/telefork.
    assert_eq!(run(&dir, "node1", None, &["hostname"]), (true, "node1".into()));
    assert_eq!(run(&dir, "node3", None, &["hostname"]), (true, "node3".into()));
    assert!(run(&dir, "node1", None, &["test", "-e", "/run/telefork/daemon.sock"]).0);

    // Node to node over the bridge (node2's stand-in answers its hostname).
    let tcp = ["bash", "-c", "exec 3<>/dev/tcp/10.78.0.2/7077 && timeout 5 head -n1 <&3"];
    assert_eq!(run(&dir, "node1", None, &tcp), (true, "node2".into()));
    // A node sees only its own netns: eth0 carries its address.
    assert!(run(&dir, "node3", None, &["ip", "-o", "addr", "show", "dev", "eth0"])
        .1
        .contains("10.78.0.3/24"));

    // As a user.
    let (uid, _gid) = tb::ensure_test_user("telefork-test").unwrap();
    assert_eq!(run(&dir, "node2", Some("telefork-test"), &["id", "-u"]), (true, uid.to_string()));
    assert!(tb::command(&dir, "node2", Some("no-such-user-xyz"), &strings(&["true"])).is_err());
    assert!(tb::command(&dir, "node9", None, &strings(&["true"])).is_err());

    // Daemon failure and restart: the node stays up meanwhile.
    let old = t.nodes[1].daemon_pid;
    tb::kill_daemon(&dir, "node2").unwrap();
    assert_eq!(tb::load(&dir).unwrap().nodes[1].daemon_pid, 0);
    assert_eq!(run(&dir, "node2", None, &["hostname"]), (true, "node2".into()));
    assert!(!run(&dir, "node1", None, &tcp).0, "node2's daemon still answers after kill");
    tb::restart_daemon(&dir, "node2").unwrap();
    let new = tb::load(&dir).unwrap().nodes[1].daemon_pid;
    assert!(new > 0 && new != old);
    assert_eq!(run(&dir, "node1", None, &tcp), (true, "node2".into()));

    // A program left running on a node, then `up` again over everything (as after a crash).
    let mut bg =
        tb::command(&dir, "node3", None, &strings(&["sleep", "1000"])).unwrap().spawn().unwrap();
    let opts2 = tb::TestbedOptions { nodes: 2, ..opts.clone() };
    let t2 = tb::up(&opts2).unwrap_or_else(|e| panic!("second up: {e:#}"));
    // (`down` reaps the killed process, which is our child here.)
    assert!(
        !std::path::Path::new(&format!("/proc/{}", bg.id())).exists(),
        "program on the old node3 survived a re-up"
    );
    let _ = bg.wait();
    assert_eq!(t2.nodes.len(), 2);
    assert!(
        ours_left().iter().all(|l| !l.contains("tfx-node3") && !l.contains("tfx-v3")),
        "{:?}",
        ours_left()
    );
    assert_eq!(run(&dir, "node2", None, &["hostname"]), (true, "node2".into()));

    tb::down(&dir).unwrap();
    assert!(!dir.exists());
    assert_eq!(ours_left(), Vec::<String>::new());
    assert!(!t2
        .nodes
        .iter()
        .any(|n| std::path::Path::new(&format!("/proc/{}", n.holder_pid)).exists()));
    // down of nothing is fine.
    tb::down_prefixed(&dir, PREFIX).unwrap();
}

/// A daemon that fails to start: `up` fails pointing at its log, and `down` cleans up the
/// half-built testbed.
#[test]
fn failing_daemon() {
    tb::check_host().unwrap_or_else(|e| panic!("cannot run here: {e:#}"));
    // The tests share the prefix and subnet: one at a time, also across processes.
    let _serial = tb::lock(PREFIX).unwrap();
    let dir = PathBuf::from(format!("/run/telefork-testbed-test-fail-{}", std::process::id()));
    let _guard = Guard(dir.clone());
    let opts = tb::TestbedOptions {
        nodes: 2,
        dir: dir.clone(),
        prefix: PREFIX.into(),
        subnet: "10.78.0.0".parse().unwrap(),
        daemon_cmd_override: Some(strings(&[
            "sh",
            "-c",
            "echo stand-in daemon gives up on {node} >&2; exit 3",
        ])),
        ..Default::default()
    };
    let e = format!("{:#}", tb::up(&opts).unwrap_err());
    assert!(e.contains("daemon.log") && e.contains("stand-in daemon gives up on node"), "{e}");
    assert!(dir.join("testbed.state").exists());
    assert!(!ours_left().is_empty());
    tb::down(&dir).unwrap();
    assert_eq!(ours_left(), Vec::<String>::new());
    assert!(!dir.exists());
}
