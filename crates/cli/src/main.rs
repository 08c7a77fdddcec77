//! The `telefork` command: one binary for every role.
//!
//!     telefork dump --pid PID --out FILE [--leave-running]
//!     telefork restore FILE [--detach] [--trust-image]
//!     telefork check-image FILE

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

mod logging;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use telefork_node::safe_file::NewFile;

#[derive(Parser)]
#[command(
    name = "telefork",
    version,
    about = "fork(), except the child appears on another machine: checkpoint, restore and move Linux processes",
    after_help = "Exit status: 0 on success; 3 when dump or restore refuses state it cannot carry \
                  (the message names it; nothing was changed); 1 on any other error. `restore` \
                  without --detach exits with the restored process's own status."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Capture a running process into an image file.
    ///
    /// The process is stopped while it is read. Once the complete image is safely on disk
    /// (written to an unnamed file, synced, renamed into place, replacing whatever entry is
    /// at FILE without following a symlink) the process is killed, unless --leave-running is
    /// given. The image is 0600, owned by the process's owner. On any error the process
    /// continues untouched and no image file is left behind.
    Dump {
        /// The process to capture (single-threaded so far).
        #[arg(long)]
        pid: i32,
        /// Where to write the image.
        #[arg(long)]
        out: PathBuf,
        /// Let the process run on after the image is written.
        #[arg(long)]
        leave_running: bool,
        /// Capture a process that has children (or unreaped zombies) on its own. Without
        /// this, such a process is refused, naming them: process trees are not captured yet.
        /// Restored, it has no children: wait() gives ECHILD, and files it shared with them
        /// are its own. (With --leave-running, the original keeps its children.)
        #[arg(long)]
        ignore_children: bool,
    },
    /// Bring a process back to life from an image file.
    ///
    /// Without --detach, waits for the restored process and exits with its exit status
    /// (128+N if it was killed by signal N). With --detach, prints the restored PID alone on
    /// the last line of stdout and returns at once. Standard input/output/error that were a
    /// terminal or a pipe at capture are bound to this command's own.
    ///
    /// The image belongs to the owner of its file, and the restore grants nothing that user
    /// could not have had: an image whose uids, gids, groups, nice value, hard limits or
    /// mappings (below vm.mmap_min_addr) exceed that is refused, naming the item, before
    /// anything is made; so is an image file that others than its owner may write.
    Restore {
        /// The image to restore.
        image: PathBuf,
        /// Do not wait for the restored process.
        #[arg(long)]
        detach: bool,
        /// (root only) Restore the image's credentials, nice value, limits and mappings as
        /// they are, whoever owns the file: for images you made or checked yourself.
        #[arg(long)]
        trust_image: bool,
        /// Leave the process in this command's cgroups instead of those it was in at
        /// capture (which a restore joins again, refusing if one is gone).
        #[arg(long)]
        ignore_cgroups: bool,
    },
    /// Verify an image (checksums, structure) and print a summary, without restoring it
    /// (read front to back, one record in memory at a time).
    CheckImage { image: PathBuf },
    /// Run this node's daemon: receives processes from other nodes (mutual TLS), sends local
    /// programs' children away, relays their output and exit status.
    Daemon {
        /// The node configuration (TOML; see crates/node/src/config.rs for every key).
        #[arg(long, default_value = telefork_node::config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Manage the cluster's certificates.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// N isolated nodes on this one machine (network, UTS and mount namespaces), each with a
    /// running daemon: for tests and the demo.
    #[command(subcommand)]
    Testbed(TestbedCmd),
    /// Benchmark telefork against its baselines on a 2-node testbed of its own (needs root):
    /// runs the telefork-bench binary next to this one with the same arguments (`telefork
    /// bench --help` shows its options; `cargo build --release --workspace --bins` builds it).
    #[command(disable_help_flag = true)]
    Bench {
        /// The bench's options, passed on as they are.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "OPTIONS")]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Create a cluster CA and a certificate for every node (DIR/ca.pem, DIR/NODE.pem, keys).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Node names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Sign a certificate for one more node with the existing CA in DIR.
    AddNode {
        #[arg(long)]
        dir: PathBuf,
        node: String,
    },
}

#[derive(Subcommand)]
enum TestbedCmd {
    /// Create the nodes (removing leftovers of an earlier run first) and start their daemons.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// How process images travel between the nodes: tls (default) or plain.
        #[arg(long, default_value = "tls", value_parser = ["tls", "plain"])]
        image_transport: String,
        #[arg(long, default_value = telefork_testbed::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Run a command on a node, as a program of that node would run.
    Exec {
        node: String,
        /// Run as this user (created if it does not exist) instead of root.
        #[arg(long)]
        user: Option<String>,
        #[arg(long, default_value = telefork_testbed::DEFAULT_DIR)]
        dir: PathBuf,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Remove every node, namespace, link and daemon of the testbed.
    Down {
        #[arg(long, default_value = telefork_testbed::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Show the nodes.
    Status {
        #[arg(long, default_value = telefork_testbed::DEFAULT_DIR)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(matches!(cli.cmd, Cmd::Daemon { .. }));
    let result = match cli.cmd {
        Cmd::Dump { pid, out, leave_running, ignore_children } => {
            dump(pid, &out, leave_running, ignore_children).map(|_| ExitCode::SUCCESS)
        }
        Cmd::Restore { image, detach, trust_image, ignore_cgroups } => {
            restore(&image, detach, trust_image, ignore_cgroups)
        }
        Cmd::CheckImage { image } => check_image(&image).map(|_| ExitCode::SUCCESS),
        Cmd::Daemon { config } => telefork_node::config::Config::load(&config)
            .and_then(telefork_node::daemon::run)
            .map(|_| ExitCode::SUCCESS),
        Cmd::Cluster(ClusterCmd::Init { dir, nodes, force }) => {
            telefork_node::cluster::init_with(&dir, &nodes, force).map(|_| {
                println!(
                    "cluster CA and certificates for {} written to {}",
                    nodes.join(", "),
                    dir.display()
                );
                ExitCode::SUCCESS
            })
        }
        Cmd::Cluster(ClusterCmd::AddNode { dir, node }) => {
            telefork_node::cluster::add_node(&dir, &node).map(|_| ExitCode::SUCCESS)
        }
        Cmd::Testbed(t) => testbed(t),
        Cmd::Bench { args } => bench(&args),
    };
    tracing::debug!("{} system calls injected", telefork_engine::injected_calls());
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("telefork: error: {e:#}");
            ExitCode::from(if is_refusal(&e) { EXIT_CANNOT_CARRY } else { 1 })
        }
    }
}

/// The exit status of a `dump` or `restore` that refused a piece of state it cannot carry
/// (named in its message), having changed nothing; any other failure exits with 1.
const EXIT_CANNOT_CARRY: u8 = 3;

/// Whether `e` is the engine refusing state it cannot carry.
fn is_refusal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<telefork_engine::Uncarried>().is_some()
            || c.downcast_ref::<telefork_engine::Error>().is_some_and(|e| e.uncarried().is_some())
    })
}

