//! The telefork node: the daemon (`daemon`) with its two kinds of sessions (`origin`: a local
//! program's child goes away; `dest`: a process arrives), its configuration (`config`), the
//! cluster's certificates (`cluster`, `tls`), the shared TLS connection (`channel`), the
//! wire protocol (`proto`, re-exported from `telefork_proto`) and files created where others may write (`safe_file`).

pub mod admission;
pub mod channel;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod dest;
mod failure;
pub mod origin;
pub mod safe_file;
pub mod tls;

/// The wire protocol (messages, framing, version, typed failures): its own crate, which the
/// library shares without the daemon.
pub use telefork_proto as proto;
