//! Frames, hellos and the readers and writers of both: what turns messages into bytes on a
//! stream and back. The decoders of untrusted bytes ([`frame_len`], [`decode_body`],
//! [`decode_frame`]) are pure; the stream readers are built on the same pieces, so both
//! accept and refuse exactly the same input (the fuzz targets check that they agree).

use std::io::{Read, Write};

use serde::{de::DeserializeOwned, Serialize};

use crate::PROTOCOL_VERSION;

/// The largest frame body a reader accepts (and a writer produces): 4 MiB.
pub const MAX_FRAME: u32 = 4 << 20;

/// The first four bytes of a hello's body. No message starts with them: a message begins with
/// its variant's index (a postcard varint), and `0xff` would announce an index of 127 or more.
pub const HELLO_MAGIC: [u8; 4] = [0xff, b'T', b'F', b'K'];

/// Why reading or writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer announced a frame longer than [`MAX_FRAME`] (nothing was allocated for it).
    #[error("peer sent a frame of {len} bytes (limit {MAX_FRAME})")]
    TooLong {
        /// The announced length.
        len: u32,
    },
    /// A message to send encodes to more than [`MAX_FRAME`] bytes.
    #[error("message of {len} bytes exceeds the frame limit")]
    TooBig {
        /// Its encoded length.
        len: usize,
    },
    /// The stream ended inside a frame's 4-byte length.
    #[error("the stream ended inside a frame's length")]
    EndInLength,
    /// The bytes in memory end before the frame's body does.
    #[error("reading a message body: the stream ended {short} bytes short")]
    EndInBody {
        /// How many bytes of the body are missing.
        short: usize,
    },
    /// The body holds one message and more bytes after it.
    #[error("{0} bytes left over after the message")]
    LeftOver(usize),
    /// The body is not a message of the expected type.
    #[error("decoding a message: {0}")]
    Decode(postcard::Error),
    /// The message could not be encoded.
    #[error("encoding a message: {0}")]
    Encode(postcard::Error),
    /// The connection ended cleanly where a message was expected.
    #[error("connection closed while waiting for {0}")]
    Closed(String),
    /// Reading or writing the stream failed.
    #[error("{doing}: {source}")]
    Io {
        /// What was being done: "reading a message", "sending a message", …
        doing: &'static str,
        /// The system's error.
        source: std::io::Error,
    },
    /// The peer speaks another version of the protocol (`theirs` is 0 for a build from
    /// before protocol versions, which sends no hello).
    #[error("{}", version_mismatch(*ours, *theirs))]
    Version {
        /// [`PROTOCOL_VERSION`] of this side.
        ours: u32,
        /// The peer's version, as its hello says.
        theirs: u32,
    },
}

fn version_mismatch(ours: u32, theirs: u32) -> String {
    let theirs = match theirs {
        0 => "is a build from before protocol versions".to_string(),
        v => format!("speaks version {v}"),
    };
    format!("protocol version mismatch: this side speaks version {ours}, the peer {theirs}")
}

/// A hello frame: the length 8, [`HELLO_MAGIC`], then [`PROTOCOL_VERSION`] as a `u32`, little
/// endian. This layout is fixed for every version to come: a later version may append fields
/// to the body (a reader ignores them), never move these.
pub fn encode_hello() -> [u8; 12] {
    let mut f = [0u8; 12];
    f[..4].copy_from_slice(&8u32.to_le_bytes());
    f[4..8].copy_from_slice(&HELLO_MAGIC);
    f[8..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    f
}

/// The version a frame body announces, if it is a hello (of any version).
pub fn hello_version(body: &[u8]) -> Option<u32> {
    match body {
        [m0, m1, m2, m3, v0, v1, v2, v3, ..] if [*m0, *m1, *m2, *m3] == HELLO_MAGIC => {
            Some(u32::from_le_bytes([*v0, *v1, *v2, *v3]))
        }
        _ => None,
    }
}

/// Checks the frame body that must open a request: a hello of this version.
///
/// # Errors
///
/// [`Error::Version`] naming both versions if it is a hello of another version, or, with
/// `theirs` 0, if it is no hello at all (a peer from before protocol versions).
pub fn check_hello(body: &[u8]) -> Result<(), Error> {
    match hello_version(body) {
        Some(PROTOCOL_VERSION) => Ok(()),
        theirs => Err(Error::Version { ours: PROTOCOL_VERSION, theirs: theirs.unwrap_or(0) }),
    }
}

/// Whether `body` is a hello of this version, to be passed over; an error for another.
fn skip_hello(body: &[u8]) -> Result<bool, Error> {
    match hello_version(body) {
        None => Ok(false),
        Some(_) => check_hello(body).map(|()| true),
    }
}

/// A message as one frame: its length (`u32`, little endian), then its postcard encoding.
///
/// # Errors
///
/// [`Error::Encode`] if serde refuses it, [`Error::TooBig`] over [`MAX_FRAME`].
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; 4];
    postcard::to_io(msg, &mut buf).map_err(Error::Encode)?;
    let len = buf.len() - 4;
    if len > MAX_FRAME as usize {
        return Err(Error::TooBig { len });
    }
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// A request (or the first answer to one) as it goes out: a hello frame, then the message's
/// frame, in one buffer (sent at once: the receiver reads both without another round trip).
///
/// # Errors
///
/// As [`encode_frame`].
pub fn encode_first<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    let frame = encode_frame(msg)?;
    let mut buf = Vec::with_capacity(12 + frame.len());
    buf.extend_from_slice(&encode_hello());
    buf.extend_from_slice(&frame);
    Ok(buf)
}

