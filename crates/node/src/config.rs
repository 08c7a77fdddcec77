//! The node configuration: one TOML file per node (`/etc/telefork/node.toml` by default).
//!
//! ```toml
//! node = "node1"                          # this node's name (= its certificate's name)
//! listen = "10.77.0.1:7077"               # where other nodes connect (mutual TLS)
//! socket = "/run/telefork/daemon.sock"    # where local programs connect
//! state_dir = "/var/lib/telefork"         # scratch for images in flight
//!
//! [tls]
//! ca = "/etc/telefork/ca.pem"
//! cert = "/etc/telefork/node1.pem"
//! key = "/etc/telefork/node1.key"
//!
//! [limits]
//! max_image_bytes = 17179869184           # largest image accepted (default 16 GiB)
//! max_restores_per_user = 16              # concurrent restored children per user
//! allow_root = false                      # run children of uid 0 here?
//! max_sessions = 256                      # connections served at once (each a process)
//! max_sessions_per_user = 32              # of them serving one local user's programs;
//!                                         # that user's further connections wait (in
//!                                         # turn, no process) up to 60 s, at most
//!                                         # max_waiting_per_user of them
//! max_waiting_per_user = 256
//! max_sessions_per_peer = 128             # of them serving connections from one node
//! max_handshakes = 256                    # TLS handshakes in progress (no process yet);
//! max_handshakes_per_source = 64          # of them from one address; further
//!                                         # connections wait in turn, up to 10 s from
//!                                         # their arrival, at most
//! max_waiting_per_source = 256            # this many per address (and 1024 in all)
//!
//! [transport]
//! image = "tls"                           # "tls": every byte encrypted (default).
//!                                         # "plain": on trusted networks, a process's
//!                                         # memory travels unencrypted (the connection is
//!                                         # still mutually authenticated and every control
//!                                         # message encrypted); a node accepts plain
//!                                         # images only if it is set to "plain" too
//! self_receive_min_bytes = 2147483648     # plain images bigger than this (by the
//!                                         # origin's offer) are received by the new
//!                                         # process itself, straight into its memory
//!                                         # populated ahead; smaller ones are read and
//!                                         # placed by the restorer (default 2 GiB: the
//!                                         # crossover measured on our machines, see
//!                                         # README "Performance")
//!
//! [[peers]]
//! name = "node2"
//! addr = "10.77.0.2:7077"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG: &str = "/etc/telefork/node.toml";
pub use telefork_proto::{DEFAULT_SOCKET, SOCKET_ENV};
pub const DEFAULT_PORT: u16 = 7077;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: String,
    pub listen: SocketAddr,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    pub tls: TlsFiles,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub transport: Transport,
    #[serde(default)]
    pub peers: Vec<Peer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_image_bytes: u64,
    pub max_restores_per_user: u32,
    pub allow_root: bool,
    /// Session processes at once, all kinds. Each serves one connection (a local program's,
    /// or an authenticated node's) and lives as long as its connection and its child.
    pub max_sessions: u32,
    /// Sessions serving one local user's programs at once; that user's further connections
    /// wait for one of them to end (without a process), in the order they came.
    pub max_sessions_per_user: u32,
    /// Connections of one local user waiting for a session; beyond it they are refused.
    pub max_waiting_per_user: u32,
    /// Sessions serving one peer node's connections at once; beyond it they are refused.
    pub max_sessions_per_peer: u32,
    /// TLS handshakes in progress at once (done by the daemon itself, before any process
    /// exists for a connection).
    pub max_handshakes: u32,
    /// Handshakes in progress from one address at once; its further connections wait.
    pub max_handshakes_per_source: u32,
    /// Connections from one address waiting for their handshake; beyond it they are closed.
    pub max_waiting_per_source: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_image_bytes: 16 << 30,
            max_restores_per_user: 16,
            allow_root: false,
            max_sessions: 256,
            max_sessions_per_user: 32,
            max_waiting_per_user: 256,
            max_sessions_per_peer: 128,
            max_handshakes: 256,
            max_handshakes_per_source: 64,
            max_waiting_per_source: 256,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Transport {
    pub image: ImageTransport,
    /// Plain images bigger than this are received by the new process itself (see the module
    /// text and `dest`).
    pub self_receive_min_bytes: u64,
}

