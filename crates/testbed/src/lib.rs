//! The testbed: N isolated telefork "machines" on one Linux host, each running a node daemon.
//! Node K (`nodeK`) is a network namespace `{prefix}nodeK` (address SUBNET.K/24 on `eth0`,
//! bridged to the other nodes through `{prefix}br0` in the root namespace), plus a UTS
//! namespace (hostname `nodeK`) and a mount namespace with a private tmpfs on /run/telefork,
//! so every node's daemon has its socket at the documented path. These namespaces are held
//! by a per-node *holder* process, so a daemon can be killed and restarted (failure tests)
//! while the node stays reachable; `exec`/`command` run programs inside them with `nsenter`.
//! All state lives in one directory (default /run/telefork-testbed): the state file, the
//! cluster certificates (`pki/`), and per node `nodeK/{node.toml,state/,daemon.log}`.
//!
//! Needs root. Names are global to the host: a second testbed must use another `prefix` and
//! `subnet` (the crate's own tests use `tfx-` and 10.78.0.0/24).

mod net;
mod procs;
mod state;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use telefork_node::config::{
    Config, Limits, Peer, TlsFiles, DEFAULT_PORT, DEFAULT_SOCKET, SOCKET_ENV,
};

use state::{NodeState, ProcId, State};

pub const DEFAULT_DIR: &str = "/run/telefork-testbed";
pub const DEFAULT_PREFIX: &str = "tf-";
pub const DEFAULT_SUBNET: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 0);
/// Nodes 1..=253 (SUBNET.254 is the bridge).
pub const MAX_NODES: usize = 253;

#[derive(Debug, Clone)]
pub struct TestbedOptions {
    pub nodes: usize,
    /// Where state, certificates, configs and logs go; removed by `down`.
    pub dir: PathBuf,
    /// The telefork binary the daemons run (`TELEFORK_BIN daemon --config DIR/nodeK/node.toml`).
    pub telefork_bin: PathBuf,
    /// Prefix of every namespace and link name (`{prefix}node1`, `{prefix}br0`, `{prefix}v1`);
    /// at most 8 characters of [a-z0-9-]. Default "tf-".
    pub prefix: String,
    /// The /24 the nodes live in (node K = .K, bridge = .254). Default 10.77.0.0.
    pub subnet: Ipv4Addr,
    /// Run this instead of the telefork daemon (tests). `{config}`, `{node}` and `{addr}` in
    /// any argument are replaced by the node's config path, name and address. It must create
    /// the daemon socket path (a listening socket, or for a stand-in a plain file).
    pub daemon_cmd_override: Option<Vec<String>>,
    /// How long `up` waits for all daemons' sockets.
    pub ready_timeout: Duration,
}

