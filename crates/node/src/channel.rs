//! A TLS 1.3 connection between two daemons, made for moving gigabytes, usable by several
//! threads at once (one waits for messages while others send output as it comes).
//!
//! rustls does the handshake (certificates, key schedule; its unbuffered API, so not a byte
//! past the handshake is read into its buffers). Then each direction's traffic keys are taken
//! from rustls (`dangerous_into_kernel_connection`, the hand-off meant for kernel TLS) and
//! records are sealed and opened *in place in our own buffers* with aws-lc-rs's AEAD, framed as
//! RFC 8446 §5.2 frames them: the bytes on the wire are ordinary TLS 1.3 records, which any
//! TLS 1.3 peer reads (a unit test checks this against rustls itself). rustls keeps
//! computing the next keys when a direction reaches its cipher's confidentiality limit
//! (KeyUpdate).
//!
//! Written by hand because rustls's buffered API copies every byte into and out of its own
//! buffers and allocates per record — for a process image, two extra passes over gigabytes on
//! machines with two cores — and kernel TLS, which takes exactly this hand-off, is not in
//! every kernel (CONFIG_TLS is not set on ours).
//!
//! Each direction has its own lock, so a blocked reader never delays a writer. The channel
//! also carries the process image as bytes (`Read`/`Write` on `&TlsChannel`), and can lend the
//! bare TCP socket for an image sent unencrypted between two records (`raw_socket`).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use serde::{de::DeserializeOwned, Serialize};

use crate::proto;

/// Largest plaintext of one record (RFC 8446 §5.1).
const MAX_PLAIN: usize = 1 << 14;
/// Largest ciphertext of one record we accept (RFC 8446 §5.2: 2^14 + 256).
const MAX_CIPHER: usize = MAX_PLAIN + 256;
const HEADER: usize = 5;
const TAG: usize = 16;
/// Records sealed per send(2) from a caller's buffer: 256 KiB, small enough to stay in cache
/// between sealing and sending (raw TLS 3.4 GB/s; 2.2–2.5 with 64 records).
const RECORDS_PER_SEND: usize = 16;
/// Records read from a pipe, sealed and sent at a time (`send_from`): 1 MiB. Against 16
/// records a 1 GiB telefork took 610 instead of 750 ms (fewer sends, and fewer wake-ups of
/// the process splicing into the pipe we drain); 128 was no better.
const RECORDS_PER_PIPE_SEND: usize = 64;
/// Received bytes buffered (and opened in place) at most.
const RX_BUFFER: usize = 1 << 20;

const TYPE_ALERT: u8 = 21;
const TYPE_HANDSHAKE: u8 = 22;
const TYPE_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_KEY_UPDATE: u8 = 24;
const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;

pub struct TlsChannel {
    sock: TcpStream,
    peer_certs: Vec<CertificateDer<'static>>,
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
    /// rustls's remaining state: computes the next traffic keys on KeyUpdate.
    keys: Mutex<Keys>,
    /// The peer asked us to update our sending keys too (KeyUpdate with update_requested).
    update_requested: AtomicBool,
    timeout: Mutex<Option<Duration>>,
}

enum Keys {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Keys {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Keys::Client(k) => k.update_tx_secret(),
            Keys::Server(k) => k.update_tx_secret(),
        }
    }

    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Keys::Client(k) => k.update_rx_secret(),
            Keys::Server(k) => k.update_rx_secret(),
        }
    }
}

/// One direction's AEAD key, IV and record sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Direction> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aws_lc_rs::aead::AES_128_GCM, key, iv)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aws_lc_rs::aead::AES_256_GCM, key, iv)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aws_lc_rs::aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(io::Error::other("TLS: the negotiated cipher is not supported")),
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| io::Error::other("TLS: bad traffic key"))?;
        let iv: [u8; 12] =
            iv.as_ref().try_into().map_err(|_| io::Error::other("TLS: bad IV length"))?;
        Ok(Direction { key: LessSafeKey::new(key), iv, seq })
    }

    /// The per-record nonce (RFC 8446 §5.3: the IV xor the sequence number), and the next
    /// sequence number.
    fn next_nonce(&mut self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(n)
    }
}

struct Tx {
    dir: Direction,
    /// Records after which the keys must change (the cipher's confidentiality limit).
    limit: u64,
    buf: Vec<u8>,
    /// Record slots `send_from` reads into and seals in place.
    area: Vec<u8>,
}

impl Tx {
    /// Appends one sealed record of `content_type` carrying `data` (at most MAX_PLAIN) to buf.
    fn seal(&mut self, content_type: u8, data: &[u8]) -> io::Result<()> {
        let start = self.buf.len();
        let len = data.len() + 1 + TAG;
        let header = [TYPE_APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        self.buf.extend_from_slice(&header);
        self.buf.extend_from_slice(data);
        self.buf.push(content_type);
        let nonce = self.dir.next_nonce();
        let tag = self
            .dir
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.buf[start + HEADER..])
            .map_err(|_| io::Error::other("TLS: sealing a record failed"))?;
        self.buf.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

struct Rx {
    dir: Direction,
    buf: Box<[u8]>,
    /// buf[head..tail]: received bytes not yet opened.
    head: usize,
    tail: usize,
    /// buf[plain.0..plain.1]: opened application data not yet read.
    plain: (usize, usize),
    /// Plaintext rustls decrypted during the handshake (data the peer sent right after it).
    early: Vec<u8>,
    /// close_notify received, or the TCP stream ended between records.
    eof: bool,
}

/// What opening one record produced.
enum Opened {
    Data,
    Handshake(Vec<u8>),
    Closed,
}

impl Rx {
    /// Opens the record at buf[head..] if it is complete. Application data is left in
    /// `plain`.
    fn open_next(&mut self) -> io::Result<Option<Opened>> {
        let avail = self.tail - self.head;
        if avail < HEADER {
            return Ok(None);
        }
        let h = &self.buf[self.head..self.head + HEADER];
        let header: [u8; HEADER] = [h[0], h[1], h[2], h[3], h[4]];
        let len = record_len(header)?;
        if avail < HEADER + len {
            return Ok(None);
        }
        let body = self.head + HEADER;
        self.head = body + len;
        let nonce = self.dir.next_nonce();
        let opened = self
            .dir
            .key
            .open_in_place(nonce, Aad::from(header), &mut self.buf[body..body + len])
            .map_err(|_| {
                invalid("TLS: a record failed authentication (corrupted or forged)".into())
            })?;
        // Inner plaintext: content, then the real content type, then zero padding.
        let Some(type_at) = opened.iter().rposition(|&b| b != 0) else {
            return Err(invalid("TLS: a record without a content type".into()));
        };
        let content = (body, body + type_at);
        match opened[type_at] {
            TYPE_APPLICATION_DATA => {
                self.plain = content;
                Ok(Some(Opened::Data))
            }
            TYPE_ALERT => match &self.buf[content.0..content.1] {
                [_, 0] => Ok(Some(Opened::Closed)),
                [_, desc] => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("TLS: the peer sent alert {desc}"),
                )),
                _ => Err(invalid("TLS: malformed alert".into())),
            },
            TYPE_HANDSHAKE => Ok(Some(Opened::Handshake(self.buf[content.0..content.1].to_vec()))),
            t => Err(invalid(format!("TLS: record of unexpected content type {t}"))),
        }
    }

