//! What a local program sends its daemon on the Unix socket, as arbitrary bytes: read in the
//! order a session reads it (origin.rs `serve`, `recv_first`, `relay`), then as a stream of
//! each local message type (`LocalRequest`, `LocalCommand`, and `FromDaemon` as the library
//! reads it). Every frame must be read alike by the stream reader and the in-memory decoder,
//! be refused only for a reason, and decode to what it re-encodes to (`frames`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use telefork_proto::{FromDaemon, LocalCommand, LocalRequest};

mod frames;

fuzz_target!(|data: &[u8]| {
    // A session: a request (after a Prepare, one more); after a Telefork, the program's
    // commands until `Again` hands the connection back for its next request.
    let mut r = data;
    let mut prepared = false;
    'session: while let Some(req) = frames::next::<LocalRequest>(&mut r) {
        match req {
            LocalRequest::Prepare { .. } if !prepared => prepared = true,
            LocalRequest::Telefork { .. } => loop {
                match frames::next::<LocalCommand>(&mut r) {
                    Some(LocalCommand::Kill { .. } | LocalCommand::Waiting) => {}
                    Some(LocalCommand::Again) => {
                        prepared = false;
                        continue 'session;
                    }
                    Some(LocalCommand::Done) | None => break 'session,
                }
            },
            LocalRequest::Prepare { .. } | LocalRequest::WhoAmI | LocalRequest::Report { .. } => {
                break
            }
        }
    }
    frames::check_stream::<LocalRequest>(data);
    frames::check_stream::<LocalCommand>(data);
    frames::check_stream::<FromDaemon>(data);
});
