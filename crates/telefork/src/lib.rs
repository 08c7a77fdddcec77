//! The telefork library (to be written).
