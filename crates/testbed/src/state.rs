//! The testbed's state file (`DIR/testbed.state`): which name prefix and subnet a testbed
//! uses, how its daemons are started, and which processes (PID + start time, so a reused PID
//! is never mistaken for ours) hold each node. Written first thing by `up()` (before any
//! namespace or link exists) and rewritten as nodes come up, so `down()` always knows the
//! prefix it may touch, even after a crash half-way through.
//!
//! The format is plain lines, `key value...`; daemon arguments are stored one per line.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const STATE_FILE: &str = "testbed.state";
const MAGIC: &str = "telefork-testbed 1";

/// A process we started, identified by PID and its start time (field 22 of /proc/PID/stat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId {
    pub pid: i32,
    pub start: u64,
}

#[derive(Debug, Clone)]
pub struct NodeState {
    pub name: String,
    pub addr: Ipv4Addr,
    pub holder: Option<ProcId>,
    pub daemon: Option<ProcId>,
}

#[derive(Debug, Clone)]
pub struct State {
    pub prefix: String,
    pub subnet: Ipv4Addr,
    /// Daemon command template: `{config}`, `{node}`, `{addr}` are substituted per node.
    pub daemon_cmd: Vec<String>,
    pub nodes: Vec<NodeState>,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// Backslash and newline as `\\` and `\n`, so any argument fits on one line.
fn escape(a: &str) -> String {
    a.replace('\\', "\\\\").replace('\n', "\\n")
}

fn unescape(a: &str) -> Result<String> {
    let mut out = String::new();
    let mut it = a.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            o => bail!("bad escape after a backslash: {o:?}"),
        }
    }
    Ok(out)
}

fn fmt_proc(p: &Option<ProcId>) -> String {
    match p {
        Some(p) => format!("{}:{}", p.pid, p.start),
        None => "-".into(),
    }
}

fn parse_proc(s: &str) -> Result<Option<ProcId>> {
    if s == "-" {
        return Ok(None);
    }
    let (pid, start) = s.split_once(':').context("expected PID:START")?;
    Ok(Some(ProcId { pid: pid.parse()?, start: start.parse()? }))
}

impl State {
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut s = format!("{MAGIC}\nprefix {}\nsubnet {}\n", self.prefix, self.subnet);
        for a in &self.daemon_cmd {
            s.push_str(&format!("daemon_arg {}\n", escape(a)));
        }
        for n in &self.nodes {
            s.push_str(&format!(
                "node {} {} {} {}\n",
                n.name,
                n.addr,
                fmt_proc(&n.holder),
                fmt_proc(&n.daemon)
            ));
        }
        telefork_node::safe_file::write_file(&path(dir), s.as_bytes(), 0o644, true)
    }

    pub fn load(dir: &Path) -> Result<State> {
        let p = path(dir);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!("reading testbed state {} (is the testbed up?)", p.display())
        })?;
        Self::parse(&text).with_context(|| format!("parsing testbed state {}", p.display()))
    }

    fn parse(text: &str) -> Result<State> {
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            bail!("not a testbed state file (first line is not {MAGIC:?})");
        }
        let mut st = State {
            prefix: String::new(),
            subnet: Ipv4Addr::UNSPECIFIED,
            daemon_cmd: vec![],
            nodes: vec![],
        };
        for (i, line) in lines.enumerate() {
            let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
            let res: Result<()> = (|| {
                match key {
                    "prefix" => st.prefix = rest.to_string(),
                    "subnet" => st.subnet = rest.parse()?,
                    "daemon_arg" => st.daemon_cmd.push(unescape(rest)?),
                    "node" => {
                        let f: Vec<&str> = rest.split(' ').collect();
                        if f.len() != 4 {
                            bail!("expected: node NAME ADDR HOLDER DAEMON");
                        }
                        st.nodes.push(NodeState {
                            name: f[0].into(),
                            addr: f[1].parse()?,
                            holder: parse_proc(f[2])?,
                            daemon: parse_proc(f[3])?,
                        });
                    }
                    "" => {}
                    _ => bail!("unknown key {key:?}"),
                }
                Ok(())
            })();
            res.with_context(|| format!("line {}: {line:?}", i + 2))?;
        }
        if !crate::valid_prefix(&st.prefix) {
            bail!("invalid prefix {:?}", st.prefix);
        }
        Ok(st)
    }

    pub fn node(&self, name: &str) -> Result<&NodeState> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| {
            let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            format!("no node {name:?} in this testbed (nodes: {})", names.join(", "))
        })
    }

    pub fn node_mut(&mut self, name: &str) -> Result<&mut NodeState> {
        self.node(name)?;
        Ok(self.nodes.iter_mut().find(|n| n.name == name).unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let dir = std::env::temp_dir().join(format!("tf-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let st = State {
            prefix: "tfx-".into(),
            subnet: "10.78.0.0".parse().unwrap(),
            daemon_cmd: vec![
                "/bin/telefork".into(),
                "daemon".into(),
                "--config".into(),
                "{config}".into(),
                "a b".into(),
                "x\ny\\n".into(),
            ],
            nodes: vec![
                NodeState {
                    name: "node1".into(),
                    addr: "10.78.0.1".parse().unwrap(),
                    holder: Some(ProcId { pid: 5, start: 77 }),
                    daemon: None,
                },
                NodeState {
                    name: "node2".into(),
                    addr: "10.78.0.2".parse().unwrap(),
                    holder: None,
                    daemon: Some(ProcId { pid: 9, start: 1 }),
                },
            ],
        };
        st.save(&dir).unwrap();
        let back = State::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(back.prefix, "tfx-");
        assert_eq!(back.daemon_cmd, st.daemon_cmd);
        assert_eq!(back.nodes.len(), 2);
        assert_eq!(back.nodes[0].holder, Some(ProcId { pid: 5, start: 77 }));
        assert_eq!(back.nodes[1].daemon, Some(ProcId { pid: 9, start: 1 }));
        assert!(back.node("node3").is_err());
        assert!(State::parse("bogus\n").is_err());
        assert!(State::parse("telefork-testbed 1\nprefix ../\n").is_err());
    }
}
