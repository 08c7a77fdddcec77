//! Cluster CA and node certificates (to be written).