    /// Makes room for at least one whole record after `tail`.
    fn make_room(&mut self) {
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        } else if self.buf.len() - self.head < HEADER + MAX_CIPHER {
            self.buf.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
    }
}

/// The length of the record after `header`, if the header is one a TLS 1.3 peer sends after
/// the handshake: application data, legacy version 3.3, room for a content type and a tag,
/// at most `MAX_CIPHER` (checked before the record is waited for).
fn record_len(header: [u8; HEADER]) -> io::Result<usize> {
    let len = u16::from_be_bytes([header[3], header[4]]) as usize;
    if header[0] != TYPE_APPLICATION_DATA
        || header[1] != 3
        || header[2] != 3
        || !(TAG + 1..=MAX_CIPHER).contains(&len)
    {
        return Err(invalid(format!("TLS: malformed record header {header:02x?}")));
    }
    Ok(len)
}

/// What a post-handshake record asks for: `Some(request)` if it ends with a KeyUpdate (the
/// next records come under new keys; `request`: the peer wants ours changed too), `None` if
/// it holds only NewSessionTickets (ignored: we never resume). Anything else is an error.
/// (A record may hold several messages; a message split across records is refused —
/// neither we nor rustls send one.)
fn post_handshake(record: &[u8]) -> io::Result<Option<bool>> {
    let mut rest = record;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(invalid("TLS: truncated post-handshake message".into()));
        }
        let len = u32::from_be_bytes([0, rest[1], rest[2], rest[3]]) as usize;
        if rest.len() < 4 + len {
            return Err(invalid(
                "TLS: post-handshake message split across records (not supported)".into(),
            ));
        }
        let (msg, tail) = rest.split_at(4 + len);
        rest = tail;
        match msg {
            // KeyUpdate ends its record (RFC 8446 §5.1): what follows is under new keys.
            [HANDSHAKE_KEY_UPDATE, 0, 0, 1, request] if *request <= 1 && rest.is_empty() => {
                return Ok(Some(*request == 1))
            }
            [HANDSHAKE_NEW_SESSION_TICKET, ..] => {}
            _ => return Err(invalid("TLS: unexpected post-handshake message".into())),
        }
    }
    Ok(None)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One step of a handshake, whichever side we are (rustls has a separate
/// `process_tls_records` per side).
trait Handshake {
    type Data;
    fn step<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
    fn peer_certs(&self) -> Vec<CertificateDer<'static>>;
}

impl Handshake for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn step<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
    fn peer_certs(&self) -> Vec<CertificateDer<'static>> {
        self.peer_certificates().map(|c| c.to_vec()).unwrap_or_default()
    }
}

impl Handshake for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn step<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
    fn peer_certs(&self) -> Vec<CertificateDer<'static>> {
        self.peer_certificates().map(|c| c.to_vec()).unwrap_or_default()
    }
}

/// Length of the first whole record in `buf` (0 if it is not all there yet). Bytes that
/// cannot start a TLS record are all handed over at once, for rustls to refuse at once.
fn first_record(buf: &[u8]) -> usize {
    if let Some(&t) = buf.first() {
        if !(20..=23).contains(&t) || buf.get(1).is_some_and(|&v| v != 3) {
            return buf.len();
        }
    }
    if buf.len() < HEADER {
        return 0;
    }
    let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if len > MAX_CIPHER + 2048 {
        return buf.len();
    }
    let end = HEADER + len;
    if buf.len() >= end {
        end
    } else {
        0
    }
}

/// Drives the handshake to completion. rustls is given one record at a time, so the records
/// that follow the handshake stay ours. Returns what was received past the handshake
/// (`HandshakeBuffers::into_rest`).
fn drive<C: Handshake>(
    conn: &mut C,
    sock: &TcpStream,
    timeout: Duration,
) -> Result<HandshakeBuffers> {
    // The whole handshake within `timeout` (a peer trickling bytes must not hold us).
    let deadline = Instant::now() + timeout;
    let mut state = HandshakeBuffers::new();
    loop {
        if state.advance(conn, sock)? {
            return Ok(state);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("TLS handshake failed: not done within {timeout:?}");
        }
        sock.set_read_timeout(Some(left)).ok();
        state.receive(sock, false)?;
    }
}

/// The bytes of a handshake in progress: received and not yet given to rustls, and to send.
struct HandshakeBuffers {
    incoming: Vec<u8>,
    filled: usize,
    outgoing: Vec<u8>,
    out_len: usize,
    early: Vec<u8>,
}

impl HandshakeBuffers {
    fn new() -> HandshakeBuffers {
        HandshakeBuffers {
            incoming: vec![0u8; 32 << 10],
            filled: 0,
            outgoing: vec![0u8; 16 << 10],
            out_len: 0,
            early: Vec::new(),
        }
    }

