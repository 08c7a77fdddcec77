//! Mutual TLS between nodes (to be written).
