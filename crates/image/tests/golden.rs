//! Golden images: images of a format version as this code wrote them once, committed under
//! `tests/golden/` and never rewritten. Each must still decode to exactly the process it holds
//! (every field, every page) as long as its version is readable; the newest version's must
//! also be what today's writer writes, byte for byte, so a change of the model or the layout
//! that was not given a new version fails here. An image of a version this build does not read
//! is refused, naming its version and the ones that are read.
//!
//! `tests/golden/v4-sample.img` and `v4-sample-indexed.img` were written by
//! `cargo run -p telefork-image --example sample_image -- crates/image/tests/golden/v4-sample.img`
//! (the second renamed from `…img-indexed`); the `v3-…` pair the same way when version 3 was
//! current. After a version bump, add the new version's pair the same way and keep the old
//! ones while they are readable (see `format`).

use telefork_image::format::OLDEST_READABLE_VERSION;
use telefork_image::*;

const V3: &[u8] = include_bytes!("golden/v3-sample.img");
const V3_INDEXED: &[u8] = include_bytes!("golden/v3-sample-indexed.img");
const V4: &[u8] = include_bytes!("golden/v4-sample.img");
const V4_INDEXED: &[u8] = include_bytes!("golden/v4-sample-indexed.img");

/// Offset of the version (u32, little endian) after the magic.
const VERSION_AT: usize = 8;

/// The header the sample holds.
fn header() -> Header {
    Header {
        arch: Arch::X86_64,
        page_size: 4096,
        kernel_release: "6.18.0".into(),
        xfeatures: 0xe7,
        created_unix: 1,
        hostname: "node1".into(),
    }
}

/// The process the v4 samples hold: the v3 one with what version 4 added.
fn process_v4() -> ProcessImage {
    let mut p = process();
    add_version_4_state(&mut p);
    p
}

/// The process the v3 samples hold, field by field (what version 4 added at its "as a new
/// process has it" values).
fn process() -> ProcessImage {
    let file = FileId {
        path: "/bin/true".into(),
        dev: 0xfe00,
        ino: 42,
        size: 4096,
        mtime_sec: 1,
        mtime_nsec: 2,
    };
    let vma = |start, end, prot, kind, growsdown, accounted| Vma {
        start,
        end,
        prot,
        shared: false,
        offset: 0,
        kind,
        growsdown,
        accounted,
        advice: vec![],
        flags: Default::default(),
    };
    ProcessImage {
        pid: 4242,
        comm: "sample".into(),
        creds: Creds { uid: [0; 4], gid: [0; 4], groups: vec![0], caps: None },
        misc: Misc {
            cwd: "/tmp".into(),
            umask: 0o22,
            nice: 0,
            personality: 0,
            rlimits: vec![Rlimit { resource: 7, soft: 1024, hard: 4096 }],
            no_new_privs: false,
        },
        mm: MmFields {
            start_code: 0x40_0000,
            end_code: 0x40_1000,
            start_data: 0x60_0000,
            end_data: 0x60_1000,
            start_brk: 0x70_0000,
            brk: 0x70_1000,
            start_stack: 0x7fff_0000,
            arg_start: 0x7fff_1000,
            arg_end: 0x7fff_1010,
            env_start: 0x7fff_1010,
            env_end: 0x7fff_1020,
            auxv: vec![6, 4096, 0, 0],
            exe: "/bin/true".into(),
            exe_id: Some(file.clone()),
        },
        vmas: vec![
            vma(0x40_0000, 0x40_1000, 5, VmaKind::File(file.clone()), false, false),
            vma(0x70_0000, 0x70_2000, 3, VmaKind::Anon, false, false),
            vma(0x7ffe_0000, 0x7fff_2000, 3, VmaKind::Anon, true, true),
            vma(0x7fff_f000, 0x8000_1000, 5, VmaKind::Special(SpecialMap::Vdso), false, false),
        ],
        threads: vec![ThreadState {
            tid: 4242,
            cpu: CpuState::X86_64(X86_64Cpu { gpregs: vec![0; 27], xsave: vec![0; 64] }),
            sigmask: 0,
            pending: vec![SigInfo(vec![0; 128])],
            altstack: AltStack { sp: 0, flags: 2, size: 0 },
            rseq: None,
            clear_child_tid: 0,
            robust_list: 0,
            robust_list_len: 24,
            tid_cache_addr: None,
        }],
        sigactions: vec![SigAction { handler: 0, flags: 0, restorer: 0, mask: 0 }; 64],
        shared_pending: vec![],
        fds: vec![
            Fd { fd: 0, cloexec: false, open_file: 0, kind: FdKind::InheritedStdio },
            Fd {
                fd: 3,
                cloexec: true,
                open_file: 1,
                kind: FdKind::Path { id: file, flags: 2, pos: 1234, directory: false },
            },
        ],
        timers: Timers::default(),
        attrs: Attrs::default(),
        locks: vec![],
    }
}

