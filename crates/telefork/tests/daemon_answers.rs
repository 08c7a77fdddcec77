//! The library against a stand-in daemon on a socket of its own (`TELEFORK_SOCKET`): what a
//! program sends (every request behind a hello of its protocol version) and how it reads the
//! answers (a daemon of another version refused naming both versions; failures arriving as
//! the variants of `telefork::Error` a caller matches on).

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Mutex;

use telefork::{Error, Limit, Uncarried, PROTOCOL_VERSION};
use telefork_proto::{self as proto, Failure, FromDaemon, LocalRequest};

/// `TELEFORK_SOCKET` is one per process: the tests take turns.
static TURN: Mutex<()> = Mutex::new(());

/// Runs a stand-in daemon for one connection: it reads the request (which must come behind a
/// hello of our version) and writes `answer` (raw bytes); the request is returned by the join
/// handle.
fn daemon(name: &str, answer: Vec<u8>) -> std::thread::JoinHandle<LocalRequest> {
    let path: PathBuf =
        std::env::temp_dir().join(format!("telefork-test-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("binding the stand-in daemon's socket");
    std::env::set_var(telefork::SOCKET_ENV, &path);
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("the library connects");
        let req = proto::read_first::<_, LocalRequest>(&mut conn)
            .expect("a request behind a hello of our version")
            .expect("a request");
        conn.write_all(&answer).expect("answering");
        std::fs::remove_file(&path).ok();
        req
    })
}

#[test]
fn requests_carry_the_version_and_answers_are_read_behind_a_hello() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let answer = proto::encode_first(&FromDaemon::Node { name: "node7".into() }).unwrap();
    let d = daemon("whoami", answer);
    assert_eq!(telefork::current_node().unwrap(), "node7");
    assert_eq!(d.join().unwrap(), LocalRequest::WhoAmI);
}

#[test]
fn a_daemon_of_the_next_version_is_refused_naming_both() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let next = PROTOCOL_VERSION + 1;
    // Its hello, then a message of its own that this version would misread.
    let mut answer = proto::encode_hello().to_vec();
    answer[8..12].copy_from_slice(&next.to_le_bytes());
    answer.extend_from_slice(&[3, 0, 0, 0, 0x07, 0x01, 0x02]);
    let d = daemon("next", answer);
    let e = telefork::current_node().unwrap_err();
    d.join().unwrap();
    match &e {
        Error::Protocol { node: None, ours, theirs } => {
            assert_eq!((*ours, *theirs), (PROTOCOL_VERSION, next))
        }
        other => panic!("a daemon of version {next} gave {other:?}"),
    }
    let text = e.to_string();
    assert!(
        text.contains(&format!("version {PROTOCOL_VERSION}"))
            && text.contains(&format!("version {next}")),
        "{text}"
    );
}

#[test]
fn a_refusal_arrives_as_its_variant_with_the_limit() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let refusal = Failure::Refused {
        node: "node3".into(),
        limit: Limit::MaxRestoresPerUser,
        reason: "user 1000 already has 1 processes restored on node node3".into(),
    };
    let d = daemon("refused", proto::encode_first(&FromDaemon::Failed(refusal)).unwrap());
    let e = telefork::current_node().unwrap_err();
    d.join().unwrap();
    assert!(
        matches!(&e, Error::Refused { node, limit: Limit::MaxRestoresPerUser, .. } if node == "node3"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "telefork refused by node node3: user 1000 already has 1 processes restored on node node3"
    );
}

/// A telefork the daemon answers with state the engine cannot carry: `telefork` returns the
/// typed refusal (which fd, which kind), and the stopped local copy is ended and reaped.
#[test]
fn a_telefork_of_uncarried_state_names_the_fd_and_leaves_no_copy() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let what = Uncarried::Fd { fd: 5, kind: "socket".into(), target: "socket:[42]".into() };
    let failure = Failure::CannotCarry { node: "node1".into(), what: what.clone() };
    let d = daemon("uncarried", proto::encode_first(&FromDaemon::Failed(failure)).unwrap());
    let e = match telefork::telefork("node2") {
        Ok(telefork::Fork::Child) => unreachable!("nobody captured the child"),
        Ok(telefork::Fork::Parent(_)) => panic!("telefork succeeded without a daemon's yes"),
        Err(e) => e,
    };
    let req = d.join().unwrap();
    let LocalRequest::Telefork { dest, child_pid, pass_stdin: false } = req else {
        panic!("the request was {req:?}")
    };
    assert_eq!(dest, "node2");
    match &e {
        Error::CannotCarry { node, what: got } => {
            assert_eq!((node.as_str(), got), ("node1", &what))
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("fd 5 is a socket"), "{e}");
    // The local copy was ended and reaped: it is no child of ours any more.
    let gone = nix::sys::wait::waitpid(
        nix::unistd::Pid::from_raw(child_pid),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    );
    if gone != Err(nix::errno::Errno::ECHILD) {
        // (Not to leave it stopped behind the failed test.)
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child_pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert_eq!(gone, Err(nix::errno::Errno::ECHILD), "the stopped copy {child_pid} is left");
}
