//! Writes a small valid image to the path given as the first argument, and the same with a
//! page index (as the plain transport sends it) to that path with `-indexed` appended (seeds
//! for the fuzzer).
//!
//!     cargo run -p telefork-image --example sample_image -- fuzz/corpus/image_decode/sample
use telefork_image::*;

fn main() {
    let out = std::env::args().nth(1).expect("usage: sample_image OUT");
    let header = Header {
        arch: Arch::X86_64,
        page_size: 4096,
        kernel_release: "6.18.0".into(),
        xfeatures: 0xe7,
        created_unix: 1,
        hostname: "node1".into(),
    };
    let file = FileId {
        path: "/bin/true".into(),
        dev: 0xfe00,
        ino: 42,
        size: 4096,
        mtime_sec: 1,
        mtime_nsec: 2,
    };
    let mut p = ProcessImage {
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
            Vma {
                start: 0x40_0000,
                end: 0x40_1000,
                prot: 5,
                shared: false,
                offset: 0,
                kind: VmaKind::File(file.clone()),
                growsdown: false,
                accounted: false,
                advice: vec![],
                flags: Default::default(),
            },
            Vma {
                start: 0x70_0000,
                end: 0x70_2000,
                prot: 3,
                shared: false,
                offset: 0,
                kind: VmaKind::Anon,
                growsdown: false,
                accounted: false,
                advice: vec![],
                flags: Default::default(),
            },
            Vma {
                start: 0x7ffe_0000,
                end: 0x7fff_2000,
                prot: 3,
                shared: false,
                offset: 0,
                kind: VmaKind::Anon,
                growsdown: true,
                accounted: true,
                advice: vec![],
                flags: Default::default(),
            },
            Vma {
                start: 0x7fff_f000,
                end: 0x8000_1000,
                prot: 5,
                shared: false,
                offset: 0,
                kind: VmaKind::Special(SpecialMap::Vdso),
                growsdown: false,
                accounted: false,
                advice: vec![],
                flags: Default::default(),
            },
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
    };
    add_version_4_state(&mut p);
    for (path, indexed) in [(out.clone(), false), (format!("{out}-indexed"), true)] {
        let f = std::fs::File::create(&path).expect("create output");
        let mut w = ImageWriter::new(std::io::BufWriter::new(f), &header).expect("write header");
        w.write_process(&p).expect("write process");
        if indexed {
            w.write_page_index(&[(0x70_0000, 4096), (0x7fff_1000, 64)]).expect("write page index");
        }
        w.write_pages(0x70_0000, &[0xAB; 4096]).expect("write pages");
        w.write_pages(0x7fff_1000, &[1; 64]).expect("write pages");
        w.finish().expect("finish");
        let bytes = std::fs::read(&path).unwrap();
        verify_image(&bytes).expect("the sample image must verify");
    }
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