/// The sample's memory: page runs, in order.
fn pages() -> Vec<(u64, Vec<u8>)> {
    vec![(0x70_0000, vec![0xAB; 4096]), (0x7fff_1000, vec![1; 64])]
}

/// The index the indexed sample announces.
fn index() -> Vec<(u64, u64)> {
    pages().iter().map(|(a, d)| (*a, d.len() as u64)).collect()
}

/// Everything an image holds, read with the streaming reader as a restorer reads it.
struct Decoded {
    version: u32,
    header: Header,
    process: ProcessImage,
    index: Option<Vec<(u64, u64)>>,
    pages: Vec<(u64, Vec<u8>)>,
}

fn decode(bytes: &[u8]) -> Result<Decoded, ImageError> {
    let (mut r, header) = ImageReader::new(bytes)?;
    let process = r.process()?;
    let index = r.page_index()?.map(<[_]>::to_vec);
    let mut pages = vec![];
    while let Some(run) = r.next_pages()? {
        pages.push((run.addr, run.data.to_vec()));
    }
    Ok(Decoded { version: r.version(), header, process, index, pages })
}

/// Writes `d` again with today's writer.
fn encode(d: &Decoded) -> Vec<u8> {
    let mut w = ImageWriter::new(Vec::new(), &d.header).unwrap();
    w.write_process(&d.process).unwrap();
    if let Some(index) = &d.index {
        w.write_page_index(index).unwrap();
    }
    for (addr, data) in &d.pages {
        w.write_pages(*addr, data).unwrap();
    }
    w.finish().unwrap()
}

fn with_version(bytes: &[u8], version: u32) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[VERSION_AT..VERSION_AT + 4].copy_from_slice(&version.to_le_bytes());
    b
}

