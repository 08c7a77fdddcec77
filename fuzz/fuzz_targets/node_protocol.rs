//! What one daemon reads from another over their TLS connection, as arbitrary bytes. The
//! first byte chooses what the rest is:
//!
//! - even: a stream of frames, read as a destination reads the origin's (`ToDest`) and as an
//!   origin reads the destination's (`FromDest`), checked as in `frames`;
//! - odd: a recipe for a record stream, which the channel's own record layer
//!   (`channel::records`: header and length checks, opening in place, the inner content type,
//!   post-handshake messages) then opens under a fixed key. Chunks of `op, len (u16 le),
//!   bytes`, by `op % 5`: 0 a record sealed around the inner plaintext `bytes` (content, type,
//!   padding: any of them); 1 an application-data record of `bytes`; 2 like 0, then one bit
//!   flipped (its index: the two bytes after the chunk); 3 `bytes` as they are (hostile); 4
//!   a record of `len` bytes of inner plaintext repeating the next 16 bytes (long records
//!   from short inputs).
//!
//! The records must open exactly as an independent model of RFC 8446 §5.2–5.4 and §4.6 says,
//! up to the first hostile chunk; a flipped bit is always refused; the data they carry is
//! then read as frames too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use telefork_node::channel::records::{open, Record, Sealer};
use telefork_proto::{FromDest, ToDest};

mod frames;

const KEY: [u8; 32] = [0x42; 32];
const IV: [u8; 12] = [0x24; 12];
/// Largest ciphertext of a record (RFC 8446 §5.2) and the AEAD tag.
const MAX_CIPHER: usize = (1 << 14) + 256;
const TAG: usize = 16;

/// What the model expects the opener to have done after the chunks so far.
#[derive(PartialEq)]
enum State {
    /// Every record so far is authentic: the opener yields the model's records and goes on.
    Exact,
    /// The opener stops at the record the model stops at: close_notify (`true`) or an error.
    Stops(bool),
    /// Hostile bytes followed the model's records: after those, anything but a panic.
    Hostile,
}

/// An independent reading of one authentic record's inner plaintext.
fn model_record(inner: &[u8]) -> Result<Record, ()> {
    if inner.len() + TAG > MAX_CIPHER {
        return Err(()); // authentic, but longer than TLS allows
    }
    let t = inner.iter().rposition(|&b| b != 0).ok_or(())?;
    let content = &inner[..t];
    match (inner[t], content) {
        (23, _) => Ok(Record::Data(content.to_vec())),
        (21, [_, 0]) => Ok(Record::Closed),
        (22, msgs) => model_handshake(msgs).map(Record::Handshake),
        _ => Err(()),
    }
}

/// Post-handshake messages (type, u24 length, body): tickets are skipped; a KeyUpdate (one
/// byte, 0 or 1) may only come last.
fn model_handshake(mut msgs: &[u8]) -> Result<Option<bool>, ()> {
    let mut update = None;
    while !msgs.is_empty() {
        if update.is_some() {
            return Err(());
        }
        let (head, rest) = msgs.split_first_chunk::<4>().ok_or(())?;
        let n = u32::from_be_bytes([0, head[1], head[2], head[3]]) as usize;
        if rest.len() < n {
            return Err(());
        }
        let (body, rest) = rest.split_at(n);
        match (head[0], body) {
            (4, _) => {}
            (24, [r @ (0 | 1)]) => update = Some(*r == 1),
            _ => return Err(()),
        }
        msgs = rest;
    }
    Ok(update)
}

fn records(mut recipe: &[u8]) {
    let mut sealer = Sealer::new(KEY, IV).expect("a fixed key");
    let mut stream = Vec::new();
    let mut model = Vec::new();
    let mut state = State::Exact;
    while let Some((&op, rest)) = recipe.split_first() {
        let Some((len, rest)) = rest.split_first_chunk::<2>() else { break };
        let len = u16::from_le_bytes(*len) as usize % 17_000;
        let (bytes, rest) = if op % 5 == 4 {
            rest.split_at(rest.len().min(16))
        } else {
            rest.split_at(rest.len().min(len))
        };
        recipe = rest;
        let inner: Vec<u8> = match op % 5 {
            1 => [bytes, &[23]].concat(),
            4 => bytes.iter().copied().cycle().take(len).collect(),
            3 => {
                stream.extend_from_slice(bytes);
                if state == State::Exact {
                    state = State::Hostile;
                }
                continue;
            }
            _ => bytes.to_vec(),
        };
        let Some((&content_type, data)) = inner.split_last() else { continue };
        let mut record = sealer.seal(content_type, data).expect("a record of under 64 KiB seals");
        if op % 5 == 2 {
            let Some((at, rest)) = recipe.split_first_chunk::<2>() else { break };
            recipe = rest;
            let bit = u16::from_le_bytes(*at) as usize % (record.len() * 8);
            record[bit / 8] ^= 1 << (bit % 8);
        }
        stream.extend_from_slice(&record);
        if state != State::Exact {
            continue;
        }
        if op % 5 == 2 {
            state = State::Stops(false);
            continue;
        }
        match model_record(&inner) {
            Ok(r) => {
                if r == Record::Closed {
                    state = State::Stops(true);
                }
                model.push(r);
            }
            Err(()) => state = State::Stops(false),
        }
    }
    let (got, end) = open(KEY, IV, &stream);
    match state {
        State::Exact => {
            assert_eq!(got, model, "authentic records opened differently");
            assert!(end.is_ok(), "authentic records ended in {end:?}");
        }
        State::Stops(closed) => {
            assert_eq!(got, model, "records opened differently");
            assert_eq!(end.is_ok(), closed, "the stream ended in {end:?}");
        }
        State::Hostile => assert!(
            got.starts_with(&model),
            "authentic records before hostile bytes opened differently"
        ),
    }
    // What the records carried, read as the frames a daemon reads from them.
    let plain: Vec<u8> = got
        .iter()
        .flat_map(|r| if let Record::Data(d) = r { &d[..] } else { &[] })
        .copied()
        .collect();
    frames::check_stream::<ToDest>(&plain);
    frames::check_stream::<FromDest>(&plain);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        frames::check_stream::<ToDest>(rest);
        frames::check_stream::<FromDest>(rest);
    } else {
        records(rest);
    }
});