impl Default for TestbedOptions {
    fn default() -> Self {
        TestbedOptions {
            nodes: 3,
            dir: PathBuf::from(DEFAULT_DIR),
            telefork_bin: PathBuf::from("telefork"),
            prefix: DEFAULT_PREFIX.into(),
            subnet: DEFAULT_SUBNET,
            daemon_cmd_override: None,
            ready_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Testbed {
    pub dir: PathBuf,
    pub prefix: String,
    pub nodes: Vec<NodeInfo>,
}

#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub addr: Ipv4Addr,
    /// The node's daemon; 0 if it is not running (killed, or exited).
    pub daemon_pid: i32,
    /// The process holding the node's UTS and mount namespaces (what `exec` enters); 0 if gone.
    pub holder_pid: i32,
    /// The node's network namespace (`ip netns exec NETNS ...` works too, but without the
    /// node's hostname and /run/telefork).
    pub netns: String,
}

pub(crate) fn valid_prefix(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 8
        && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn node_name(k: usize) -> String {
    format!("node{k}")
}

/// `nodeK` -> K.
fn node_index(name: &str) -> Result<usize> {
    name.strip_prefix("node")
        .and_then(|k| k.parse().ok())
        .with_context(|| format!("bad node name {name:?}"))
}

fn node_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

fn config_path(dir: &Path, name: &str) -> PathBuf {
    node_dir(dir, name).join("node.toml")
}

fn daemon_log(dir: &Path, name: &str) -> PathBuf {
    node_dir(dir, name).join("daemon.log")
}

fn live(p: Option<ProcId>) -> Option<ProcId> {
    p.filter(|p| procs::alive(*p))
}

fn to_testbed(dir: &Path, st: &State) -> Result<Testbed> {
    let mut nodes = vec![];
    for n in &st.nodes {
        nodes.push(NodeInfo {
            name: n.name.clone(),
            addr: n.addr,
            daemon_pid: live(n.daemon).map_or(0, |p| p.pid),
            holder_pid: live(n.holder).map_or(0, |p| p.pid),
            netns: net::netns_name(&st.prefix, node_index(&n.name)?),
        });
    }
    Ok(Testbed { dir: dir.to_path_buf(), prefix: st.prefix.clone(), nodes })
}

/// The configuration of node K of `n`.
fn node_config(dir: &Path, subnet: Ipv4Addr, n: usize, k: usize) -> Config {
    let pki = dir.join("pki");
    let name = node_name(k);
    let (cert, key) = telefork_node::cluster::node_files(&pki, &name);
    Config {
        node: name.clone(),
        listen: SocketAddr::new(net::host_addr(subnet, k).into(), DEFAULT_PORT),
        socket: PathBuf::from(DEFAULT_SOCKET),
        state_dir: node_dir(dir, &name).join("state"),
        tls: TlsFiles { ca: pki.join(telefork_node::cluster::CA_CERT), cert, key },
        limits: Limits::default(),
        transport: Default::default(),
        peers: (1..=n)
            .filter(|&j| j != k)
            .map(|j| Peer {
                name: node_name(j),
                addr: SocketAddr::new(net::host_addr(subnet, j).into(), DEFAULT_PORT),
            })
            .collect(),
    }
}

fn daemon_argv(st: &State, dir: &Path, node: &NodeState) -> Vec<String> {
    let cfg = config_path(dir, &node.name).display().to_string();
    st.daemon_cmd
        .iter()
        .map(|a| {
            a.replace("{config}", &cfg)
                .replace("{node}", &node.name)
                .replace("{addr}", &node.addr.to_string())
        })
        .collect()
}

/// Whether a testbed can be made here: an error naming what is missing (root, iproute2's
/// `ip`). Tests that need a testbed fail with it: where they are meant to run (CI runs as
/// root, with network namespaces), not being able to is a failure, not a pass.
pub fn check_host() -> Result<()> {
    let euid = nix::unistd::Uid::effective();
    if !euid.is_root() {
        bail!(
            "a testbed needs root (network namespaces, bridges, mounts); this runs as uid {euid}"
        );
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => bail!("a testbed needs iproute2: `ip -V` failed ({})", out.status),
        Err(e) => bail!("a testbed needs iproute2: cannot run `ip` ({e})"),
    }
}

/// Brings up a testbed of `opts.nodes` nodes, first removing what a previous (possibly
/// crashed) testbed with the same `dir` and `prefix` left. On failure everything created so
/// far stays for inspection (logs in DIR/nodeK/); `down(dir)` removes it.
pub fn up(opts: &TestbedOptions) -> Result<Testbed> {
    if !(1..=MAX_NODES).contains(&opts.nodes) {
        bail!("testbed needs 1 to {MAX_NODES} nodes, not {}", opts.nodes);
    }
    if !valid_prefix(&opts.prefix) {
        bail!("testbed prefix {:?} must be 1-8 characters of [a-z0-9-]", opts.prefix);
    }
    if opts.subnet.octets()[3] != 0 {
        bail!("testbed subnet {} must be the base of a /24 (last byte 0)", opts.subnet);
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the testbed needs root (network namespaces, bridges, mounts)");
    }
    let dir = &opts.dir;
    down_prefixed(dir, &opts.prefix).context("removing the leftovers of an earlier testbed")?;

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let daemon_cmd = match &opts.daemon_cmd_override {
        Some(c) if c.is_empty() => bail!("daemon_cmd_override is empty"),
        Some(c) => c.clone(),
        None => vec![
            opts.telefork_bin.display().to_string(),
            "daemon".into(),
            "--config".into(),
            "{config}".into(),
        ],
    };
    let mut st =
        State { prefix: opts.prefix.clone(), subnet: opts.subnet, daemon_cmd, nodes: vec![] };
    // Saved before anything exists, so that `down(dir)` knows the prefix whatever happens next.
    st.save(dir)?;
    build(opts, &mut st).with_context(|| {
        format!("testbed up failed; what was created stays for inspection (logs in {}/nodeK/), `down` removes it", dir.display())
    })?;
    to_testbed(dir, &st)
}

/// The body of `up` once the state file exists.
fn build(opts: &TestbedOptions, st: &mut State) -> Result<()> {
    let dir = &opts.dir;

    let names: Vec<String> = (1..=opts.nodes).map(node_name).collect();
    telefork_node::cluster::init(&dir.join("pki"), &names)
        .context("creating the testbed's cluster certificates")?;

    net::create_bridge(&opts.prefix, opts.subnet)?;
    for k in 1..=opts.nodes {
        let name = node_name(k);
        let nd = node_dir(dir, &name);
        let cfg = node_config(dir, opts.subnet, opts.nodes, k);
        std::fs::create_dir_all(&cfg.state_dir)
            .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
        telefork_node::safe_file::write_file(
            &config_path(dir, &name),
            cfg.to_toml().as_bytes(),
            0o644,
            true,
        )?;
        net::create_node_net(&opts.prefix, opts.subnet, k)
            .with_context(|| format!("creating the network of {name}"))?;
        st.nodes.push(NodeState {
            name: name.clone(),
            addr: net::host_addr(opts.subnet, k),
            holder: None,
            daemon: None,
        });
        st.save(dir)?;
        let holder = procs::start_holder(&net::netns_name(&opts.prefix, k), &name, &nd)?;
        st.nodes[k - 1].holder = Some(holder);
        st.save(dir)?;
        let argv = daemon_argv(st, dir, &st.nodes[k - 1]);
        let daemon = procs::start_daemon(
            holder,
            &argv,
            &nd,
            &daemon_log(dir, &name),
            &format!("daemon of {name}"),
        )?;
        st.nodes[k - 1].daemon = Some(daemon);
        st.save(dir)?;
    }
    let deadline = Instant::now() + opts.ready_timeout;
    for n in &st.nodes {
        let (h, d) = (n.holder.unwrap(), n.daemon.unwrap());
        procs::wait_ready(
            h,
            d,
            Path::new(DEFAULT_SOCKET),
            &daemon_log(dir, &n.name),
            &format!("daemon of {}", n.name),
            deadline,
        )?;
    }
    Ok(())
}

/// The testbed described by DIR's state file (PIDs of processes that have gone read as 0).
pub fn load(dir: &Path) -> Result<Testbed> {
    to_testbed(dir, &State::load(dir)?)
}

/// Removes the testbed in `dir`: its processes, namespaces, links and the directory. Works
/// on whatever a crashed `up` left. The name prefix comes from the state file; without one,
/// the default prefix "tf-" is cleaned up.
pub fn down(dir: &Path) -> Result<()> {
    let prefix = State::load(dir).map(|s| s.prefix).unwrap_or_else(|_| DEFAULT_PREFIX.to_string());
    down_prefixed(dir, &prefix)
}

/// `down` for an explicit prefix (also cleans `{prefix}*` namespaces and links that no state
/// file mentions). `dir` is removed only if it holds a testbed state file or is empty.
pub fn down_prefixed(dir: &Path, prefix: &str) -> Result<()> {
    if !valid_prefix(prefix) {
        bail!("testbed prefix {prefix:?} must be 1-8 characters of [a-z0-9-]");
    }
    let st = State::load(dir).ok().filter(|s| s.prefix == prefix);
    // Processes: daemons and holders we recorded (if PID and start time still match), and
    // whatever else runs inside our network namespaces (programs started on the nodes).
    let mut pids: Vec<i32> = vec![];
    if let Some(st) = &st {
        for n in &st.nodes {
            pids.extend(live(n.daemon).map(|p| p.pid));
            pids.extend(live(n.holder).map(|p| p.pid));
        }
    }
    let namespaces = net::list_netns(prefix)?;
    for ns in &namespaces {
        pids.extend(net::netns_pids(ns).with_context(|| format!("listing the processes of {ns}"))?);
    }
    let me = std::process::id() as i32;
    pids.retain(|&p| p != me);
    pids.sort_unstable();
    pids.dedup();
    procs::stop_all(&pids, Duration::from_secs(2));

    let mut errors = vec![];
    for ns in &namespaces {
        if let Err(e) = net::delete_netns(ns) {
            errors.push(e);
        }
    }
    // A veth goes with its namespace (asynchronously); a bridge must be deleted.
    for link in net::list_links(prefix)? {
        if let Err(e) = net::delete_link(&link) {
            errors.push(e);
        }
    }
    if let Some(e) = errors.into_iter().next() {
        return Err(e.context("removing the testbed's network"));
    }

    if dir.exists() {
        let empty = std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(false);
        if state::path(dir).exists() {
            if st.is_none() && State::load(dir).is_ok() {
                // The state file belongs to a testbed with another prefix: leave it alone.
                bail!("{} holds a testbed with another prefix; not removing it", dir.display());
            }
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        } else if empty {
            std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
        } else {
            bail!(
                "{} is not empty and holds no testbed state file; not removing it",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Runs CMD on NODE as a program of that node would run (its network, hostname and
/// /run/telefork; as USER if given), with inherited stdio; returns its exit status.
pub fn exec(dir: &Path, node: &str, user: Option<&str>, cmd: &[String]) -> Result<ExitStatus> {
    let mut c = command(dir, node, user, cmd)?;
    c.status().with_context(|| format!("running {cmd:?} on {node}"))
}

/// Like `exec`, not yet spawned (callers choose stdio, e.g. to capture output).
pub fn command(dir: &Path, node: &str, user: Option<&str>, cmd: &[String]) -> Result<Command> {
    if cmd.is_empty() {
        bail!("no command to run on {node}");
    }
    let st = State::load(dir)?;
    let n = st.node(node)?;
    let holder = live(n.holder).with_context(|| {
        format!("node {node} is down (its namespace holder is gone); bring the testbed up again")
    })?;
    let mut c = Command::new("nsenter");
    c.arg(format!("--target={}", holder.pid)).args(["--net", "--uts", "--mount", "--"]);
    c.env_remove(SOCKET_ENV).current_dir("/");
    if let Some(u) = user {
        let pw = nix::unistd::User::from_name(u)?
            .with_context(|| format!("no user {u:?} on this host (see ensure_test_user)"))?;
        c.args([
            "setpriv",
            &format!("--reuid={}", pw.uid),
            &format!("--regid={}", pw.gid),
            "--init-groups",
            "--",
        ]);
        c.env("USER", u).env("LOGNAME", u).env("HOME", &pw.dir);
    }
    c.args(cmd);
    // A program of the node starts with stdio only: fds leaked by whatever started us (the
    // shell, a test harness) must not follow it into the node.
    // SAFETY: close_range is async-signal-safe; marking fds close-on-exec (rather than
    // closing them) keeps std's own exec-error pipe working until exec.
    unsafe {
        c.pre_exec(|| {
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    Ok(c)
}

/// Rewrites NODE's configuration (DIR/NODE/node.toml) with `change` and restarts its daemon.
pub fn reconfigure(
    dir: &Path,
    node: &str,
    change: impl FnOnce(&mut telefork_node::config::Config),
) -> Result<()> {
    let path = dir.join(node).join("node.toml");
    let mut cfg = telefork_node::config::Config::load(&path)?;
    change(&mut cfg);
    telefork_node::safe_file::write_file(&path, cfg.to_toml().as_bytes(), 0o644, true)?;
    restart_daemon(dir, node)
}

/// Stops NODE's daemon (SIGTERM, SIGKILL after 2 s). The node stays up: `exec` still works
/// and `restart_daemon` starts a new daemon.
pub fn kill_daemon(dir: &Path, node: &str) -> Result<()> {
    let mut st = State::load(dir)?;
    let n = st.node_mut(node)?;
    if let Some(d) = live(n.daemon) {
        procs::stop_all(&[d.pid], Duration::from_secs(2));
        if procs::alive(d) {
            bail!("daemon of {node} (pid {}) did not exit", d.pid);
        }
    }
    n.daemon = None;
    st.save(dir)
}

/// Stops NODE's daemon if it runs, and starts a new one (waiting for its socket).
pub fn restart_daemon(dir: &Path, node: &str) -> Result<()> {
    kill_daemon(dir, node)?;
    let mut st = State::load(dir)?;
    let n = st.node(node)?.clone();
    let holder = live(n.holder)
        .with_context(|| format!("node {node} is down (its namespace holder is gone)"))?;
    let _ = std::fs::remove_file(procs::in_node(holder, Path::new(DEFAULT_SOCKET)));
    let argv = daemon_argv(&st, dir, &n);
    let log = daemon_log(dir, node);
    let what = format!("daemon of {node}");
    let d = procs::start_daemon(holder, &argv, &node_dir(dir, node), &log, &what)?;
    st.node_mut(node)?.daemon = Some(d);
    st.save(dir)?;
    procs::wait_ready(
        holder,
        d,
        Path::new(DEFAULT_SOCKET),
        &log,
        &what,
        Instant::now() + Duration::from_secs(10),
    )
}

/// Held while a testbed of some prefix is in use; dropping it releases the lock.
pub struct TestbedLock {
    _file: std::fs::File,
}

/// Waits for exclusive use of the testbed names with `prefix` (an `flock` on
/// /run/lock/telefork-testbed-PREFIX.lock), across threads and processes. Namespace and link
/// names are global to the host: tests that bring a testbed up hold this for their whole
/// duration so that parallel tests take turns. (`up`/`down` themselves do not take it.)
pub fn lock(prefix: &str) -> Result<TestbedLock> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    if !valid_prefix(prefix) {
        bail!("testbed prefix {prefix:?} must be 1-8 characters of [a-z0-9-]");
    }
    let dir = Path::new("/run/lock");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("telefork-testbed-{prefix}.lock"));
    // /run/lock is writable by everyone: a symlink planted at the name is not followed, a FIFO
    // does not block the open, and anything but a file of ours (someone else's could have its
    // lock held forever) is refused.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .with_context(|| format!("opening {} (not following a symlink)", path.display()))?;
    let md = file.metadata().with_context(|| format!("opening {}", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if !md.is_file() || md.uid() != me {
        bail!("{} is not a regular file of uid {me} (its owner is uid {}): someone else made it; remove it", path.display(), md.uid());
    }
    loop {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(TestbedLock { _file: file });
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
}

/// Makes sure a system user NAME exists (creating it with useradd --system, no home, nologin
/// shell, if missing); returns its uid and gid.
pub fn ensure_test_user(name: &str) -> Result<(u32, u32)> {
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        || name.is_empty()
    {
        bail!("bad user name {name:?}");
    }
    if nix::unistd::User::from_name(name)?.is_none() {
        let out = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
            .output()
            .context("running useradd")?;
        // Another process may have created it meanwhile; the lookup below decides.
        if !out.status.success() && nix::unistd::User::from_name(name)?.is_none() {
            bail!(
                "`useradd --system --no-create-home --shell /usr/sbin/nologin {name}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let u = nix::unistd::User::from_name(name)?
        .with_context(|| format!("user {name:?} still missing after useradd"))?;
    Ok((u.uid.as_raw(), u.gid.as_raw()))
}
