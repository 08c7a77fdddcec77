//! telefork's image: the data model of a captured process ([`model`]) and its byte layout
//! ([`format`](mod@format)). Pure data — no system calls — so it can be fuzzed and reused by the daemon.

pub mod format;
pub mod model;
mod v3;

pub use format::{
    verify_image, ImageError, ImageReader, ImageWriter, PageRun, FORMAT_VERSION, MAX_PAGE_CHUNK,
};
pub use model::*;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Header, ProcessImage) {
        let h = Header {
            arch: Arch::X86_64,
            page_size: 4096,
            kernel_release: "6.18".into(),
            xfeatures: 0xe7,
            created_unix: 1,
            hostname: "node1".into(),
        };
        let p = ProcessImage {
            pid: 42,
            comm: "t".into(),
            creds: Creds { uid: [0; 4], gid: [0; 4], groups: vec![], caps: None },
            misc: Misc {
                cwd: "/".into(),
                umask: 0o22,
                nice: 0,
                personality: 0,
                rlimits: vec![],
                no_new_privs: false,
            },
            mm: MmFields {
                start_code: 0,
                end_code: 0,
                start_data: 0,
                end_data: 0,
                start_brk: 0,
                brk: 0,
                start_stack: 0,
                arg_start: 0,
                arg_end: 0,
                env_start: 0,
                env_end: 0,
                auxv: vec![0, 0],
                exe: "/bin/true".into(),
                exe_id: None,
            },
            vmas: vec![],
            threads: vec![],
            sigactions: vec![],
            shared_pending: vec![],
            fds: vec![],
            timers: Default::default(),
            attrs: Default::default(),
            locks: vec![],
        };
        (h, p)
    }

    fn encode(pages: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let (h, p) = sample();
        let mut w = ImageWriter::new(Vec::new(), &h).unwrap();
        w.write_process(&p).unwrap();
        for (a, d) in pages {
            w.write_pages(*a, d).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let big = vec![7u8; format::MAX_PAGE_CHUNK + 4096];
        let bytes = encode(&[(0x1000, vec![1; 4096]), (0x10_0000, big.clone())]);
        let (h, p, total) = verify_image(&bytes).unwrap();
        assert_eq!((h, p), sample());
        assert_eq!(total, 4096 + big.len() as u64);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&[(0x1000, vec![1; 8192])]);
        for cut in 0..bytes.len() {
            assert!(verify_image(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
    }

    #[test]
    fn every_bit_flip_is_an_error() {
        // (Also with a page index, page checksums on.)
        let (h, p) = sample();
        let mut w = ImageWriter::new(Vec::new(), &h).unwrap();
        w.write_process(&p).unwrap();
        w.write_page_index(&[(0x1000, 64)]).unwrap();
        w.write_pages(0x1000, &[1; 64]).unwrap();
        let indexed = w.finish().unwrap();
        every_bit_flip_is_an_error_in(&encode(&[(0x1000, vec![1; 64])]), false);
        every_bit_flip_is_an_error_in(&indexed, true);
    }

    fn every_bit_flip_is_an_error_in(bytes: &[u8], has_index: bool) {
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = bytes.to_vec();
                b[i] ^= bit;
                // (Except a version turned into the older one this build also reads, whose
                // layout is the same but for the page index: accepted without one.)
                let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
                if (8..12).contains(&i) && version == format::OLDEST_READABLE_VERSION && !has_index
                {
                    verify_image(&b).unwrap();
                    continue;
                }
                assert!(verify_image(&b).is_err(), "flip at byte {i} accepted");
            }
        }
    }

    #[test]
    fn page_checksums_are_skipped_only_when_the_reader_is_told() {
        let (h, p) = sample();
        let mut w = ImageWriter::new(Vec::new(), &h).unwrap().without_page_checksums();
        w.write_process(&p).unwrap();
        w.write_pages(0x1000, &[3; 4096]).unwrap();
        let bytes = w.finish().unwrap();
        // An ordinary reader (a file's) refuses the zero CRC.
        assert!(verify_image(&bytes).is_err());
        let (mut r, _) = ImageReader::new(&bytes[..]).unwrap();
        r.skip_page_checksums();
        r.process().unwrap();
        let run = r.next_pages().unwrap().unwrap();
        assert_eq!((run.addr, run.data.len(), run.data[0]), (0x1000, 4096, 3));
        assert!(r.next_pages().unwrap().is_none());
        // Metadata records keep their CRCs: a flipped bit in the process record is caught.
        let mut bad = bytes.clone();
        let at = bytes.windows(9).position(|w| w == b"/bin/true").unwrap();
        bad[at] ^= 1;
        let (mut r, _) = ImageReader::new(&bad[..]).unwrap();
        r.skip_page_checksums();
        assert!(r.process().is_err());
    }

    /// A record whose bytes another party writes reads back like any other.
    #[test]
    fn pages_sent_by_another_writer() {
        use std::io::Write;
        let (h, p) = sample();
        let mut w = ImageWriter::new(Vec::new(), &h).unwrap();
        assert!(
            w.write_pages_sent_by(0x1000, 4096, |_| Ok(())).is_err(),
            "accepted with checksums on"
        );
        let mut w = w.without_page_checksums();
        w.write_process(&p).unwrap();
        w.write_pages_sent_by(0x2000, 4096, |out| out.write_all(&[9; 4096])).unwrap();
        w.write_pages(0x4000, &[8; 4096]).unwrap();
        let bytes = w.finish().unwrap();
        let (mut r, _) = ImageReader::new(&bytes[..]).unwrap();
        r.skip_page_checksums();
        r.process().unwrap();
        let a = r.next_pages().unwrap().map(|run| (run.addr, run.data.to_vec())).unwrap();
        assert_eq!((a.0, a.1.len(), a.1[4095]), (0x2000, 4096, 9));
        let b = r.next_pages().unwrap().map(|run| (run.addr, run.data[0])).unwrap();
        assert_eq!(b, (0x4000, 8));
        assert!(r.next_pages().unwrap().is_none());
    }

    /// Page records must come in ascending order without overlapping (a restorer may place
    /// them from two threads); touching ones are fine.
    #[test]
    fn overlapping_or_backward_page_records_are_refused() {
        verify_image(&encode(&[(0x1000, vec![1; 4096]), (0x2000, vec![2; 4096])])).unwrap();
        for pages in [
            vec![(0x1000, vec![1; 8192]), (0x2000, vec![2; 4096])],
            vec![(0x3000, vec![1; 4096]), (0x1000, vec![2; 4096])],
        ] {
            let err = verify_image(&encode(&pages)).unwrap_err().to_string();
            assert!(err.contains("overlaps or precedes"), "{err}");
        }
    }

    #[test]
    fn huge_length_is_refused_without_allocating() {
        let mut bytes = encode(&[]);
        // The header record's length field sits right after magic + version + kind.
        bytes[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = verify_image(&bytes).unwrap_err().to_string();
        assert!(err.contains("exceeds the limit"), "{err}");
    }

    fn encode_indexed(index: &[(u64, u64)], pages: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let (h, p) = sample();
        let mut w = ImageWriter::new(Vec::new(), &h).unwrap().without_page_checksums();
        w.write_process(&p).unwrap();
        w.write_page_index(index).unwrap();
        for (a, d) in pages {
            w.write_pages(*a, d).unwrap();
        }
        w.finish().unwrap()
    }

    fn reader(bytes: &[u8]) -> ImageReader<&[u8]> {
        let (mut r, _) = ImageReader::new(bytes).unwrap();
        r.skip_page_checksums();
        r.process().unwrap();
        r
    }

    /// The page index announces the records; a reader that asks for it gets it, one that does
    /// not still checks the records against it; records received elsewhere count for the
    /// trailer (the reader then goes on after their bytes).
    #[test]
    fn page_index_round_trip() {
        let index = [(0x1000, 4096), (0x3000, 8192)];
        let bytes = encode_indexed(&index, &[(0x1000, vec![1; 4096]), (0x3000, vec![2; 8192])]);
        let mut r = reader(&bytes);
        assert_eq!(r.page_index().unwrap(), Some(&index[..]));
        assert_eq!(
            r.next_pages().unwrap().map(|run| (run.addr, run.data.len())),
            Some((0x1000, 4096))
        );
        assert_eq!(
            r.next_pages().unwrap().map(|run| (run.addr, run.data[8191])),
            Some((0x3000, 2))
        );
        assert!(r.next_pages().unwrap().is_none());
        let mut r = reader(&bytes);
        assert_eq!(r.next_pages().unwrap().map(|run| run.addr), Some(0x1000));
        // Records counted as received elsewhere: no more than announced.
        let mut r2 = reader(&bytes);
        r2.page_index().unwrap();
        r2.pages_received_elsewhere(1).unwrap();
        assert!(r2.pages_received_elsewhere(2).is_err(), "more than announced");
        // An image without an index: `page_index` says so and the pages read as usual.
        let plain = encode(&[(0x1000, vec![1; 4096])]);
        let (mut r, _) = ImageReader::new(&plain[..]).unwrap();
        r.process().unwrap();
        assert_eq!(r.page_index().unwrap(), None);
        assert_eq!(r.next_pages().unwrap().map(|run| run.addr), Some(0x1000));
        assert!(r.next_pages().unwrap().is_none());
        for cut in 0..bytes.len() {
            let ok = ImageReader::new(&bytes[..cut]).and_then(|(mut r, _)| {
                r.skip_page_checksums();
                r.process()?;
                while r.next_pages()?.is_some() {}
                Ok(())
            });
            assert!(ok.is_err(), "cut at {cut} accepted");
        }
    }

    /// A writer refuses records the index did not announce, and stopping short of it; a reader
    /// refuses a record that is not the announced one, a short image and a bad index.
    #[test]
    fn page_index_mismatches_are_refused() {
        let (h, p) = sample();
        let mut w = ImageWriter::new(Vec::new(), &h).unwrap().without_page_checksums();
        w.write_process(&p).unwrap();
        w.write_page_index(&[(0x1000, 4096), (0x2000, 4096)]).unwrap();
        assert!(w.write_pages(0x2000, &[1; 4096]).is_err(), "an unannounced record");
        w.write_pages(0x1000, &[1; 4096]).unwrap();
        assert!(w
            .finish()
            .unwrap_err()
            .to_string()
            .contains("announced 2 records, 1 were written"));
        // The record's address changed in transit (no CRC on pages here): refused.
        let mut bytes = encode_indexed(&[(0x1000, 4096)], &[(0x1000, vec![1; 4096])]);
        let at = bytes.windows(8).rposition(|w| w == 0x1000u64.to_le_bytes()).unwrap();
        bytes[at + 1] = 0x50;
        let mut r = reader(&bytes);
        let err = r.next_pages().err().expect("a moved record accepted").to_string();
        assert!(err.contains("not the one the page index announced"), "{err}");
        // Fewer records than announced: refused at the trailer. (Built by hand: the image of
        // a process without pages, with an index announcing one put before its trailer.)
        let (h, p) = sample();
        let (mut prefix, mut no_pages, mut with_index) = (Vec::new(), Vec::new(), Vec::new());
        let mut w = ImageWriter::new(&mut prefix, &h).unwrap();
        w.write_process(&p).unwrap();
        drop(w);
        let mut w = ImageWriter::new(&mut no_pages, &h).unwrap();
        w.write_process(&p).unwrap();
        w.finish().unwrap();
        let mut w = ImageWriter::new(&mut with_index, &h).unwrap();
        w.write_process(&p).unwrap();
        w.write_page_index(&[(0x1000, 4096)]).unwrap();
        assert!(w
            .finish()
            .unwrap_err()
            .to_string()
            .contains("announced 1 records, 0 were written"));
        with_index.extend_from_slice(&no_pages[prefix.len()..]);
        let (mut r, _) = ImageReader::new(&with_index[..]).unwrap();
        r.process().unwrap();
        let err = r.next_pages().err().expect("a short image accepted").to_string();
        assert!(err.contains("announced 1 records, the image had 0"), "{err}");
        // Bad indexes: overlapping, empty entries, too long, wrapping. (The writer checks the
        // lengths; the reader checks everything.)
        let too_long = format::MAX_PAGE_CHUNK as u64 + 4096;
        for bad in [
            vec![(0x2000, 8192), (0x3000, 4096)],
            vec![(0x1000, 0)],
            vec![(0x1000, too_long)],
            vec![(u64::MAX - 4095, 8192)],
        ] {
            let mut bytes = Vec::new();
            let mut w = ImageWriter::new(&mut bytes, &h).unwrap();
            w.write_process(&p).unwrap();
            if w.write_page_index(&bad).is_err() {
                assert!(
                    bad.iter().any(|&(_, n)| n == 0 || n == too_long),
                    "index {bad:?} refused by the writer"
                );
                continue;
            }
            drop(w);
            let (mut r, _) = ImageReader::new(&bytes[..]).unwrap();
            r.process().unwrap();
            assert!(r.page_index().is_err(), "index {bad:?} accepted");
        }
        // An index in a version 2 image (which has none) is refused. (A version 3 image made
        // to say 2: the process record has the same shape in both.)
        let mut old = include_bytes!("../tests/golden/v3-sample-indexed.img").to_vec();
        old[8..12].copy_from_slice(&2u32.to_le_bytes());
        let (mut r, _) = ImageReader::new(&old[..]).unwrap();
        r.skip_page_checksums();
        r.process().unwrap();
        assert!(r.page_index().unwrap_err().to_string().contains("format version 2"));
        let (mut r, _) = ImageReader::new(&old[..]).unwrap();
        r.skip_page_checksums();
        r.process().unwrap();
        assert!(r.next_pages().is_err());
    }

    /// Records received elsewhere: their bytes taken off the stream by someone else (as the
    /// new process takes them), the reader goes on with the next record, and the trailer
    /// counts them.
    #[test]
    fn pages_received_elsewhere_then_the_rest() {
        use std::cell::RefCell;
        use std::io::Read;
        use std::rc::Rc;
        struct Shared(Rc<RefCell<std::io::Cursor<Vec<u8>>>>);
        impl Read for Shared {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                self.0.borrow_mut().read(b)
            }
        }
        let bytes = encode_indexed(
            &[(0x1000, 4096), (0x3000, 8192)],
            &[(0x1000, vec![1; 4096]), (0x3000, vec![2; 8192])],
        );
        let stream = Rc::new(RefCell::new(std::io::Cursor::new(bytes)));
        let (mut r, _) = ImageReader::new(Shared(stream.clone())).unwrap();
        r.skip_page_checksums();
        r.process().unwrap();
        assert!(r.page_index().unwrap().is_some());
        let mut first =
            vec![0u8; format::PAGE_RECORD_HEAD_LEN + 4096 + format::PAGE_RECORD_TAIL_LEN];
        stream.borrow_mut().read_exact(&mut first).unwrap();
        assert_eq!(first[..format::PAGE_RECORD_HEAD_LEN], format::page_record_head(0x1000, 4096));
        assert_eq!(first[format::PAGE_RECORD_HEAD_LEN], 1);
        r.pages_received_elsewhere(1).unwrap();
        assert_eq!(r.next_pages().unwrap().map(|run| (run.addr, run.data[0])), Some((0x3000, 2)));
        assert!(r.next_pages().unwrap().is_none(), "the trailer counts both records");
    }
}
