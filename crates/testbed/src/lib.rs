//! The testbed (to be written).
