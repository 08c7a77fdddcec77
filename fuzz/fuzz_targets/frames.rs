//! Frame-stream checks shared by the protocol targets: each frame is read as the daemons read
//! it (`proto::read_frame`, hellos of our version passed over), and must agree with the
//! in-memory decoder (`decode_frame`, the same `frame_len` and `decode_body` a local request
//! goes through) and survive re-encoding.

use serde::{de::DeserializeOwned, Serialize};
use telefork_proto as proto;

/// The hellos of our version at the start of `stream`: the bytes they take.
fn hellos(stream: &[u8]) -> usize {
    let mut at = 0;
    while let Some(h) = stream[at..].first_chunk::<4>() {
        let n = u32::from_le_bytes(*h) as usize;
        match stream.get(at + 4..at + 4 + n) {
            Some(body) if proto::hello_version(body) == Some(proto::PROTOCOL_VERSION) => {
                at += 4 + n
            }
            _ => break,
        }
    }
    at
}

/// The next frame of `stream` as a `T`, checked; `stream` moves past it. `None` at the end of
/// the stream or at an error (after which a daemon reads no further).
pub fn next<T>(stream: &mut &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let before = *stream;
    let pure = proto::decode_frame::<T>(before);
    let read = proto::read_frame::<_, T>(stream);
    // (The message's own frame, after any hellos passed over.)
    let skipped = hellos(before);
    let announced = before[skipped..].first_chunk::<4>().map(|h| u32::from_le_bytes(*h));
    match (read, pure) {
        (Ok(Some(v)), Ok(Some((w, used)))) => {
            assert_eq!(v, w, "read_frame and decode_frame decoded different messages");
            assert_eq!(
                before.len() - stream.len(),
                used,
                "read_frame and decode_frame took different lengths"
            );
            assert!(announced
                .is_some_and(|n| n <= proto::MAX_FRAME && used == skipped + 4 + n as usize));
            // Re-encoding: the same message, in no more bytes than it came in (postcard takes
            // over-long varints, never shorter ones), decoded whole.
            let again = proto::encode_frame(&v).expect("a decoded message encodes");
            assert!(
                again.len() <= used,
                "{v:?} re-encodes to {} bytes, read from {used}",
                again.len()
            );
            let (back, took) = proto::decode_frame::<T>(&again)
                .expect("a re-encoded message decodes")
                .expect("a whole frame");
            assert_eq!(back, v, "decode(encode(x)) != x");
            assert_eq!(took, again.len());
            Some(v)
        }
        (Ok(None), Ok(None)) => {
            assert!(skipped == before.len(), "a clean end with {} bytes left", before.len());
            None
        }
        (Err(_), Err(_)) => {
            // Refused for one of four reasons only: the stream ends inside the frame, the
            // length is over the limit (then the body is never waited for), the body is a hello
            // of another version, or it is not exactly one message.
            let rest = &before[skipped..];
            let justified = match announced {
                None => true,
                Some(n) if n > proto::MAX_FRAME => true,
                Some(n) => {
                    rest.len() < 4 + n as usize
                        || proto::decode_body::<T>(&rest[4..4 + n as usize]).is_err()
                }
            };
            assert!(justified, "a frame of {announced:?} bytes refused for no reason");
            None
        }
        (r, p) => panic!("read_frame gave {r:?} but decode_frame {p:?}"),
    }
}

/// Reads `bytes` as a stream of `T` frames to its end or first error, checking each.
pub fn check_stream<T>(bytes: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut r = bytes;
    while next::<T>(&mut r).is_some() {}
}