    /// Runs the handshake as far as the bytes received allow, sending what it produces.
    /// True once it is complete; false when it needs more input.
    fn advance<C: Handshake>(&mut self, conn: &mut C, sock: &TcpStream) -> Result<bool> {
        loop {
            let record = first_record(&self.incoming[..self.filled]);
            let UnbufferedStatus { mut discard, state } = conn.step(&mut self.incoming[..record]);
            let mut need_input = false;
            let mut may_write = false;
            match state.map_err(|e| anyhow!("TLS handshake failed: {e}"))? {
                ConnectionState::EncodeTlsData(mut s) => loop {
                    match s.encode(&mut self.outgoing[self.out_len..]) {
                        Ok(n) => {
                            self.out_len += n;
                            break;
                        }
                        Err(EncodeError::InsufficientSize(InsufficientSizeError {
                            required_size,
                        })) => {
                            self.outgoing.resize(self.out_len + required_size, 0);
                        }
                        Err(e) => bail!("TLS handshake failed: {e}"),
                    }
                },
                ConnectionState::TransmitTlsData(t) => {
                    // (A handshake's flights are a few KiB: they fit a fresh socket's send
                    // buffer, so this does not wait even on a socket served by an event loop.)
                    (&*sock)
                        .write_all(&self.outgoing[..self.out_len])
                        .context("TLS handshake failed: sending")?;
                    self.out_len = 0;
                    t.done();
                }
                ConnectionState::BlockedHandshake => need_input = true,
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec.map_err(|e| anyhow!("TLS failed: {e}"))?;
                        discard += rec.discard;
                        self.early.extend_from_slice(rec.payload);
                    }
                }
                ConnectionState::WriteTraffic(_) => may_write = true,
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    bail!("the peer closed the connection during the TLS handshake")
                }
                _ => bail!("TLS handshake failed: unexpected state (early data?)"),
            }
            self.incoming.copy_within(discard..self.filled, 0);
            self.filled -= discard;
            if may_write {
                if !conn.handshaking() {
                    return Ok(true);
                }
                need_input = true; // (a server may write before the client's Finished)
            }
            if need_input && first_record(&self.incoming[..self.filled]) == 0 {
                return Ok(false);
            }
        }
    }

    /// Receives more of the handshake: waits for it (within the socket's read timeout), or
    /// with `nonblocking` takes only what has arrived (false if nothing had).
    fn receive(&mut self, sock: &TcpStream, nonblocking: bool) -> Result<bool> {
        if self.filled == self.incoming.len() {
            if self.incoming.len() >= 1 << 20 {
                bail!("TLS handshake failed: handshake messages too large");
            }
            self.incoming.resize(self.incoming.len() * 2, 0);
        }
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        let buf = &mut self.incoming[self.filled..];
        // SAFETY: recv writes at most buf.len() bytes into `buf`, which we own.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock if nonblocking => Ok(false),
                io::ErrorKind::Interrupted => Ok(false),
                _ => Err(e).context("TLS handshake failed: receiving"),
            };
        }
        if n == 0 {
            bail!("the peer closed the connection during the TLS handshake");
        }
        self.filled += n as usize;
        Ok(true)
    }

    /// The bytes received past the handshake (the start of the record stream), and any
    /// application data rustls opened anyway.
    fn into_rest(mut self) -> (Vec<u8>, Vec<u8>) {
        self.incoming.truncate(self.filled);
        (self.incoming, self.early)
    }
}

/// The server side of a handshake run by an event loop (the daemon's, before any session
/// process exists for the connection): fed whenever its socket is readable, it never waits.
pub struct PendingServer {
    conn: UnbufferedServerConnection,
    buffers: HandshakeBuffers,
    done: bool,
}

impl PendingServer {
    pub fn new(
        cfg: Arc<rustls::ServerConfig>,
        sock: &TcpStream,
        timeout: Duration,
    ) -> Result<PendingServer> {
        prepare(sock, timeout);
        let conn = UnbufferedServerConnection::new(cfg).context("starting TLS")?;
        Ok(PendingServer { conn, buffers: HandshakeBuffers::new(), done: false })
    }

    /// Takes what has arrived on `sock` and answers it. True once the handshake is complete
    /// (the client's certificate verified).
    pub fn progress(&mut self, sock: &TcpStream) -> Result<bool> {
        while !self.done && self.buffers.receive(sock, true)? {
            self.done = self.buffers.advance(&mut self.conn, sock)?;
        }
        Ok(self.done)
    }

    /// The client's certificate chain (verified by the handshake).
    pub fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
        self.conn.peer_certs()
    }

    /// The channel of a completed handshake.
    pub fn finish(self, sock: TcpStream, timeout: Duration) -> Result<TlsChannel> {
        if !self.done {
            bail!("TLS: the handshake is not complete");
        }
        let peer = self.conn.peer_certs();
        let (rest, early) = self.buffers.into_rest();
        let (secrets, kc) = self
            .conn
            .dangerous_into_kernel_connection()
            .map_err(|e| anyhow!("TLS: taking the traffic keys: {e}"))?;
        let limit = limit_of(kc.negotiated_cipher_suite());
        TlsChannel::assemble(sock, peer, secrets, Keys::Server(kc), limit, rest, early, timeout)
    }
}

impl TlsChannel {
    /// Connects as a client and completes the handshake within `timeout`.
    pub fn client(
        cfg: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
        sock: TcpStream,
        timeout: Duration,
    ) -> Result<Self> {
        prepare(&sock, timeout);
        let mut conn = UnbufferedClientConnection::new(cfg, name).context("starting TLS")?;
        let (rest, early) = drive(&mut conn, &sock, timeout)?.into_rest();
        let peer = conn.peer_certs();
        let (secrets, kc) = conn
            .dangerous_into_kernel_connection()
            .map_err(|e| anyhow!("TLS: taking the traffic keys: {e}"))?;
        let limit = limit_of(kc.negotiated_cipher_suite());
        Self::assemble(sock, peer, secrets, Keys::Client(kc), limit, rest, early, timeout)
    }

    /// Accepts a client and completes the handshake (which verifies its certificate) within
    /// `timeout`.
    pub fn server(
        cfg: Arc<rustls::ServerConfig>,
        sock: TcpStream,
        timeout: Duration,
    ) -> Result<Self> {
        prepare(&sock, timeout);
        let mut conn = UnbufferedServerConnection::new(cfg).context("starting TLS")?;
        let buffers = drive(&mut conn, &sock, timeout)?;
        PendingServer { conn, buffers, done: true }.finish(sock, timeout)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        sock: TcpStream,
        peer_certs: Vec<CertificateDer<'static>>,
        secrets: ExtractedSecrets,
        keys: Keys,
        limit: u64,
        rest: Vec<u8>,
        early: Vec<u8>,
        timeout: Duration,
    ) -> Result<Self> {
        sock.set_read_timeout(None).ok();
        if rest.len() > RX_BUFFER {
            bail!("TLS: too much data right after the handshake");
        }
        let mut buf = vec![0u8; RX_BUFFER].into_boxed_slice();
        buf[..rest.len()].copy_from_slice(&rest);
        let rx = Rx {
            dir: Direction::new(secrets.rx)?,
            buf,
            head: 0,
            tail: rest.len(),
            plain: (0, 0),
            early,
            eof: false,
        };
        let tx = Tx {
            dir: Direction::new(secrets.tx)?,
            limit,
            buf: Vec::with_capacity(RECORDS_PER_SEND * (HEADER + MAX_PLAIN + 1 + TAG)),
            area: Vec::new(),
        };
        Ok(TlsChannel {
            sock,
            peer_certs,
            tx: Mutex::new(tx),
            rx: Mutex::new(rx),
            keys: Mutex::new(keys),
            update_requested: AtomicBool::new(false),
            timeout: Mutex::new(Some(timeout)),
        })
    }

    /// For tests: change sending keys after this many records (normally the cipher's limit).
    #[cfg(test)]
    fn set_key_limit(&self, records: u64) {
        self.tx.lock().unwrap().limit = records;
    }