#[test]
fn version_4_images_decode_to_what_they_hold() {
    for (name, bytes, index) in
        [("v4-sample", V4, None), ("v4-sample-indexed", V4_INDEXED, Some(index()))]
    {
        let d = decode(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(d.version, 4, "{name}");
        assert_eq!(d.header, header(), "{name}: the header");
        assert_eq!(d.process, process_v4(), "{name}: the process record");
        assert_eq!(d.index, index, "{name}: the page index");
        assert_eq!(d.pages, pages(), "{name}: the pages");
        let (h, p, page_bytes) = verify_image(bytes).unwrap();
        assert_eq!((h, p, page_bytes), (header(), process_v4(), 4096 + 64), "{name}");
    }
}

#[test]
fn version_3_images_decode_to_what_they_hold() {
    for (name, bytes, index) in
        [("v3-sample", V3, None), ("v3-sample-indexed", V3_INDEXED, Some(index()))]
    {
        let d = decode(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(d.version, 3, "{name}");
        assert_eq!(d.header, header(), "{name}: the header");
        assert_eq!(d.process, process(), "{name}: the process record");
        assert_eq!(d.index, index, "{name}: the page index");
        assert_eq!(d.pages, pages(), "{name}: the pages");
        // The whole-image check (trailer included) agrees.
        let (h, p, page_bytes) = verify_image(bytes).unwrap();
        assert_eq!((h, p, page_bytes), (header(), process(), 4096 + 64), "{name}");
    }
}

/// Today's writer writes the newest golden images byte for byte: a model or layout change
/// shows here, and must come with a new format version (and new golden images).
#[test]
fn the_current_version_is_written_as_its_golden_images() {
    assert_eq!(
        FORMAT_VERSION, 4,
        "the format version changed: add golden images of version {FORMAT_VERSION} (see this \
         file's text), keep the older ones while they are readable, and check them here"
    );
    for (name, bytes) in [("v4-sample", V4), ("v4-sample-indexed", V4_INDEXED)] {
        let again = encode(&decode(bytes).unwrap());
        let first = again.iter().zip(bytes).position(|(a, b)| a != b);
        assert!(
            again == bytes,
            "{name}: today's writer writes other bytes (first difference at byte {first:?}, \
             lengths {} and {}): the format changed without a new FORMAT_VERSION",
            again.len(),
            bytes.len()
        );
    }
}

#[test]
fn an_unknown_version_is_refused_naming_it_and_the_readable_ones() {
    for found in [FORMAT_VERSION + 1, 99, OLDEST_READABLE_VERSION - 1, 0, u32::MAX] {
        let e = match decode(&with_version(V3, found)) {
            Ok(_) => panic!("an image of version {found} was read"),
            Err(e) => e,
        };
        assert!(matches!(e, ImageError::Version { found: f } if f == found), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("version {found} "))
                && msg.contains(&format!("versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}")),
            "the error must name version {found} and the versions read: {msg}"
        );
    }
}

/// Version 2 (before the page index) is still read: the same records without an index; an
/// index in a version 2 image is corrupt.
#[test]
fn version_2_is_read_without_a_page_index() {
    let d = decode(&with_version(V3, 2)).unwrap();
    assert_eq!((d.version, d.process, d.index, d.pages), (2, process(), None, pages()));
    let e = decode(&with_version(V3_INDEXED, 2)).err().expect("a page index in version 2");
    assert!(e.to_string().contains("page index in an image of format version 2"), "{e}");
}

/// What version 4 added, as the v4 samples hold it (`sample_image` writes the same).
fn add_version_4_state(p: &mut ProcessImage) {
    p.vmas[0].flags = VmaFlags {
        lock: Some(MemLock::OnFault),
        droppable: false,
        sealed: true,
        guards: vec![(0x40_0000, 0x40_1000)],
        name: Some("arena".into()),
    };
    p.vmas[0].advice = vec![2]; // MADV_SEQUENTIAL
    p.timers = Timers {
        itimers: vec![
            TimerValue { value_ns: 1_500_000_000, interval_ns: 0 },
            TimerValue::default(),
            TimerValue { value_ns: 7_000, interval_ns: 10_000 },
        ],
        posix: vec![PosixTimer {
            id: 3,
            clock: 1,
            notify: TimerNotify::Thread { tid: 4242 },
            signo: 34,
            sigval: 0xfeed,
            value: TimerValue { value_ns: 42, interval_ns: 1_000_000 },
            overrun: 2,
        }],
    };
    p.attrs = Attrs {
        oom_score_adj: 500,
        loginuid: Some(1000),
        thp_disable: true,
        child_subreaper: true,
        dumpable: Some(1),
        timer_slack_ns: Some(50_000),
        membarrier: 0x10,
        memory_merge: true,
        mdwe: 1,
        pdeath_signal: 9,
        securebits: 0x10,
        cpus: Some(vec![0, 2]),
        cgroups: vec![CgroupMembership { controllers: "".into(), path: "/batch/job7".into() }],
        leader: Some(Leader::Session),
        sched: Some(Sched { policy: 3, priority: 0, reset_on_fork: true }),
        ioprio: (2 << 13) | 4,
        coredump_filter: Some(0x23),
    };
    p.creds.caps = Some(Caps {
        inheritable: 0,
        permitted: 1 << 10,
        effective: 1 << 10,
        bounding: (1 << 41) - 1,
        ambient: 0,
    });
    p.locks = vec![
        FileLock { fd: 3, kind: LockKind::Posix, write: true, start: 10, len: 0 },
        FileLock { fd: 3, kind: LockKind::Flock, write: false, start: 0, len: 0 },
    ];
}