fn dump(pid: i32, out: &Path, leave_running: bool, ignore_children: bool) -> Result<()> {
    let start = Instant::now();
    // Unnamed until complete, 0600, never through a symlink (see `safe_file`); dropped with
    // the commit closure if the dump fails, which leaves nothing behind.
    let image = NewFile::create(out, 0o600)?;
    let writer = image.file().try_clone().context("duplicating the image's file descriptor")?;
    let size = std::cell::Cell::new(0);
    let opts = telefork_engine::DumpOptions {
        leave_running,
        inherit_stdio: false,
        skip_page_checksums: false,
        page_route: None,
        outside_reader: None,
        ignore_children,
        // (A checkpoint: the image holds copies of its fds' state.)
        fork_copy: false,
    };
    let commit = |w: BufWriter<File>| -> Result<()> {
        let f = w.into_inner().map_err(|e| e.into_error()).context("writing the image")?;
        size.set(f.metadata().map(|m| m.len()).unwrap_or(0));
        drop(f);
        // (Read while the process is still stopped: its identity cannot change meanwhile.)
        let (uid, gid) = process_owner(pid)?;
        image.set_owner(uid, gid)?;
        image.commit(true)
    };
    let result = telefork_engine::dump(
        Pid::from_raw(pid),
        BufWriter::with_capacity(1 << 20, writer),
        &opts,
        commit,
    );
    match result {
        Ok(s) => {
            eprintln!(
                "telefork: dumped process {} ({} mappings, {} fds, {} of memory) to {} ({}) in {:.1} ms{}",
                s.pid,
                s.vmas,
                s.fds,
                human(s.page_bytes),
                out.display(),
                human(size.get()),
                start.elapsed().as_secs_f64() * 1e3,
                if leave_running { "; left running" } else { "; process killed" }
            );
            Ok(())
        }
        Err(e) => {
            Err(e).with_context(|| format!("dumping process {pid} failed; it was left running"))
        }
    }
}

