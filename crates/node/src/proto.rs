//! The wire protocol: between a local program and its node's daemon (Unix socket), and
//! between two daemons (mutual TLS). Every message is a frame: a u32 length (little endian)
//! and the postcard encoding of one enum value, at most `MAX_FRAME` bytes, so a hostile peer
//! can make us allocate no more than that. A process image is not framed: it follows an
//! accepted `Offer` as raw bytes, self-delimited by its own trailer (see `telefork_image`).
//! What decodes untrusted bytes (`frame_len`, `decode_body`; the readers are built on them)
//! is pure, and fuzzed (fuzz/fuzz_targets/local_protocol.rs, node_protocol.rs).
//!
//! ```text
//!  program ──LocalRequest──► origin daemon ──ToDest::Offer──► destination daemon
//!          ◄──FromDaemon───                ◄──Accept/Refused──
//!                                          ──image bytes────►   (restore)
//!                      (a small encrypted image follows the Offer at once, before Accept)
//!                                          ◄──Started{pid}───
//!          ──LocalCommand──►               ──Kill/Stdin─────►
//!          ◄──Exited───────                ◄──Stdout/Stderr/Result/Exited──
//!          ──Again─────────►               ──Again──────────►
//!          ──LocalRequest──►               ──ToDest::Offer──►   (the next telefork)
//! ```
//!
//! Both connections serve one program's teleforks one after another: once a child has
//! ended, `Again` hands each back for the next request (no session process, no daemon
//! connection, no TLS handshake per telefork).

use std::io::{Read, Write};

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub const MAX_FRAME: u32 = 4 << 20;

/// Who a process belongs to, as established by the origin daemon (SO_PEERCRED).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
}

/// A program's request to its daemon: the first message on a connection, or the first after
/// the connection was handed back (`LocalCommand::Again`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalRequest {
    /// Send my stopped child `child_pid` to `dest`. Passed along with SCM_RIGHTS: the
    /// child's stdout, stderr and (if `pass_stdin`) stdin.
    Telefork { dest: String, child_pid: i32, pass_stdin: bool },
    /// The calling (restored) process reports the value of a `remote` closure.
    Report { value: Vec<u8> },
    /// Which node is this?
    WhoAmI,
    /// A telefork to `dest` is likely next on this connection (the library's spare one):
    /// connect to it now, so that telefork does not wait for a TLS handshake. No reply; the
    /// next request follows on the same connection.
    Prepare { dest: String },
}

/// Later messages of a program about its remote child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalCommand {
    Kill {
        signal: i32,
    },
    /// After the child's end (`FromDaemon::Exited`): this connection carries the program's
    /// next request (the session serves it, instead of a new session for a new connection).
    Again,
    /// Said by libraries of earlier releases while waiting; ignored. (The local protocol has
    /// no version number: variants are only added at the end, never removed, so that a
    /// program started before a daemon upgrade still speaks to the new daemon.)
    Waiting,
    /// After the child's end: no further request on this connection.
    Done,
}

/// Messages of a daemon to a local program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromDaemon {
    /// The destination accepted the offer; the capture is streaming to it.
    Accepted {
        node: String,
    },
    Started {
        node: String,
        pid: i32,
    },
    Failed {
        error: String,
    },
    /// The value reported by the child (`remote`), sent just before `Exited`.
    Result {
        value: Vec<u8>,
    },
    Exited(ExitInfo),
    /// The connection to the child's node was lost; its fate is unknown.
    Lost {
        error: String,
    },
    Ok,
    Node {
        name: String,
    },
    /// A node refused the request: `node` (this one or the destination) said why, and which
    /// limit of its config refused it, if one did.
    Refused {
        node: String,
        limit: Option<String>,
        reason: String,
    },
}

/// Messages of an origin daemon to a destination daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToDest {
    /// `plain_image`: the image will follow unencrypted, right after `Accept`, on the same
    /// TCP connection (between TLS records: neither side has TLS data in flight then).
    /// `image_follows`: the (encrypted, small) image follows the offer at once, without
    /// waiting for `Accept` (one round trip less); a refusing destination then reads it to
    /// its end and drops it.
    Offer {
        user: User,
        origin: String,
        image_bytes: u64,
        pass_stdin: bool,
        plain_image: bool,
        image_follows: bool,
    },
    Kill {
        signal: i32,
    },
    Stdin {
        data: Vec<u8>,
    },
    StdinEof,
    /// After the child's `Exited`: keep this connection (and the session serving it) for the
    /// next `Offer` of the same program, instead of a new connection and session per telefork.
    Again,
}

