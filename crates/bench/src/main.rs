//! `telefork-bench` (run as `telefork bench`): telefork against the physical limits, every
//! number beside its baseline measured in the same run (issue 4). A benchmark, not a test: it
//! brings up its own 2-node testbed (prefix `tfb-`, 10.80.0.0/24, /run/telefork-bench), runs the
//! `benchprog` binary of this crate there as the non-root user `tfbench`, and for dump/restore
//! runs it on the host as root, with the `telefork` binary found next to this one (its daemons
//! are the testbed's nodes, its `dump`/`restore` the file rows). The testbed is always torn down
//! (also on error, and best effort on SIGINT/SIGTERM/SIGHUP). Any measurement that fails stops
//! the bench with a non-zero exit and the reason. `--congestion-control` sets the nodes'
//! net.ipv4.tcp_congestion_control (inside their network namespaces; the host's own setting is
//! untouched).
//!
//! The bench lives apart from the product binary: `telefork bench` executes this binary in its
//! place (same arguments), so the apparatus and its programs are built and shipped on their own.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

const PREFIX: &str = "tfb-";
const SUBNET: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 80, 0, 0);
const DIR: &str = "/run/telefork-bench";
const USER: &str = "tfbench";
/// The origin relay's socket (the hand-overs' floor), on node1.
const RELAY_SOCK: &str = "/run/telefork-bench/relay.sock";
const IMG_DIR: &str = "/tmp/telefork-bench-images";
const TCP_PORT: u16 = 7101;
const TLS_PORT: u16 = 7102;
const FRESH_PORT: u16 = 7103;
const FRESH_AHEAD_PORT: u16 = 7106;
const RELAY_PORT: u16 = 7104;
const MOVE_PORT: u16 = 7105;
/// The origin relay's socket of the floor with the state moved by hand, on node1.
const MOVE_SOCK: &str = "/run/telefork-bench/move.sock";