    /// The peer's certificate chain (verified during the handshake).
    pub fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
        self.peer_certs.clone()
    }

    /// How long a receive may wait for data (None: forever). Sends always time out after
    /// the handshake timeout, so a vanished peer cannot hang us.
    pub fn set_recv_timeout(&self, t: Option<Duration>) {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    pub fn send<T: Serialize>(&self, msg: &T) -> Result<()> {
        let mut w = self;
        Ok(proto::write_frame(&mut w, msg)?)
    }

    /// Sends a request, or the first answer to one: behind this side's hello (the protocol
    /// version), in one go.
    pub fn send_first<T: Serialize>(&self, msg: &T) -> Result<()> {
        let mut w = self;
        Ok(proto::write_first(&mut w, msg)?)
    }

    /// Receives a message (hellos of our version passed over; one of another version is a
    /// `proto::Error::Version`).
    pub fn recv<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        let mut r = self;
        Ok(proto::read_frame(&mut r)?)
    }

    /// Receives a request, which must come behind a hello of our version
    /// (`proto::read_first`).
    pub fn recv_first<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        let mut r = self;
        Ok(proto::read_first(&mut r)?)
    }

    pub fn expect<T: DeserializeOwned>(&self, what: &str) -> Result<T> {
        let mut r = self;
        Ok(proto::expect_frame(&mut r, what)?)
    }

    /// Sends close_notify and shuts the socket down.
    pub fn close(&self) {
        let _ = self.send_records(TYPE_ALERT, &[1, 0]);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Seals `data` into records of `content_type` and sends them, RECORDS_PER_SEND at a
    /// time; changes keys first when the limit is reached or the peer asked.
    fn send_records(&self, content_type: u8, data: &[u8]) -> io::Result<()> {
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let mut pieces = data.chunks(MAX_PLAIN).peekable();
        loop {
            tx.buf.clear();
            for _ in 0..RECORDS_PER_SEND {
                let Some(piece) = pieces.next() else { break };
                if tx.dir.seq >= tx.limit || self.update_requested.swap(false, Ordering::SeqCst) {
                    // KeyUpdate (RFC 8446 §4.6.3), update_not_requested, under the old keys.
                    tx.seal(TYPE_HANDSHAKE, &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0])?;
                    let next = self
                        .keys
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .next_tx()
                        .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
                    tx.dir = Direction::new(next)?;
                }
                tx.seal(content_type, piece)?;
            }
            self.write_sock(&tx.buf)?;
            if pieces.peek().is_none() {
                return Ok(());
            }
        }
    }

    /// Sends exactly `len` bytes read from `fd` (a pipe the captured process splices its
    /// memory into): they are read straight into the payload areas of the records, sealed in
    /// place and sent — no copy between reading and sealing.
    pub fn send_from(&self, fd: std::os::fd::RawFd, len: usize) -> io::Result<()> {
        const SLOT: usize = HEADER + MAX_PLAIN + 1 + TAG;
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let mut area = std::mem::take(&mut tx.area);
        area.resize(RECORDS_PER_PIPE_SEND * SLOT, 0); // (once: the area is kept)
        let result = (|| {
            let mut left = len;
            while left > 0 {
                // Keys change between batches, with margin (the limit has 1024 records of it).
                if tx.dir.seq + RECORDS_PER_PIPE_SEND as u64 >= tx.limit
                    || self.update_requested.swap(false, Ordering::SeqCst)
                {
                    tx.buf.clear();
                    tx.seal(TYPE_HANDSHAKE, &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0])?;
                    self.write_sock(&tx.buf)?;
                    let next = self
                        .keys
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .next_tx()
                        .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
                    tx.dir = Direction::new(next)?;
                }
                // Lay out the batch's records back to back: header, payload, type, tag.
                let mut records = Vec::with_capacity(RECORDS_PER_PIPE_SEND);
                let mut end = 0usize;
                while records.len() < RECORDS_PER_PIPE_SEND && left > 0 {
                    let n = left.min(MAX_PLAIN);
                    records.push((end, n));
                    end += HEADER + n + 1 + TAG;
                    left -= n;
                }
                // Fill every payload from the pipe.
                let base = area.as_mut_ptr();
                let mut iov: Vec<libc::iovec> = records
                    .iter()
                    .map(|&(at, n)| libc::iovec {
                        // SAFETY: at + HEADER + n <= end <= area.len(): inside `area`.
                        iov_base: unsafe { base.add(at + HEADER) }.cast(),
                        iov_len: n,
                    })
                    .collect();
                let mut first = 0usize;
                while first < iov.len() {
                    // SAFETY: every iovec points into `area`, at disjoint payload ranges that lie
                    // inside it; `area` is not touched otherwise until readv returns.
                    let got = unsafe {
                        libc::readv(fd, iov[first..].as_ptr(), (iov.len() - first) as libc::c_int)
                    };
                    if got < 0 {
                        let e = io::Error::last_os_error();
                        match e.kind() {
                            io::ErrorKind::Interrupted => continue,
                            io::ErrorKind::WouldBlock => {
                                wait_for_pipe(fd)?;
                                continue;
                            }
                            _ => return Err(e),
                        }
                    }
                    if got == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the process's memory ended early",
                        ));
                    }
                    let mut got = got as usize;
                    while got > 0 {
                        let v = &mut iov[first];
                        let k = got.min(v.iov_len);
                        // SAFETY: advancing within the same payload range.
                        v.iov_base = unsafe { v.iov_base.cast::<u8>().add(k).cast() };
                        v.iov_len -= k;
                        got -= k;
                        if v.iov_len == 0 {
                            first += 1;
                        }
                    }
                }
                for &(at, n) in &records {
                    let rlen = n + 1 + TAG;
                    let header = [TYPE_APPLICATION_DATA, 3, 3, (rlen >> 8) as u8, rlen as u8];
                    area[at..at + HEADER].copy_from_slice(&header);
                    area[at + HEADER + n] = TYPE_APPLICATION_DATA;
                    let nonce = tx.dir.next_nonce();
                    let tag = tx
                        .dir
                        .key
                        .seal_in_place_separate_tag(
                            nonce,
                            Aad::from(header),
                            &mut area[at + HEADER..at + HEADER + n + 1],
                        )
                        .map_err(|_| io::Error::other("TLS: sealing a record failed"))?;
                    area[at + HEADER + n + 1..at + rlen + HEADER].copy_from_slice(tag.as_ref());
                }
                self.write_sock(&area[..end])?;
            }
            Ok(())
        })();
        tx.area = area;
        result
    }

    /// Handles a post-handshake record (`post_handshake`): KeyUpdate switches the receiving
    /// keys (and, if the peer asks, ours).
    fn on_handshake(&self, rx: &mut Rx, record: &[u8]) -> io::Result<()> {
        if let Some(request) = post_handshake(record)? {
            let next = self
                .keys
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .next_rx()
                .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
            rx.dir = Direction::new(next)?;
            if request {
                self.update_requested.store(true, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    fn wait_readable(&self, deadline: Option<Instant>) -> io::Result<()> {
        loop {
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        let waited = self
                            .timeout
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .unwrap_or_default();
                        return Err(io::Error::new(io::ErrorKind::TimedOut, format!("nothing came from the peer for {} s (the link or the peer is down)", waited.as_secs())));
                    }
                    PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
                        .unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) => continue,
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes all of `buf` to the socket. Its send timeout (the handshake timeout) expiring
    /// means the peer took nothing for that long: said so, instead of the bare EAGAIN
    /// ("Resource temporarily unavailable") the kernel gives.
    fn write_sock(&self, buf: &[u8]) -> io::Result<()> {
        (&self.sock).write_all(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                let waited = self.sock.write_timeout().ok().flatten().unwrap_or_default();
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the peer took nothing for {} s (the link or the peer is down)",
                        waited.as_secs()
                    ),
                )
            }
            _ => e,
        })
    }

    /// The TCP socket, the TLS session given up (for a connection only drained from now on).
    pub fn into_socket(self) -> io::Result<TcpStream> {
        self.sock.try_clone()
    }

    /// The TCP socket under the session (for poll, and for a process to write its pages onto on
    /// the plain transport).
    pub fn socket_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.sock)
    }

    /// The TCP socket under the TLS session, for bytes that travel unencrypted between two
    /// TLS records (`ImageTransport::Plain`). Only while neither side has TLS data in flight:
    /// an error if bytes beyond the last TLS record were already received. The caller must
    /// be the only user of the channel meanwhile (no other thread reading or sending).
    pub fn raw_socket(&self) -> io::Result<&TcpStream> {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        if rx.head != rx.tail || rx.plain.0 != rx.plain.1 || !rx.early.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer sent data before its turn",
            ));
        }
        Ok(&self.sock)
    }
}

