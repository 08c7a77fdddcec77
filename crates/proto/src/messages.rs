//! The messages: between a local program and its daemon ([`LocalRequest`], [`LocalCommand`],
//! [`FromDaemon`]), and between an origin daemon and a destination daemon ([`ToDest`],
//! [`FromDest`]). Their encodings change only with [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).

use serde::{Deserialize, Serialize};

use crate::Failure;

/// Who a process belongs to, as established by the origin daemon (SO_PEERCRED).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Its user ID.
    pub uid: u32,
    /// Its primary group ID.
    pub gid: u32,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitInfo {
    /// It exited with this code.
    Code(i32),
    /// A signal of this number killed it.
    Signal(i32),
}

/// A program's request to its daemon: the first message on a connection, or the first after
/// the connection was handed back ([`LocalCommand::Again`]); always behind a hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalRequest {
    /// Send my stopped child `child_pid` to `dest`. Passed along with SCM_RIGHTS: the
    /// child's stdout, stderr and (if `pass_stdin`) stdin.
    Telefork {
        /// The destination: a node name of the cluster config, or host:port of a peer.
        dest: String,
        /// The caller's stopped child to send.
        child_pid: i32,
        /// Whether the caller's stdin is passed (and relayed to the child).
        pass_stdin: bool,
    },
    /// The calling (restored) process reports the value of a `remote` closure.
    Report {
        /// The value, postcard-encoded by the library.
        value: Vec<u8>,
    },
    /// Which node is this?
    WhoAmI,
    /// A telefork to `dest` is likely next on this connection (the library's spare one):
    /// connect to it now, so that telefork does not wait for a TLS handshake. No reply; the
    /// next request follows on the same connection.
    Prepare {
        /// The likely destination.
        dest: String,
    },
}

/// Later messages of a program about its remote child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalCommand {
    /// Send the child this signal.
    Kill {
        /// The signal's number.
        signal: i32,
    },
    /// After the child's end ([`FromDaemon::Exited`]): this connection carries the program's
    /// next request (the session serves it, instead of a new session for a new connection).
    Again,
    /// Said by libraries of earlier releases while waiting; ignored.
    Waiting,
    /// After the child's end: no further request on this connection.
    Done,
}

/// Messages of a daemon to a local program (the first answer to a request behind a hello).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromDaemon {
    /// The destination accepted the offer; the capture is streaming to it.
    Accepted {
        /// The destination's name.
        node: String,
    },
    /// The child runs on `node` as `pid` (the local copy is being killed).
    Started {
        /// The destination's name.
        node: String,
        /// The child's PID there.
        pid: i32,
    },
    /// The request failed, was refused, or the child was lost: why, typed.
    Failed(Failure),
    /// The value reported by the child (`remote`), sent just before `Exited`.
    Result {
        /// The value as the child's library encoded it.
        value: Vec<u8>,
    },
    /// The child ended.
    Exited(ExitInfo),
    /// The answer to a `Report` stored.
    Ok,
    /// The answer to `WhoAmI`.
    Node {
        /// This node's name.
        name: String,
    },
}

/// Messages of an origin daemon to a destination daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToDest {
    /// A process to restore, behind a hello. The image follows once accepted (or at once:
    /// `image_follows`).
    Offer {
        /// Whose process it is (as its origin established).
        user: User,
        /// The origin's node name (checked against its certificate).
        origin: String,
        /// About how big the image is (resident and swapped memory): a hint for the limits.
        image_bytes: u64,
        /// Whether the program's stdin will be relayed.
        pass_stdin: bool,
        /// The image will follow unencrypted, right after `Accept`, on the same TCP
        /// connection (between TLS records: neither side has TLS data in flight then).
        plain_image: bool,
        /// The (encrypted, small) image follows the offer at once, without waiting for
        /// `Accept` (one round trip less); a refusing destination then reads it to its end
        /// and drops it.
        image_follows: bool,
    },
    /// Send the child this signal.
    Kill {
        /// The signal's number.
        signal: i32,
    },
    /// Bytes of the program's stdin for the child.
    Stdin {
        /// The bytes.
        data: Vec<u8>,
    },
    /// The program's stdin ended.
    StdinEof,
    /// After the child's `Exited`: keep this connection (and the session serving it) for the
    /// next `Offer` of the same program, instead of a new connection and session per telefork.
    Again,
}

/// Messages of a destination daemon to an origin daemon (the answer to an offer behind a
/// hello).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromDest {
    /// The offer is accepted: send the image.
    Accept,
    /// The offer was refused, or the restore failed: why, typed (a refusal names the limit).
    Failed(Failure),
    /// The process runs here as `pid`.
    Started {
        /// Its PID on the destination.
        pid: i32,
    },
    /// Bytes the child wrote to its stdout.
    Stdout {
        /// The bytes.
        data: Vec<u8>,
    },
    /// Bytes the child wrote to its stderr.
    Stderr {
        /// The bytes.
        data: Vec<u8>,
    },
    /// The child's `remote` result, just before `Exited`.
    Result {
        /// The value as the child's library encoded it.
        value: Vec<u8>,
    },
    /// The child ended.
    Exited(ExitInfo),
}
