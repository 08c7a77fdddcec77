//! The telefork node daemon (see `daemon`), its configuration (`config`), the cluster's
//! certificates (`cluster`, `tls`) and the wire protocol between nodes and with local
//! programs (`proto`).

pub mod cluster;
pub mod config;
pub mod tls;