/// Who the image of process `pid` belongs to: the owner the kernel gives its /proc files —
/// its effective uid and gid, or root for a process the kernel marks undumpable (one that
/// changed identity, e.g. set-user-ID) — and root as well when its real, effective, saved and
/// filesystem ids are not all one (its memory may hold what the other identity could read).
fn process_owner(pid: i32) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(format!("/proc/{pid}"))
        .with_context(|| format!("reading the owner of process {pid}"))?;
    let c = telefork_engine::procfs::read_status(Pid::from_raw(pid))
        .with_context(|| format!("reading the credentials of process {pid}"))?;
    let one_identity = c.uid.iter().all(|&u| u == c.uid[0]) && c.gid.iter().all(|&g| g == c.gid[0]);
    Ok(if one_identity && (md.uid(), md.gid()) == (c.uid[1], c.gid[1]) {
        (md.uid(), md.gid())
    } else {
        (0, 0)
    })
}

/// Opens an image for reading: a regular file only. A FIFO would block the open (or a read)
/// forever and a device like /dev/zero never ends; the open is non-blocking, and the file is
/// checked again once open in case the name changed meanwhile.
fn open_image(image: &Path) -> Result<File> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let not_regular = |md: &std::fs::Metadata| -> Result<()> {
        let t = md.file_type();
        let kind = match () {
            _ if t.is_file() => return Ok(()),
            _ if t.is_dir() => "a directory",
            _ if t.is_fifo() => "a FIFO",
            _ if t.is_socket() => "a socket",
            _ if t.is_char_device() => "a character device",
            _ if t.is_block_device() => "a block device",
            _ => "something else",
        };
        bail!(
            "{} is {kind}, not a regular file: images are read from regular files",
            image.display()
        )
    };
    let md =
        std::fs::metadata(image).with_context(|| format!("opening image {}", image.display()))?;
    not_regular(&md)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(image)
        .with_context(|| format!("opening image {}", image.display()))?;
    let now = f.metadata().with_context(|| format!("opening image {}", image.display()))?;
    not_regular(&now)?;
    if (now.dev(), now.ino()) != (md.dev(), md.ino()) {
        bail!("{} changed while being opened", image.display());
    }
    nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()))
        .with_context(|| format!("opening image {}", image.display()))?;
    Ok(f)
}

fn restore(
    image: &Path,
    detach: bool,
    trust_image: bool,
    ignore_cgroups: bool,
) -> Result<ExitCode> {
    let start = Instant::now();
    let root = nix::unistd::geteuid().is_root();
    if trust_image && !root {
        anyhow::bail!("--trust-image is for root: a user's restore can only give the process that user's own rights anyway");
    }
    let f = open_image(image)?;
    let opts = telefork_engine::RestoreOptions {
        expect_owner: image_owner(image, &f, trust_image)?,
        join_cgroups: !ignore_cgroups,
        ..Default::default()
    };
    let r = telefork_engine::restore(BufReader::with_capacity(1 << 20, f), &opts).map_err(|e| {
        if root && e.beyond_owner().is_some() {
            anyhow::anyhow!("refusing to restore {}, nothing was made: {e:#}; `telefork restore --trust-image` restores it as it is", image.display())
        } else {
            e.into_chain().context(format!("restoring {} failed; nothing was left running", image.display()))
        }
    })?;
    let huge = match r.pages.in_huge_pages {
        0 => String::new(),
        n => format!(", {} in huge pages", human(n)),
    };
    eprintln!(
        "telefork: restored process {} ({}, {} of memory{huge}) in {:.1} ms",
        r.pid,
        if r.same_pid {
            "same PID"
        } else {
            "new PID: the original is taken (by a live process, or a zombie not reaped within 3 s)"
        },
        human(r.pages.bytes),
        start.elapsed().as_secs_f64() * 1e3
    );
    if detach {
        println!("{}", r.pid);
        std::io::stdout().flush().ok();
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        match waitpid(r.pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(ExitCode::from(code as u8)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(ExitCode::from(128 + sig as u8)),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("waiting for the restored process"),
        }
    }
}

/// Who the image belongs to: the owner of the file (`open_image` made sure it is a regular
/// one), which no one else may write (whoever may write it could have made it). `None` with
/// `--trust-image`.
fn image_owner(image: &Path, f: &File, trust_image: bool) -> Result<Option<(u32, u32)>> {
    use std::os::unix::fs::MetadataExt;
    if trust_image {
        return Ok(None);
    }
    let m = f.metadata().with_context(|| format!("stat of image {}", image.display()))?;
    if m.mode() & 0o022 != 0 {
        anyhow::bail!(
            "image {} may be written by others than its owner (mode {:04o}): anyone of them could have made it; refusing (chmod go-w, or as root --trust-image)",
            image.display(),
            m.mode() & 0o7777
        );
    }
    Ok(Some((m.uid(), m.gid())))
}

/// `telefork bench`: the benchmark apparatus is a binary of its own (crates/bench), kept out of
/// this one; this process becomes it (exec, so signals and the exit status are its own), with
/// `telefork bench` as its program name for its usage line.
fn bench(args: &[std::ffi::OsString]) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let me = std::env::current_exe().context("locating the telefork binary")?;
    let bench =
        me.parent().context("locating the telefork binary's directory")?.join("telefork-bench");
    if !bench.is_file() {
        bail!(
            "{} is missing: `telefork bench` runs the telefork-bench binary next to telefork; build it with `cargo build --release --workspace --bins` (or `-p telefork-bench`)",
            bench.display()
        );
    }
    let e = std::process::Command::new(&bench).arg0("telefork bench").args(args).exec();
    Err(e).with_context(|| format!("running {}", bench.display()))
}

