//! Frame-stream checks shared by the protocol targets: each frame is read as the daemons read
//! it (`proto::read_frame`), and must agree with the in-memory decoder (`decode_frame`, the
//! same `frame_len` and `decode_body` a local request goes through) and survive re-encoding.

use serde::{de::DeserializeOwned, Serialize};
use telefork_node::proto;

/// The next frame of `stream` as a `T`, checked; `stream` moves past it. `None` at the end of
/// the stream or at an error (after which a daemon reads no further).
pub fn next<T>(stream: &mut &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let before = *stream;
    let pure = proto::decode_frame::<T>(before);
    let read = proto::read_frame::<_, T>(stream);
    let announced = before.first_chunk::<4>().map(|h| u32::from_le_bytes(*h));
    match (read, pure) {
        (Ok(Some(v)), Ok(Some((w, used)))) => {
            assert_eq!(v, w, "read_frame and decode_frame decoded different messages");
            assert_eq!(
                before.len() - stream.len(),
                used,
                "read_frame and decode_frame took different lengths"
            );
            assert!(announced.is_some_and(|n| n <= proto::MAX_FRAME && used == 4 + n as usize));
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
            assert!(before.is_empty(), "a clean end with {} bytes left", before.len());
            None
        }
        (Err(_), Err(_)) => {
            // Refused for one of three reasons only: the stream ends inside the frame, the
            // length is over the limit (then the body is never waited for), or the body is not
            // exactly one message.
            let justified = match announced {
                None => true,
                Some(n) if n > proto::MAX_FRAME => true,
                Some(n) => {
                    before.len() < 4 + n as usize
                        || proto::decode_body::<T>(&before[4..4 + n as usize]).is_err()
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
