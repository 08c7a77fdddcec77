//! Answers for a peer from before protocol versions (version 0: it sends no hello, and reads
//! no message of today's). A receiver that finds no hello where a request must start answers
//! with these frames, in the only form such a peer reads, so that it reports the mismatch
//! instead of a dropped connection; then it stops reading.

use crate::{encode_frame, Error};

/// For a program's library: a frame that library reads as `FromDaemon::Failed { error }`
/// (variant 2 of its enum, a string).
///
/// # Errors
///
/// As [`encode_frame`] (a text over the frame limit).
pub fn to_program(error: &str) -> Result<Vec<u8>, Error> {
    encode_frame(&(2u32, error))
}

/// For an origin daemon: a frame it reads as `FromDest::Refused { limit: None, reason }`
/// (variant 1 of its enum, no limit, a string).
///
/// # Errors
///
/// As [`encode_frame`] (a text over the frame limit).
pub fn to_origin(reason: &str) -> Result<Vec<u8>, Error> {
    encode_frame(&(1u32, None::<&str>, reason))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    /// The enums of the builds before versions, as far as these answers go.
    #[allow(dead_code)]
    #[derive(Debug, Deserialize, PartialEq)]
    enum OldFromDaemon {
        Accepted { node: String },
        Started { node: String, pid: i32 },
        Failed { error: String },
    }
    #[allow(dead_code)]
    #[derive(Debug, Deserialize, PartialEq)]
    enum OldFromDest {
        Accept,
        Refused { limit: Option<String>, reason: String },
    }

    #[test]
    fn an_unversioned_peer_reads_the_mismatch() {
        let f = super::to_program("protocol version mismatch").unwrap();
        assert_eq!(
            crate::decode_body::<OldFromDaemon>(&f[4..]).unwrap(),
            OldFromDaemon::Failed { error: "protocol version mismatch".into() }
        );
        let f = super::to_origin("protocol version mismatch").unwrap();
        assert_eq!(
            crate::decode_body::<OldFromDest>(&f[4..]).unwrap(),
            OldFromDest::Refused { limit: None, reason: "protocol version mismatch".into() }
        );
    }
}