fn testbed(cmd: TestbedCmd) -> Result<ExitCode> {
    match cmd {
        TestbedCmd::Up { nodes, dir, image_transport } => {
            let opts = telefork_testbed::TestbedOptions {
                nodes,
                dir,
                telefork_bin: std::env::current_exe().context("locating the telefork binary")?,
                ..Default::default()
            };
            let mut tb = telefork_testbed::up(&opts)?;
            if image_transport == "plain" {
                for n in &tb.nodes {
                    telefork_testbed::reconfigure(&tb.dir, &n.name, |c| {
                        c.transport.image = telefork_node::config::ImageTransport::Plain
                    })?;
                }
                tb = telefork_testbed::load(&tb.dir)?;
            }
            print_testbed(&tb);
            Ok(ExitCode::SUCCESS)
        }
        TestbedCmd::Exec { node, user, dir, cmd } => {
            if let Some(u) = &user {
                telefork_testbed::ensure_test_user(u)?;
            }
            let st = telefork_testbed::exec(&dir, &node, user.as_deref(), &cmd)?;
            Ok(match (st.code(), std::os::unix::process::ExitStatusExt::signal(&st)) {
                (Some(c), _) => ExitCode::from(c as u8),
                (None, Some(s)) => ExitCode::from(128 + s as u8),
                _ => ExitCode::from(1),
            })
        }
        TestbedCmd::Down { dir } => telefork_testbed::down(&dir).map(|_| ExitCode::SUCCESS),
        TestbedCmd::Status { dir } => {
            print_testbed(&telefork_testbed::load(&dir)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_testbed(tb: &telefork_testbed::Testbed) {
    for n in &tb.nodes {
        println!("{:<8} {:<12} daemon pid {}", n.name, n.addr, n.daemon_pid);
    }
}

/// Reads the image front to back as restore does: one record in memory at a time.
fn check_image(image: &Path) -> Result<()> {
    let f = open_image(image)?;
    let checking = || format!("checking image {}", image.display());
    let (mut r, h) = telefork_image::ImageReader::new(BufReader::with_capacity(1 << 20, f))
        .with_context(checking)?;
    let p = r.process().with_context(checking)?;
    let mut page_bytes = 0u64;
    while let Some(run) = r.next_pages().with_context(checking)? {
        page_bytes += run.data.len() as u64;
    }
    println!(
        "image {}: format v{}, {:?}, kernel {}, made on {:?}",
        image.display(),
        r.version(),
        h.arch,
        h.kernel_release,
        h.hostname
    );
    println!(
        "process {} ({}), {} threads, {} mappings, {} fds, {} of memory",
        p.pid,
        p.comm,
        p.threads.len(),
        p.vmas.len(),
        p.fds.len(),
        human(page_bytes)
    );
    Ok(())
}

fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
