//! The telefork wire protocol, spoken by a program's `telefork` library and its node's daemon
//! (on a Unix socket), and by two daemons (over mutual TLS).
//!
//! Every message is a frame: a `u32` length (little endian) and the postcard encoding of one
//! enum value, at most [`MAX_FRAME`] bytes, so a hostile peer can make a reader allocate no
//! more than that. A process image is not framed: it follows an accepted
//! [`ToDest::Offer`] as raw bytes, self-delimited by its own trailer (see `telefork_image`).
//! What decodes untrusted bytes ([`frame_len`], [`decode_body`], [`decode_frame`]; the
//! readers are built on them) is pure, and fuzzed (fuzz/fuzz_targets/local_protocol.rs,
//! node_protocol.rs).
//!
//! ```text
//!  program ──hello+LocalRequest──► origin daemon ──hello+ToDest::Offer──► destination daemon
//!          ◄──hello+FromDaemon───                ◄──hello+Accept/Failed──
//!                                                ──image bytes──────────►   (restore)
//!                      (a small encrypted image follows the Offer at once, before Accept)
//!                                                ◄──Started{pid}────────
//!          ──LocalCommand──►                     ──Kill/Stdin───────────►
//!          ◄──Exited───────                      ◄──Stdout/Stderr/Result/Exited──
//!          ──Again─────────►                     ──Again────────────────►
//!          ──hello+LocalRequest──►               ──hello+ToDest::Offer──►   (the next telefork)
//! ```
//!
//! Both connections serve one program's teleforks one after another: once a child has
//! ended, `Again` hands each back for the next request (no session process, no daemon
//! connection, no TLS handshake per telefork).
//!
//! **Versions.** Each request (a [`LocalRequest`], a [`ToDest::Offer`]) goes out behind a
//! *hello* frame carrying [`PROTOCOL_VERSION`], and the first answer to it comes behind the
//! answering side's hello. A hello's layout never changes (see [`encode_hello`]), so any
//! build can read the version of any other; a reader meeting a hello of another version
//! stops with [`Error::Version`] naming both, instead of misreading what follows. Whoever
//! receives requests insists on the hello ([`read_first`], [`check_hello`]); a peer that
//! sends none is from before versions (version 0) and is answered in the only form it reads
//! ([`unversioned`]).
//!
//! ```
//! use telefork_proto::{encode_first, read_first, LocalRequest};
//!
//! // A program's request as it goes out: its hello, then the message.
//! let bytes = encode_first(&LocalRequest::WhoAmI)?;
//! // The daemon's session reads it (a hello of another version would be refused here).
//! let req: Option<LocalRequest> = read_first(&mut &bytes[..])?;
//! assert_eq!(req, Some(LocalRequest::WhoAmI));
//! # Ok::<(), telefork_proto::Error>(())
//! ```
//!
//! Failures travel typed ([`Failure`]: refused by which [`Limit`], unreachable, state the
//! engine cannot carry, failed at which [`Stage`], lost, version mismatch), so a program can
//! match on them.

#![deny(missing_docs)]

mod failure;
mod frame;
mod messages;
pub mod unversioned;

pub use failure::{Failure, Limit, Stage, Uncarried};
pub use frame::{
    check_hello, decode_body, decode_frame, encode_first, encode_frame, encode_hello, expect_frame,
    frame_len, hello_version, read_first, read_frame, write_first, write_frame, Error, HELLO_MAGIC,
    MAX_FRAME,
};
pub use messages::{ExitInfo, FromDaemon, FromDest, LocalCommand, LocalRequest, ToDest, User};

/// The version of this protocol. Bumped whenever a message changes in a way an older build
/// would misread; 0 names the builds from before protocol versions (they send no hello).
pub const PROTOCOL_VERSION: u32 = 1;

/// Where local programs reach their node's daemon unless [`SOCKET_ENV`] says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/telefork/daemon.sock";

/// Environment variable a program can set to reach its node's daemon elsewhere.
pub const SOCKET_ENV: &str = "TELEFORK_SOCKET";