fn write_all<W: Write + ?Sized>(w: &mut W, bytes: &[u8]) -> Result<(), Error> {
    let io = |source| Error::Io { doing: "sending a message", source };
    w.write_all(bytes).map_err(io)?;
    w.flush().map_err(io)
}

/// Writes one message as a frame and flushes.
///
/// # Errors
///
/// As [`encode_frame`], and [`Error::Io`] if writing fails.
pub fn write_frame<W: Write + ?Sized, T: Serialize>(w: &mut W, msg: &T) -> Result<(), Error> {
    write_all(w, &encode_frame(msg)?)
}

/// Writes a hello and one message ([`encode_first`]) and flushes.
///
/// # Errors
///
/// As [`write_frame`].
pub fn write_first<W: Write + ?Sized, T: Serialize>(w: &mut W, msg: &T) -> Result<(), Error> {
    write_all(w, &encode_first(msg)?)
}

/// The body length a frame's 4-byte header announces.
///
/// # Errors
///
/// [`Error::TooLong`] above [`MAX_FRAME`], before anything is allocated for it.
pub fn frame_len(header: [u8; 4]) -> Result<usize, Error> {
    let len = u32::from_le_bytes(header);
    if len > MAX_FRAME {
        return Err(Error::TooLong { len });
    }
    Ok(len as usize)
}

/// Decodes a frame's body: exactly one message, no byte left over.
///
/// # Errors
///
/// [`Error::Decode`] if it is no `T` (a hello is none either), [`Error::LeftOver`] if bytes
/// follow the message.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    let (v, rest) = postcard::take_from_bytes(body).map_err(Error::Decode)?;
    if !rest.is_empty() {
        return Err(Error::LeftOver(rest.len()));
    }
    Ok(v)
}

/// [`read_frame`] on bytes in memory: the first message of `buf` (hellos of this version
/// before it passed over) and the bytes it took; `Ok(None)` if `buf` ends cleanly before one.
///
/// # Errors
///
/// As [`read_frame`]; [`Error::EndInLength`] or [`Error::EndInBody`] if `buf` ends inside a
/// frame.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, Error> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        if rest.is_empty() {
            return Ok(None);
        }
        let Some(header) = rest.first_chunk::<4>() else {
            return Err(Error::EndInLength);
        };
        let len = frame_len(*header)?;
        let Some(body) = rest[4..].get(..len) else {
            return Err(Error::EndInBody { short: len - (rest.len() - 4) });
        };
        at += 4 + len;
        if !skip_hello(body)? {
            return Ok(Some((decode_body(body)?, at)));
        }
    }
}

/// One frame's body; `Ok(None)` on a clean end of the stream before it.
fn read_body<R: Read + ?Sized>(r: &mut R) -> Result<Option<Vec<u8>>, Error> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(Error::EndInLength),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(Error::Io { doing: "reading a message", source }),
        }
    }
    let mut body = vec![0u8; frame_len(header)?];
    r.read_exact(&mut body)
        .map_err(|source| Error::Io { doing: "reading a message body", source })?;
    Ok(Some(body))
}

/// Reads one message; hellos of this version before it are passed over. `Ok(None)` on a
/// clean end of the stream before the message (an end inside a frame is an error).
///
/// # Errors
///
/// [`Error::Version`] at a hello of another version; [`Error::TooLong`],
/// [`Error::EndInLength`], [`Error::Io`] reading; [`Error::Decode`] or [`Error::LeftOver`]
/// if the body is not exactly one `T`.
pub fn read_frame<R: Read + ?Sized, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, Error> {
    while let Some(body) = read_body(r)? {
        if !skip_hello(&body)? {
            return decode_body(&body).map(Some);
        }
    }
    Ok(None)
}