impl Read for &TlsChannel {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let deadline =
            self.timeout.lock().unwrap_or_else(|e| e.into_inner()).map(|t| Instant::now() + t);
        let mut guard = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        let rx = &mut *guard;
        if !rx.early.is_empty() {
            let n = out.len().min(rx.early.len());
            out[..n].copy_from_slice(&rx.early[..n]);
            rx.early.drain(..n);
            return Ok(n);
        }
        loop {
            let (a, b) = rx.plain;
            if a < b {
                let n = out.len().min(b - a);
                out[..n].copy_from_slice(&rx.buf[a..a + n]);
                rx.plain.0 += n;
                return Ok(n);
            }
            if rx.eof {
                return Ok(0);
            }
            match rx.open_next()? {
                Some(Opened::Data) => continue,
                Some(Opened::Handshake(msg)) => {
                    self.on_handshake(rx, &msg)?;
                    continue;
                }
                Some(Opened::Closed) => {
                    rx.eof = true;
                    continue;
                }
                None => {}
            }
            // More bytes: as many as have arrived (one recv feeds many records), waiting
            // (with the lock held: only readers wait for it) if none have.
            rx.make_room();
            let tail = rx.tail;
            // SAFETY: recv writes at most buf.len() - tail bytes into rx.buf[tail..], ours.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    rx.buf[tail..].as_mut_ptr().cast(),
                    rx.buf.len() - tail,
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => self.wait_readable(deadline)?,
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(e),
                }
                continue;
            }
            if n == 0 {
                if rx.head != rx.tail {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS: the connection ended inside a record",
                    ));
                }
                rx.eof = true; // (the peer closed TCP without close_notify: the end, as before)
                continue;
            }
            rx.tail += n as usize;
        }
    }
}

impl Write for &TlsChannel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send_records(TYPE_APPLICATION_DATA, buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Waits (30 s at most) until the pipe `send_from` reads has bytes (or its writer is gone).
fn wait_for_pipe(fd: std::os::fd::RawFd) -> io::Result<()> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: poll reads and writes the one pollfd we pass.
        match unsafe { libc::poll(&mut p, 1, 30_000) } {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the process stopped handing over its memory (30 s)",
                ))
            }
            n if n > 0 => return Ok(()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Records per key: the cipher suite's confidentiality limit (2^24 for AES-GCM), less a
/// margin.
fn limit_of(suite: rustls::SupportedCipherSuite) -> u64 {
    suite
        .tls13()
        .map(|s| s.common.confidentiality_limit)
        .unwrap_or(1 << 24)
        .saturating_sub(1024)
        .max(1)
}

/// Socket options for a node connection: no Nagle delay, deep buffers, timeouts for the
/// handshake (and for every later send).
fn prepare(sock: &TcpStream, timeout: Duration) {
    sock.set_nodelay(true).ok();
    deep_buffers(sock);
    sock.set_read_timeout(Some(timeout)).ok();
    sock.set_write_timeout(Some(timeout)).ok();
}

/// Gives the socket deep kernel buffers (32 MiB each way; the daemon runs as root, so
/// SO_*BUFFORCE may exceed net.core.[rw]mem_max): while the receiving process is busy
/// placing the memory of one chunk of an image, the sender keeps streaming the next into the
/// buffer instead of stalling (1 GiB: 830 ms with these, 980 ms with the kernel's defaults).
/// Best effort.
fn deep_buffers(sock: &TcpStream) {
    let size: libc::c_int = 32 << 20;
    for opt in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE] {
        // SAFETY: setsockopt reads one c_int from `size`, which outlives the call.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Connects to `addr` within `timeout`, from a reserved port (below 1024) if one is free.
///
/// Only root may bind those, so a node tells its daemon's connections apart from those of
/// anyone else on the same host by the port alone: it serves them in a queue of their own
/// (`admission`), and a local user who floods a peer from this host's address cannot delay
/// this daemon's teleforks there. (Not an authentication: the TLS handshake is that.)
pub fn connect(addr: std::net::SocketAddr, timeout: Duration) -> Result<TcpStream> {
    if let Some(s) = connect_from_reserved_port(addr, timeout) {
        return Ok(s);
    }
    let s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(s)
}

/// Reserved ports tried, from a random start: 512..1024 (below them, the well-known services).
const RESERVED_PORTS: std::ops::Range<u16> = 512..1024;

/// A connection from a free reserved port, or None (not root, none free, or the connect
/// failed: the caller then connects the ordinary way, and says why if that fails too).
fn connect_from_reserved_port(addr: std::net::SocketAddr, timeout: Duration) -> Option<TcpStream> {
    use nix::sys::socket::{
        bind, connect as sys_connect, setsockopt, socket, sockopt, AddressFamily, SockFlag,
        SockType, SockaddrStorage,
    };
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let span = (RESERVED_PORTS.end - RESERVED_PORTS.start) as u32;
    // (A start that differs between processes and moments; nothing depends on its quality.)
    let start = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for i in 0..32u32 {
        let port = RESERVED_PORTS.start + ((start.wrapping_add(i)) % span) as u16;
        let fd = socket(
            family,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .ok()?;
        // (A port whose last connection lingers in TIME_WAIT elsewhere may be bound again.)
        setsockopt(&fd, sockopt::ReuseAddr, &true).ok()?;
        let local = std::net::SocketAddr::new(
            if addr.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            },
            port,
        );
        match bind(fd.as_raw_fd(), &SockaddrStorage::from(local)) {
            Ok(()) => {}
            Err(nix::errno::Errno::EADDRINUSE) => continue,
            Err(_) => return None, // (EACCES: not root)
        }
        match sys_connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
            Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
            Err(nix::errno::Errno::EADDRNOTAVAIL | nix::errno::Errno::EADDRINUSE) => continue,
            Err(_) => return None,
        }
        let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        if !matches!(poll(&mut p, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)), Ok(1)) {
            return None;
        }
        match nix::sys::socket::getsockopt(&fd, sockopt::SocketError) {
            Ok(0) => {}
            Ok(e) if e == libc::EADDRNOTAVAIL || e == libc::EADDRINUSE => continue,
            _ => return None,
        }
        let stream = TcpStream::from(fd);
        stream.set_nonblocking(false).ok()?;
        return Some(stream);
    }
    None
}