/// Messages of a destination daemon to an origin daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromDest {
    Accept,
    /// `limit`: the key of the destination's config that refused it (e.g.
    /// "limits.max_restores_per_user"), if a limit did.
    Refused {
        limit: Option<String>,
        reason: String,
    },
    Started {
        pid: i32,
    },
    Failed {
        error: String,
    },
    Stdout {
        data: Vec<u8>,
    },
    Stderr {
        data: Vec<u8>,
    },
    Result {
        value: Vec<u8>,
    },
    Exited(ExitInfo),
}

/// A message as one frame: its length (u32, little-endian), then its postcard encoding.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let body = postcard::to_stdvec(msg).context("encoding a message")?;
    if body.len() > MAX_FRAME as usize {
        bail!("message of {} bytes exceeds the frame limit", body.len());
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    Ok(buf)
}

pub fn write_frame<W: Write + ?Sized, T: Serialize>(w: &mut W, msg: &T) -> Result<()> {
    w.write_all(&encode_frame(msg)?)?;
    w.flush()?;
    Ok(())
}

/// The body length a frame's 4-byte header announces; refused above `MAX_FRAME`, before
/// anything is allocated for it.
pub fn frame_len(header: [u8; 4]) -> Result<usize> {
    let len = u32::from_le_bytes(header);
    if len > MAX_FRAME {
        bail!("peer sent a frame of {len} bytes (limit {MAX_FRAME})");
    }
    Ok(len as usize)
}

/// Decodes a frame's body: exactly one message, no byte left over.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    let (v, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        bail!("{} bytes left over after the message", rest.len());
    }
    Ok(v)
}

/// `read_frame` on bytes in memory: the first frame of `buf` and the bytes it took;
/// `Ok(None)` if `buf` is empty, an error if it ends inside the frame.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>> {
    if buf.is_empty() {
        return Ok(None);
    }
    let Some(header) = buf.first_chunk::<4>() else {
        bail!("the stream ended inside a frame's length");
    };
    let len = frame_len(*header)?;
    let Some(body) = buf[4..].get(..len) else {
        bail!("reading a message body: the stream ended {} bytes short", len - (buf.len() - 4));
    };
    Ok(Some((decode_body(body).context("decoding a message")?, 4 + len)))
}

/// Reads one frame; `Ok(None)` on a clean end of stream before the frame (an end inside its
/// length or body is an error).
pub fn read_frame<R: Read + ?Sized, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => bail!("the stream ended inside a frame's length"),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading a message"),
        }
    }
    let mut body = vec![0u8; frame_len(header)?];
    r.read_exact(&mut body).context("reading a message body")?;
    decode_body(&body).context("decoding a message").map(Some)
}

/// Like `read_frame`, but the end of the stream is an error naming what was expected.
pub fn expect_frame<R: Read + ?Sized, T: DeserializeOwned>(r: &mut R, what: &str) -> Result<T> {
    read_frame(r)?.with_context(|| format!("connection closed while waiting for {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let mut b = Vec::new();
            write_frame(&mut b, &m).unwrap();
            valid.push(b);
        }
        let mut b = Vec::new();
        write_frame(
            &mut b,
            &LocalRequest::Telefork { dest: "node2".into(), child_pid: 42, pass_stdin: false },
        )
        .unwrap();
        valid.push(b);
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
            let _ = read_frame::<_, LocalCommand>(&mut &frame[..]);
            let _ = read_frame::<_, FromDaemon>(&mut &frame[..]);
            let _ = read_frame::<_, ToDest>(&mut &frame[..]);
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
        assert!(read_frame::<_, ToDest>(&mut &huge[..]).is_err());
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
        // Two frames back to back, then every cut of them.
        let stream = [&frame[..], &encode_frame(&LocalRequest::WhoAmI).unwrap()].concat();
        let (first, used) = decode_frame::<LocalRequest>(&stream).unwrap().unwrap();
        assert_eq!((first, used), (req.clone(), frame.len()));
        assert_eq!(
            decode_frame::<LocalRequest>(&stream[used..]).unwrap().unwrap().0,
            LocalRequest::WhoAmI
        );
        assert!(decode_frame::<LocalRequest>(&[]).unwrap().is_none());
        for cut in 0..frame.len() {
            let pure = decode_frame::<LocalRequest>(&frame[..cut]);
            let read = read_frame::<_, LocalRequest>(&mut &frame[..cut]);
            assert_eq!(cut == 0, matches!(pure, Ok(None)), "cut {cut}: {pure:?}");
            assert_eq!(cut == 0, matches!(read, Ok(None)), "cut {cut}: {read:?}");
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
        let frame = encode_frame(&ToDest::Stdin { data: vec![1, 2, 3] }).unwrap();
        assert_eq!(
            read_frame::<_, ToDest>(&mut Trickle(&frame)).unwrap(),
            Some(ToDest::Stdin { data: vec![1, 2, 3] })
        );
    }
}
