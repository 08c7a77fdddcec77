//! The telefork node: the daemon (`daemon`) with its two kinds of sessions (`origin`: a local
//! program's child goes away; `dest`: a process arrives), its configuration (`config`), the
//! cluster's certificates (`cluster`, `tls`), the shared TLS connection (`channel`) and the
//! wire protocol (`proto`).

pub mod admission;
pub mod channel;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod dest;
pub mod origin;
pub mod proto;
pub mod tls;
