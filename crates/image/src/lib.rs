//! telefork's image: the data model of a captured process ([`model`]) and its byte layout
//! ([`format`]). Pure data — no system calls — so it can be fuzzed and reused by the daemon.

pub mod format;
pub mod model;

pub use format::{verify_image, ImageError, ImageReader, ImageWriter, PageRun, FORMAT_VERSION};
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
            creds: Creds { uid: [0; 4], gid: [0; 4], groups: vec![] },
            misc: Misc { cwd: "/".into(), umask: 0o22, nice: 0, personality: 0, rlimits: vec![], no_new_privs: false },
            mm: MmFields {
                start_code: 0, end_code: 0, start_data: 0, end_data: 0, start_brk: 0, brk: 0,
                start_stack: 0, arg_start: 0, arg_end: 0, env_start: 0, env_end: 0,
                auxv: vec![0, 0], exe: "/bin/true".into(), exe_id: None,
            },
            vmas: vec![],
            threads: vec![],
            sigactions: vec![],
            shared_pending: vec![],
            fds: vec![],
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
        let bytes = encode(&[(0x1000, vec![1; 64])]);
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= bit;
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
        assert!(w.write_pages_sent_by(0x1000, 4096, |_| Ok(())).is_err(), "accepted with checksums on");
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
        for pages in [vec![(0x1000, vec![1; 8192]), (0x2000, vec![2; 4096])], vec![(0x3000, vec![1; 4096]), (0x1000, vec![2; 4096])]] {
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
}
