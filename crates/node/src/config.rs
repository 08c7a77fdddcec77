//! The node configuration file (to be written).
