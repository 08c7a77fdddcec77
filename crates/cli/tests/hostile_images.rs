//! Hostile images: a root `telefork restore` must grant nothing the image's owner — the owner
//! of the image file — could not have had. A small real process (tests/zdtm/simple.c) runs as
//! a test user and is captured; its image is then rewritten with the image crate's own
//! encoder (valid checksums), one item per variant — uids, gids, groups, nice, a hard limit,
//! a mapping below vm.mmap_min_addr — given to the test user, and restored as root: each must
//! be refused, naming the item, with nothing left running. The honest image restores and its
//! process says PASS as the test user; `--trust-image` restores a hostile one as it is.
//!
//! Needs root (it starts processes as another user and restores them). Every process a test
//! starts is killed by PID on every exit path: the target, the restore commands, and any
//! process whose environment carries the test's unique `ZDTM_GO` (a restored target).

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use telefork_image::{ImageReader, ImageWriter, ProcessImage, Vma, VmaKind};

const TELEFORK: &str = env!("CARGO_BIN_EXE_telefork");
/// The non-root owner of the images (created if missing).
const TEST_USER: &str = "telefork-hostile";
const TIMEOUT: Duration = Duration::from_secs(60);

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

fn proc_state(pid: i32) -> Option<char> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..].chars().next()
}

/// Live processes whose environment holds `marker`.
fn pids_with_env(marker: &[u8]) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&p| p != me)
        .filter(|&p| {
            fs::read(format!("/proc/{p}/environ"))
                .map(|e| e.split(|&b| b == 0).any(|kv| kv == marker))
                .unwrap_or(false)
        })
        .filter(|&p| !matches!(proc_state(p), None | Some('Z')))
        .collect()
}

