//! `telefork bench --quick --json`, end to end: the bench brings up its own testbed, runs every
//! measurement and its baselines' helper programs (benchprog's sinks, relays, the state moved
//! by hand, the background pause's floor, raw TCP on reno), and reports each promised row with
//! a measured value. A smoke test of the benchmark, not a timed test: no speed is asserted — only that
//! every number was measured (positive and finite) and the run left no testbed behind.
//! Needs root and iproute2 (CI has both): without them it fails, naming what is missing.

use std::path::Path;
use std::process::Command;

use telefork_testbed as tb;

/// Rows every quick run must report (by a part of their name), with what they measure.
const PROMISED: [&str; 13] = [
    "call → child's first instruction on node2",
    "round trip: telefork + exit(0) + wait",
    "hand-overs only: relay → node2",
    "state moved by hand: mappings, written pages",
    "round trip (the same), against the state moved by hand",
    "telefork(background) returns",
    "floor: fork + pidfd_open + the request",
    "telefork(background), against that floor",
    "64 GiB reserved, 10 MiB touched",
    "256 MiB telefork until it runs on node2 (TLS)",
    "256 MiB telefork until it runs on node2 (plain)",
    "256 MiB restore from file (until it runs)",
    "256 MiB: extra memory on node1",
];

#[test]
fn quick_bench_measures_every_row() {
    tb::check_host().unwrap_or_else(|e| panic!("cannot run here: {e:#}"));
    let bin = env!("CARGO_BIN_EXE_telefork");
    bench_binaries_built(bin);
    let out = Command::new(bin)
        .args(["bench", "--quick", "--json"])
        .output()
        .expect("running telefork bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "telefork bench --quick failed ({}):\n{stderr}", out.status);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("bench --json printed no JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout))
    });
    let rows = report["measurements"].as_array().expect("a measurements array");
    for want in PROMISED {
        let row = rows
            .iter()
            .find(|r| r["name"].as_str().is_some_and(|n| n.contains(want)))
            .unwrap_or_else(|| panic!("no row {want:?} in the report:\n{report:#}"));
        for field in ["value", "baseline", "ratio"] {
            let v = row[field].as_f64().unwrap_or(f64::NAN);
            assert!(
                v.is_finite() && v > 0.0,
                "row {want:?}: {field} is {} — not measured:\n{row:#}",
                row[field]
            );
        }
    }
    // The nodes' congestion control is named, and raw TCP on reno (the link without pacing)
    // stands beside each throughput row, one per size and transport, unless the nodes are on
    // reno already (then there is none).
    let congestion = report["congestion_control"].as_str().unwrap_or_default();
    assert!(!congestion.is_empty(), "the report names no congestion control:\n{report:#}");
    let unpaced: Vec<&serde_json::Value> =
        rows.iter().filter(|r| r["baseline_name"] == "raw TCP plaintext, reno").collect();
    if congestion == "reno" {
        assert!(unpaced.is_empty(), "nodes on reno: no separate reno rows expected:\n{report:#}");
    } else {
        for mib in [64, 256] {
            for transport in ["TLS", "plain"] {
                let name = format!("{mib} MiB telefork until it runs on node2 ({transport})");
                let beside: Vec<_> =
                    unpaced.iter().filter(|r| r["name"] == name.as_str()).collect();
                assert_eq!(beside.len(), 1, "one raw TCP on reno row beside {name:?}:\n{report:#}");
                let v = beside[0]["baseline"].as_f64().unwrap_or(f64::NAN);
                assert!(
                    v.is_finite() && v > 0.0,
                    "raw TCP on reno was not measured:\n{:#}",
                    beside[0]
                );
            }
        }
        assert_eq!(unpaced.len(), 4, "reno rows beyond the four throughput rows:\n{report:#}");
    }
    // Whether this machine hands freed memory back to a VM host is said (the order of its
    // reporting blocks, or null on bare metal), and the machine line says the same.
    let reporting = &report["free_page_reporting_order"];
    let machine = report["machine"].as_str().unwrap_or_default();
    match reporting.as_u64() {
        Some(_) => assert!(
            machine.contains("free page reporting"),
            "an order but no word of it in the machine line:\n{report:#}"
        ),
        None => {
            assert!(
                reporting.is_null(),
                "free_page_reporting_order is neither a number nor null:\n{report:#}"
            );
            assert!(
                !machine.contains("free page reporting"),
                "the machine line speaks of reporting, the field does not:\n{report:#}"
            );
        }
    }
    // Every row measured, not only the promised ones.
    for row in rows {
        let v = row["value"].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "row {} was not measured:\n{row:#}", row["name"]);
    }
    // The bench's testbed is gone (its namespaces have the prefix tfb-).
    let netns = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let left: Vec<String> = String::from_utf8_lossy(&netns.stdout)
        .lines()
        .filter(|l| l.starts_with("tfb-"))
        .map(String::from)
        .collect();
    assert!(left.is_empty(), "the bench left network namespaces behind: {left:?}");
}

/// `telefork bench` runs the telefork-bench binary next to telefork, which runs benchprog next to
/// it: both are another crate's (crates/bench), which this test's build does not make.
fn bench_binaries_built(telefork: &str) {
    let dir = Path::new(telefork).parent().unwrap();
    for name in ["telefork-bench", "benchprog"] {
        let path = dir.join(name);
        assert!(
            path.is_file(),
            "{} is missing: run `cargo build --release --workspace --bins` first",
            path.display()
        );
    }
}

/// `--congestion-control` with a name the kernel lacks: the bench stops with an error naming
/// it and what a namespace may take, after tearing its testbed down; a malformed name is
/// refused before any testbed is made.
#[test]
fn unknown_congestion_control_is_an_error_and_leaves_nothing() {
    tb::check_host().unwrap_or_else(|e| panic!("cannot run here: {e:#}"));
    let bin = env!("CARGO_BIN_EXE_telefork");
    bench_binaries_built(bin);
    for (name, expect) in
        [("nosuchcc", "tcp_allowed_congestion_control"), ("no such", "1-15 letters")]
    {
        let out = Command::new(bin)
            .args(["bench", "--quick", "--congestion-control", name])
            .output()
            .expect("running telefork bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "bench --congestion-control {name:?} succeeded:\n{stderr}");
        assert!(
            stderr.contains(name) && stderr.contains(expect),
            "the error should name {name:?} and say {expect:?}:\n{stderr}"
        );
        let netns = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
        assert!(
            !String::from_utf8_lossy(&netns.stdout).lines().any(|l| l.starts_with("tfb-")),
            "testbed left behind after {name:?}"
        );
    }
}