impl Default for Transport {
    fn default() -> Self {
        Transport { image: ImageTransport::Tls, self_receive_min_bytes: 2 << 30 }
    }
}

/// How a process image travels between nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageTransport {
    /// Inside the mutual-TLS connection, like everything else.
    #[default]
    Tls,
    /// Unencrypted on the same (authenticated) connection, written onto the socket by the
    /// frozen process itself: for trusted networks.
    Plain,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    pub addr: SocketAddr,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/telefork")
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let c: Config =
            toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        c.validate().with_context(|| format!("in config {}", path.display()))?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if !valid_node_name(&self.node) {
            bail!("node name {:?} must be 1-63 letters, digits or '-'", self.node);
        }
        for p in &self.peers {
            if !valid_node_name(&p.name) {
                bail!("peer name {:?} must be 1-63 letters, digits or '-'", p.name);
            }
        }
        let l = &self.limits;
        for (key, v) in [
            ("max_sessions", l.max_sessions),
            ("max_sessions_per_user", l.max_sessions_per_user),
            ("max_sessions_per_peer", l.max_sessions_per_peer),
            ("max_handshakes", l.max_handshakes),
            ("max_handshakes_per_source", l.max_handshakes_per_source),
        ] {
            if v == 0 {
                bail!("limits.{key} must be at least 1 (0 would serve nobody)");
            }
        }
        Ok(())
    }

    /// Resolves a destination: a configured peer's name, this node's own, or the address of
    /// a configured peer (host:port exactly as in `[[peers]]`). Anything else is refused
    /// before a socket is opened: the daemon runs as root inside the cluster's network, and
    /// connecting wherever a local user names would make it a port scanner for them.
    pub fn resolve(&self, dest: &str) -> Result<(String, SocketAddr)> {
        if let Some(p) = self.peers.iter().find(|p| p.name == dest) {
            return Ok((p.name.clone(), p.addr));
        }
        if dest == self.node {
            return Ok((self.node.clone(), self.listen));
        }
        if let Ok(addr) = dest.parse::<SocketAddr>() {
            if let Some(p) = self.peers.iter().find(|p| p.addr == addr) {
                return Ok((p.name.clone(), p.addr));
            }
            if addr == self.listen {
                return Ok((self.node.clone(), self.listen));
            }
            bail!("destination {dest} is not a node of this cluster: node {} connects only to the peers in its config ({})", self.node, self.peer_list());
        }
        bail!(
            "unknown destination {dest:?}: not a node of this cluster (node {} knows {})",
            self.node,
            self.peer_list()
        )
    }

    /// The configured peers' names, for messages.
    fn peer_list(&self) -> String {
        if self.peers.is_empty() {
            return "no peers".into();
        }
        self.peers.iter().map(|p| format!("{} ({})", p.name, p.addr)).collect::<Vec<_>>().join(", ")
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

pub fn valid_node_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 63 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_resolve() {
        let c: Config = toml::from_str(
            r#"node = "node1"
listen = "10.0.0.1:7077"
[tls]
ca = "/c"
cert = "/n"
key = "/k"
[[peers]]
name = "node2"
addr = "10.0.0.2:7077"
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.max_restores_per_user, 16);
        assert_eq!(c.resolve("node2").unwrap().1.port(), 7077);
        assert_eq!(c.resolve("10.0.0.2:7077").unwrap().0, "node2");
        assert!(c.resolve("nowhere").is_err());
        assert_eq!(c.resolve("node1").unwrap().1, c.listen);
        // Only configured addresses: not another port of a peer, not any other host.
        for unknown in ["10.0.0.2:5555", "127.0.0.1:7077", "10.0.0.3:7077"] {
            let e = c.resolve(unknown).unwrap_err().to_string();
            assert!(
                e.contains("not a node of this cluster") && e.contains("node2 (10.0.0.2:7077)"),
                "{unknown}: {e}"
            );
        }
        assert!(toml::from_str::<Config>("node = \"x\"\nbogus = 1").is_err());
    }
}
