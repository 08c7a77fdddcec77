//! Why a telefork did not happen, or its child was lost, as the daemons carry it: typed
//! values ([`Failure`], [`Limit`], [`Stage`], [`Uncarried`]) that travel from the node that
//! found them to the program, which can match on them; their `Display` is the message for a
//! person.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A limit of a node's configuration that refused a request; [`Limit::key`] is its key in
/// the node's config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Limit {
    /// `limits.allow_root`: the node runs no processes of root.
    AllowRoot,
    /// `limits.max_image_bytes`: the image is bigger than the node accepts.
    MaxImageBytes,
    /// `limits.max_restores_per_user`: the user has that many processes restored there.
    MaxRestoresPerUser,
    /// `limits.max_sessions`: the node serves that many connections.
    MaxSessions,
    /// `limits.max_sessions_per_user`: the user's programs have that many sessions, and this
    /// connection waited its time for one to end.
    MaxSessionsPerUser,
    /// `limits.max_waiting_per_user`: that many of the user's connections wait already.
    MaxWaitingPerUser,
    /// `limits.max_sessions_per_peer`: the node serves that many connections of the origin.
    MaxSessionsPerPeer,
    /// `peers`: the destination is not one of the node's configured peers.
    Peers,
    /// `transport.image`: an unencrypted image offered to a node that takes encrypted ones only.
    TransportImage,
}

impl Limit {
    /// The limit's key in a node's config file, e.g. `"limits.max_restores_per_user"`.
    pub fn key(self) -> &'static str {
        match self {
            Limit::AllowRoot => "limits.allow_root",
            Limit::MaxImageBytes => "limits.max_image_bytes",
            Limit::MaxRestoresPerUser => "limits.max_restores_per_user",
            Limit::MaxSessions => "limits.max_sessions",
            Limit::MaxSessionsPerUser => "limits.max_sessions_per_user",
            Limit::MaxWaitingPerUser => "limits.max_waiting_per_user",
            Limit::MaxSessionsPerPeer => "limits.max_sessions_per_peer",
            Limit::Peers => "peers",
            Limit::TransportImage => "transport.image",
        }
    }
}

/// Its config key ([`Limit::key`]).
impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// Where a transfer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Stage {
    /// The origin checked the request: the child must be the caller's own, and stop.
    Check,
    /// The origin captured the process and sent it.
    Send,
    /// The destination received the image and restored the process.
    Restore,
    /// A restored process's `remote` result was stored on its node.
    Report,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Check => "checking the child",
            Stage::Send => "capturing and sending the process",
            Stage::Restore => "restoring the process",
            Stage::Report => "storing the result",
        })
    }
}

/// State of a process that the engine cannot carry (the wire form of
/// `telefork_engine::Uncarried`): refused by name before anything was changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Uncarried {
    /// An open file descriptor of a kind the engine does not carry.
    Fd {
        /// The descriptor's number in the process.
        fd: i32,
        /// What it is: "socket", "pipe", "eventfd", …
        kind: String,
        /// What /proc/PID/fd/N links to.
        target: String,
    },
    /// More threads than the engine carries.
    Threads {
        /// How many threads the process has.
        count: u64,
    },
    /// Any other piece of state: a mapping, a sandbox, a deleted file the process depends on.
    State {
        /// What it is, e.g. "mapping 0x7f…-0x7f…" or "seccomp filters".
        what: String,
        /// Why it cannot travel.
        why: String,
    },
}

impl fmt::Display for Uncarried {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uncarried::Fd { fd, kind, target } => {
                let article = match kind.as_bytes().first() {
                    Some(b'a' | b'e' | b'i' | b'o') => "an",
                    Some(b'u') if kind.starts_with("unknown") => "an",
                    _ => "a",
                };
                write!(f, "fd {fd} is {article} {kind} ({target}): not supported yet")
            }
            Uncarried::Threads { count } => {
                write!(f, "{count} threads: only single-threaded processes can be carried so far")
            }
            Uncarried::State { what, why } => write!(f, "{what}: {why}"),
        }
    }
}