/// Like [`read_frame`], but the end of the stream is an error naming what was expected.
///
/// # Errors
///
/// As [`read_frame`], and [`Error::Closed`] at the end of the stream.
pub fn expect_frame<R: Read + ?Sized, T: DeserializeOwned>(
    r: &mut R,
    what: &str,
) -> Result<T, Error> {
    read_frame(r)?.ok_or_else(|| Error::Closed(what.to_string()))
}

/// Reads a request: a hello of this version, then the message. `Ok(None)` on a clean end of
/// the stream before either.
///
/// # Errors
///
/// [`Error::Version`] if the first frame is a hello of another version or no hello (then
/// `theirs` is 0: a peer from before protocol versions); otherwise as [`read_frame`].
pub fn read_first<R: Read + ?Sized, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, Error> {
    match read_body(r)? {
        None => Ok(None),
        Some(body) => {
            check_hello(&body)?;
            read_frame(r)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    /// Hostile bytes never panic the decoder: random frames and mutations of valid ones, for
    /// every message type (a deterministic xorshift generator keeps the test repeatable).
    #[test]
    fn hostile_frames_are_errors_not_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut valid = Vec::new();
        for m in [
            ToDest::Offer {
                user: User { uid: 1000, gid: 1000 },
                origin: "node1".into(),
                image_bytes: 1 << 30,
                pass_stdin: true,
                plain_image: false,
                image_follows: false,
            },
            ToDest::Stdin { data: vec![1, 2, 3] },
        ] {
            valid.push(encode_first(&m).unwrap());
        }
        valid.push(
            encode_frame(&LocalRequest::Telefork {
                dest: "node2".into(),
                child_pid: 42,
                pass_stdin: false,
            })
            .unwrap(),
        );
        valid.push(
            encode_first(&FromDaemon::Failed(Failure::CannotCarry {
                node: "node1".into(),
                what: Uncarried::Fd { fd: 3, kind: "socket".into(), target: "socket:[1]".into() },
            }))
            .unwrap(),
        );
        for i in 0..200_000u64 {
            let mut frame = if i % 2 == 0 {
                let len = (next() % 64) as usize;
                let mut f = (len as u32).to_le_bytes().to_vec();
                f.extend((0..len).map(|_| next() as u8));
                f
            } else {
                let mut f = valid[(next() % valid.len() as u64) as usize].clone();
                let at = 4 + (next() as usize) % (f.len() - 4);
                f[at] ^= 1 << (next() % 8);
                f
            };
            if i % 7 == 0 {
                frame.truncate((next() as usize) % frame.len());
            }
            let _ = read_frame::<_, LocalRequest>(&mut &frame[..]);
            let _ = read_first::<_, LocalRequest>(&mut &frame[..]);
            let _ = read_frame::<_, LocalCommand>(&mut &frame[..]);
            let _ = read_frame::<_, FromDaemon>(&mut &frame[..]);
            let _ = read_first::<_, ToDest>(&mut &frame[..]);
            let _ = read_frame::<_, FromDest>(&mut &frame[..]);
        }
    }

    #[test]
    fn frames_round_trip_and_limits() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &ToDest::Kill { signal: 9 }).unwrap();
        let m: ToDest = read_frame(&mut &buf[..]).unwrap().unwrap();
        assert!(matches!(m, ToDest::Kill { signal: 9 }));
        assert!(read_frame::<_, ToDest>(&mut &buf[..0]).unwrap().is_none());
        let mut huge = (MAX_FRAME + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(matches!(read_frame::<_, ToDest>(&mut &huge[..]), Err(Error::TooLong { .. })));
        assert!(read_frame::<_, ToDest>(&mut &[3, 0, 0, 0, 0xff, 0xff, 0xff][..]).is_err());
    }

    /// The pieces the daemon decodes untrusted bytes with: a length over the limit is refused
    /// before any allocation, a body must be exactly one message, and the in-memory decoder
    /// agrees with the stream reader (including where the stream ends inside a frame).
    #[test]
    fn frame_pieces() {
        assert_eq!(frame_len(MAX_FRAME.to_le_bytes()).unwrap(), MAX_FRAME as usize);
        let e = frame_len((MAX_FRAME + 1).to_le_bytes()).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
        let req = LocalRequest::Telefork { dest: "node2".into(), child_pid: 7, pass_stdin: true };
        let frame = encode_frame(&req).unwrap();
        assert_eq!(decode_body::<LocalRequest>(&frame[4..]).unwrap(), req);
        let e =
            decode_body::<LocalRequest>(&[&frame[4..], &[0][..]].concat()).unwrap_err().to_string();
        assert!(e.contains("1 bytes left over"), "{e}");
        assert!(decode_body::<LocalRequest>(&frame[4..frame.len() - 1]).is_err());
        // Two frames back to back, the second behind a hello, then every cut of them.
        let stream = [&frame[..], &encode_first(&LocalRequest::WhoAmI).unwrap()].concat();
        let (first, used) = decode_frame::<LocalRequest>(&stream).unwrap().unwrap();
        assert_eq!((first, used), (req.clone(), frame.len()));
        assert_eq!(
            decode_frame::<LocalRequest>(&stream[used..]).unwrap().unwrap(),
            (LocalRequest::WhoAmI, stream.len() - used)
        );
        assert!(decode_frame::<LocalRequest>(&[]).unwrap().is_none());
        for cut in 0..stream.len() {
            let pure = decode_frame::<LocalRequest>(&stream[used.min(cut)..cut]);
            let read = read_frame::<_, LocalRequest>(&mut &stream[used.min(cut)..cut]);
            // (A hello alone, then the end: a clean end.)
            let clean = cut <= used || cut == used + 12;
            assert_eq!(clean, matches!(pure, Ok(None)), "cut {cut}: {pure:?}");
            assert_eq!(clean, matches!(read, Ok(None)), "cut {cut}: {read:?}");
            assert_eq!(pure.is_err(), read.is_err(), "cut {cut}");
        }
    }

    /// A stream that ends inside a frame's 4-byte length is an error, not a clean end.
    #[test]
    fn an_end_inside_the_length_is_an_error() {
        for cut in 1..4 {
            let e = read_frame::<_, ToDest>(&mut &[9u8, 0, 0][..cut]).unwrap_err().to_string();
            assert!(e.contains("inside a frame's length"), "{e}");
        }
        // (a reader that hands out one byte at a time still reads whole frames)
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(out.len()).min(1);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let frame = encode_first(&ToDest::Stdin { data: vec![1, 2, 3] }).unwrap();
        assert_eq!(
            read_first::<_, ToDest>(&mut Trickle(&frame)).unwrap(),
            Some(ToDest::Stdin { data: vec![1, 2, 3] })
        );
    }

    /// The hello's bytes are fixed for every version to come (a future build reads ours by
    /// them, and we read its by them).
    #[test]
    fn the_hello_layout_is_fixed() {
        let h = encode_hello();
        assert_eq!(h[..8], [8, 0, 0, 0, 0xff, b'T', b'F', b'K']);
        assert_eq!(u32::from_le_bytes(h[8..].try_into().unwrap()), PROTOCOL_VERSION);
        assert_eq!(hello_version(&h[4..]), Some(PROTOCOL_VERSION));
        // A later version may append to the body; its version still reads.
        assert_eq!(
            hello_version(&[&h[4..8], &7u32.to_le_bytes(), &[1, 2, 3][..]].concat()),
            Some(7)
        );
        // No message of ours reads as a hello, nor a hello as a message.
        assert_eq!(hello_version(&encode_frame(&LocalRequest::WhoAmI).unwrap()[4..]), None);
        assert!(decode_body::<LocalRequest>(&h[4..]).is_err());
        assert!(decode_body::<ToDest>(&h[4..]).is_err());
    }

    /// A hello of the next version, wherever a reader meets it: refused as a version
    /// mismatch naming both versions, never read as a message.
    #[test]
    fn a_peer_of_the_next_version_is_refused_naming_both() {
        let next = PROTOCOL_VERSION + 1;
        let mut theirs = encode_first(&ToDest::Kill { signal: 9 }).unwrap();
        theirs[8..12].copy_from_slice(&next.to_le_bytes());
        let refused = |r: Result<Option<ToDest>, Error>| match r {
            Err(Error::Version { ours, theirs }) => {
                assert_eq!((ours, theirs), (PROTOCOL_VERSION, next));
            }
            other => panic!("a hello of version {next} gave {other:?}"),
        };
        refused(read_first(&mut &theirs[..]));
        refused(read_frame(&mut &theirs[..]));
        refused(decode_frame(&theirs).map(|o| o.map(|(m, _)| m)));
        let text = read_first::<_, ToDest>(&mut &theirs[..]).unwrap_err().to_string();
        assert!(
            text.contains(&format!("version {PROTOCOL_VERSION}"))
                && text.contains(&format!("version {next}")),
            "{text}"
        );
        // A request without a hello: a build from before versions (0).
        let bare = encode_frame(&ToDest::Kill { signal: 9 }).unwrap();
        match read_first::<_, ToDest>(&mut &bare[..]) {
            Err(Error::Version { ours: PROTOCOL_VERSION, theirs: 0 }) => {}
            other => panic!("a request without a hello gave {other:?}"),
        }
        // Ours passes.
        let ours = encode_first(&ToDest::Kill { signal: 9 }).unwrap();
        assert_eq!(read_first(&mut &ours[..]).unwrap(), Some(ToDest::Kill { signal: 9 }));
    }
}