/// The options, as `telefork bench --help` shows them (`telefork bench` runs this binary with
/// its own name as the program name, so the usage line reads `telefork bench`).
#[derive(Parser)]
#[command(
    name = "telefork-bench",
    about = "Benchmark telefork against its baselines on a 2-node testbed of its own (needs root; the telefork and benchprog binaries next to this one: `cargo build --release --workspace --bins`)"
)]
struct BenchArgs {
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Runs per measurement, every size (medians are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Process sizes in MiB for throughput and dump/restore.
    #[arg(long, value_delimiter = ',', default_values_t = [256u64, 1024, 4096])]
    sizes_mib: Vec<u64>,
    /// Fast sanity check: sizes 64,256 and 3 runs.
    #[arg(long)]
    quick: bool,
    /// Also dump and restore processes of the same sizes (benchprog hold) with criu, side
    /// by side with telefork's (criu must be on PATH and pass `criu check`, else the bench
    /// stops at once; scripts/criu-from-debian.sh fetches Debian 13's criu, which passes it
    /// on Linux 6.18).
    #[arg(long)]
    against_criu: bool,
    /// The TCP congestion control of the testbed's nodes (e.g. reno): telefork's
    /// connections and the raw TCP baseline get it (the reno rows stay on reno); default:
    /// the one the host gives new network namespaces. Only the names in the host's
    /// net.ipv4.tcp_allowed_congestion_control can be set in a namespace. On our test VM,
    /// bbr's pacing held one connection to ~2 GB/s where reno carried ~6 (README).
    #[arg(long, value_name = "NAME")]
    congestion_control: Option<String>,
}

fn main() -> ExitCode {
    match run(BenchArgs::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("telefork: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A binary of the workspace next to this one (`telefork`, `benchprog`: cargo builds them
/// into one directory), or an error naming where it was looked for and how to build it.
fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating the telefork-bench binary")?;
    let path = me.parent().context("locating the telefork-bench binary's directory")?.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: the bench runs the {name} binary next to its own; build both with `cargo build --release --workspace --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// One line of the result: a measurement (median) beside its baseline (median).
struct Row {
    group: &'static str,
    name: String,
    unit: &'static str, // "ms", "GB/s" or "MiB"
    value: f64,
    baseline_name: String,
    baseline: f64,
    runs: usize,
    samples: Vec<f64>,
    baseline_samples: Vec<f64>,
    note: String,
}

impl Row {
    /// measurement / baseline (for GB/s: the share of the baseline reached).
    fn ratio(&self) -> f64 {
        self.value / self.baseline
    }
}

/// PIDs of processes this bench started and has not reaped (killed on SIGINT).
static CHILDREN: Mutex<Vec<i32>> = Mutex::new(Vec::new());

fn track(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).push(pid as i32);
}

fn untrack(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).retain(|&p| p != pid as i32);
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

fn run(mut a: BenchArgs) -> Result<ExitCode> {
    if a.quick {
        a.sizes_mib = vec![64, 256];
        a.runs = 3;
    }
    if a.runs == 0 || a.sizes_mib.is_empty() || a.sizes_mib.contains(&0) {
        bail!("bench needs --runs >= 1 and non-zero --sizes-mib");
    }
    if let Some(cc) = &a.congestion_control {
        // (TCP_CA_NAME_MAX is 16 with its NUL; whether the kernel has it shows on the nodes.)
        if cc.is_empty()
            || cc.len() > 15
            || !cc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            bail!("--congestion-control {cc:?}: a congestion control's name is 1-15 letters, digits or '_' (e.g. reno)");
        }
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("telefork bench needs root (it brings up a testbed and dumps processes)");
    }
    let telefork_bin = sibling("telefork")?;
    let prog = sibling("benchprog")?;
    let criu_version = if a.against_criu { Some(check_criu()?) } else { None };
    telefork_testbed::ensure_test_user(USER)?;
    let _lock = telefork_testbed::lock(PREFIX)?;
    install_signal_handler();

    // (Read once: the machine line and the JSON say the same.)
    let reporting_order = free_page_reporting_order();
    let mut machine = machine(reporting_order);
    progress(&format!("machine: {machine}"));
    // (The nodes' TCP congestion control, read once the testbed is up.)
    let mut nodes_cc = String::new();
    let mut rows = vec![];
    let testbed_result = (|| -> Result<()> {
        let tb = {
            progress(&format!(
                "bringing up a 2-node testbed (prefix {PREFIX}, {SUBNET}/24, {DIR})"
            ));
            let opts = telefork_testbed::TestbedOptions {
                nodes: 2,
                dir: PathBuf::from(DIR),
                telefork_bin: telefork_bin.clone(),
                prefix: PREFIX.into(),
                subnet: SUBNET,
                ..Default::default()
            };
            telefork_testbed::up(&opts)?
        };
        // A copy every user can run, visible from both nodes.
        let node_prog = Path::new(DIR).join("benchprog");
        std::fs::copy(&prog, &node_prog)
            .with_context(|| format!("copying benchprog to {}", node_prog.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&node_prog, std::fs::Permissions::from_mode(0o755))?;
        let daemon1 = tb.nodes[0].daemon_pid;
        if let Some(cc) = &a.congestion_control {
            set_congestion_control(cc)?;
        }
        nodes_cc = nodes_congestion_control()?;
        progress(&format!("the nodes' TCP congestion control: {nodes_cc}"));
        machine.push_str(&format!("; testbed TCP congestion control {nodes_cc}"));
        testbed_measurements(
            &a,
            &node_prog,
            daemon1,
            &tb.nodes[1].addr.to_string(),
            &nodes_cc,
            &mut rows,
        )
    })();
    progress("tearing the testbed down");
    let down = telefork_testbed::down_prefixed(Path::new(DIR), PREFIX);
    testbed_result?;
    down.context("tearing the testbed down")?;

    let ours = file_measurements(&a, &prog, &telefork_bin, &mut rows)?;
    // (criu comes last: should it fail, the table of what was measured is still printed,
    // then the failure, with a non-zero exit.)
    let criu = match &criu_version {
        Some(version) => criu_measurements(&a, &prog, version, &ours, &mut rows)
            .context("the comparison with criu failed (the rows above were measured)"),
        None => Ok(()),
    };

    if a.json {
        println!("{}", to_json(&a, &machine, &nodes_cc, reporting_order, &rows));
    } else {
        print_table(&a, &machine, &rows);
    }
    criu?;
    Ok(ExitCode::SUCCESS)
}

fn testbed_measurements(
    a: &BenchArgs,
    prog: &Path,
    daemon1: i32,
    node2: &str,
    nodes_cc: &str,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let p = prog.display().to_string();
    let runs = a.runs;

    // Latency of a small program: teleforks back to back (3 per round: remote, default,
    // background), with the CPU they cost both nodes together (this machine's, from
    // /proc/stat: the testbed's nodes share it).
    // (More rounds than elsewhere: they are short, and the CPU count has 10 ms ticks.)
    let latency_runs = (runs * 8).max(40);
    progress(&format!("latency: small program, {latency_runs} runs"));
    let (cpu_before, wall_before) = (busy_cpu_ms()?, std::time::Instant::now());
    let out = run_prog(
        "latency",
        node_cmd("node1", Some(USER), &[&p, "latency", &latency_runs.to_string(), "node2"])?,
        None,
    )?;
    let teleforks = (3 * latency_runs) as f64;
    let cpu_per_telefork = (busy_cpu_ms()? - cpu_before) / teleforks;
    let wall_per_telefork = wall_before.elapsed().as_secs_f64() * 1e3 / teleforks;
    let rss = out.one("rss_bytes")? / (1 << 20) as f64;
    rows.push(row_ms(
        "latency",
        format!("call → child's first instruction on node2 ({rss:.1} MiB resident)"),
        out.ms("first_instr_ns")?,
        "local fork+exit+waitpid",
        out.ms("fork_rt_ns")?,
        "",
    ));
    rows.push(row_ms(
        "latency",
        "round trip: telefork + exit(0) + wait".into(),
        out.ms("tf_rt_ns")?,
        "local fork+exit+waitpid",
        out.ms("fork_rt_ns")?,
        "",
    ));
    rows.push(row_ms(
        "",
        "CPU per telefork, both nodes (back to back)".into(),
        vec![cpu_per_telefork],
        "wall time per telefork",
        vec![wall_per_telefork],
        "one value for the whole run; ratio = cores busy on average",
    ));
    // The same with 30 ms between teleforks: what a single telefork sees on an idle machine
    // (the CPUs halt in between and are woken on the way).
    let idle_runs = latency_runs.min(20);
    progress(&format!("latency: small program, 30 ms apart, {idle_runs} runs"));
    let idle = run_prog(
        "latency (idle)",
        node_cmd("node1", Some(USER), &[&p, "latency", &idle_runs.to_string(), "node2", "30"])?,
        None,
    )?;
    rows.push(row_ms(
        "",
        "call → first instruction, teleforks 30 ms apart".into(),
        idle.ms("first_instr_ns")?,
        "local fork+exit+waitpid (idem)",
        idle.ms("fork_rt_ns")?,
        "",
    ));
    rows.push(row_ms(
        "",
        "round trip, teleforks 30 ms apart".into(),
        idle.ms("tf_rt_ns")?,
        "local fork+exit+waitpid (idem)",
        idle.ms("fork_rt_ns")?,
        "",
    ));
    // The hand-overs' floor: the same way there and back through a relay on each node (as
    // through the daemons), a fork+exit+waitpid there, and no state moved.
    // (Both floors: a program on node1 measuring through a relay on each node — `KIND-dest`
    // on node2, `KIND-origin` on node1 listening on `sock` — as through the daemons.)
    let through_relays = |kind: &str, port: u16, sock: &str| -> Result<ProgOut> {
        let (dest, origin) = (format!("{kind}-dest"), format!("{kind}-origin"));
        let out = with_sinks(
            vec![
                (dest.as_str(), node_cmd("node2", None, &[&p, &dest, &port.to_string()])?),
                (
                    origin.as_str(),
                    node_cmd("node1", None, &[&p, &origin, sock, &format!("{node2}:{port}")])?,
                ),
            ],
            || {
                run_prog(
                    &format!("{kind} latency"),
                    node_cmd(
                        "node1",
                        Some(USER),
                        &[&p, &format!("{kind}-latency"), &latency_runs.to_string(), sock],
                    )?,
                    None,
                )
            },
        );
        let _ = std::fs::remove_file(sock);
        out
    };
    progress(&format!(
        "latency: hand-overs only (relays, no capture or restore), {latency_runs} runs"
    ));
    let relay = through_relays("relay", RELAY_PORT, RELAY_SOCK)?;
    rows.push(row_ms(
        "",
        "hand-overs only: relay → node2, fork+exit+waitpid there, status home".into(),
        relay.ms("relay_rt_ns")?,
        "local fork+exit+waitpid",
        relay.ms("fork_rt_ns")?,
        "the hops of a design with a daemon on each side and nothing else: no state moved, plain TCP",
    ));
    rows.push(row_ms(
        "",
        "round trip (the same), against the hand-overs alone".into(),
        out.ms("tf_rt_ns")?,
        "hand-overs only (row above)",
        relay.ms("relay_rt_ns")?,
        "what capturing, moving and restoring the process adds to the hand-overs",
    ));
    // The same with the process's state moved by hand (benchprog/by_hand.rs): the least a
    // design like telefork's (a daemon on each node reading the stopped fork from /proc) must
    // do to move it, and nothing else.
    progress(&format!("latency: state moved by hand (relays: smaps, written pages, a new process filled), {latency_runs} runs"));
    let by_hand = through_relays("move", MOVE_PORT, MOVE_SOCK)?;
    rows.push(row_ms(
        "",
        "state moved by hand: mappings, written pages → a new process on node2".into(),
        by_hand.ms("move_rt_ns")?,
        "local fork+exit+waitpid",
        by_hand.ms("fork_rt_ns")?,
        "the floor of moving it as telefork does (a daemon reading the stopped fork from /proc): the hand-overs, smaps, PAGEMAP_SCAN, its pages; no ptrace, registers, fds, signals, TLS or checks",
    ));
    rows.push(row_ms(
        "",
        "round trip (the same), against the state moved by hand".into(),
        out.ms("tf_rt_ns")?,
        "state moved by hand (row above)",
        by_hand.ms("move_rt_ns")?,
        "what the engine, TLS and the daemons' checks add to that floor",
    ));
    rows.push(row_ms(
        "parent pause",
        format!("small ({rss:.1} MiB): telefork() returns in the parent"),
        out.ms("tf_pause_ns")?,
        "local fork() returns",
        out.ms("fork_pause_ns")?,
        "default: returns once the child runs there",
    ));
    rows.push(row_ms(
        "",
        format!("small ({rss:.1} MiB): telefork(background) returns"),
        out.ms("tf_bg_pause_ns")?,
        "local fork() returns",
        out.ms("fork_pause_ns")?,
        "Options::background",
    ));
    // The background pause's floor: what the program must do before a background telefork
    // returns (fork, a pidfd of the child, the request with its stdout/stderr to a waiting
    // peer), and nothing else.
    progress(&format!("parent pause: the background pause's floor (fork, pidfd, one request to a waiting peer), {latency_runs} runs"));
    let notify = run_prog(
        "notify latency",
        node_cmd("node1", Some(USER), &[&p, "notify-latency", &latency_runs.to_string()])?,
        None,
    )?;
    rows.push(row_ms(
        "",
        "floor: fork + pidfd_open + the request (stdout/stderr) to a waiting peer".into(),
        notify.ms("notify_pause_ns")?,
        "local fork() returns",
        notify.ms("fork_pause_ns")?,
        "what a background telefork must do before it returns, and nothing else (benchprog notify-latency)",
    ));
    rows.push(row_ms(
        "",
        format!("small ({rss:.1} MiB): telefork(background), against that floor"),
        out.ms("tf_bg_pause_ns")?,
        "the floor (row above)",
        notify.ms("notify_pause_ns")?,
        "what the library adds to it",
    ));

    // Sparse.
    progress(&format!("sparse: 10 MiB plain, {runs} runs"));
    let plain = run_prog(
        "sparse baseline",
        node_cmd("node1", Some(USER), &[&p, "tfork", "10", "0", &runs.to_string(), "node2", "1"])?,
        None,
    )?;
    progress(&format!("sparse: 64 GiB reserved, 10 MiB touched, {runs} runs"));
    let sparse = run_prog(
        "sparse",
        node_cmd("node1", Some(USER), &[&p, "tfork", "10", "64", &runs.to_string(), "node2", "1"])?,
        None,
    )?;
    rows.push(row_ms(
        "sparse",
        "64 GiB reserved, 10 MiB touched: telefork round trip".into(),
        sparse.ms("tf_rt_ns")?,
        "10 MiB process telefork round trip",
        plain.ms("tf_rt_ns")?,
        "",
    ));

    // Throughput baselines: sinks on node2 (root: the TLS sink reads node2's key).
    let pki = Path::new(DIR).join("pki").display().to_string();
    // A benchprog `tfork` run (verifying the memory once, up to 1 GiB) and a raw TCP run.
    let tfork = |what: &str, mib: u64, runs: usize| {
        let verify = if mib <= 1024 { "1" } else { "0" };
        run_prog(
            what,
            node_cmd(
                "node1",
                Some(USER),
                &[&p, "tfork", &mib.to_string(), "0", &runs.to_string(), "node2", verify],
            )?,
            None,
        )
    };
    // Raw TCP with the nodes' congestion control (what telefork's connections use), or with
    // reno: the link without pacing (see UNPACED_NOTE).
    let raw_tcp = |mib: u64, runs: usize, sender_cc: Option<&str>| {
        let what = format!("raw TCP{}", sender_cc.map(|c| format!(" ({c})")).unwrap_or_default());
        progress(&format!("throughput {mib} MiB: {what}, {runs} runs"));
        let mut argv = vec![
            p.clone(),
            "tcp-send".into(),
            format!("{node2}:{TCP_PORT}"),
            (mib << 20).to_string(),
            runs.to_string(),
        ];
        argv.extend(sender_cc.map(String::from));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        run_prog(&what, node_cmd("node1", None, &argv)?, None)
    };
    // The simplest whole data path: a process's memory over plain TCP into fresh memory there
    // (each page faulted in by the copy, or populated ahead by a second thread).
    let plain_receiver = |mib: u64, runs: usize, ahead: bool| -> Result<Vec<f64>> {
        let (port, how) =
            if ahead { (FRESH_AHEAD_PORT, "populated ahead") } else { (FRESH_PORT, "faulted in") };
        progress(&format!("throughput {mib} MiB: process memory over TCP into fresh memory on node2 ({how}), {runs} runs"));
        let out = run_prog(
            "memory into fresh memory",
            node_cmd(
                "node1",
                None,
                &[&p, "mem-send", &format!("{node2}:{port}"), &mib.to_string(), &runs.to_string()],
            )?,
            None,
        )?;
        Ok(gbps(mib << 20, out.all("mem_ns")?))
    };
    let sinks = vec![
        ("tcp-sink", node_cmd("node2", None, &[&p, "tcp-sink", &TCP_PORT.to_string()])?),
        ("tls-sink", node_cmd("node2", None, &[&p, "tls-sink", &TLS_PORT.to_string(), &pki])?),
        ("fresh-sink", node_cmd("node2", None, &[&p, "fresh-sink", &FRESH_PORT.to_string()])?),
        (
            "fresh-sink ahead",
            node_cmd("node2", None, &[&p, "fresh-sink", &FRESH_AHEAD_PORT.to_string(), "ahead"])?,
        ),
    ];
    // (Per size, in the order of the sizes: measured with the TLS rows, shown again beside the
    // plain ones.)
    let mut receivers: Vec<Receivers> = vec![];
    with_sinks(sinks, || {
        for &mib in &a.sizes_mib {
            let bytes = mib << 20;
            progress(&format!("throughput {mib} MiB: telefork, {runs} runs"));
            let tf = tfork(&format!("telefork {mib} MiB"), mib, runs)?;
            // Origin memory in a run of its own: sampling reads /proc/PID/smaps_rollup, which
            // walks the page tables of gigabytes and would slow the timed runs.
            progress(&format!("origin memory {mib} MiB: one more telefork, sampling every 5 ms"));
            let pid = Arc::new(AtomicI32::new(0));
            let sampler = Sampler::start(daemon1, pid.clone());
            let sampled = run_prog(
                &format!("telefork {mib} MiB (sampled)"),
                node_cmd(
                    "node1",
                    Some(USER),
                    &[&p, "tfork", &mib.to_string(), "0", "1", "node2", "0"],
                )?,
                Some(&pid),
            );
            let mem = sampler.stop();
            sampled?;
            let tcp = raw_tcp(mib, runs, None)?;
            // (Not when the nodes are on reno already: the row above is that.)
            let unpaced = match nodes_cc {
                "reno" => None,
                _ => Some(gbps(bytes, raw_tcp(mib, runs, Some("reno"))?.all("tcp_ns")?)),
            };
            progress(&format!("throughput {mib} MiB: raw TLS, {runs} runs"));
            let tls = run_prog(
                "raw TLS",
                node_cmd(
                    "node1",
                    None,
                    &[
                        &p,
                        "tls-send",
                        &format!("{node2}:{TLS_PORT}"),
                        &bytes.to_string(),
                        &runs.to_string(),
                        &pki,
                    ],
                )?,
                None,
            )?;
            let (tf_run, rt_note) = telefork_gbps(bytes, &tf)?;
            progress(&format!("throughput {mib} MiB: fresh memory on node2, {runs} runs"));
            let pop = run_prog(
                "populate",
                node_cmd("node2", None, &[&p, "populate", &mib.to_string(), &runs.to_string()])?,
                None,
            )?;
            let tls_s = gbps(bytes, tls.all("tls_ns")?);
            let tcp_s = gbps(bytes, tcp.all("tcp_ns")?);
            let pop_s = gbps(bytes, pop.all("populate_ns")?);
            let name = format!("{mib} MiB telefork until it runs on node2 (TLS)");
            rows.push(throughput_row(
                name.clone(),
                tf_run.clone(),
                "raw TLS (same TLS channel)",
                tls_s,
                runs,
                &rt_note,
            ));
            rows.push(throughput_row(
                name.clone(),
                tf_run.clone(),
                "raw TCP plaintext",
                tcp_s,
                runs,
                &rt_note,
            ));
            if let Some(unpaced) = &unpaced {
                rows.push(throughput_row(
                    name.clone(),
                    tf_run.clone(),
                    UNPACED_NAME,
                    unpaced.clone(),
                    runs,
                    UNPACED_NOTE,
                ));
            }
            rows.push(throughput_row(name.clone(), tf_run.clone(), "fresh memory populated on node2", pop_s, runs, "the destination must at least place the memory (with as much again resident, as the parent's is)"));
            let receiver = plain_receiver(mib, runs, false)?;
            let ahead = plain_receiver(mib, runs, true)?;
            rows.push(throughput_row(
                name.clone(),
                tf_run.clone(),
                FLOOR_NAME,
                receiver.clone(),
                runs,
                FLOOR_NOTE,
            ));
            rows.push(throughput_row(name, tf_run, AHEAD_NAME, ahead.clone(), runs, AHEAD_NOTE));
            receivers.push(Receivers { receiver, ahead, unpaced });
            rows.push(row_ms(
                "parent pause",
                format!("{mib} MiB: telefork() returns in the parent"),
                tf.ms("tf_pause_ns")?,
                "local fork() returns",
                tf.ms("fork_pause_ns")?,
                "",
            ));
            rows.push(row_ms(
                "",
                format!("{mib} MiB: telefork(background) returns"),
                tf.ms("tf_bg_pause_ns")?,
                "local fork() returns",
                tf.ms("fork_pause_ns")?,
                "Options::background",
            ));
            let size = tf.one("rss_bytes")? / (1 << 20) as f64;
            if mem.samples < 3 {
                bail!(
                    "origin memory: only {} samples were taken during the {mib} MiB teleforks",
                    mem.samples
                );
            }
            rows.push(Row {
                group: "origin memory",
                name: format!("{mib} MiB: extra memory on node1 (sessions + copies)"),
                unit: "MiB",
                value: mem.extra_peak_kb as f64 / 1024.0,
                baseline_name: "the process (parent VmRSS)".into(),
                baseline: size,
                runs,
                samples: vec![],
                baseline_samples: vec![],
                note: format!(
                    "sessions' RSS peak {:.1} MiB, frozen fork's private memory peak {:.1} MiB (its RSS {:.0} MiB is shared copy-on-write with the parent, peak {:.0} MiB), node1 daemon {:.1} MiB; {} samples",
                    mem.sessions_peak_kb as f64 / 1024.0,
                    mem.frozen_private_peak_kb as f64 / 1024.0,
                    mem.frozen_peak_kb as f64 / 1024.0,
                    mem.parent_peak_kb as f64 / 1024.0,
                    mem.daemon_kb as f64 / 1024.0,
                    mem.samples
                ),
            });
        }
        // The same teleforks with the plain image transport (memory unencrypted, sent by the
        // frozen process itself), beside raw TCP.
        for n in ["node1", "node2"] {
            telefork_testbed::reconfigure(Path::new(DIR), n, |c| {
                c.transport.image = telefork_node::config::ImageTransport::Plain
            })?;
        }
        let plain_res = (|| -> Result<()> {
            for (&mib, Receivers { receiver, ahead, unpaced }) in a.sizes_mib.iter().zip(&receivers)
            {
                let bytes = mib << 20;
                progress(&format!(
                    "throughput {mib} MiB: telefork with plain image transport, {runs} runs"
                ));
                let tf = tfork(&format!("plain telefork {mib} MiB"), mib, runs)?;
                let tcp = raw_tcp(mib, runs, None)?;
                let (tf_run, rt_note) = telefork_gbps(bytes, &tf)?;
                let tcp_s = gbps(bytes, tcp.all("tcp_ns")?);
                let name = format!("{mib} MiB telefork until it runs on node2 (plain)");
                rows.push(throughput_row(
                    name.clone(),
                    tf_run.clone(),
                    "raw TCP plaintext",
                    tcp_s,
                    runs,
                    &rt_note,
                ));
                if let Some(unpaced) = unpaced {
                    rows.push(throughput_row(
                        name.clone(),
                        tf_run.clone(),
                        UNPACED_NAME,
                        unpaced.clone(),
                        runs,
                        &format!("{UNPACED_NOTE}{MEASURED_WITH_TLS}"),
                    ));
                }
                // (The same receivers as with TLS: they do not depend on the image transport.)
                rows.push(throughput_row(
                    name.clone(),
                    tf_run.clone(),
                    FLOOR_NAME,
                    receiver.clone(),
                    runs,
                    &format!("{FLOOR_NOTE}{MEASURED_WITH_TLS}"),
                ));
                rows.push(throughput_row(
                    name,
                    tf_run,
                    AHEAD_NAME,
                    ahead.clone(),
                    runs,
                    &format!("{AHEAD_NOTE}{MEASURED_WITH_TLS}"),
                ));
            }
            Ok(())
        })();
        for n in ["node1", "node2"] {
            telefork_testbed::reconfigure(Path::new(DIR), n, |c| {
                c.transport.image = telefork_node::config::ImageTransport::Tls
            })?;
        }
        plain_res
    })
}

const UNPACED_NAME: &str = "raw TCP plaintext, reno";
const UNPACED_NOTE: &str = "the sender on reno (TCP_CONGESTION), which does not pace: the link itself, without the pacing of the nodes' congestion control when that is bbr (telefork's connections and the row above use the nodes' default)";
const FLOOR_NAME: &str = "plain receiver into fresh memory";
const FLOOR_NOTE: &str = "a process's written memory over plain TCP, read straight into fresh pages on node2 (each faulted in by the copy)";
const AHEAD_NAME: &str = "plain receiver, memory populated ahead";
const AHEAD_NOTE: &str = "the same receiver while a second thread populates its fresh memory ahead of it (MADV_POPULATE_WRITE): one copy off the wire, into pages already placed";
/// The baselines of one size that do not depend on the image transport, in GB/s per run:
/// measured once, with the TLS rows, and shown again beside the plain ones.
struct Receivers {
    /// The plain receiver into fresh memory, faulting it in as it copies.
    receiver: Vec<f64>,
    /// The same with the memory populated ahead by a second thread.
    ahead: Vec<f64>,
    /// Raw TCP with the sender on reno (`None` when the nodes are on reno already).
    unpaced: Option<Vec<f64>>,
}

/// (The plain-transport rows show the receivers measured with the TLS rows.)
const MEASURED_WITH_TLS: &str = "; measured once per size, with the TLS rows";

/// Runs `f` while the helper programs `helpers` (each waited for until it prints READY) run,
/// and ends them afterwards, also when `f` or a later helper's start fails.
fn with_sinks<T>(helpers: Vec<(&str, Command)>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let mut started = vec![];
    let res = (|| {
        for (what, c) in helpers {
            started.push(start_sink(what, c)?);
        }
        f()
    })();
    for mut s in started {
        let _ = s.kill();
        let _ = s.wait();
        untrack(s.id());
    }
    res
}

/// dump / restore through a file on the host, beside reading the image once (cache warm).
fn file_measurements(
    a: &BenchArgs,
    prog: &Path,
    telefork_bin: &Path,
    rows: &mut Vec<Row>,
) -> Result<Vec<FileTimes>> {
    std::fs::create_dir_all(IMG_DIR).with_context(|| format!("creating {IMG_DIR}"))?;
    let mut ours = vec![];
    let runs = a.runs;
    let res = (|| -> Result<()> {
        for &mib in &a.sizes_mib {
            let img = Path::new(IMG_DIR).join(format!("{mib}.img"));
            let go = Path::new(IMG_DIR).join(format!("{mib}.go"));
            let (mut dump_ms, mut read_ms, mut restore_ms) = (vec![], vec![], vec![]);
            for k in 1..=runs {
                progress(&format!("dump/restore {mib} MiB: run {k}/{runs}"));
                let _ = std::fs::remove_file(&go);
                let _ = std::fs::remove_file(&img);
                // The process to dump.
                // (stdout/stderr to a file: the engine does not capture pipes other than a
                // relayed stdio yet.)
                let log = Path::new(IMG_DIR).join(format!("{mib}.out"));
                let mut child = spawn_hold(
                    prog,
                    mib,
                    &go,
                    &log,
                    &Path::new(IMG_DIR).join(format!("{mib}.err")),
                    false,
                )?;
                let t0 = Instant::now();
                let st = Command::new(telefork_bin)
                    .args([
                        "dump",
                        "--pid",
                        &child.id().to_string(),
                        "--out",
                        &img.display().to_string(),
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .output()
                    .context("running telefork dump")?;
                let dt = t0.elapsed();
                let _ = child.kill();
                let _ = child.wait();
                untrack(child.id());
                if !st.status.success() {
                    bail!(
                        "telefork dump of {mib} MiB failed: {}",
                        String::from_utf8_lossy(&st.stderr).trim()
                    );
                }
                dump_ms.push(dt.as_secs_f64() * 1e3);
                // Baseline: read the image once, page cache warm.
                read_file(&img)?;
                let t0 = Instant::now();
                let n = read_file(&img)?;
                read_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                if n < mib << 20 {
                    bail!("image of {mib} MiB is only {n} bytes");
                }
                // Restore: until the restored process runs (the CLI reports it), then let it
                // verify its memory and exit.
                let t0 = Instant::now();
                let mut r = Command::new(telefork_bin)
                    .args(["restore", &img.display().to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("running telefork restore")?;
                track(r.id());
                let mut err = BufReader::new(r.stderr.take().context("no stderr")?);
                let mut seen = String::new();
                let mut line = String::new();
                let mut restored = false;
                while err.read_line(&mut line).unwrap_or(0) > 0 {
                    seen.push_str(&line);
                    if line.contains("restored process") {
                        restored = true;
                        break;
                    }
                    line.clear();
                }
                let dt = t0.elapsed();
                std::fs::write(&go, b"go")?;
                let mut rest = String::new();
                let _ = err.read_to_string(&mut rest);
                let st = r.wait()?;
                untrack(r.id());
                if !restored
                    || !st.success()
                    || !std::fs::read_to_string(&log).unwrap_or_default().contains("OK")
                {
                    bail!(
                        "telefork restore of {mib} MiB failed ({st}; the restored process verifies its memory): {}{} {}",
                        seen.trim(),
                        rest.trim(),
                        std::fs::read_to_string(Path::new(IMG_DIR).join(format!("{mib}.err"))).unwrap_or_default().trim()
                    );
                }
                restore_ms.push(dt.as_secs_f64() * 1e3);
            }
            let _ = std::fs::remove_file(&img);
            let _ = std::fs::remove_file(&go);
            rows.push(row_ms(
                "dump/restore",
                format!("{mib} MiB dump to file (incl. fsync)"),
                dump_ms.clone(),
                "read the image once (cache warm)",
                read_ms.clone(),
                "",
            ));
            rows.push(row_ms(
                "dump/restore",
                format!("{mib} MiB restore from file (until it runs)"),
                restore_ms.clone(),
                "read the image once (cache warm)",
                read_ms,
                "",
            ));
            ours.push(FileTimes { mib, dump_ms, restore_ms });
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(IMG_DIR);
    res.map(|()| ours)
}

/// telefork's dump and restore times of one size (ms), for the side-by-side with criu.
struct FileTimes {
    mib: u64,
    dump_ms: Vec<f64>,
    restore_ms: Vec<f64>,
}

/// `criu check` must pass before a bench that was asked to compare with criu starts; its
/// version.
fn check_criu() -> Result<String> {
    let out = Command::new("criu").arg("check").output().context("--against-criu: running `criu check` (is criu on PATH? scripts/criu-from-debian.sh fetches one)")?;
    if !out.status.success() {
        bail!("--against-criu: `criu check` fails ({}): {}", out.status, tail(&out.stderr));
    }
    let v = Command::new("criu").arg("--version").output().context("running `criu --version`")?;
    let v = String::from_utf8_lossy(&v.stdout);
    Ok(v.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(str::trim)
        .unwrap_or("version unknown")
        .to_string())
}

fn criu_measurements(
    a: &BenchArgs,
    prog: &Path,
    version: &str,
    ours: &[FileTimes],
    rows: &mut Vec<Row>,
) -> Result<()> {
    // The process criu restores is detached from criu (`restore -d`): as the subreaper of
    // our descendants we get it back, to reap it once it has verified its memory.
    // SAFETY: a prctl on this process with plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        bail!("PR_SET_CHILD_SUBREAPER: {}", std::io::Error::last_os_error());
    }
    let dir = Path::new(IMG_DIR).join("criu");
    let runs = a.runs;
    let res = (|| -> Result<()> {
        for t in ours {
            let mib = t.mib;
            let (mut d, mut r) = (vec![], vec![]);
            for k in 1..=runs {
                progress(&format!("criu dump/restore {mib} MiB: run {k}/{runs}"));
                let (dump_ms, restore_ms) = criu_once(prog, mib, &dir)?;
                d.push(dump_ms);
                r.push(restore_ms);
            }
            rows.push(row_ms("vs criu", format!("{mib} MiB dump to file: telefork"), t.dump_ms.clone(), &format!("criu {version} dump + fsync"), d, "a benchprog hold process of the same size, same file system; both fsync their image files"));
            rows.push(row_ms(
                "",
                format!("{mib} MiB restore from file until it runs: telefork"),
                t.restore_ms.clone(),
                &format!("criu {version} restore -d"),
                r,
                "the restored process then verifies its memory (both)",
            ));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) };
    res
}

/// Every file in `dir` and the directory itself to disk (as telefork's dump fsyncs its image).
fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::File::open(e.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

/// A process of the criu measurement, killed and reaped however the measurement ends.
struct Reaped(i32);

impl Drop for Reaped {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0);
        // (Ours — our child, or restored below us as the subreaper — so the PID is still
        // its own until reaped here.)
        if matches!(
            nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)),
            Ok(nix::sys::wait::WaitStatus::StillAlive)
        ) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
        untrack(self.0 as u32);
    }
}

/// One criu dump and restore of a `benchprog hold` process with `mib` MiB written: (dump
/// incl. fsync, restore until criu returns with the process running) in ms. The restored
/// process must verify its memory.
fn criu_once(prog: &Path, mib: u64, dir: &Path) -> Result<(f64, f64)> {
    let _ = std::fs::remove_dir_all(dir);
    let imgs = dir.join("img");
    std::fs::create_dir_all(&imgs).with_context(|| format!("creating {}", imgs.display()))?;
    let (go, log) = (dir.join("go"), dir.join("hold.out"));
    // (A session of its own: criu dumps a whole session, not a process of ours.)
    let child = spawn_hold(prog, mib, &go, &log, &dir.join("hold.err"), true)?;
    let pid = child.id() as i32;
    let held = Reaped(pid);
    let t0 = Instant::now();
    let dumped = Command::new("criu")
        .args(["dump", "-t", &pid.to_string(), "-D"])
        .arg(&imgs)
        .output()
        .context("running criu dump")?;
    let synced = fsync_dir(&imgs);
    let dump_ms = t0.elapsed().as_secs_f64() * 1e3;
    // (criu ended the process it dumped; if it failed, the process is ended here.)
    drop(held);
    if !dumped.status.success() {
        bail!("criu dump of {mib} MiB failed: {}", tail(&dumped.stderr));
    }
    synced.context("fsync of criu's images")?;
    let t0 = Instant::now();
    let restored = Command::new("criu")
        .args(["restore", "-d", "-D"])
        .arg(&imgs)
        .output()
        .context("running criu restore")?;
    let restore_ms = t0.elapsed().as_secs_f64() * 1e3;
    if !restored.status.success() {
        bail!("criu restore of {mib} MiB failed: {}", tail(&restored.stderr));
    }
    // The restored process: the same PID, our child now (we are the subreaper).
    track(pid as u32);
    let restored_process = Reaped(pid);
    std::fs::write(&go, b"go")?;
    let t = Instant::now();
    let status = loop {
        match nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        ) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {}
            Ok(st) => break st,
            Err(e) => {
                return Err(e).context(format!("waiting for process {pid}, which criu restored"))
            }
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the process criu restored did not end within 120 s of being told to verify its memory");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    drop(restored_process); // (reaped: only untracked)
    let verified = std::fs::read_to_string(&log).unwrap_or_default().lines().any(|l| l == "OK");
    if !verified || !matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)) {
        bail!("the process criu restored did not verify its memory ({status:?})");
    }
    Ok((dump_ms, restore_ms))
}

/// Starts `benchprog hold` with `mib` MiB written (stdio only; stdout to `log`, stderr to
/// `err`; in a session of its own with `own_session`), tracked, and waits for its READY.
/// Killed (and reaped) if it does not get ready.
fn spawn_hold(
    prog: &Path,
    mib: u64,
    go: &Path,
    log: &Path,
    err: &Path,
    own_session: bool,
) -> Result<Child> {
    let mut hold = Command::new(prog);
    hold.args(["hold", &mib.to_string(), &go.display().to_string()])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?)
        .stderr(std::fs::File::create(err).with_context(|| format!("creating {}", err.display()))?);
    stdio_only(&mut hold);
    if own_session {
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            hold.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = hold.spawn().context("starting benchprog hold")?;
    track(child.id());
    if let Err(e) = wait_file_line(log, "READY", &mut child) {
        let _ = child.kill();
        let _ = child.wait();
        untrack(child.id());
        return Err(e);
    }
    Ok(child)
}

/// The last lines of a program's stderr, for an error message.
fn tail(stderr: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr);
    let last: Vec<&str> = s.lines().rev().take(4).collect();
    last.into_iter().rev().collect::<Vec<_>>().join(" / ")
}

/// The program starts with stdio only: fds leaked by whatever started the bench (a shell, a
/// job runner) would otherwise be part of the process to dump.
fn stdio_only(c: &mut Command) {
    // SAFETY: close_range is async-signal-safe; CLOEXEC keeps std's exec-error pipe working.
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
}

fn read_file(p: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut buf = vec![0u8; 8 << 20];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf)? {
            0 => return Ok(n),
            k => n += k as u64,
        }
    }
}

/// Makes `cc` the TCP congestion control of both nodes' new connections (their namespaces'
/// net.ipv4.tcp_congestion_control; the host's own setting is left alone).
fn set_congestion_control(cc: &str) -> Result<()> {
    for node in ["node1", "node2"] {
        let mut c = node_cmd(node, None, &["tee", CC_SYSCTL])?;
        c.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child =
            c.spawn().with_context(|| format!("setting {node}'s TCP congestion control"))?;
        let written = child
            .stdin
            .take()
            .map(|mut stdin| std::io::Write::write_all(&mut stdin, cc.as_bytes()));
        let out = child
            .wait_with_output()
            .with_context(|| format!("setting {node}'s TCP congestion control"))?;
        if let Some(Err(e)) = written {
            bail!("setting {node}'s TCP congestion control to {cc}: writing to tee: {e}");
        }
        if !out.status.success() {
            let allowed =
                std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
                    .unwrap_or_default();
            bail!(
                "setting {node}'s TCP congestion control to {cc:?} failed ({}); a network namespace may take only these (net.ipv4.tcp_allowed_congestion_control): {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                allowed.trim()
            );
        }
    }
    let now = nodes_congestion_control()?;
    if now != cc {
        bail!("asked for TCP congestion control {cc:?} on the nodes, but they report {now:?}");
    }
    Ok(())
}

/// Where a node's default TCP congestion control is (read in its network namespace).
const CC_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_congestion_control";

/// The TCP congestion control new connections get on the nodes (a namespace inherits the
/// host's default): every telefork and raw TCP row uses it, but for the reno rows. An error
/// if the two nodes differ.
fn nodes_congestion_control() -> Result<String> {
    let mut seen = vec![];
    for node in ["node1", "node2"] {
        let out = node_cmd(node, None, &["cat", CC_SYSCTL])?
            .output()
            .with_context(|| format!("reading {node}'s {CC_SYSCTL}"))?;
        if !out.status.success() {
            bail!("reading {node}'s {CC_SYSCTL}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        seen.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    if seen[0] != seen[1] {
        bail!(
            "the nodes' TCP congestion controls differ: node1 {:?}, node2 {:?}",
            seen[0],
            seen[1]
        );
    }
    Ok(seen.swap_remove(0))
}

fn node_cmd(node: &str, user: Option<&str>, argv: &[&str]) -> Result<Command> {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    telefork_testbed::command(Path::new(DIR), node, user, &argv)
}

fn start_sink(what: &str, mut c: Command) -> Result<Child> {
    c.stdout(Stdio::piped()).stdin(Stdio::null());
    let mut child = c.spawn().with_context(|| format!("starting {what}"))?;
    track(child.id());
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    if let Err(e) = wait_line(&mut lines, "READY", what) {
        let _ = child.kill();
        let _ = child.wait();
        untrack(child.id());
        return Err(e);
    }
    Ok(child)
}

/// Waits until the file `log` (a child's stdout) holds the line `want`.
fn wait_file_line(log: &Path, want: &str, child: &mut Child) -> Result<()> {
    let t = Instant::now();
    loop {
        if std::fs::read_to_string(log).unwrap_or_default().lines().any(|l| l == want) {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            bail!("benchprog hold ended ({st}) before printing {want}");
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("benchprog hold did not print {want} within 300 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn wait_line(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    want: &str,
    what: &str,
) -> Result<()> {
    for l in lines {
        if l? == want {
            return Ok(());
        }
    }
    bail!("{what} ended before printing {want}")
}

/// What one benchprog run printed: `R KEY VALUE` lines.
struct ProgOut {
    what: String,
    cache: std::collections::HashMap<String, Vec<f64>>,
}

impl ProgOut {
    fn all(&self, key: &str) -> Result<&[f64]> {
        self.cache
            .get(key)
            .map(Vec::as_slice)
            .filter(|v| !v.is_empty())
            .with_context(|| format!("{}: benchprog reported no {key}", self.what))
    }
    fn one(&self, key: &str) -> Result<f64> {
        Ok(self.all(key)?[0])
    }
    /// All samples of a nanosecond key, in ms.
    fn ms(&self, key: &str) -> Result<Vec<f64>> {
        Ok(self.all(key)?.iter().map(|n| n / 1e6).collect())
    }
}

/// Runs a benchprog command to its end; its `PID` goes to `pid_out` (for the sampler). Fails
/// on a non-zero exit. Progress (`run k/n`) follows the first key printed per run.
fn run_prog(what: &str, mut c: Command, pid_out: Option<&Arc<AtomicI32>>) -> Result<ProgOut> {
    c.stdout(Stdio::piped()).stdin(Stdio::null());
    let mut child = c.spawn().with_context(|| format!("starting {what}"))?;
    track(child.id());
    let mut vals = vec![];
    let mut first_key: Option<String> = None;
    let mut k = 0;
    for line in BufReader::new(child.stdout.take().context("no stdout")?).lines() {
        let line = line.unwrap_or_default();
        let mut it = line.split_whitespace();
        match (it.next(), it.next(), it.next()) {
            (Some("PID"), Some(p), None) => {
                if let (Some(o), Ok(p)) = (pid_out, p.parse()) {
                    o.store(p, Ordering::SeqCst);
                }
            }
            (Some("R"), Some(key), Some(v)) => {
                let v: f64 = v.parse().with_context(|| format!("{what}: bad value in {line:?}"))?;
                if key != "rss_bytes" && key != "verified" {
                    if first_key.is_none() {
                        first_key = Some(key.to_string());
                    }
                    if first_key.as_deref() == Some(key) {
                        k += 1;
                        progress(&format!("  {what}: run {k} done"));
                    }
                }
                vals.push((key.to_string(), v));
            }
            _ => {}
        }
    }
    let st = child.wait()?;
    untrack(child.id());
    if !st.success() {
        bail!("{what} failed ({st}); its error is above");
    }
    let mut cache: std::collections::HashMap<String, Vec<f64>> = Default::default();
    for (k, v) in &vals {
        cache.entry(k.clone()).or_default().push(*v);
    }
    Ok(ProgOut { what: what.into(), cache })
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Milliseconds this machine's CPUs have been busy (not idle, not waiting for I/O) since boot.
fn busy_cpu_ms() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().find(|l| l.starts_with("cpu ")).context("no cpu line in /proc/stat")?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    if ticks.len() < 8 {
        bail!("unexpected cpu line in /proc/stat: {line}");
    }
    // user nice system idle iowait irq softirq steal: ours are user, nice, system, irq,
    // softirq (not idle, iowait, nor steal — the hypervisor running someone else).
    let busy: u64 = [0, 1, 2, 5, 6].iter().map(|&i| ticks[i]).sum();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(busy as f64 * 1e3 / hz)
}

/// A row of times in ms (medians of `samples` against `bsamples`).
fn row_ms(
    group: &'static str,
    name: String,
    samples: Vec<f64>,
    bname: &str,
    bsamples: Vec<f64>,
    note: &str,
) -> Row {
    Row {
        group,
        name,
        unit: "ms",
        value: median(&samples),
        baseline_name: bname.into(),
        baseline: median(&bsamples),
        runs: samples.len(),
        samples,
        baseline_samples: bsamples,
        note: note.into(),
    }
}

/// GB/s per run of moving `bytes`, from nanoseconds per run.
fn gbps(bytes: u64, ns: &[f64]) -> Vec<f64> {
    ns.iter().map(|&n| bytes as f64 / n).collect()
}

/// Telefork's GB/s per run, timed until the child runs on node2 (what the raw transfers
/// time: until the receiver has every byte), and the note with the round trip (the child's
/// exit and wait included).
fn telefork_gbps(bytes: u64, tf: &ProgOut) -> Result<(Vec<f64>, String)> {
    let round_trip = gbps(bytes, tf.all("tf_rt_ns")?);
    Ok((
        gbps(bytes, tf.all("tf_pause_ns")?),
        format!("round trip incl. exit+wait {:.2} GB/s", median(&round_trip)),
    ))
}

/// A GB/s row: samples of the measurement and of its baseline, medians compared.
fn throughput_row(
    name: String,
    samples: Vec<f64>,
    baseline_name: &str,
    baseline_samples: Vec<f64>,
    runs: usize,
    note: &str,
) -> Row {
    Row {
        group: "throughput",
        name,
        unit: "GB/s",
        value: median(&samples),
        baseline_name: baseline_name.into(),
        baseline: median(&baseline_samples),
        runs,
        samples,
        baseline_samples,
        note: note.to_string(),
    }
}

/// Samples VmRSS every ~5 ms: node1's origin sessions (the daemon's children and their
/// descendants), the teleforking program (the parent) and its children (the frozen fork).
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<MemPeak>,
}

#[derive(Default)]
struct MemPeak {
    sessions_peak_kb: u64,
    parent_peak_kb: u64,
    frozen_peak_kb: u64,
    /// Peak of the frozen fork's private memory (pages it no longer shares with the parent:
    /// copies made because of the telefork) plus the sessions' RSS, in one sample.
    extra_peak_kb: u64,
    frozen_private_peak_kb: u64,
    daemon_kb: u64,
    samples: u64,
}

impl Sampler {
    fn start(daemon: i32, parent: Arc<AtomicI32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut m = MemPeak::default();
            while !s.load(Ordering::SeqCst) {
                m.daemon_kb = m.daemon_kb.max(vm_rss_kb(daemon));
                let sessions: u64 = descendants(daemon).into_iter().map(vm_rss_kb).sum();
                m.sessions_peak_kb = m.sessions_peak_kb.max(sessions);
                let p = parent.load(Ordering::SeqCst);
                if p > 0 {
                    m.parent_peak_kb = m.parent_peak_kb.max(vm_rss_kb(p));
                    let kids = children(p);
                    let frozen: u64 = kids.iter().copied().map(vm_rss_kb).sum();
                    m.frozen_peak_kb = m.frozen_peak_kb.max(frozen);
                    let private: u64 = kids.iter().copied().map(private_kb).sum();
                    m.frozen_private_peak_kb = m.frozen_private_peak_kb.max(private);
                    m.extra_peak_kb = m.extra_peak_kb.max(sessions + private);
                }
                if sessions > 0 {
                    m.samples += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            m
        });
        Sampler { stop, handle }
    }

    fn stop(self) -> MemPeak {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or_default()
    }
}

fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn descendants(pid: i32) -> Vec<i32> {
    let mut out = vec![];
    let mut todo = children(pid);
    while let Some(p) = todo.pop() {
        out.push(p);
        todo.extend(children(p));
    }
    out
}

/// Private memory of a process (smaps_rollup Private_Clean + Private_Dirty): for a fork,
/// what it no longer shares with its parent.
fn private_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.strip_prefix("Private_Clean:").or_else(|| l.strip_prefix("Private_Dirty:"))
        })
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn vm_rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:").and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
        })
        .unwrap_or(0)
}

/// The machine line; `reporting_order`: `free_page_reporting_order`.
fn machine(reporting_order: Option<u32>) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
        })
        .unwrap_or(0);
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mut line = format!(
        "{cores} cores {cpu}, {:.1} GiB RAM, Linux {kernel}",
        mem as f64 / (1 << 20) as f64
    );
    if let Some(order) = reporting_order {
        let block = 4u64
            .checked_shl(order)
            .map_or_else(|| format!("order {order}"), |kib| format!("{kib} KiB"));
        line.push_str(&format!("; a VM that hands freed memory back to its host (virtio-balloon free page reporting, {block} blocks)"));
    }
    line
}

/// The block order of free page reporting when a virtio-balloon device of this VM offers it
/// (feature bit 5, VIRTIO_BALLOON_F_REPORTING): the guest then hands freed memory back to its
/// host, and memory it takes again later costs a fault in the host first — what makes the big
/// sizes' fresh memory on the destination slow at random ("cold"). None on bare metal.
fn free_page_reporting_order() -> Option<u32> {
    let devices = std::fs::read_dir("/sys/bus/virtio/drivers/virtio_balloon").ok()?;
    let reports = devices.flatten().any(|d| {
        std::fs::read_to_string(d.path().join("features"))
            .is_ok_and(|f| f.as_bytes().get(5) == Some(&b'1'))
    });
    if !reports {
        return None;
    }
    std::fs::read_to_string("/sys/module/page_reporting/parameters/page_reporting_order")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn fmt_val(v: f64, unit: &str) -> String {
    match unit {
        "ms" if v < 10.0 => format!("{v:.2} ms"),
        "ms" => format!("{v:.1} ms"),
        "GB/s" => format!("{v:.2} GB/s"),
        _ => format!("{v:.1} {unit}"),
    }
}

fn fmt_ratio(r: &Row) -> String {
    if r.unit == "GB/s" {
        format!("{:.0} %", r.ratio() * 100.0)
    } else {
        format!("{:.2}×", r.ratio())
    }
}

fn print_table(a: &BenchArgs, machine: &str, rows: &[Row]) {
    println!("telefork bench — {machine}");
    println!("medians of {} runs; testbed nodes: network/UTS/mount namespaces on one host, veth+bridge; images in {IMG_DIR} ({})", a.runs, fs_of(IMG_DIR));
    println!();
    let w0 = rows.iter().map(|r| r.name.chars().count()).max().unwrap_or(10).max(11);
    let w2 = rows.iter().map(|r| r.baseline_name.chars().count()).max().unwrap_or(8).max(8);
    println!(
        "{:<14} {:<w0$} {:>12}   {:<w2$} {:>12} {:>8}  note",
        "", "measurement", "value", "baseline", "value", "ratio"
    );
    let mut last = "";
    for r in rows {
        let g = if r.group != last { r.group } else { "" };
        last = r.group;
        println!(
            "{:<14} {:<w0$} {:>12}   {:<w2$} {:>12} {:>8}  {}",
            g,
            r.name,
            fmt_val(r.value, r.unit),
            r.baseline_name,
            fmt_val(r.baseline, r.unit),
            fmt_ratio(r),
            r.note
        );
    }
    println!();
    println!("ratio: time or memory = measurement / baseline (lower is better); GB/s = share of the baseline's throughput reached.");
    println!("origin memory: peak over 5 ms samples of the RSS of node1's origin session process(es) (children of its daemon) plus the frozen");
    println!("  fork's private memory (pages copied since the fork), against the process's own VmRSS; the pages the frozen fork still");
    println!("  shares copy-on-write with the parent are not extra.");
}

fn fs_of(path: &str) -> String {
    // The filesystem of the image directory (its parent; the directory is gone by now).
    let p = Path::new(path).parent().unwrap_or(Path::new("/"));
    let names: [(i64, &str); 4] = [
        (0xEF53, "ext2/3/4"),
        (0x0102_1994, "tmpfs"),
        (0x5846_5342, "xfs"),
        (0x9123_683E, "btrfs"),
    ];
    match nix::sys::statfs::statfs(p) {
        Ok(s) => {
            let t = s.filesystem_type().0;
            names.iter().find(|(m, _)| *m == t).map_or_else(
                || format!("fs type {t:#x}"),
                |(_, n)| format!("{n} on {}", p.display()),
            )
        }
        Err(_) => "?".into(),
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn json_arr(v: &[f64]) -> String {
    format!("[{}]", v.iter().map(|x| json_num(*x)).collect::<Vec<_>>().join(","))
}

fn to_json(
    a: &BenchArgs,
    machine: &str,
    nodes_cc: &str,
    reporting_order: Option<u32>,
    rows: &[Row],
) -> String {
    let rows: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"group\":{},\"name\":{},\"unit\":{},\"value\":{},\"baseline_name\":{},\"baseline\":{},\"ratio\":{},\"runs\":{},\"samples\":{},\"baseline_samples\":{},\"note\":{}}}",
                json_str(r.group),
                json_str(&r.name),
                json_str(r.unit),
                json_num(r.value),
                json_str(&r.baseline_name),
                json_num(r.baseline),
                json_num(r.ratio()),
                r.runs,
                json_arr(&r.samples),
                json_arr(&r.baseline_samples),
                json_str(&r.note)
            )
        })
        .collect();
    format!(
        "{{\"machine\":{},\"congestion_control\":{},\"free_page_reporting_order\":{},\"runs\":{},\"sizes_mib\":[{}],\"image_dir\":{},\"measurements\":[{}]}}",
        json_str(machine),
        json_str(nodes_cc),
        reporting_order.map_or_else(|| "null".to_string(), |o| o.to_string()),
        a.runs,
        a.sizes_mib.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","),
        json_str(IMG_DIR),
        rows.join(",")
    )
}

/// SIGINT/SIGTERM/SIGHUP: kill what we started, tear the testbed down, exit 130. The signals
/// are blocked in every thread and taken by one thread with sigwait (children get a clean
/// mask from std's spawn).
fn install_signal_handler() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("bench: {sig:?}: stopping, tearing the testbed down");
            let pids = CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for p in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Signal::SIGKILL);
            }
            let _ = telefork_testbed::down_prefixed(Path::new(DIR), PREFIX);
            let _ = std::fs::remove_dir_all(IMG_DIR);
            std::process::exit(130);
        }
    });
}
