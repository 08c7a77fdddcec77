//! Writes seed inputs for the protocol fuzz targets into DIR/local_protocol and
//! DIR/node_protocol: valid message streams of every type, and record recipes in the format
//! fuzz/fuzz_targets/node_protocol.rs reads.
//!
//!     cargo run -p telefork-node --example fuzz_seeds -- fuzz/corpus
use telefork_node::proto::*;

fn frames<T: serde::Serialize>(msgs: &[T]) -> Vec<u8> {
    msgs.iter().flat_map(|m| encode_frame(m).expect("a small message encodes")).collect()
}

/// Requests (and first answers) as they go out: each behind a hello.
fn firsts<T: serde::Serialize>(msgs: &[T]) -> Vec<u8> {
    msgs.iter().flat_map(|m| encode_first(m).expect("a small message encodes")).collect()
}

/// One chunk of a node_protocol record recipe: `op`, the length (u16 le), the bytes.
fn chunk(op: u8, len: u16, bytes: &[u8]) -> Vec<u8> {
    [&[op][..], &len.to_le_bytes(), bytes].concat()
}

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: fuzz_seeds DIR"));
    let telefork =
        LocalRequest::Telefork { dest: "node2".into(), child_pid: 4242, pass_stdin: true };
    let local: Vec<(&str, Vec<u8>)> = vec![
        (
            "telefork_again",
            [
                firsts(std::slice::from_ref(&telefork)),
                frames(&[
                    LocalCommand::Kill { signal: 15 },
                    LocalCommand::Waiting,
                    LocalCommand::Again,
                ]),
                firsts(&[LocalRequest::WhoAmI]),
            ]
            .concat(),
        ),
        (
            "prepare_telefork_done",
            [
                firsts(&[LocalRequest::Prepare { dest: "node2".into() }, telefork]),
                frames(&[LocalCommand::Done]),
            ]
            .concat(),
        ),
        ("report", firsts(&[LocalRequest::Report { value: vec![1, 2, 3, 4] }])),
        (
            "from_daemon",
            [
                firsts(&[FromDaemon::Accepted { node: "node2".into() }]),
                frames(&[
                    FromDaemon::Started { node: "node2".into(), pid: 77 },
                    FromDaemon::Result { value: vec![9; 8] },
                    FromDaemon::Exited(ExitInfo::Code(3)),
                    FromDaemon::Failed(Failure::Lost {
                        node: "node2".into(),
                        message: "gone".into(),
                    }),
                    FromDaemon::Failed(Failure::Failed {
                        node: "node1".into(),
                        stage: Stage::Send,
                        message: "no".into(),
                    }),
                    FromDaemon::Ok,
                    FromDaemon::Node { name: "node1".into() },
                    FromDaemon::Failed(Failure::Refused {
                        node: "node2".into(),
                        limit: Limit::MaxSessionsPerUser,
                        reason: "busy".into(),
                    }),
                    FromDaemon::Failed(Failure::CannotCarry {
                        node: "node1".into(),
                        what: Uncarried::Fd { fd: 4, kind: "socket".into(), target: "x".into() },
                    }),
                    FromDaemon::Failed(Failure::Protocol {
                        node: "node2".into(),
                        ours: 1,
                        theirs: 2,
                    }),
                ]),
            ]
            .concat(),
        ),
    ];
    let offer = ToDest::Offer {
        user: User { uid: 1000, gid: 1000 },
        origin: "node1".into(),
        image_bytes: 1 << 20,
        pass_stdin: true,
        plain_image: false,
        image_follows: true,
    };
    let to_dest = [
        firsts(std::slice::from_ref(&offer)),
        frames(&[
            ToDest::Stdin { data: b"input".to_vec() },
            ToDest::StdinEof,
            ToDest::Kill { signal: 9 },
            ToDest::Again,
        ]),
        firsts(std::slice::from_ref(&offer)),
    ]
    .concat();
    let from_dest = [
        firsts(&[FromDest::Accept]),
        frames(&[
            FromDest::Started { pid: 77 },
            FromDest::Stdout { data: b"out".to_vec() },
            FromDest::Stderr { data: b"err".to_vec() },
            FromDest::Result { value: vec![5; 4] },
            FromDest::Exited(ExitInfo::Signal(9)),
            FromDest::Failed(Failure::Refused {
                node: "node2".into(),
                limit: Limit::MaxRestoresPerUser,
                reason: "full".into(),
            }),
            FromDest::Failed(Failure::Failed {
                node: "node2".into(),
                stage: Stage::Restore,
                message: "no".into(),
            }),
        ]),
    ]
    .concat();
    let app = |b: &[u8]| chunk(1, b.len() as u16, b);
    let inner = |b: &[u8]| chunk(0, b.len() as u16, b);
    let node: Vec<(&str, Vec<u8>)> = vec![
        ("to_dest", [&[0][..], &to_dest].concat()),
        ("from_dest", [&[0][..], &from_dest].concat()),
        (
            "records",
            [
                vec![1],
                app(&firsts(&[offer])),
                inner(&[4, 0, 0, 2, 7, 7, 24, 0, 0, 1, 1, 22]), // a ticket, then KeyUpdate (update requested)
                app(&frames(&[ToDest::Stdin { data: b"input".to_vec() }])),
                inner(&[b'x', 23, 0, 0, 0]), // padded
                app(&from_dest),
                inner(&[1, 0, 21]), // close_notify
            ]
            .concat(),
        ),
        ("records_long", [vec![1], app(&to_dest), chunk(4, 16_700, b"0123456789abcdef")].concat()), // authentic, longer than TLS allows
        (
            "records_flipped",
            [vec![1], app(&to_dest), chunk(2, 5, b"flip\x17"), vec![40, 1]].concat(),
        ), // (then the bit to flip)
        (
            "records_raw",
            [vec![1], app(&to_dest), chunk(3, 9, &[23, 3, 3, 0, 40, 1, 2, 3, 4])].concat(),
        ),
    ];
    for (sub, seeds) in [("local_protocol", local), ("node_protocol", node)] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
        for (name, bytes) in seeds {
            let p = d.join(format!("seed_{name}"));
            std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        }
    }
}