fn kill_pid(pid: i32) {
    // SAFETY: kill(2) with a PID this test started (or a process carrying its marker).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Waits for `child` with a timeout; kills it on timeout (None).
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Only fds 0-2 go through exec (a harness's extra fds are not the target's state).
fn close_extra_fds(cmd: &mut Command) {
    // SAFETY: close_range is async-signal-safe; CLOSE_RANGE_CLOEXEC keeps std's exec-error pipe.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }
}

/// Makes `cmd` run as `uid`:`gid` with only its own group, as a login would.
fn as_user(cmd: &mut Command, (uid, gid): (u32, u32)) {
    // SAFETY: setgroups/setgid/setuid are async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            let groups = [gid];
            if libc::setgroups(1, groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What one `telefork restore` did.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// Where the restore's stdout went (a restored process goes on writing there).
    stdout_file: Option<PathBuf>,
}

impl Outcome {
    fn say(&self) -> String {
        format!(
            "{:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// A directory of its own (searchable by the test user), the target built into it, and
/// everything the test started; all of it removed or killed on drop.
struct Lab {
    name: String,
    dir: PathBuf,
    exe: PathBuf,
    go: PathBuf,
    marker: Vec<u8>,
    user: (u32, u32),
    started: Vec<Child>,
    restored: Vec<i32>,
}

impl Lab {
    fn new(name: &str) -> Lab {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "{name}: these tests restore as root and start processes as {TEST_USER}: run them as root");
        let user = telefork_testbed::ensure_test_user(TEST_USER)
            .unwrap_or_else(|e| panic!("{name}: no test user: {e:#}"));
        let n = UNIQUE.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir()
            .join(format!("telefork-hostile-{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let exe = dir.join("simple");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/zdtm/simple.c");
        let out = Command::new("gcc")
            .args(["-O1", "-g", "-Wall"])
            .arg("-o")
            .arg(&exe)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("cannot run gcc ({e}); run scripts/setup.sh"));
        assert!(
            out.status.success(),
            "gcc failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let go = dir.join("go");
        let mut marker = b"ZDTM_GO=".to_vec();
        marker.extend_from_slice(go.as_os_str().as_encoded_bytes());
        Lab { name: name.into(), dir, exe, go, marker, user, started: vec![], restored: vec![] }
    }

    /// Starts the target as the test user, waits for READY and dumps it (as root): the
    /// honest image's process record and the rest of its bytes.
    fn capture(&mut self) -> Vec<u8> {
        let mut cmd = Command::new(&self.exe);
        cmd.env("ZDTM_GO", &self.go).env("ZDTM_TMP", &self.dir).current_dir(&self.dir);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        close_extra_fds(&mut cmd);
        as_user(&mut cmd, self.user);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot start {}: {e}", self.name, self.exe.display()));
        let pid = child.id();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        self.started.push(child);
        let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
        assert_eq!(first, "READY", "{}: the target did not say READY", self.name);
        let img = self.dir.join("honest.img");
        let out = Command::new(TELEFORK)
            .args(["dump", "--pid", &pid.to_string(), "--out"])
            .arg(&img)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: telefork dump failed:\n{}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let target = self.started.last_mut().unwrap();
        assert!(
            wait_timeout(target, Duration::from_secs(10)).is_some(),
            "{}: the dumped target did not end",
            self.name
        );
        fs::read(&img).unwrap()
    }

    /// The image `honest` with its process record changed by `change`, written (valid
    /// checksums: the image crate's own encoder) to a file of the test user, mode 0600.
    fn craft(&self, honest: &[u8], what: &str, change: impl FnOnce(&mut ProcessImage)) -> PathBuf {
        let (mut r, header) = ImageReader::new(honest).unwrap();
        let mut process = r.process().unwrap();
        change(&mut process);
        let mut w = ImageWriter::new(Vec::new(), &header).unwrap();
        w.write_process(&process).unwrap();
        while let Some(run) = r.next_pages().unwrap() {
            w.write_pages(run.addr, run.data).unwrap();
        }
        let path = self.dir.join(format!("{what}.img"));
        fs::write(&path, w.finish().unwrap()).unwrap();
        self.give_to_test_user(&path);
        path
    }

    fn give_to_test_user(&self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.user.0), Some(self.user.1)).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// `telefork restore IMG ARGS` (as root, or as the test user), stdout and stderr into
    /// files; a restored process keeps the stdout file.
    fn restore(&mut self, img: &Path, args: &[&str], as_test_user: bool) -> Outcome {
        let n = UNIQUE.fetch_add(1, Ordering::SeqCst);
        let (out_path, err_path) =
            (self.dir.join(format!("restore-{n}.out")), self.dir.join(format!("restore-{n}.err")));
        let mut cmd = Command::new(TELEFORK);
        cmd.arg("restore").arg(img).args(args);
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).unwrap())
            .stderr(fs::File::create(&err_path).unwrap());
        close_extra_fds(&mut cmd);
        if as_test_user {
            as_user(&mut cmd, self.user);
        }
        let child = cmd.spawn().unwrap();
        self.started.push(child);
        let status = wait_timeout(self.started.last_mut().unwrap(), TIMEOUT)
            .unwrap_or_else(|| panic!("{}: telefork restore {args:?} hung (killed)", self.name));
        let o = Outcome {
            status,
            stdout: fs::read_to_string(&out_path).unwrap(),
            stderr: fs::read_to_string(&err_path).unwrap(),
            stdout_file: Some(out_path),
        };
        if o.status.success() && args.contains(&"--detach") {
            if let Some(pid) = o.stdout.lines().last().and_then(|l| l.trim().parse().ok()) {
                self.restored.push(pid);
            }
        }
        o
    }

    /// The restore must refuse the image, with an error containing every one of `names`,
    /// and leave nothing running.
    fn refused(&mut self, img: &Path, what: &str, names: &[&str]) -> String {
        let o = self.restore(img, &["--detach"], false);
        assert!(
            !o.status.success(),
            "{}: telefork restore accepted {what}:\n{}",
            self.name,
            o.say()
        );
        for n in names {
            assert!(
                o.stderr.contains(n),
                "{}: the refusal of {what} must name {n:?}:\n{}",
                self.name,
                o.say()
            );
        }
        self.assert_nothing_left(what);
        eprintln!("{}: {what}: {}", self.name, o.stderr.trim());
        o.stderr
    }

    fn assert_nothing_left(&self, what: &str) {
        thread::sleep(Duration::from_millis(100));
        let left = pids_with_env(&self.marker);
        assert!(left.is_empty(), "{}: processes left behind after {what}: {left:?}", self.name);
    }

    /// Lets the restored process `pid` go on: it checks its memory, says PASS on the stdout
    /// it got from the (detached) restore, and ends.
    fn go_and_pass(&self, o: &Outcome, pid: i32) {
        fs::write(&self.go, b"go").unwrap();
        let path = o.stdout_file.as_ref().expect("a restore with its stdout in a file");
        let said = |word: &str| {
            fs::read_to_string(path).unwrap_or_default().lines().any(|l| l.starts_with(word))
        };
        let end = Instant::now() + TIMEOUT;
        while Instant::now() < end && !said("PASS") && !said("FAIL") {
            thread::sleep(Duration::from_millis(10));
        }
        let out = fs::read_to_string(path).unwrap_or_default();
        assert!(
            said("PASS"),
            "{}: restored process {pid} did not say PASS:\n{out}\n{}",
            self.name,
            o.say()
        );
        while Instant::now() < end && !matches!(proc_state(pid), None | Some('Z')) {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(
            matches!(proc_state(pid), None | Some('Z')),
            "{}: restored process {pid} did not end after PASS",
            self.name
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.started {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for _ in 0..3 {
            let left = pids_with_env(&self.marker);
            if left.is_empty() {
                break;
            }
            left.into_iter().for_each(kill_pid);
            thread::sleep(Duration::from_millis(50));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The `Uid:` / `Gid:` / `Groups:` values of /proc/PID/status.
fn status_field(pid: i32, key: &str) -> Vec<u32> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.split_whitespace().filter_map(|w| w.parse().ok()).collect())
        .unwrap_or_default()
}

fn detached_pid(lab: &Lab, o: &Outcome) -> i32 {
    assert!(o.status.success(), "{}: the restore failed:\n{}", lab.name, o.say());
    o.stdout
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}: no PID on the last line:\n{}", lab.name, o.say()))
}

// ---------------------------------------------------------------------------------------------

/// The honest image of the test user's process, owned by the test user, restores (as root)
/// as that user, and the process carries on and says PASS.
#[test]
fn honest_image_restores_as_its_owner() {
    let mut lab = Lab::new("honest");
    let honest = lab.capture();
    let img = lab.craft(&honest, "honest", |_| {});
    let o = lab.restore(&img, &["--detach"], false);
    let pid = detached_pid(&lab, &o);
    let (uid, gid) = lab.user;
    assert_eq!(status_field(pid, "Uid:"), vec![uid; 4], "honest: the restored process's uids");
    assert_eq!(status_field(pid, "Gid:"), vec![gid; 4], "honest: the restored process's gids");
    lab.go_and_pass(&o, pid);
}

/// An image claiming uid 0 — real, effective, saved or filesystem — is refused.
#[test]
fn refuses_uid_0() {
    let mut lab = Lab::new("uid0");
    let honest = lab.capture();
    let img = lab.craft(&honest, "all-uids-0", |p| p.creds.uid = [0; 4]);
    let err = lab.refused(&img, "an image claiming uid 0", &["real uid 0", TEST_USER]);
    assert!(
        err.contains("--trust-image"),
        "uid0: a root restorer is told of --trust-image:\n{err}"
    );
    for (i, which) in ["real", "effective", "saved", "filesystem"].iter().enumerate() {
        let img = lab.craft(&honest, &format!("{which}-uid-0"), |p| p.creds.uid[i] = 0);
        lab.refused(
            &img,
            &format!("an image claiming {which} uid 0"),
            &[&format!("{which} uid 0")],
        );
    }
}

/// An image claiming group 42 (shadow on Debian, which the test user is not in) as its real,
/// effective, saved or filesystem gid, or as a supplementary group, is refused.
#[test]
fn refuses_group_42() {
    let mut lab = Lab::new("gid42");
    let honest = lab.capture();
    for (i, which) in ["real", "effective", "saved", "filesystem"].iter().enumerate() {
        let img = lab.craft(&honest, &format!("{which}-gid-42"), |p| p.creds.gid[i] = 42);
        lab.refused(
            &img,
            &format!("an image claiming {which} gid 42"),
            &[&format!("{which} gid 42"), TEST_USER],
        );
    }
    let img = lab.craft(&honest, "group-42", |p| p.creds.groups.push(42));
    lab.refused(
        &img,
        "an image claiming supplementary group 42",
        &["supplementary group 42", TEST_USER, "does not have"],
    );
}

/// Nice -20 (the test user's RLIMIT_NICE lets it lower nothing) is refused.
#[test]
fn refuses_nice_minus_20() {
    let mut lab = Lab::new("nice");
    let honest = lab.capture();
    let img = lab.craft(&honest, "nice", |p| p.misc.nice = -20);
    lab.refused(&img, "an image claiming nice -20", &["nice value -20"]);
}

/// A hard limit above the restorer's own (one that is finite here) is refused.
#[test]
fn refuses_a_hard_limit_above_the_owners() {
    let mut lab = Lab::new("rlimit");
    let honest = lab.capture();
    // (The restore command runs with this test's limits.)
    let candidates = [
        (libc::RLIMIT_NICE, "RLIMIT_NICE"),
        (libc::RLIMIT_RTPRIO, "RLIMIT_RTPRIO"),
        (libc::RLIMIT_NOFILE, "RLIMIT_NOFILE"),
        (libc::RLIMIT_MEMLOCK, "RLIMIT_MEMLOCK"),
    ];
    let (res, name, hard) = candidates
        .iter()
        .find_map(|&(res, name)| {
            let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: getrlimit writes one struct rlimit.
            let ok = unsafe { libc::getrlimit(res, &mut l) } == 0;
            (ok && l.rlim_max != libc::RLIM_INFINITY).then_some((res, name, l.rlim_max))
        })
        .expect("rlimit: every candidate limit is unlimited here: nothing to exceed");
    let img = lab.craft(&honest, "rlimit", |p| {
        let l = p
            .misc
            .rlimits
            .iter_mut()
            .find(|l| l.resource == res)
            .expect("the image has every limit");
        l.hard = hard + 1;
    });
    lab.refused(
        &img,
        &format!("an image claiming a hard {name} of {}", hard + 1),
        &[name, &(hard + 1).to_string()],
    );
}

/// A mapping at address 0 (below vm.mmap_min_addr) is refused.
#[test]
fn refuses_a_mapping_at_address_0() {
    let min: u64 =
        fs::read_to_string("/proc/sys/vm/mmap_min_addr").unwrap().trim().parse().unwrap();
    assert!(min > 0, "vm.mmap_min_addr is 0 here: anyone may map page 0, nothing to refuse");
    let mut lab = Lab::new("map0");
    let honest = lab.capture();
    let img = lab.craft(&honest, "map0", |p| {
        assert!(p.vmas.first().is_some_and(|v| v.start >= 4096));
        p.vmas.insert(
            0,
            Vma {
                start: 0,
                end: 4096,
                prot: 3,
                shared: false,
                offset: 0,
                kind: VmaKind::Anon,
                growsdown: false,
                accounted: true,
                advice: vec![],
                flags: Default::default(),
            },
        );
    });
    lab.refused(&img, "an image with a mapping at address 0", &["0x0-0x1000", "mmap_min_addr"]);
}

/// The files an image names are looked at as its owner: a mapped file in a root-only
/// directory is refused as unreachable, and the refusal tells nothing of that file (its size
/// or time, which a look as root would give away).
#[test]
fn refuses_to_look_at_files_its_owner_cannot_reach() {
    let mut lab = Lab::new("unreachable");
    let honest = lab.capture();
    let private = lab.dir.join("root-only");
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    let secret = private.join("secret");
    fs::write(&secret, vec![7u8; 12345]).unwrap();
    let img = lab.craft(&honest, "unreachable", |p| {
        let v =
            p.vmas.iter_mut().find(|v| matches!(v.kind, VmaKind::File(_))).expect("a file mapping");
        if let VmaKind::File(id) = &mut v.kind {
            id.path = secret.display().to_string();
            id.size = 1;
        }
    });
    let err = lab.refused(
        &img,
        "an image mapping a file in a root-only directory",
        &["Permission denied", &secret.display().to_string()],
    );
    assert!(
        !err.contains("12345"),
        "unreachable: the refusal gives away the size of a file the owner cannot reach:\n{err}"
    );
}

/// An image file others may write could have been made by any of them: refused, however
/// honest its contents.
#[test]
fn refuses_an_image_file_others_may_write() {
    let mut lab = Lab::new("writable");
    let honest = lab.capture();
    let img = lab.craft(&honest, "writable", |_| {});
    fs::set_permissions(&img, fs::Permissions::from_mode(0o666)).unwrap();
    lab.refused(&img, "an image file of mode 0666", &["mode 0666"]);
}

/// The test user restoring its own hostile image gets the same refusal, named, before
/// anything is made (not the kernel's "Operation not permitted" half way); and may not
/// pass --trust-image.
#[test]
fn a_user_restoring_their_own_image_gets_the_same_checks() {
    let mut lab = Lab::new("user");
    let honest = lab.capture();
    // (A copy of telefork the test user can surely reach, wherever the build lives.)
    let tf = lab.dir.join("telefork");
    fs::copy(TELEFORK, &tf).unwrap();
    let img = lab.craft(&honest, "nice", |p| p.misc.nice = -20);
    let o = lab.restore_with(&tf, &img, &[]);
    assert!(
        !o.status.success() && o.stderr.contains("nice value -20"),
        "user: the refusal must name the nice value:\n{}",
        o.say()
    );
    lab.assert_nothing_left("the user's refused restore");
    let o = lab.restore_with(&tf, &img, &["--trust-image"]);
    assert!(
        !o.status.success() && o.stderr.contains("--trust-image is for root"),
        "user: --trust-image must be refused:\n{}",
        o.say()
    );
}

impl Lab {
    /// `restore` as the test user, with the binary `tf`.
    fn restore_with(&mut self, tf: &Path, img: &Path, args: &[&str]) -> Outcome {
        let mut cmd = Command::new(tf);
        cmd.arg("restore").arg(img).args(args).stdin(Stdio::null());
        close_extra_fds(&mut cmd);
        as_user(&mut cmd, self.user);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        // (Bounded: a restore that went through would be waiting for its process; killed.)
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = rx.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
            kill_pid(pid as i32);
            panic!("{}: the test user's restore hung (killed)", self.name)
        });
        let out = out.unwrap();
        Outcome {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
            stdout_file: None,
        }
    }
}

/// Root may restore a hostile image as it is with --trust-image: claiming uid 0 and group 42,
/// it runs as root with group 42, and says PASS.
#[test]
fn trust_image_restores_it_as_it_is() {
    let mut lab = Lab::new("trust");
    let honest = lab.capture();
    let img = lab.craft(&honest, "root", |p| {
        p.creds.uid = [0; 4];
        p.creds.groups.push(42);
    });
    let o = lab.restore(&img, &["--detach", "--trust-image"], false);
    let pid = detached_pid(&lab, &o);
    assert_eq!(status_field(pid, "Uid:"), vec![0; 4], "trust: the restored process's uids");
    assert!(
        status_field(pid, "Groups:").contains(&42),
        "trust: the restored process's groups lack 42"
    );
    lab.go_and_pass(&o, pid);
}