/// Fails unless the peer certificate names `node`.
pub fn check_peer_name(ch: &TlsChannel, expect: Option<&str>) -> Result<String> {
    let certs = ch.peer_certificates();
    let name =
        crate::tls::peer_node_name(&certs).context("peer certificate carries no node name")?;
    if let Some(e) = expect {
        if e != name {
            bail!("peer is {name:?}, expected {e:?}");
        }
    }
    Ok(name)
}

/// The record layer without a socket, for the fuzzer (fuzz/fuzz_targets/node_protocol.rs),
/// its seeds and tests: one direction's records sealed and opened by the channel's own code
/// (`Tx::seal`; `Rx::open_next`, in place, then `post_handshake`) under a fixed AES-256-GCM
/// key. A KeyUpdate is reported, but the keys stay: there is no key schedule here.
pub mod records {
    use rustls::crypto::cipher::{AeadKey, Iv};

    use super::*;

    /// What one record carried.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Record {
        Data(Vec<u8>),
        /// Post-handshake messages: `Some(request)` if they end with a KeyUpdate, `None` if
        /// they are only NewSessionTickets.
        Handshake(Option<bool>),
        /// close_notify: nothing after it is read.
        Closed,
    }

    fn direction(key: [u8; 32], iv: [u8; 12]) -> io::Result<Direction> {
        Direction::new((
            0,
            ConnectionTrafficSecrets::Aes256Gcm { key: AeadKey::from(key), iv: Iv::new(iv) },
        ))
    }

    /// Seals records one after another (sequence numbers from 0), as a sending channel does.
    pub struct Sealer(Tx);

    impl Sealer {
        pub fn new(key: [u8; 32], iv: [u8; 12]) -> io::Result<Sealer> {
            Ok(Sealer(Tx {
                dir: direction(key, iv)?,
                limit: u64::MAX,
                buf: Vec::new(),
                area: Vec::new(),
            }))
        }

        /// One record whose inner plaintext is `data`, then `content_type` (so any inner
        /// plaintext, padding included, can be made). `data` may exceed `MAX_PLAIN` (an
        /// authentic record a reader must refuse as too long) as long as the length fits the
        /// header's 16 bits.
        pub fn seal(&mut self, content_type: u8, data: &[u8]) -> io::Result<Vec<u8>> {
            if data.len() + 1 + TAG > u16::MAX as usize {
                return Err(invalid(format!(
                    "TLS: {} bytes do not fit one record's 16-bit length",
                    data.len()
                )));
            }
            self.0.buf.clear();
            self.0.seal(content_type, data)?;
            Ok(std::mem::take(&mut self.0.buf))
        }
    }

    /// Opens the records of `stream` in order, in place, as a receiving channel does: up to
    /// its end, a close_notify or the first error (a stream that ends inside a record is one,
    /// as a connection that does). What the records carried, and how the stream ended.
    pub fn open(key: [u8; 32], iv: [u8; 12], stream: &[u8]) -> (Vec<Record>, io::Result<()>) {
        let mut out = Vec::new();
        let dir = match direction(key, iv) {
            Ok(d) => d,
            Err(e) => return (out, Err(e)),
        };
        let mut rx = Rx {
            dir,
            buf: stream.into(),
            head: 0,
            tail: stream.len(),
            plain: (0, 0),
            early: Vec::new(),
            eof: false,
        };
        loop {
            let record = match rx.open_next() {
                Ok(Some(Opened::Data)) => Record::Data(rx.buf[rx.plain.0..rx.plain.1].to_vec()),
                Ok(Some(Opened::Handshake(msg))) => match post_handshake(&msg) {
                    Ok(k) => Record::Handshake(k),
                    Err(e) => return (out, Err(e)),
                },
                Ok(Some(Opened::Closed)) => {
                    out.push(Record::Closed);
                    return (out, Ok(()));
                }
                Ok(None) if rx.head == rx.tail => return (out, Ok(())),
                Ok(None) => {
                    return (
                        out,
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "TLS: the connection ended inside a record",
                        )),
                    )
                }
                Err(e) => return (out, Err(e)),
            };
            out.push(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::path::Path;

    use super::*;
    use crate::cluster;
    use crate::config::TlsFiles;

    const T: Duration = Duration::from_secs(20);

    fn cluster_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        cluster::init(d.path(), &["node1".to_string(), "node2".to_string()]).unwrap();
        d
    }

    fn files(dir: &Path, node: &str) -> TlsFiles {
        let (cert, key) = cluster::node_files(dir, node);
        TlsFiles { ca: dir.join(cluster::CA_CERT), cert, key }
    }

    /// A cluster of node1 (server) and node2 (client), and a listener on loopback.
    fn setup() -> (
        tempfile::TempDir,
        Arc<rustls::ServerConfig>,
        Arc<rustls::ClientConfig>,
        TcpListener,
        std::net::SocketAddr,
    ) {
        let d = cluster_dir();
        let server_cfg = crate::tls::server_config(&files(d.path(), "node1")).unwrap();
        let client_cfg = crate::tls::client_config(&files(d.path(), "node2")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        (d, server_cfg, client_cfg, listener, addr)
    }

    /// A pseudo-random pattern (xorshift), so misplaced bytes are caught.
    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Our client and server: 3 MiB each way at once, keys changing every 20 records
    /// (KeyUpdate both ways, ~10 times), then close_notify ends the stream.
    #[test]
    fn both_ways_with_key_updates() {
        let (_d, server_cfg, client_cfg, listener, addr) = setup();
        let up = pattern(3 << 20, 1);
        let down = pattern(3 << 20, 2);
        let (up2, down2) = (up.clone(), down.clone());
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let ch = Arc::new(TlsChannel::server(server_cfg, s, T).unwrap());
            assert_eq!(check_peer_name(&ch, Some("node2")).unwrap(), "node2");
            ch.set_key_limit(20);
            let w = {
                let ch = ch.clone();
                std::thread::spawn(move || (&*ch).write_all(&down2).unwrap())
            };
            let mut got = vec![0u8; up2.len()];
            (&*ch).read_exact(&mut got).unwrap();
            assert!(got == up2, "server received different bytes");
            w.join().unwrap();
            ch.close();
        });
        let ch = TlsChannel::client(
            client_cfg,
            crate::tls::server_name("node1").unwrap(),
            TcpStream::connect(addr).unwrap(),
            T,
        )
        .unwrap();
        assert_eq!(check_peer_name(&ch, Some("node1")).unwrap(), "node1");
        ch.set_key_limit(20);
        std::thread::scope(|s| {
            s.spawn(|| (&ch).write_all(&up).unwrap());
            let mut got = vec![0u8; down.len()];
            (&ch).read_exact(&mut got).unwrap();
            assert!(got == down, "client received different bytes");
        });
        // After close_notify: end of stream.
        let mut rest = Vec::new();
        (&ch).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        server.join().unwrap();
    }

    /// The records are standard TLS 1.3: rustls's own buffered server reads what our client
    /// sends (across our KeyUpdates) and echoes it; it then updates its keys itself and our
    /// client follows.
    #[test]
    fn a_standard_tls_peer_reads_our_records() {
        let (_d, server_cfg, client_cfg, listener, addr) = setup();
        let data = pattern(1 << 20, 3);
        let len = data.len();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            let conn = rustls::ServerConnection::new(server_cfg).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, s);
            let mut got = vec![0u8; len];
            tls.read_exact(&mut got).unwrap();
            tls.conn.refresh_traffic_keys().unwrap();
            tls.write_all(&got).unwrap();
            tls.flush().unwrap();
            tls.conn.send_close_notify();
            tls.flush().unwrap();
        });
        let ch = TlsChannel::client(
            client_cfg,
            crate::tls::server_name("node1").unwrap(),
            TcpStream::connect(addr).unwrap(),
            T,
        )
        .unwrap();
        ch.set_key_limit(10);
        (&ch).write_all(&data).unwrap();
        let mut echo = vec![0u8; len];
        (&ch).read_exact(&mut echo).unwrap();
        assert!(echo == data, "the echo differs");
        server.join().unwrap();
    }

    /// A peer that goes quiet (a link outage): a receive and a send each end with an error
    /// that says so and how long we waited, not a bare EAGAIN.
    #[test]
    fn a_quiet_peer_is_named() {
        let (_d, server_cfg, client_cfg, listener, addr) = setup();
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let _ch = TlsChannel::server(server_cfg, s, T).unwrap();
            // Neither reads nor writes until the client is done.
            let _ = hold_rx.recv();
        });
        let short = Duration::from_secs(1);
        let ch = TlsChannel::client(
            client_cfg,
            crate::tls::server_name("node1").unwrap(),
            TcpStream::connect(addr).unwrap(),
            short,
        )
        .unwrap();
        ch.set_recv_timeout(Some(short));
        let e = ch.recv::<proto::FromDest>().unwrap_err();
        assert!(
            format!("{e:#}")
                .contains("nothing came from the peer for 1 s (the link or the peer is down)"),
            "{e:#}"
        );
        // Sends fill the kernel's buffers (32 MiB each way), then wait the send timeout.
        let chunk = vec![7u8; 4 << 20];
        let e = loop {
            if let Err(e) = (&ch).write_all(&chunk) {
                break e;
            }
        };
        assert!(
            e.to_string().contains("the peer took nothing for 1 s (the link or the peer is down)"),
            "{e}"
        );
        hold_tx.send(()).unwrap();
        server.join().unwrap();
    }

    /// Bytes sent from a pipe (read straight into records) arrive intact and in order
    /// between ordinary writes, across key updates; a pipe that ends early is an error.
    #[test]
    fn send_from_a_pipe() {
        let (_d, server_cfg, client_cfg, listener, addr) = setup();
        let data = pattern((2 << 20) + 12345, 4);
        let expect = [b"head".to_vec(), data.clone(), b"tail".to_vec()].concat();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let ch = TlsChannel::server(server_cfg, s, T).unwrap();
            let mut got = vec![0u8; expect.len()];
            (&ch).read_exact(&mut got).unwrap();
            assert!(got == expect, "received different bytes");
        });
        let ch = TlsChannel::client(
            client_cfg,
            crate::tls::server_name("node1").unwrap(),
            TcpStream::connect(addr).unwrap(),
            T,
        )
        .unwrap();
        ch.set_key_limit(40);
        let (r, mut w) = std::io::pipe().unwrap();
        let feeder = {
            let data = data.clone();
            std::thread::spawn(move || w.write_all(&data).unwrap())
        };
        (&ch).write_all(b"head").unwrap();
        ch.send_from(r.as_raw_fd(), data.len()).unwrap();
        (&ch).write_all(b"tail").unwrap();
        feeder.join().unwrap();
        server.join().unwrap();
        // The writer of the pipe is gone: asking for more is an error, not a hang.
        let err = ch.send_from(r.as_raw_fd(), 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    /// Hostile bytes after the handshake — random headers and lengths, truncated records,
    /// valid-looking headers with garbage bodies — are errors or the end of the stream for
    /// the reader, never a panic or a hang (a deterministic xorshift generator).
    #[test]
    fn hostile_records_are_errors_not_panics() {
        let (_d, server_cfg, client_cfg, listener, addr) = setup();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for i in 0..60 {
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let len = (next() % 40_000) as usize;
            let mut v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 3 == 0 && v.len() >= 5 {
                // a plausible header: application data, TLS 1.2 version, some length
                let l = (next() % 17_000) as u16;
                v[..5].copy_from_slice(&[TYPE_APPLICATION_DATA, 3, 3, (l >> 8) as u8, l as u8]);
            }
            cases.push(v);
        }
        let n = cases.len();
        let server = std::thread::spawn(move || {
            let mut outcomes = Vec::new();
            for _ in 0..n {
                let (s, _) = listener.accept().unwrap();
                let ch = TlsChannel::server(server_cfg.clone(), s, T).unwrap();
                ch.set_recv_timeout(Some(Duration::from_secs(5)));
                let mut buf = vec![0u8; 1 << 16];
                let r = (&ch).read(&mut buf);
                outcomes.push(matches!(r, Err(_) | Ok(0)));
            }
            outcomes
        });
        for case in &cases {
            let ch = TlsChannel::client(
                client_cfg.clone(),
                crate::tls::server_name("node1").unwrap(),
                TcpStream::connect(addr).unwrap(),
                T,
            )
            .unwrap();
            let raw = ch.raw_socket().unwrap();
            let _ = (&*raw).write_all(case);
            let _ = raw.shutdown(std::net::Shutdown::Write);
            drop(ch);
        }
        let outcomes = server.join().expect("the reader panicked");
        assert!(outcomes.iter().all(|&ok| ok), "some hostile input was read as data: {outcomes:?}");
    }

    /// A forged or damaged record is refused, naming why.
    #[test]
    fn a_forged_record_is_refused() {
        let (_d, server_cfg, client_cfg, listener, addr) = setup();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let ch = TlsChannel::server(server_cfg, s, T).unwrap();
            let mut buf = [0u8; 64];
            let good = (&ch).read(&mut buf).unwrap();
            assert_eq!(&buf[..good], b"genuine");
            (&ch).read(&mut buf).unwrap_err().to_string()
        });
        let ch = TlsChannel::client(
            client_cfg,
            crate::tls::server_name("node1").unwrap(),
            TcpStream::connect(addr).unwrap(),
            T,
        )
        .unwrap();
        (&ch).write_all(b"genuine").unwrap();
        let mut forged = vec![TYPE_APPLICATION_DATA, 3, 3, 0, 40];
        forged.extend_from_slice(&[0x55; 40]);
        ch.raw_socket().unwrap().write_all(&forged).unwrap();
        let err = server.join().unwrap();
        assert!(err.contains("failed authentication"), "{err}");
    }

    /// A record header is accepted only as TLS 1.3 sends one after the handshake, with a
    /// length from a content type and a tag up to 2^14 + 256.
    #[test]
    fn record_headers() {
        assert_eq!(record_len([TYPE_APPLICATION_DATA, 3, 3, 0, 17]).unwrap(), 17);
        assert_eq!(record_len([TYPE_APPLICATION_DATA, 3, 3, 0x41, 0x00]).unwrap(), MAX_CIPHER);
        for bad in [
            [TYPE_APPLICATION_DATA, 3, 3, 0x41, 0x01], // one byte too long
            [TYPE_APPLICATION_DATA, 3, 3, 0, 16],      // no room for a content type
            [TYPE_APPLICATION_DATA, 3, 3, 0, 0],
            [TYPE_HANDSHAKE, 3, 3, 0, 40], // (TLS 1.3 hides the type inside)
            [TYPE_APPLICATION_DATA, 3, 1, 0, 40],
            [TYPE_APPLICATION_DATA, 2, 3, 0, 40],
        ] {
            let e = record_len(bad).unwrap_err();
            assert!(e.to_string().contains("malformed record header"), "{bad:02x?}: {e}");
        }
    }

    /// Post-handshake records: tickets are skipped, a KeyUpdate must end the record, anything
    /// else (or a message cut short) is refused.
    #[test]
    fn post_handshake_messages() {
        let ticket = [HANDSHAKE_NEW_SESSION_TICKET, 0, 0, 2, 7, 7];
        let update = |r: u8| [HANDSHAKE_KEY_UPDATE, 0, 0, 1, r];
        assert_eq!(post_handshake(&update(0)).unwrap(), Some(false));
        assert_eq!(post_handshake(&update(1)).unwrap(), Some(true));
        assert_eq!(post_handshake(&ticket).unwrap(), None);
        assert_eq!(
            post_handshake(&[&ticket[..], &ticket, &update(1)].concat()).unwrap(),
            Some(true)
        );
        for (bad, why) in [
            (update(2).to_vec(), "unexpected"),
            ([&update(0)[..], &ticket].concat(), "unexpected"), // KeyUpdate not last
            ([HANDSHAKE_KEY_UPDATE, 0, 0, 2, 0, 0].to_vec(), "unexpected"),
            ([1, 0, 0, 0].to_vec(), "unexpected"),
            ([HANDSHAKE_KEY_UPDATE, 0, 0].to_vec(), "truncated"),
            ([HANDSHAKE_NEW_SESSION_TICKET, 0, 0, 9, 1].to_vec(), "split across records"),
        ] {
            let e = post_handshake(&bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad:02x?}: {e}");
        }
    }

    /// The socketless record layer opens what it sealed — data, padded data, a KeyUpdate, then
    /// close_notify, after which nothing is read — and refuses a flipped bit, an authentic
    /// record too long for TLS, and a stream ending inside a record.
    #[test]
    fn records_without_a_socket() {
        use records::{open, Record, Sealer};
        let (key, iv) = ([7u8; 32], [9u8; 12]);
        let mut s = Sealer::new(key, iv).unwrap();
        let mut stream = s.seal(TYPE_APPLICATION_DATA, b"hello").unwrap();
        stream.extend(s.seal(0, &[b'p', b'a', b'd', TYPE_APPLICATION_DATA, 0, 0]).unwrap()); // inner "pad", type, padding
        stream.extend(s.seal(TYPE_HANDSHAKE, &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 1]).unwrap());
        stream.extend(s.seal(TYPE_ALERT, &[1, 0]).unwrap());
        stream.extend(s.seal(TYPE_APPLICATION_DATA, b"after the end").unwrap());
        let (got, end) = open(key, iv, &stream);
        end.unwrap();
        assert_eq!(
            got,
            [
                Record::Data(b"hello".to_vec()),
                Record::Data(b"pad".to_vec()),
                Record::Handshake(Some(true)),
                Record::Closed
            ]
        );

        let mut s = Sealer::new(key, iv).unwrap();
        let good = s.seal(TYPE_APPLICATION_DATA, b"first").unwrap();
        let second = s.seal(TYPE_APPLICATION_DATA, b"second").unwrap();
        for bit in [HEADER * 8 + 3, (second.len() - 1) * 8] {
            let mut forged = second.clone();
            forged[bit / 8] ^= 1 << (bit % 8);
            let (got, end) = open(key, iv, &[&good[..], &forged].concat());
            assert_eq!(got, [Record::Data(b"first".to_vec())]);
            assert!(end.unwrap_err().to_string().contains("failed authentication"));
        }
        let (got, end) = open(key, iv, &[&good[..], &second[..second.len() - 1]].concat());
        assert_eq!(got, [Record::Data(b"first".to_vec())]);
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let long = Sealer::new(key, iv)
            .unwrap()
            .seal(TYPE_APPLICATION_DATA, &vec![1; MAX_PLAIN + 256])
            .unwrap();
        assert!(open(key, iv, &long)
            .1
            .unwrap_err()
            .to_string()
            .contains("malformed record header"));
        let fits = Sealer::new(key, iv)
            .unwrap()
            .seal(TYPE_APPLICATION_DATA, &vec![1; MAX_PLAIN + 256 - 17])
            .unwrap();
        assert_eq!(open(key, iv, &fits).0.len(), 1);
    }
}
