//! The byte layout of an image, written and read strictly front to back so the same bytes can
//! go to a file or over a socket.
//!
//! ```text
//! image   := MAGIC "TELEFORK" | version u32 | HEADER | PROCESS | INDEX? | PAGES* | TRAILER
//! record  := kind u32 | len u32 | payload[len] | crc32 u32      (little endian;
//!                                                                crc over kind, len, payload)
//! HEADER  := postcard(Header)          PROCESS := postcard(ProcessImage)
//! PAGES   := addr u64 | raw bytes      TRAILER := postcard(Trailer)
//! INDEX   := postcard(Vec<(addr u64, len u64)>): every page record that follows, in order
//! ```
//!
//! Page records come in ascending address order and never overlap (a restorer may place
//! them from several threads: overlapping records would leave which one wins to chance).
//!
//! The optional page index (version 3) announces the page records before they come, so a
//! restorer knows the layout of the rest of the stream: the new process can then receive its
//! pages straight into place (the engine's `self_receive`), and memory the records will fill
//! whole can be made huge pages before they come (`huge`). A writer that wrote one must
//! write exactly those records; a reader checks every record against it.
//!
//! Every length is bounded before anything is allocated, every record is checksummed, and a
//! missing or inconsistent trailer means the image was cut short. The reader never panics on
//! any input (see `fuzz/`).
//!
//! ## Changing the format without breaking older images
//!
//! The version after the magic says how to read everything that follows; a reader refuses a
//! version outside `OLDEST_READABLE_VERSION..=FORMAT_VERSION` with `ImageError::Version`,
//! which names the version found and the ones it reads. The metadata records are postcard,
//! which is not self-describing: a struct's fields are its values in declaration order, with
//! no names, tags or lengths, and an enum's variant is its position. So:
//!
//! * Adding, removing, reordering or retyping a field of any model struct changes the bytes
//!   (an older image then fails to decode, or decodes wrongly): bump `FORMAT_VERSION`, and
//!   keep reading the previous version — decode its records into the previous shape (a
//!   private copy of the old struct) and convert, giving the new field the value that means
//!   "as before" (`None`, empty, the old behaviour). Older builds refuse the new images by
//!   their version, never by misreading them.
//! * Appending a variant to an enum leaves older images' bytes meaning what they meant; bump
//!   the version all the same, so an older build refuses an image that may use the variant.
//! * New data that stands apart goes in a record of a new kind where it belongs in the
//!   stream, optional for the reader, as the page index came in version 3: readers refuse a
//!   record kind they do not expect, so this too is a new version, but older images (without
//!   the record) are read unchanged.
//! * Raise `OLDEST_READABLE_VERSION` only to drop an old version on purpose.
//!
//! `tests/golden/` holds images of each readable version as written when that version was
//! current; `tests/golden.rs` checks that they still decode to exactly what they hold and
//! that today's writer writes the newest ones byte for byte (so a change that forgot to
//! bump the version fails there). A new version adds its own golden images.

use std::io::{Read, Write};

use crate::model::{Header, ProcessImage, Trailer};

pub const MAGIC: [u8; 8] = *b"TELEFORK";
/// Bumped on any incompatible change of the model or the layout. (3: the optional page
/// index; 4: timers, process attributes, file locks and mapping flags in the process
/// record. Version 2 and 3 images are still read, see `v3`.)
pub const FORMAT_VERSION: u32 = 4;
/// The oldest version this build reads.
pub const OLDEST_READABLE_VERSION: u32 = 2;

/// Largest metadata record (header, process, trailer).
pub const MAX_META_RECORD: u32 = 64 << 20;
/// Largest page payload in one record; writers split bigger runs.
pub const MAX_PAGE_CHUNK: usize = 8 << 20;

/// Bytes of a page record before its data (kind, length, address) ...
pub const PAGE_RECORD_HEAD_LEN: usize = 16;
/// ... and after it (the checksum).
pub const PAGE_RECORD_TAIL_LEN: usize = 4;