/// Why a request failed, as a node found it and the daemons pass it on to the program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// `node` refused by one of its limits.
    #[error("node {node} refused: {reason}")]
    Refused {
        /// The node that refused (the origin or the destination).
        node: String,
        /// The limit that refused.
        limit: Limit,
        /// Why, for a person (names the limit and its value).
        reason: String,
    },
    /// The destination could not be reached (connection, TLS handshake, its name).
    #[error("cannot reach node {node}: {reason}")]
    Unreachable {
        /// The destination.
        node: String,
        /// What failed.
        reason: String,
    },
    /// The process holds state the engine cannot carry; nothing was changed.
    #[error("node {node} cannot carry the process: {what}")]
    CannotCarry {
        /// The node that found it (the origin's capture or the destination's restore).
        node: String,
        /// The piece of state.
        what: Uncarried,
    },
    /// The transfer failed at `stage`.
    #[error("{}", failed(node, *stage, message))]
    Failed {
        /// The node where it failed.
        node: String,
        /// Where.
        stage: Stage,
        /// What failed, with what it was doing.
        message: String,
    },
    /// The child ran, but the connection to it was lost before its exit status came: its
    /// fate is unknown (the node or its session died, or the network went).
    #[error("lost track of the remote child on node {node}: {message}")]
    Lost {
        /// The child's node.
        node: String,
        /// What was lost.
        message: String,
    },
    /// `node` speaks another version of the protocol.
    #[error("{}", mismatch(node, *ours, *theirs))]
    Protocol {
        /// The node of the other version.
        node: String,
        /// The version of the side that found it.
        ours: u32,
        /// The version of `node` (0: a build from before protocol versions).
        theirs: u32,
    },
}

fn failed(node: &str, stage: Stage, message: &str) -> String {
    match stage {
        Stage::Restore => format!("node {node} could not restore the process: {message}"),
        _ => message.to_string(),
    }
}

fn mismatch(node: &str, ours: u32, theirs: u32) -> String {
    let theirs = match theirs {
        0 => "is a build from before protocol versions".to_string(),
        v => format!("speaks version {v}"),
    };
    format!("protocol version mismatch: this side speaks version {ours}, node {node} {theirs}")
}

impl Failure {
    /// The node the failure names.
    pub fn node(&self) -> &str {
        match self {
            Failure::Refused { node, .. }
            | Failure::Unreachable { node, .. }
            | Failure::CannotCarry { node, .. }
            | Failure::Failed { node, .. }
            | Failure::Lost { node, .. }
            | Failure::Protocol { node, .. } => node,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Typed failures cross the wire intact, and say who and what in their message.
    #[test]
    fn failures_travel_typed() {
        let all = [
            Failure::Refused {
                node: "node3".into(),
                limit: Limit::MaxRestoresPerUser,
                reason: "user 1000 already has 1 processes restored on node node3".into(),
            },
            Failure::Unreachable { node: "node3".into(), reason: "connecting to x".into() },
            Failure::CannotCarry {
                node: "node1".into(),
                what: Uncarried::Fd { fd: 5, kind: "eventfd".into(), target: "anon".into() },
            },
            Failure::Failed { node: "node2".into(), stage: Stage::Restore, message: "m".into() },
            Failure::Lost { node: "node2".into(), message: "closed".into() },
            Failure::Protocol { node: "node2".into(), ours: 1, theirs: 2 },
        ];
        for f in all {
            let back: Failure = crate::decode_body(&crate::encode_frame(&f).unwrap()[4..]).unwrap();
            assert_eq!(back, f);
            assert!(f.to_string().contains(f.node()), "{f}");
        }
        let f = Failure::CannotCarry {
            node: "node1".into(),
            what: Uncarried::Fd { fd: 5, kind: "eventfd".into(), target: "anon".into() },
        };
        assert_eq!(
            f.to_string(),
            "node node1 cannot carry the process: fd 5 is an eventfd (anon): not supported yet"
        );
        let p = Failure::Protocol { node: "node2".into(), ours: 1, theirs: 2 }.to_string();
        assert!(p.contains("version 1") && p.contains("version 2"), "{p}");
        assert_eq!(Limit::MaxWaitingPerUser.to_string(), "limits.max_waiting_per_user");
    }
}