/// The head of the page record of `len` bytes at `addr`, as it is on the stream (for a
/// restorer that has the stream received elsewhere and checks the heads afterwards).
pub fn page_record_head(addr: u64, len: u64) -> [u8; PAGE_RECORD_HEAD_LEN] {
    let mut h = [0u8; PAGE_RECORD_HEAD_LEN];
    h[..4].copy_from_slice(&(Kind::Pages as u32).to_le_bytes());
    h[4..8].copy_from_slice(&((8 + len) as u32).to_le_bytes());
    h[8..].copy_from_slice(&addr.to_le_bytes());
    h
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Kind {
    Header = 1,
    Process = 2,
    Pages = 3,
    Trailer = 4,
    PageIndex = 5,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Kind> {
        Some(match v {
            1 => Kind::Header,
            2 => Kind::Process,
            3 => Kind::Pages,
            4 => Kind::Trailer,
            5 => Kind::PageIndex,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("I/O error on the image: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a telefork image (bad magic)")]
    BadMagic,
    #[error("image format version {found} is not supported (this build reads versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})")]
    Version { found: u32 },
    #[error("image is truncated: it ends before {0}")]
    Truncated(&'static str),
    #[error("image is corrupt: checksum mismatch in a {0} record")]
    Checksum(&'static str),
    #[error("image is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, ImageError>;

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Header => "header",
        Kind::Process => "process",
        Kind::Pages => "pages",
        Kind::Trailer => "trailer",
        Kind::PageIndex => "page index",
    }
}

/// Writes one image front to back.
pub struct ImageWriter<W: Write> {
    out: W,
    page_records: u64,
    page_bytes: u64,
    page_checksums: bool,
    /// The page index written, and how many of its records were written since.
    index: Option<(Vec<(u64, u64)>, usize)>,
}

impl<W: Write> ImageWriter<W> {
    /// Writes the magic, the version and the header record.
    pub fn new(mut out: W, header: &Header) -> Result<Self> {
        out.write_all(&MAGIC)?;
        out.write_all(&FORMAT_VERSION.to_le_bytes())?;
        let mut w =
            ImageWriter { out, page_records: 0, page_bytes: 0, page_checksums: true, index: None };
        w.meta_record(Kind::Header, header)?;
        Ok(w)
    }

    /// Page records get 0 instead of a CRC: for an image on a connection that protects every
    /// byte itself (TLS authenticates each record) or is trusted by configuration, where
    /// checksumming the memory would only cost a pass over it on each side. Only a reader
    /// told `skip_page_checksums` accepts such an image; metadata records keep their CRCs.
    pub fn without_page_checksums(mut self) -> Self {
        self.page_checksums = false;
        self
    }

    pub fn write_process(&mut self, p: &ProcessImage) -> Result<()> {
        self.meta_record(Kind::Process, p)
    }

    /// Announces the page records that will follow, `(addr, len)` each, in order (after the
    /// process record, before any page): the records written next must be exactly these.
    pub fn write_page_index(&mut self, records: &[(u64, u64)]) -> Result<()> {
        if self.index.is_some() || self.page_records > 0 {
            return Err(ImageError::Corrupt(
                "a page index must come once, before the pages".into(),
            ));
        }
        if let Some(&(a, n)) = records.iter().find(|&&(_, n)| n == 0 || n > MAX_PAGE_CHUNK as u64) {
            return Err(ImageError::Corrupt(format!("page index entry at {a:#x} of {n} bytes")));
        }
        self.meta_record(Kind::PageIndex, &records)?;
        self.index = Some((records.to_vec(), 0));
        Ok(())
    }

    /// With a page index: checks that the next record is the one it announced.
    fn announced(&mut self, addr: u64, len: usize) -> Result<()> {
        if let Some((records, next)) = &mut self.index {
            if records.get(*next) != Some(&(addr, len as u64)) {
                return Err(ImageError::Corrupt(format!(
                    "page record {addr:#x}+{len} is not the one the page index announced"
                )));
            }
            *next += 1;
        }
        Ok(())
    }

    /// Writes the contents of `[addr, addr + data.len())`, split into bounded records.
    pub fn write_pages(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        let mut off = 0usize;
        while off < data.len() {
            let n = (data.len() - off).min(MAX_PAGE_CHUNK);
            self.announced(addr + off as u64, n)?;
            let chunk = &data[off..off + n];
            let a = (addr + off as u64).to_le_bytes();
            let len = (8 + n) as u32;
            let crc = if self.page_checksums {
                let mut crc = crc32fast::Hasher::new();
                crc.update(&(Kind::Pages as u32).to_le_bytes());
                crc.update(&len.to_le_bytes());
                crc.update(&a);
                crc.update(chunk);
                crc.finalize()
            } else {
                0
            };
            self.out.write_all(&(Kind::Pages as u32).to_le_bytes())?;
            self.out.write_all(&len.to_le_bytes())?;
            self.out.write_all(&a)?;
            self.out.write_all(chunk)?;
            self.out.write_all(&crc.to_le_bytes())?;
            self.page_records += 1;
            self.page_bytes += n as u64;
            off += n;
        }
        Ok(())
    }

    /// Writes a page record of `len` bytes at `addr` whose bytes someone else puts on the
    /// stream: `send` gets the sink after the record's header and must have exactly `len`
    /// bytes reach the stream, in order (e.g. flush, then let the captured process write its
    /// own memory to the same socket). Only without page checksums: those bytes never pass
    /// through here.
    pub fn write_pages_sent_by(
        &mut self,
        addr: u64,
        len: usize,
        send: impl FnOnce(&mut W) -> std::io::Result<()>,
    ) -> Result<()> {
        if self.page_checksums {
            return Err(ImageError::Corrupt(
                "pages written by another party need an image without page checksums".into(),
            ));
        }
        if len == 0 || len > MAX_PAGE_CHUNK {
            return Err(ImageError::Corrupt(format!("pages record of {len} bytes")));
        }
        self.announced(addr, len)?;
        self.out.write_all(&(Kind::Pages as u32).to_le_bytes())?;
        self.out.write_all(&((8 + len) as u32).to_le_bytes())?;
        self.out.write_all(&addr.to_le_bytes())?;
        send(&mut self.out)?;
        self.out.write_all(&0u32.to_le_bytes())?;
        self.page_records += 1;
        self.page_bytes += len as u64;
        Ok(())
    }

    /// Sends what was written so far on its way (flushes the sink): a reader at the other end
    /// of a stream can start on the process record while the pages are still being read.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }

    /// Writes the trailer and returns the sink (flushed).
    pub fn finish(mut self) -> Result<W> {
        if let Some((records, next)) = &self.index {
            if *next != records.len() {
                return Err(ImageError::Corrupt(format!(
                    "the page index announced {} records, {next} were written",
                    records.len()
                )));
            }
        }
        let t = Trailer { page_records: self.page_records, page_bytes: self.page_bytes };
        self.meta_record(Kind::Trailer, &t)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn meta_record<T: serde::Serialize>(&mut self, kind: Kind, v: &T) -> Result<()> {
        let payload = postcard::to_stdvec(v)
            .map_err(|e| ImageError::Corrupt(format!("cannot encode {}: {e}", kind_name(kind))))?;
        if payload.len() > MAX_META_RECORD as usize {
            return Err(ImageError::Corrupt(format!("{} record too large", kind_name(kind))));
        }
        let len = payload.len() as u32;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&(kind as u32).to_le_bytes());
        crc.update(&len.to_le_bytes());
        crc.update(&payload);
        self.out.write_all(&(kind as u32).to_le_bytes())?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&payload)?;
        self.out.write_all(&crc.finalize().to_le_bytes())?;
        Ok(())
    }
}

/// One run of memory read from the image.
pub struct PageRun<'a> {
    pub addr: u64,
    pub data: &'a [u8],
}

/// Reads one image front to back: `new` (magic + header), `process`, then `next_pages` until
/// it returns `None` (which means the trailer was read and matched).
pub struct ImageReader<R: Read> {
    input: R,
    buf: Vec<u8>,
    page_records: u64,
    page_bytes: u64,
    /// Where the last page record ended: the next may not start before.
    pages_end: u64,
    done: bool,
    check_page_checksums: bool,
    /// The page index, if the image has one, and how many of its records came so far.
    index: Option<Vec<(u64, u64)>>,
    index_next: usize,
    /// The image's format version.
    version: u32,
    /// A record head read ahead (by `page_index`, looking for an index), not consumed yet.
    head_ahead: Option<[u8; 8]>,
}

impl<R: Read> ImageReader<R> {
    pub fn new(mut input: R) -> Result<(Self, Header)> {
        let mut magic = [0u8; 12];
        read_exact(&mut input, &mut magic, "the magic number")?;
        if magic[..8] != MAGIC {
            return Err(ImageError::BadMagic);
        }
        let found = u32::from_le_bytes([magic[8], magic[9], magic[10], magic[11]]);
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&found) {
            return Err(ImageError::Version { found });
        }
        let mut r = ImageReader {
            input,
            buf: Vec::new(),
            page_records: 0,
            page_bytes: 0,
            pages_end: 0,
            done: false,
            check_page_checksums: true,
            index: None,
            index_next: 0,
            version: found,
            head_ahead: None,
        };
        r.record(Kind::Header)?;
        let h: Header = decode(&r.buf, "header")?;
        Ok((r, h))
    }

    /// Accepts page records without verifying their CRCs (an image written
    /// `without_page_checksums`, arriving on a connection that authenticates or is trusted).
    pub fn skip_page_checksums(&mut self) {
        self.check_page_checksums = false;
    }

    /// Whether page records' checksums are verified (see `skip_page_checksums`).
    pub fn checks_page_checksums(&self) -> bool {
        self.check_page_checksums
    }

    pub fn process(&mut self) -> Result<ProcessImage> {
        self.record(Kind::Process)?;
        if self.version < 4 {
            let old: crate::v3::ProcessImageV3 = decode(&self.buf, "process")?;
            return Ok(old.into());
        }
        decode(&self.buf, "process")
    }

    /// The image's format version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The page index, if the next record (right after the process record) is one: the
    /// `(addr, len)` of every page record that follows, in order, checked like the records
    /// themselves (ascending, not overlapping, each of 1 to `MAX_PAGE_CHUNK` bytes). `None`
    /// if the image has none (the record read to see is kept for `next_pages`).
    pub fn page_index(&mut self) -> Result<Option<&[(u64, u64)]>> {
        if self.index.is_some() || self.page_records > 0 || self.done || self.head_ahead.is_some() {
            return Err(ImageError::Corrupt(
                "a page index must come once, before the pages".into(),
            ));
        }
        let mut head = [0u8; 8];
        read_exact(&mut self.input, &mut head, "the pages")?;
        if u32::from_le_bytes([head[0], head[1], head[2], head[3]]) != Kind::PageIndex as u32 {
            self.head_ahead = Some(head);
            return Ok(None);
        }
        self.head_ahead = Some(head);
        self.record(Kind::PageIndex)?;
        self.take_index()?;
        Ok(self.index.as_deref())
    }

    /// The page index as `page_index` reads it if the pages have not begun and it was not
    /// asked for yet; else the one read before (`None`: the image has none).
    pub fn page_index_once(&mut self) -> Result<Option<&[(u64, u64)]>> {
        if self.index.is_some() || self.page_records > 0 || self.done || self.head_ahead.is_some() {
            return Ok(self.index.as_deref());
        }
        self.page_index()
    }

    fn take_index(&mut self) -> Result<()> {
        if self.version < 3 {
            return Err(ImageError::Corrupt(format!(
                "a page index in an image of format version {}",
                self.version
            )));
        }
        let index: Vec<(u64, u64)> = decode(&self.buf, "page index")?;
        let mut end = 0u64;
        for &(addr, len) in &index {
            if len == 0 || len > MAX_PAGE_CHUNK as u64 {
                return Err(ImageError::Corrupt(format!(
                    "page index entry at {addr:#x} of {len} bytes"
                )));
            }
            if addr < end {
                return Err(ImageError::Corrupt(format!("page index entry at {addr:#x} overlaps or precedes the one before (which ended at {end:#x})")));
            }
            end = addr.checked_add(len).ok_or_else(|| {
                ImageError::Corrupt(format!(
                    "page index entry at {addr:#x} wraps the address space"
                ))
            })?;
        }
        self.index = Some(index);
        Ok(())
    }

    /// Counts the next `count` records of the page index as read: their bytes reached their
    /// place by another way (the new process received them from the same stream itself, and
    /// its restorer checked their record headers).
    pub fn pages_received_elsewhere(&mut self, count: usize) -> Result<()> {
        let Some(index) = &self.index else {
            return Err(ImageError::Corrupt(
                "pages received elsewhere without a page index".into(),
            ));
        };
        let Some(records) = index.get(self.index_next..self.index_next.saturating_add(count))
        else {
            return Err(ImageError::Corrupt(format!(
                "{count} page records received beyond the page index"
            )));
        };
        for &(addr, len) in records {
            self.page_records += 1;
            self.page_bytes += len;
            self.pages_end = addr + len;
        }
        self.index_next += count;
        Ok(())
    }

    /// The next run of memory, or `None` once the trailer has been read and verified.
    pub fn next_pages(&mut self) -> Result<Option<PageRun<'_>>> {
        if self.done {
            return Ok(None);
        }
        let mut kind = self.record_any(&[Kind::Pages, Kind::Trailer, Kind::PageIndex])?;
        if kind == Kind::PageIndex {
            // (A reader that did not ask for the index still checks the records against it.)
            if self.index.is_some() || self.page_records > 0 {
                return Err(ImageError::Corrupt(
                    "a page index must come once, before the pages".into(),
                ));
            }
            self.take_index()?;
            kind = self.record_any(&[Kind::Pages, Kind::Trailer])?;
        }
        if kind == Kind::Trailer {
            if let Some(index) = &self.index {
                if self.index_next != index.len() {
                    return Err(ImageError::Corrupt(format!(
                        "the page index announced {} records, the image had {}",
                        index.len(),
                        self.index_next
                    )));
                }
            }
            self.check_trailer()?;
            return Ok(None);
        }
        if self.buf.len() < 8 {
            return Err(ImageError::Corrupt("pages record shorter than its address".into()));
        }
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.buf[..8]);
        let addr = u64::from_le_bytes(a);
        let n = (self.buf.len() - 8) as u64;
        let Some(end) = addr.checked_add(n) else {
            return Err(ImageError::Corrupt(format!(
                "pages record at {addr:#x} wraps the address space"
            )));
        };
        if addr < self.pages_end {
            return Err(ImageError::Corrupt(format!("pages record at {addr:#x} overlaps or precedes the one before (which ended at {:#x})", self.pages_end)));
        }
        if let Some(index) = &self.index {
            if index.get(self.index_next) != Some(&(addr, n)) {
                return Err(ImageError::Corrupt(format!(
                    "pages record {addr:#x}+{n} is not the one the page index announced"
                )));
            }
            self.index_next += 1;
        }
        self.pages_end = end;
        self.page_records += 1;
        self.page_bytes += n;
        Ok(Some(PageRun { addr, data: &self.buf[8..] }))
    }

    /// Like `next_pages`, but hands over the record's buffer instead of lending it, taking
    /// `spare` in exchange (so a reader thread and a writer can pass buffers back and forth
    /// without copying). The run's bytes are `buf[8..]` (the first 8 hold its address).
    pub fn next_pages_owned(&mut self, spare: Vec<u8>) -> Result<Option<(u64, Vec<u8>)>> {
        let addr = match self.next_pages()? {
            Some(run) => run.addr,
            None => return Ok(None),
        };
        let buf = std::mem::replace(&mut self.buf, spare);
        Ok(Some((addr, buf)))
    }

    fn check_trailer(&mut self) -> Result<()> {
        let t: Trailer = decode(&self.buf, "trailer")?;
        if t.page_records != self.page_records || t.page_bytes != self.page_bytes {
            return Err(ImageError::Corrupt(format!(
                "trailer promises {} page records / {} bytes, image had {} / {}",
                t.page_records, t.page_bytes, self.page_records, self.page_bytes
            )));
        }
        self.done = true;
        Ok(())
    }

    fn record(&mut self, want: Kind) -> Result<()> {
        self.record_any(&[want]).map(|_| ())
    }

    /// Reads one record of one of the wanted kinds into `self.buf`, checking its checksum.
    fn record_any(&mut self, want: &[Kind]) -> Result<Kind> {
        let what = kind_name(want[0]);
        let head = match self.head_ahead.take() {
            Some(head) => head,
            None => {
                let mut head = [0u8; 8];
                read_exact(&mut self.input, &mut head, what)?;
                head
            }
        };
        let kind_raw = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let kind = Kind::from_u32(kind_raw).filter(|k| want.contains(k)).ok_or_else(|| {
            ImageError::Corrupt(format!("expected a {what} record, found record kind {kind_raw}"))
        })?;
        self.record_body(kind, head, len)?;
        Ok(kind)
    }

    /// Reads the payload and checksum of a record whose header was read.
    fn record_body(&mut self, kind: Kind, head: [u8; 8], len: u32) -> Result<()> {
        let max = if kind == Kind::Pages { (MAX_PAGE_CHUNK + 8) as u32 } else { MAX_META_RECORD };
        if len > max {
            return Err(ImageError::Corrupt(format!(
                "{} record of {len} bytes exceeds the limit of {max}",
                kind_name(kind)
            )));
        }
        // (Only new bytes are zeroed: the buffer is reused, and read_exact overwrites it all.)
        self.buf.resize(len as usize, 0);
        read_exact(&mut self.input, &mut self.buf, kind_name(kind))?;
        let mut crc_bytes = [0u8; 4];
        read_exact(&mut self.input, &mut crc_bytes, kind_name(kind))?;
        if kind == Kind::Pages && !self.check_page_checksums {
            return Ok(());
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(&self.buf);
        if crc.finalize() != u32::from_le_bytes(crc_bytes) {
            return Err(ImageError::Checksum(kind_name(kind)));
        }
        Ok(())
    }
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ImageError::Truncated(what)
        } else {
            ImageError::Io(e)
        }
    })
}

fn decode<'a, T: serde::Deserialize<'a>>(buf: &'a [u8], what: &str) -> Result<T> {
    let (v, rest) = postcard::take_from_bytes(buf)
        .map_err(|e| ImageError::Corrupt(format!("cannot decode the {what} record: {e}")))?;
    if !rest.is_empty() {
        return Err(ImageError::Corrupt(format!(
            "{} stray bytes after the {what} record",
            rest.len()
        )));
    }
    Ok(v)
}

/// Decodes a whole image held in memory, checking everything; used by the fuzzer (`telefork
/// check-image` streams a file through `ImageReader` the same way). Returns the header, the
/// process and the number of page bytes.
pub fn verify_image(bytes: &[u8]) -> Result<(Header, ProcessImage, u64)> {
    let (mut r, h) = ImageReader::new(bytes)?;
    let p = r.process()?;
    let mut total = 0u64;
    while let Some(run) = r.next_pages()? {
        total += run.data.len() as u64;
    }
    Ok((h, p, total))
}
